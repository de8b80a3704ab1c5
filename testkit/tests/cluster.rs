//! A real Redis Cluster from `Cluster`: it starts with every slot served and every primary
//! replicated; a killed primary's replica takes over; a manual failover swaps roles; a slot
//! moves with its keys, also to an added node; a cluster without full coverage serves the
//! healthy shards; passwords and TLS are required where configured; drop cleans up.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use ssegw_testkit::{
    slot_of, Authority, Cluster, ClusterOptions, Reply, ServerOptions, TlsOptions, SLOTS,
};

fn start(options: ClusterOptions) -> Cluster {
    Cluster::start(options).unwrap_or_else(|e| panic!("a cluster did not start: {e}"))
}

fn ok() -> Reply {
    Reply::Status("OK".into())
}

fn bulk(text: &str) -> Reply {
    Reply::Bulk(text.as_bytes().to_vec())
}

/// The first word of a node's `ROLE` reply: "master" or "slave".
fn role(cluster: &Cluster, addr: &str) -> String {
    let reply = cluster.command(addr, &["ROLE"]).unwrap();
    reply.as_array().unwrap()[0].as_str().unwrap().to_string()
}

/// A field of a node's `CLUSTER INFO`.
fn cluster_info(cluster: &Cluster, addr: &str, field: &str) -> String {
    let reply = cluster.command(addr, &["CLUSTER", "INFO"]).unwrap();
    let prefix = format!("{field}:");
    reply
        .as_str()
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{addr} has no {field} in CLUSTER INFO"))
        .to_string()
}

/// Sets `key` on the primary at `addr` and waits until its replica has it too. (`WAIT`
/// counts acknowledgements of the writes made on its own connection.)
fn write_replicated(cluster: &Cluster, addr: &str, key: &str, value: &str) {
    let mut primary = cluster.connect(addr).unwrap();
    assert_eq!(primary.command(&["SET", key, value]).unwrap(), ok());
    assert_eq!(
        primary.command(&["WAIT", "1", "5000"]).unwrap(),
        Reply::Integer(1)
    );
}

/// The slot ranges `CLUSTER SLOTS` on `addr` lists, in order, each with its primary's port.
fn slot_ranges(cluster: &Cluster, addr: &str) -> Vec<(i64, i64, i64)> {
    let reply = cluster.command(addr, &["CLUSTER", "SLOTS"]).unwrap();
    let mut ranges: Vec<_> = reply
        .as_array()
        .unwrap()
        .iter()
        .map(|range| {
            let range = range.as_array().unwrap();
            let port = range[2].as_array().unwrap()[1].as_integer().unwrap();
            (
                range[0].as_integer().unwrap(),
                range[1].as_integer().unwrap(),
                port,
            )
        })
        .collect();
    ranges.sort();
    ranges
}

#[test]
fn a_started_cluster_serves_every_slot_from_three_replicated_primaries() {
    let cluster = start(ClusterOptions::default());
    assert_eq!(cluster.nodes().len(), 6);
    let seeds = cluster.seeds();
    assert_eq!(seeds.len(), 6);
    let primaries = cluster.primaries().unwrap();
    assert_eq!(primaries.len(), 3, "{primaries:?}");
    let mut replicas: Vec<String> = primaries
        .iter()
        .map(|primary| cluster.replica_of(primary).unwrap())
        .collect();
    replicas.sort();
    replicas.dedup();
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    for primary in &primaries {
        assert_eq!(role(&cluster, primary), "master");
        assert!(!replicas.contains(primary));
    }
    for replica in &replicas {
        assert_eq!(role(&cluster, replica), "slave");
    }
    // Every node sees the same three contiguous ranges, covering every slot.
    let ranges = slot_ranges(&cluster, &seeds[0]);
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert_eq!(ranges[0].0, 0);
    assert_eq!(ranges[2].1, i64::from(SLOTS) - 1);
    assert_eq!(ranges[1].0, ranges[0].1 + 1);
    assert_eq!(ranges[2].0, ranges[1].1 + 1);
    for addr in &seeds {
        assert_eq!(slot_ranges(&cluster, addr), ranges, "{addr}");
        assert_eq!(cluster_info(&cluster, addr, "cluster_state"), "ok");
        assert_eq!(
            cluster_info(&cluster, addr, "cluster_slots_assigned"),
            "16384"
        );
        assert_eq!(cluster_info(&cluster, addr, "cluster_known_nodes"), "6");
        assert_eq!(cluster_info(&cluster, addr, "cluster_size"), "3");
    }
    for (first, last, port) in &ranges {
        let owner = format!("127.0.0.1:{port}");
        assert_eq!(cluster.owner_of_slot(*first as u16).unwrap(), owner);
        assert_eq!(cluster.owner_of_slot(*last as u16).unwrap(), owner);
    }
    // The hash slot computed here is the server's.
    for key in [
        "foo",
        "bar",
        "hello",
        "{user1000}.following",
        "",
        "a{b}c",
        "ssegw:t:x",
    ] {
        let expected = i64::from(slot_of(key));
        assert_eq!(
            cluster
                .command(&seeds[0], &["CLUSTER", "KEYSLOT", key])
                .unwrap(),
            Reply::Integer(expected),
            "{key:?}"
        );
    }
    // A key is served by its slot's owner, replicated to its replica, and redirected elsewhere.
    let owner = cluster.owner_of_slot(slot_of("k")).unwrap();
    write_replicated(&cluster, &owner, "k", "v");
    assert_eq!(cluster.command(&owner, &["GET", "k"]).unwrap(), bulk("v"));
    let other = primaries.iter().find(|p| **p != owner).unwrap();
    let Reply::Error(moved) = cluster.command(other, &["GET", "k"]).unwrap() else {
        panic!("{other} served a key of {owner}'s");
    };
    assert_eq!(moved, format!("MOVED {} {owner}", slot_of("k")));
    // Dropped, the cluster leaves no process and no directory behind.
    let dir = cluster.dir().to_path_buf();
    assert!(dir
        .join(format!("nodes-{}.conf", cluster.nodes()[0].port()))
        .is_file());
    let addrs: Vec<_> = cluster.nodes().iter().map(|node| node.addr()).collect();
    drop(cluster);
    for addr in addrs {
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
            "{addr}"
        );
    }
    assert!(!dir.exists(), "{}", dir.display());
}

#[test]
fn a_killed_primary_is_replaced_by_its_replica_with_the_data() {
    let mut cluster = start(ClusterOptions::default());
    let slot = slot_of("k");
    let old = cluster.owner_of_slot(slot).unwrap();
    let replica = cluster.replica_of(&old).unwrap();
    write_replicated(&cluster, &old, "k", "before");
    let killed = Instant::now();
    cluster.server_at(&old).unwrap().kill();
    let new = cluster
        .wait_for_new_owner(slot, &old, Duration::from_secs(20))
        .unwrap();
    eprintln!("a replica took over {:?} after the kill", killed.elapsed());
    assert_eq!(new, replica);
    assert_eq!(role(&cluster, &new), "master");
    assert_eq!(cluster.owner_of_slot(slot).unwrap(), new);
    assert!(!cluster.primaries().unwrap().contains(&old));
    assert_eq!(
        cluster.command(&new, &["GET", "k"]).unwrap(),
        bulk("before")
    );
    assert_eq!(cluster.command(&new, &["SET", "k", "after"]).unwrap(), ok());
    for addr in cluster.seeds().iter().filter(|addr| **addr != old) {
        assert_eq!(
            cluster_info(&cluster, addr, "cluster_state"),
            "ok",
            "{addr}"
        );
    }
}

#[test]
fn failover_swaps_a_primary_and_its_replica_and_keeps_the_data() {
    let cluster = start(ClusterOptions::default());
    let slot = slot_of("k");
    let old = cluster.owner_of_slot(slot).unwrap();
    let replica = cluster.replica_of(&old).unwrap();
    write_replicated(&cluster, &old, "k", "before");
    cluster.failover(&replica).unwrap();
    assert_eq!(role(&cluster, &replica), "master");
    assert_eq!(role(&cluster, &old), "slave");
    assert_eq!(cluster.owner_of_slot(slot).unwrap(), replica);
    assert_eq!(cluster.replica_of(&replica).unwrap(), old);
    assert_eq!(
        cluster.command(&replica, &["GET", "k"]).unwrap(),
        bulk("before")
    );
    // The old primary now follows the new one.
    write_replicated(&cluster, &replica, "k", "after");
    let mut old_primary = cluster.connect(&old).unwrap();
    assert_eq!(old_primary.command(&["READONLY"]).unwrap(), ok());
    assert_eq!(old_primary.command(&["GET", "k"]).unwrap(), bulk("after"));
}

#[test]
fn a_migrated_slot_takes_its_keys_to_the_new_owner() {
    let cluster = start(ClusterOptions::default());
    let (string, stream) = ("{moving}.string", "{moving}.stream");
    let slot = slot_of(string);
    assert_eq!(slot_of(stream), slot);
    let from = cluster.owner_of_slot(slot).unwrap();
    let to = cluster
        .primaries()
        .unwrap()
        .into_iter()
        .find(|primary| *primary != from)
        .unwrap();
    assert_eq!(cluster.command(&from, &["SET", string, "v"]).unwrap(), ok());
    let id = cluster
        .command(&from, &["XADD", stream, "*", "field", "value"])
        .unwrap();
    let id = id.as_str().unwrap().to_string();
    cluster.migrate_slot(slot, &to).unwrap();
    assert_eq!(cluster.owner_of_slot(slot).unwrap(), to);
    assert_eq!(cluster.command(&to, &["GET", string]).unwrap(), bulk("v"));
    assert_eq!(
        cluster.command(&to, &["XRANGE", stream, "-", "+"]).unwrap(),
        Reply::Array(vec![Reply::Array(vec![
            bulk(&id),
            Reply::Array(vec![bulk("field"), bulk("value")]),
        ])])
    );
    assert_eq!(
        cluster
            .command(&from, &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])
            .unwrap(),
        Reply::Integer(0)
    );
    let Reply::Error(moved) = cluster.command(&from, &["GET", string]).unwrap() else {
        panic!("{from} still serves slot {slot}");
    };
    assert_eq!(moved, format!("MOVED {slot} {to}"));
    // The neighbours of the slot stay where they were.
    assert_eq!(cluster.owner_of_slot(slot - 1).unwrap(), from);
    assert_eq!(cluster.owner_of_slot(slot + 1).unwrap(), from);
}

#[test]
fn an_added_node_is_an_empty_primary_until_a_slot_is_migrated_to_it() {
    let mut cluster = start(ClusterOptions::default());
    let new = cluster.add_node().unwrap();
    assert_eq!(cluster.nodes().len(), 7);
    assert!(cluster.seeds().contains(&new));
    assert!(cluster.primaries().unwrap().contains(&new));
    assert_eq!(role(&cluster, &new), "master");
    for addr in cluster.seeds() {
        assert_eq!(cluster_info(&cluster, &addr, "cluster_known_nodes"), "7");
    }
    let slot = slot_of("k");
    let old = cluster.owner_of_slot(slot).unwrap();
    assert_eq!(cluster.command(&old, &["SET", "k", "v"]).unwrap(), ok());
    cluster.migrate_slot(slot, &new).unwrap();
    assert_eq!(cluster.owner_of_slot(slot).unwrap(), new);
    assert_eq!(cluster.command(&new, &["GET", "k"]).unwrap(), bulk("v"));
    assert_eq!(cluster.command(&new, &["SET", "k", "w"]).unwrap(), ok());
    assert_eq!(cluster_info(&cluster, &new, "cluster_state"), "ok");
}

#[test]
fn without_full_coverage_the_healthy_shards_serve_while_a_primary_is_down() {
    let mut cluster = start(ClusterOptions {
        replicas_per_primary: 0,
        require_full_coverage: false,
        ..ClusterOptions::default()
    });
    assert_eq!(cluster.nodes().len(), 3);
    let down_slot = slot_of("down");
    let dead = cluster.owner_of_slot(down_slot).unwrap();
    // A key of another shard than the one about to go down.
    let key = (0..)
        .map(|n| format!("up-{n}"))
        .find(|key| cluster.owner_of_slot(slot_of(key)).unwrap() != dead)
        .unwrap();
    let alive = cluster.owner_of_slot(slot_of(&key)).unwrap();
    cluster.server_at(&dead).unwrap().kill();
    cluster
        .wait_for_fail(&dead, Duration::from_secs(20))
        .unwrap();
    assert_eq!(cluster_info(&cluster, &alive, "cluster_state"), "ok");
    assert_eq!(cluster.command(&alive, &["SET", &key, "v"]).unwrap(), ok());
    assert_eq!(cluster.command(&alive, &["GET", &key]).unwrap(), bulk("v"));
    // Nobody serves the dead primary's slots: the live nodes still send their keys to it.
    assert_eq!(cluster.owner_of_slot(down_slot).unwrap(), dead);
    assert_eq!(
        cluster.command(&alive, &["GET", "down"]).unwrap(),
        Reply::Error(format!("MOVED {down_slot} {dead}"))
    );
}

#[test]
fn a_password_protected_cluster_forms_and_migrates_with_auth() {
    let cluster = start(ClusterOptions {
        password: Some("cluster-secret".into()),
        ..ClusterOptions::default()
    });
    let seeds = cluster.seeds();
    for addr in &seeds {
        let Reply::Error(refusal) = ssegw_testkit::command(addr, &["PING"]).unwrap() else {
            panic!("{addr} answered PING without a password");
        };
        assert!(refusal.starts_with("NOAUTH"), "{refusal}");
    }
    // The cluster's own `command` authenticates; replication authenticates with masterauth.
    let slot = slot_of("k");
    let from = cluster.owner_of_slot(slot).unwrap();
    write_replicated(&cluster, &from, "k", "v");
    // MIGRATE authenticates to the target with the password.
    let to = cluster
        .primaries()
        .unwrap()
        .into_iter()
        .find(|primary| *primary != from)
        .unwrap();
    cluster.migrate_slot(slot, &to).unwrap();
    assert_eq!(cluster.command(&to, &["GET", "k"]).unwrap(), bulk("v"));
}

#[test]
fn a_tls_cluster_speaks_tls_only_and_migrates_and_fails_over_over_tls() {
    let dir =
        std::env::temp_dir().join(format!("ssegw-testkit-cluster-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let authority = Authority::create(&dir, "cluster").unwrap();
    let cluster = start(ClusterOptions {
        server: ServerOptions {
            // Always redis-server: `./test` runs this file again with SSEGW_REDIS_SERVER naming
            // Valkey's wheel, which is built without TLS.
            binary: "redis-server".into(),
            tls: Some(TlsOptions {
                authority,
                require_client_cert: true,
            }),
            ..ServerOptions::default()
        },
        ..ClusterOptions::default()
    });
    let seeds = cluster.seeds();
    // Plain text gets no Redis answer.
    let reply = ssegw_testkit::Connection::open(&seeds[0], Duration::from_secs(2))
        .and_then(|mut plain| plain.command(&["PING"]));
    assert!(
        reply.is_err(),
        "{} answered plain text: {reply:?}",
        seeds[0]
    );
    // The nodes name each other by their TLS ports.
    let ranges = slot_ranges(&cluster, &seeds[0]);
    let ports: Vec<_> = cluster
        .nodes()
        .iter()
        .map(|n| i64::from(n.port()))
        .collect();
    assert!(
        ranges.iter().all(|(_, _, port)| ports.contains(port)),
        "{ranges:?}"
    );
    // Replication, MIGRATE and a failover all run over TLS.
    let slot = slot_of("k");
    let from = cluster.owner_of_slot(slot).unwrap();
    write_replicated(&cluster, &from, "k", "v");
    let to = cluster
        .primaries()
        .unwrap()
        .into_iter()
        .find(|primary| *primary != from)
        .unwrap();
    cluster.migrate_slot(slot, &to).unwrap();
    assert_eq!(cluster.command(&to, &["GET", "k"]).unwrap(), bulk("v"));
    let replica = cluster.replica_of(&to).unwrap();
    cluster.failover(&replica).unwrap();
    assert_eq!(cluster.owner_of_slot(slot).unwrap(), replica);
    assert_eq!(cluster.command(&replica, &["GET", "k"]).unwrap(), bulk("v"));
    drop(cluster);
    std::fs::remove_dir_all(&dir).unwrap();
}
