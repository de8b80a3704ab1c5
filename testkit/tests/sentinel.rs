//! A real Sentinel group (a master, replicas, three sentinels) from `Sentinel`: it starts with
//! every sentinel agreeing on the master; `failover()` moves the master and keeps the data; a
//! killed master is replaced; passwords are required where configured; a group speaks TLS
//! only when asked, and fails over all the same; drop cleans up.

use std::net::TcpStream;
use std::time::Duration;

use ssegw_testkit::{Authority, Reply, Sentinel, SentinelOptions, ServerOptions, TlsOptions};

fn start(options: SentinelOptions) -> Sentinel {
    Sentinel::start(options).unwrap_or_else(|e| panic!("a Sentinel group did not start: {e}"))
}

fn ok() -> Reply {
    Reply::Status("OK".into())
}

fn bulk(text: &str) -> Reply {
    Reply::Bulk(text.as_bytes().to_vec())
}

/// Sets `key` on the master at `addr` and waits until `replicas` replicas have it. (`WAIT`
/// counts acknowledgements of the writes made on its own connection.)
fn write_everywhere(group: &Sentinel, addr: &str, key: &str, value: &str, replicas: i64) {
    let mut master = group.connect(addr).unwrap();
    assert_eq!(master.command(&["SET", key, value]).unwrap(), ok());
    assert_eq!(
        master
            .command(&["WAIT", &replicas.to_string(), "5000"])
            .unwrap(),
        Reply::Integer(replicas)
    );
}

/// The first word of a data node's `ROLE` reply: "master" or "slave".
fn role(group: &Sentinel, addr: &str) -> String {
    let reply = group.command(addr, &["ROLE"]).unwrap();
    reply.as_array().unwrap()[0].as_str().unwrap().to_string()
}

#[test]
fn a_started_group_has_one_master_that_every_sentinel_names() {
    let group = start(SentinelOptions {
        replicas: 2,
        ..SentinelOptions::default()
    });
    assert_eq!(group.master_name(), "ssegw");
    assert_eq!(group.sentinels().len(), 3);
    assert_eq!(group.servers().len(), 3);
    let master = group.master_addr().unwrap();
    assert_eq!(
        master,
        format!("127.0.0.1:{}", group.master().unwrap().port())
    );
    assert_eq!(master, format!("127.0.0.1:{}", group.servers()[0].port()));
    for sentinel in group.sentinel_addrs() {
        let reply = group
            .command(&sentinel, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "ssegw"])
            .unwrap();
        let port = group.servers()[0].port().to_string();
        assert_eq!(
            reply,
            Reply::Array(vec![bulk("127.0.0.1"), bulk(&port)]),
            "{sentinel}"
        );
    }
    assert_eq!(role(&group, &master), "master");
    for replica in &group.servers()[1..] {
        assert_eq!(
            role(&group, &format!("127.0.0.1:{}", replica.port())),
            "slave"
        );
    }
    // A write on the master reaches the replicas.
    write_everywhere(&group, &master, "k", "v", 2);
    for replica in &group.servers()[1..] {
        let addr = format!("127.0.0.1:{}", replica.port());
        assert_eq!(group.command(&addr, &["GET", "k"]).unwrap(), bulk("v"));
    }
}

#[test]
fn failover_makes_a_replica_the_master_with_the_data_and_the_old_master_its_replica() {
    let group = start(SentinelOptions::default());
    let old = group.master_addr().unwrap();
    write_everywhere(&group, &old, "k", "before", 1);
    let new = group.failover().unwrap();
    assert_ne!(new, old);
    assert_eq!(group.master_addr().unwrap(), new);
    assert_eq!(format!("127.0.0.1:{}", group.master().unwrap().port()), new);
    assert_eq!(role(&group, &new), "master");
    assert_eq!(role(&group, &old), "slave");
    assert_eq!(group.command(&new, &["GET", "k"]).unwrap(), bulk("before"));
    // The old master now follows the new one.
    write_everywhere(&group, &new, "k", "after", 1);
    assert_eq!(group.command(&old, &["GET", "k"]).unwrap(), bulk("after"));
}

#[test]
fn a_killed_master_is_replaced_by_a_replica_that_takes_writes() {
    let mut group = start(SentinelOptions::default());
    let old = group.master_addr().unwrap();
    group.master_mut().unwrap().kill();
    let new = group
        .wait_for_new_master(&old, Duration::from_secs(30))
        .unwrap();
    assert_ne!(new, old);
    assert_eq!(group.master_addr().unwrap(), new);
    assert_eq!(group.command(&new, &["SET", "k", "v"]).unwrap(), ok());
    assert_eq!(group.command(&new, &["GET", "k"]).unwrap(), bulk("v"));
}

#[test]
fn passwords_are_required_of_clients_of_the_nodes_and_of_the_sentinels() {
    let group = start(SentinelOptions {
        password: Some("node-secret".into()),
        sentinel_password: Some("sentinel-secret".into()),
        ..SentinelOptions::default()
    });
    let master = group.master_addr().unwrap();
    let sentinel = &group.sentinel_addrs()[0];
    for addr in [&master, sentinel] {
        let Reply::Error(refusal) = ssegw_testkit::command(addr, &["PING"]).unwrap() else {
            panic!("{addr} answered PING without a password");
        };
        assert!(refusal.starts_with("NOAUTH"), "{refusal}");
    }
    // The group's own `command` authenticates as each kind of process requires.
    assert_eq!(
        group.command(&master, &["PING"]).unwrap(),
        Reply::Status("PONG".into())
    );
    assert_eq!(
        group.command(sentinel, &["PING"]).unwrap(),
        Reply::Status("PONG".into())
    );
}

#[test]
fn a_dropped_group_is_killed_and_its_directory_removed() {
    let group = start(SentinelOptions::default());
    let dir = group.dir().to_path_buf();
    assert!(dir.join("sentinel-0.conf").is_file());
    let addrs: Vec<_> = group
        .servers()
        .iter()
        .chain(group.sentinels())
        .map(|server| server.addr())
        .collect();
    drop(group);
    for addr in addrs {
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
            "{addr}"
        );
    }
    assert!(!dir.exists(), "{}", dir.display());
}

#[test]
fn a_tls_group_speaks_tls_only_replicates_and_fails_over() {
    let dir =
        std::env::temp_dir().join(format!("ssegw-testkit-sentinel-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let authority = Authority::create(&dir, "group").unwrap();
    let group = start(SentinelOptions {
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
        ..SentinelOptions::default()
    });
    let old = group.master_addr().unwrap();
    assert_eq!(old, format!("127.0.0.1:{}", group.servers()[0].port()));
    let port = group.servers()[0].port().to_string();
    for sentinel in group.sentinel_addrs() {
        let reply = group
            .command(&sentinel, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "ssegw"])
            .unwrap();
        assert_eq!(
            reply,
            Reply::Array(vec![bulk("127.0.0.1"), bulk(&port)]),
            "{sentinel}"
        );
    }
    // Plain text gets no Redis answer from a node or a sentinel.
    for addr in [&old, &group.sentinel_addrs()[0]] {
        let reply = ssegw_testkit::Connection::open(addr, Duration::from_secs(2))
            .and_then(|mut plain| plain.command(&["PING"]));
        assert!(reply.is_err(), "{addr} answered plain text: {reply:?}");
    }
    // Replication runs over TLS, and so does everything a failover takes.
    write_everywhere(&group, &old, "k", "before", 1);
    let new = group.failover().unwrap();
    assert_ne!(new, old);
    assert_eq!(group.master_addr().unwrap(), new);
    assert_eq!(role(&group, &new), "master");
    assert_eq!(role(&group, &old), "slave");
    assert_eq!(group.command(&new, &["GET", "k"]).unwrap(), bulk("before"));
    write_everywhere(&group, &new, "k", "after", 1);
    assert_eq!(group.command(&old, &["GET", "k"]).unwrap(), bulk("after"));
    drop(group);
    std::fs::remove_dir_all(&dir).unwrap();
}
