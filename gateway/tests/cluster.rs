//! Redis Cluster (3 primaries, 3 replicas, real processes): topics on every shard, clients on
//! two gateway replicas, multi-topic connections and resume cursors across shards, publishing
//! from a cluster-aware `redis-cli -c`; then, with a publisher running all along, in turn: the
//! SIGKILL of a primary, `CLUSTER FAILOVER` on a replica, the migration of a hot topic's slot,
//! and a node added with a slot moved to it. Every client gets every acknowledged event exactly
//! once and in order (no gap: `--publish-replicas 1`); readiness drops while a shard is
//! unreachable, and only then. A cluster that speaks TLS only, with client certificates and a
//! password, is served the same way, and a primary that lost the function library gets it
//! back. The Mercure hub's log publishes and resumes across replicas on the log's shard.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ssegw_testkit::{
    slot_of, Authority, Cluster as RedisCluster, ClusterOptions, Reply, ServerOptions, TlsOptions,
};
use support::failover::{self, check_client, watch_readiness, Publisher};
use support::{strs, try_blocking_http_publish, wait_until, Gateway, Sse};

fn start_cluster() -> RedisCluster {
    RedisCluster::start(ClusterOptions::default())
        .expect("a 6-node cluster of redis-server processes")
}

/// The gateway's flags for this cluster, plus `extra`.
fn flags(cluster: &RedisCluster, extra: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = [
        "--redis-cluster",
        &cluster.seeds()[..2].join(","),
        "--redis-timeout",
        "1s",
        "--canary-interval",
        "100ms",
    ]
    .map(String::from)
    .to_vec();
    flags.extend(extra.iter().map(|f| f.to_string()));
    flags
}

/// `per_primary` topics on each primary, in the order of the primaries: `c<n>` names whose
/// slots fall there.
fn topics_on_every_primary(cluster: &RedisCluster, per_primary: usize) -> Vec<(String, String)> {
    let primaries = cluster.primaries().unwrap();
    let mut topics = Vec::new();
    for primary in &primaries {
        let mine = (0..)
            .map(|n| format!("c{n}"))
            .filter(|topic| cluster.owner_of_slot(slot_of(topic)).unwrap() == *primary)
            .take(per_primary);
        topics.extend(mine.map(|topic| (topic, primary.clone())));
    }
    topics
}

/// The topic's stream on the primary that owns it now: (id, data) in order.
fn stream(cluster: &RedisCluster, topic: &str) -> Vec<(String, String)> {
    let owner = cluster.owner_of_slot(slot_of(topic)).unwrap();
    let key = format!("ssegw:s:{{{topic}}}");
    let reply = cluster
        .command(&owner, &["XRANGE", &key, "-", "+"])
        .unwrap();
    failover::entries(&reply)
}

/// Publishes with `redis-cli -c` through a node that does not own the topic's slot: the
/// client follows `MOVED`, as any cluster-aware client does. Returns the id.
fn redis_cli_publish(cluster: &RedisCluster, topic: &str, data: &str) -> String {
    let owner = cluster.owner_of_slot(slot_of(topic)).unwrap();
    let other = cluster
        .primaries()
        .unwrap()
        .into_iter()
        .find(|p| *p != owner)
        .unwrap();
    let (host, port) = other.rsplit_once(':').unwrap();
    let output = std::process::Command::new("redis-cli")
        .args(["-c", "-h", host, "-p", port, "FCALL", "ssegw_publish", "1"])
        .arg(format!("ssegw:s:{{{topic}}}"))
        .arg(data)
        .output()
        .expect("redis-cli");
    let id = String::from_utf8(output.stdout).unwrap().trim().to_string();
    assert!(
        output.status.success() && id.contains('-'),
        "redis-cli answered {id:?}"
    );
    id
}

#[actix_web::test]
async fn delivers_and_resumes_across_shards() {
    let cluster = start_cluster();
    let flags = flags(&cluster, &[]);
    let a = Gateway::start(&strs(&flags));
    let b = Gateway::start(&strs(&flags));
    let topics = topics_on_every_primary(&cluster, 2);
    let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();

    // The library is on every primary, publishing on sharded channels.
    for primary in cluster.primaries().unwrap() {
        let reply = cluster
            .command(&primary, &["FCALL", "ssegw_channels", "0"])
            .unwrap();
        assert_eq!(reply, Reply::Bulk(b"sharded".to_vec()), "{primary}");
    }

    // One connection on every shard's topics.
    let query: Vec<String> = names.iter().map(|t| format!("topic={t}")).collect();
    let query = query.join("&");
    let mut sse = Sse::open(&a, &query, None).await;
    sse.baseline().await;
    let mut sent = Vec::new();
    for topic in &names {
        let data = format!("{topic} over HTTP");
        let id = try_blocking_http_publish(b.addr, topic, &data, None).unwrap();
        sent.push((topic.to_string(), id, data));
        let data = format!("{topic} from redis-cli -c");
        let id = redis_cli_publish(&cluster, topic, &data);
        sent.push((topic.to_string(), id, data));
    }
    // Each topic in order; topics on different shards arrive through different links, so
    // they may interleave otherwise than they were published.
    fn by_topic<'a>(data: &[&'a str]) -> Vec<&'a str> {
        let mut sorted = data.to_vec();
        sorted.sort_by_key(|d| d.split(' ').next().unwrap().to_string());
        sorted
    }
    let received = sse.take(sent.len()).await;
    let got: Vec<&str> = received.iter().map(|e| e.data.as_str()).collect();
    let want: Vec<&str> = sent.iter().map(|(_, _, d)| d.as_str()).collect();
    assert_eq!(by_topic(&got), by_topic(&want));

    // Resume on the other replica from the cursor of the fifth event: exactly what followed
    // it on the first connection, each topic in order.
    let cursor = received[4].id.clone();
    let mut resumed = Sse::open(&b, &query, Some(&cursor)).await;
    let rest = resumed.take(sent.len() - 5).await;
    let rest: Vec<&str> = rest.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(by_topic(&rest), by_topic(&got[5..]));
    resumed.assert_quiet(Duration::from_millis(300)).await;

    // A topic left and joined again at once, over and over: each new connection is brought
    // up to date and delivered to, whether or not its subscription was gone in between.
    for round in 0..10 {
        let mut again = Sse::open(&a, "topic=rejoined", None).await;
        again.baseline().await;
        let data = format!("round {round}");
        try_blocking_http_publish(b.addr, "rejoined", &data, None).unwrap();
        assert_eq!(again.next().await.data, data);
    }

    // One sharded pub/sub connection per replica on each primary, whatever the topics.
    for primary in cluster.primaries().unwrap() {
        let Reply::Bulk(list) = cluster
            .command(&primary, &["CLIENT", "LIST", "TYPE", "pubsub"])
            .unwrap()
        else {
            panic!("CLIENT LIST answers a bulk string");
        };
        let list = String::from_utf8(list).unwrap();
        assert_eq!(list.lines().count(), 2, "{primary}: {list}");
    }

    // A topic's events reach only the primary that owns it.
    for (topic, primary) in &topics {
        let key = format!("ssegw:s:{{{topic}}}");
        let len = cluster.command(primary, &["XLEN", &key]).unwrap();
        assert_eq!(len, Reply::Integer(2), "{topic} on {primary}");
    }
}

/// Runs `phase`, watching both replicas' readiness meanwhile; returns whether each dropped.
fn watching(replicas: &[&Gateway], phase: impl FnOnce()) -> Vec<bool> {
    let stop = Arc::new(AtomicBool::new(false));
    let watch = watch_readiness(replicas.iter().map(|g| g.addr).collect(), stop.clone());
    phase();
    for gw in replicas {
        support::Replica::wait_readyz(*gw, 200);
    }
    stop.store(true, Ordering::Release);
    watch.join().unwrap()
}

#[actix_web::test]
async fn faults_and_slot_moves_lose_no_acknowledged_event() {
    let mut cluster = start_cluster();
    let mut flags = flags(
        &cluster,
        &[
            "--publish-replicas",
            "1",
            "--publish-replicas-timeout",
            "500ms",
        ],
    );
    // A primary that takes over has one Redis timeout for its first canary before readiness
    // drops: room for a slow machine, since the handovers below must not drop it.
    let timeout = flags.iter().position(|f| f == "--redis-timeout").unwrap() + 1;
    flags[timeout] = "2s".into();
    let a = Gateway::start(&strs(&flags));
    let b = Gateway::start(&strs(&flags));
    let topics = topics_on_every_primary(&cluster, 2);
    let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
    let primaries = cluster.primaries().unwrap();
    let mut clients = Vec::new();
    for (name, gw) in [("a", &a), ("b", &b)] {
        for topic in &names {
            let mut sse = Sse::open(gw, &format!("topic={topic}"), None).await;
            sse.baseline().await;
            clients.push((
                format!("client of {topic} on {name}"),
                topic.to_string(),
                sse,
            ));
        }
    }
    let (publisher, publishing) = Publisher::start(&names, vec![a.addr, b.addr]);
    publisher.wait_for(30, "before the faults");

    // 1. SIGKILL of the first primary: its replica is promoted; readiness drops meanwhile.
    let killed = primaries[0].clone();
    let dropped = watching(&[&a, &b], || {
        cluster.server_at(&killed).unwrap().kill();
        cluster
            .wait_for_new_owner(slot_of(names[0]), &killed, Duration::from_secs(30))
            .expect("the replica promoted");
        publisher.wait_for(30, "after the kill");
    });
    assert_eq!(
        dropped,
        [true, true],
        "readiness never dropped while a shard was down"
    );
    // The killed node rejoins as a replica of the one that replaced it, so that publishes on
    // its shard can be confirmed again.
    cluster.server_at(&killed).unwrap().restart().unwrap();

    // 2. CLUSTER FAILOVER on the second primary's replica: nothing unreachable, no drop.
    let replica = cluster.replica_of(&primaries[1]).unwrap();
    let dropped = watching(&[&a, &b], || {
        cluster.failover(&replica).expect("CLUSTER FAILOVER");
        publisher.wait_for(30, "after the failover");
    });
    assert_eq!(dropped, [false, false], "readiness dropped in a failover");

    // 3. The hot topic's slot migrates from the third primary to the second's new one.
    let hot = names[4];
    let dropped = watching(&[&a, &b], || {
        cluster
            .migrate_slot(slot_of(hot), &replica)
            .expect("slot migration");
        publisher.wait_for(30, "after the migration");
    });
    assert_eq!(dropped, [false, false], "readiness dropped in a migration");
    assert_eq!(cluster.owner_of_slot(slot_of(hot)).unwrap(), replica);

    // 4. A new node joins, and another topic's slot moves to it.
    let added = cluster.add_node().expect("a new node");
    let moved = names[5];
    let dropped = watching(&[&a, &b], || {
        cluster
            .migrate_slot(slot_of(moved), &added)
            .expect("slot migration to the new node");
        publisher.wait_for(30, "after the move to the new node");
    });
    assert_eq!(
        dropped,
        [false, false],
        "readiness dropped when a node joined"
    );
    // The new primary got the function library when it took the slot.
    let reply = cluster
        .command(&added, &["FCALL", "ssegw_channels", "0"])
        .unwrap();
    assert_eq!(reply, Reply::Bulk(b"sharded".to_vec()));

    let by_topic = publisher.finish(publishing);
    for reply in publisher.refused.lock().unwrap().iter() {
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    }
    for (who, topic, mut sse) in clients {
        let events = sse.drain(Duration::from_millis(1500)).await;
        assert!(
            events.iter().all(|e| e.event != "ssegw-gap"),
            "{who}: a gap with --publish-replicas 1"
        );
        let kept = stream(&cluster, &topic);
        check_client(&who, &events, &topic, &by_topic[&topic], &kept);
        assert!(
            by_topic[&topic].len() >= 10,
            "{who}: only {} acknowledged",
            by_topic[&topic].len()
        );
    }
    wait_until("both replicas ready at the end", || {
        [&a, &b]
            .iter()
            .all(|gw| support::http_status(gw.addr, "GET", "/readyz") == Some(200))
    });
}

/// Every node speaks TLS only, requires a client certificate and a password: the gateway
/// reaches every primary with them. A primary that lost the function library (`FUNCTION
/// FLUSH`, as after a restart without persistence) is given it again at the next call.
#[actix_web::test]
async fn a_cluster_over_tls_with_a_password_and_a_lost_library() {
    let dir = support::tempdir("cluster-tls");
    let authority = Authority::create(&dir, "cluster").expect("test certificates");
    let cluster = RedisCluster::start(ClusterOptions {
        password: Some("cluster-pw-3f1".into()),
        server: ServerOptions {
            // Always redis-server: Valkey's wheel is built without TLS.
            binary: "redis-server".into(),
            tls: Some(TlsOptions {
                authority: authority.clone(),
                require_client_cert: true,
            }),
            ..ServerOptions::default()
        },
        ..ClusterOptions::default()
    })
    .expect("a 6-node cluster over TLS");
    let password = dir.join("password");
    std::fs::write(&password, "cluster-pw-3f1\n").unwrap();
    let [ca, cert, key, password] = [
        &authority.ca,
        &authority.client_cert,
        &authority.client_key,
        &password,
    ]
    .map(|path| path.display().to_string());
    let flags = flags(
        &cluster,
        &[
            "--redis-tls",
            "true",
            "--redis-ca-file",
            &ca,
            "--redis-client-cert",
            &cert,
            "--redis-client-key",
            &key,
            "--redis-password-file",
            &password,
        ],
    );
    let gw = Gateway::start(&strs(&flags));
    let topics = topics_on_every_primary(&cluster, 1);
    let query: Vec<String> = topics.iter().map(|(t, _)| format!("topic={t}")).collect();
    let mut sse = Sse::open(&gw, &query.join("&"), None).await;
    sse.baseline().await;
    for (topic, _) in &topics {
        // A multi-topic stream's ids are cursors over all its topics: the data tells.
        try_blocking_http_publish(gw.addr, topic, &format!("{topic} over TLS"), None).unwrap();
        assert_eq!(sse.next().await.data, format!("{topic} over TLS"));
    }

    let (topic, primary) = &topics[0];
    let flushed = cluster.command(primary, &["FUNCTION", "FLUSH"]).unwrap();
    assert_eq!(flushed, Reply::Status("OK".into()));
    try_blocking_http_publish(gw.addr, topic, "after FUNCTION FLUSH", None).unwrap();
    assert_eq!(sse.next().await.data, "after FUNCTION FLUSH");
    let reply = cluster
        .command(primary, &["FCALL", "ssegw_channels", "0"])
        .unwrap();
    assert_eq!(reply, Reply::Bulk(b"sharded".to_vec()));
}

/// Without `--publish-replicas`, a primary killed before its replica had the newest events
/// loses them: each client gets every event the promoted replica kept, once and in order, and
/// a `lost` gap (never a silent one) for acknowledged events that are gone.
#[actix_web::test]
async fn a_killed_primary_without_publish_replicas_loses_nothing_silently() {
    let mut cluster = start_cluster();
    let flags = flags(&cluster, &[]);
    let a = Gateway::start(&strs(&flags));
    let b = Gateway::start(&strs(&flags));
    let topics = topics_on_every_primary(&cluster, 1);
    let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
    let mut clients = Vec::new();
    for (name, gw) in [("a", &a), ("b", &b)] {
        for topic in &names {
            let mut sse = Sse::open(gw, &format!("topic={topic}"), None).await;
            sse.baseline().await;
            clients.push((
                format!("client of {topic} on {name}"),
                topic.to_string(),
                sse,
            ));
        }
    }
    let (publisher, publishing) = Publisher::start(&names, vec![a.addr, b.addr]);
    publisher.wait_for(30, "before the kill");
    let killed = topics[0].1.clone();
    let dropped = watching(&[&a, &b], || {
        cluster.server_at(&killed).unwrap().kill();
        cluster
            .wait_for_new_owner(slot_of(names[0]), &killed, Duration::from_secs(30))
            .expect("the replica promoted");
        publisher.wait_for(30, "after the kill");
    });
    assert_eq!(
        dropped,
        [true, true],
        "readiness never dropped while a shard was down"
    );
    let by_topic = publisher.finish(publishing);
    for reply in publisher.refused.lock().unwrap().iter() {
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    }
    for (who, topic, mut sse) in clients {
        let events = sse.drain(Duration::from_millis(1500)).await;
        let kept = stream(&cluster, &topic);
        check_client(&who, &events, &topic, &by_topic[&topic], &kept);
    }
}

/// What the gateway needs of a cluster, and nothing more (docs/deploy.md, "Least privilege"):
/// its functions and the commands they run, sharded pub/sub on topic channels and its
/// canaries, the slot map, `WAIT`, the presence reports and their registry, and as keys the
/// topics' streams and idempotency records and the presence keys only.
const CLUSTER_GATEWAY_ACL: &str = "on >gateway-pw-6a0 resetkeys ~ssegw:s:* ~ssegw:i:* ~ssegw:p:* \
     resetchannels &ssegw:c:* &ssegw:canary:* -@all +fcall +fcall_ro +function|load +ssubscribe \
     +sunsubscribe +spublish +cluster|slots +wait +ping +xadd +xrange +xrevrange +xlen +xtrim +xdel \
     +xinfo|stream +exists +pttl +expire +time +get +set +mget +del +zadd +zrem +zrange \
     +zremrangebyscore";

/// The gateway as an ACL user with only `CLUSTER_GATEWAY_ACL`, publishing with
/// `--publish-replicas 1`: it loads its library on every primary, subscribes and delivers.
#[actix_web::test]
async fn a_cluster_as_an_acl_user_with_least_privilege() {
    let cluster = RedisCluster::start(ClusterOptions {
        password: Some("admin-pw-19c".into()),
        server: ServerOptions {
            // redis-server takes the words of `--user` as separate arguments.
            args: ["--user", "gateway"]
                .into_iter()
                .chain(CLUSTER_GATEWAY_ACL.split_whitespace())
                .map(String::from)
                .collect(),
            ..ServerOptions::default()
        },
        ..ClusterOptions::default()
    })
    .expect("a 6-node cluster with an ACL user");
    let dir = support::tempdir("cluster-acl");
    let password = dir.join("password");
    std::fs::write(&password, "gateway-pw-6a0\n").unwrap();
    let password = password.display().to_string();
    let flags = flags(
        &cluster,
        &[
            "--redis-username",
            "gateway",
            "--redis-password-file",
            &password,
            "--publish-replicas",
            "1",
        ],
    );
    let gw = Gateway::start(&strs(&flags));
    let topics = topics_on_every_primary(&cluster, 1);
    let query: Vec<String> = topics.iter().map(|(t, _)| format!("topic={t}")).collect();
    let mut sse = Sse::open(&gw, &query.join("&"), None).await;
    sse.baseline().await;
    for (topic, _) in &topics {
        try_blocking_http_publish(gw.addr, topic, &format!("{topic} as gateway"), None).unwrap();
        assert_eq!(sse.next().await.data, format!("{topic} as gateway"));
    }
    // Nothing denied, but `CLIENT SETINFO`: redis-rs names itself with it where the server
    // knows it (Valkey, Redis 7.2 and later) and carries on when refused.
    for primary in cluster.primaries().unwrap() {
        let Reply::Array(entries) = cluster.command(&primary, &["ACL", "LOG"]).unwrap() else {
            panic!("ACL LOG answers an array");
        };
        for entry in entries {
            let fields = entry.as_array().unwrap();
            let object = fields
                .chunks(2)
                .find(|pair| pair[0] == Reply::Bulk(b"object".to_vec()))
                .map(|pair| pair[1].clone());
            assert_eq!(
                object,
                Some(Reply::Bulk(b"client|setinfo".to_vec())),
                "{primary} denied the gateway something: {entry:?}"
            );
        }
    }
}

/// Loads the library `sse-gateway script <args>` prints on every primary, as an administrator
/// does with `--redis-install-functions false`.
fn load_library(cluster: &RedisCluster, args: &[&str]) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .arg("script")
        .args(args)
        .output()
        .expect("sse-gateway script");
    let library = String::from_utf8(output.stdout).unwrap();
    for primary in cluster.primaries().unwrap() {
        let loaded = cluster
            .command(&primary, &["FUNCTION", "LOAD", "REPLACE", &library])
            .unwrap();
        assert_eq!(loaded, Reply::Bulk(b"ssegw".to_vec()), "{primary}");
    }
}

/// With `--redis-install-functions false`, a library made for a single Redis (publishing on
/// global channels) would deliver nothing live in a cluster: the replica stays not ready until
/// the administrator loads `sse-gateway script --sharded`, then serves.
#[actix_web::test]
async fn a_library_for_a_single_redis_is_not_taken_for_a_cluster() {
    let cluster = start_cluster();
    load_library(&cluster, &[]);
    let flags = flags(&cluster, &["--redis-install-functions", "false"]);
    let gw = Gateway::start_unchecked(&strs(&flags));
    support::Replica::wait_readyz(&gw, 503);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(support::http_status(gw.addr, "GET", "/readyz"), Some(503));

    load_library(&cluster, &["--sharded"]);
    support::Replica::wait_readyz(&gw, 200);
    let mut sse = Sse::open(&gw, "topic=admin-loaded", None).await;
    sse.baseline().await;
    try_blocking_http_publish(gw.addr, "admin-loaded", "sharded at last", None).unwrap();
    assert_eq!(sse.next().await.data, "sharded at last");
}

/// A shard down with no replica to take over (`cluster-require-full-coverage no`): the replica
/// is not ready while it is down, yet streams on the other shards keep flowing and new
/// subscriptions to them are served; publishing to the dead shard's topics, and subscribing
/// to those this replica does not serve yet, is answered 503. When the node comes back empty, its topic resumes with a `lost` gap: the
/// history it held is gone, and the client is told.
#[actix_web::test]
async fn a_shard_down_leaves_the_others_serving() {
    let mut cluster = RedisCluster::start(ClusterOptions {
        replicas_per_primary: 0,
        require_full_coverage: false,
        ..ClusterOptions::default()
    })
    .expect("a 3-node cluster without replicas");
    let gw = Gateway::start(&strs(&flags(&cluster, &[])));
    let topics = topics_on_every_primary(&cluster, 2);
    let [(dead, dead_node), (unserved, _), (healthy, _), _, (other, _), _] = &topics[..] else {
        panic!("three primaries");
    };
    let mut dead_client = Sse::open(&gw, &format!("topic={dead}"), None).await;
    dead_client.baseline().await;
    let mut healthy_client = Sse::open(&gw, &format!("topic={healthy}"), None).await;
    healthy_client.baseline().await;
    for (topic, client) in [(dead, &mut dead_client), (healthy, &mut healthy_client)] {
        try_blocking_http_publish(gw.addr, topic, "before", None).unwrap();
        assert_eq!(client.next().await.data, "before");
    }

    cluster.server_at(dead_node).unwrap().kill();
    support::Replica::wait_readyz(&gw, 503);
    try_blocking_http_publish(gw.addr, healthy, "while a shard is down", None).unwrap();
    assert_eq!(healthy_client.next().await.data, "while a shard is down");
    let mut late = Sse::open(&gw, &format!("topic={other}"), None).await;
    late.baseline().await;
    try_blocking_http_publish(gw.addr, other, "joined meanwhile", None).unwrap();
    assert_eq!(late.next().await.data, "joined meanwhile");
    let refused = try_blocking_http_publish(gw.addr, dead, "nowhere", None).unwrap_err();
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    // A topic of the dead shard that this replica does not serve yet cannot be subscribed.
    // (One it serves already admits newcomers to its open stream, which resumes, or tells of
    // a gap, once the shard is back.)
    assert_eq!(
        support::http_status(gw.addr, "GET", &format!("/events?topic={unserved}")),
        Some(503)
    );
    assert_eq!(support::http_status(gw.addr, "GET", "/readyz"), Some(503));

    cluster.server_at(dead_node).unwrap().restart().unwrap();
    support::Replica::wait_readyz(&gw, 200);
    let gap = dead_client.next().await;
    assert_eq!(gap.event, "ssegw-gap", "{gap:?}");
    assert!(gap.data.contains("\"lost\""), "{}", gap.data);
    try_blocking_http_publish(gw.addr, dead, "after", None).unwrap();
    assert_eq!(dead_client.next().await.data, "after");
}

/// A publish that got no answer in time may have run: the gateway answers 503 and never sends
/// it again. (redis-rs's cluster connection would resend it after its response timeout: stored
/// twice, and after the publishes that followed it.) Here its primary is paused while the
/// publish waits, then resumed: the stream holds it once, before the next one.
#[actix_web::test]
async fn a_publish_that_timed_out_is_stored_at_most_once() {
    // No replica to take over, and a node timeout longer than the pause: the primary stays
    // the primary.
    let cluster = RedisCluster::start(ClusterOptions {
        replicas_per_primary: 0,
        node_timeout: Duration::from_secs(15),
        ..ClusterOptions::default()
    })
    .expect("a 3-node cluster");
    let gw = Gateway::start(&strs(&flags(&cluster, &[])));
    let topics = topics_on_every_primary(&cluster, 1);
    let (topic, primary) = &topics[0];
    try_blocking_http_publish(gw.addr, topic, "first", None).unwrap();
    let paused = cluster
        .nodes()
        .iter()
        .find(|n| format!("127.0.0.1:{}", n.port()) == *primary)
        .unwrap();
    paused.pause().unwrap();
    let refused = try_blocking_http_publish(gw.addr, topic, "unanswered", None).unwrap_err();
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    // Longer than redis-rs would keep resending it.
    std::thread::sleep(Duration::from_secs(3));
    paused.resume().unwrap();
    let id = loop {
        match try_blocking_http_publish(gw.addr, topic, "next", None) {
            Ok(id) => break id,
            Err(reply) => assert!(reply.starts_with("HTTP/1.1 503"), "{reply}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whether the unanswered one ran is not known (here redis-rs dropped its connection, and
    // Redis with it); if it did, once and before the next.
    let kept: Vec<String> = stream(&cluster, topic)
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    assert!(
        kept == ["first", "next"] || kept == ["first", "unanswered", "next"],
        "{kept:?} (next was {id})"
    );
}

/// The publish path on a cluster: `sse-gateway namespace` loads the table on every primary
/// (each shard's topics trim by it, the replica shows it), keyed publishes over HTTP and with
/// `redis-cli -c` (two declared keys) store once, and a batch spanning the shards comes back in
/// order.
#[actix_web::test]
async fn namespaces_keys_and_batches_span_the_shards() {
    let cluster = start_cluster();
    let flags = flags(&cluster, &[]);
    let gw = Gateway::start(&strs(&flags));
    let topics: Vec<String> = topics_on_every_primary(&cluster, 1)
        .into_iter()
        .map(|(topic, _)| topic)
        .collect();
    let namespace = std::process::Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .args(["namespace", "set", "--default", "--max-len", "2"])
        .args(&flags[..2])
        .output()
        .unwrap();
    assert!(
        namespace.status.success(),
        "{}",
        String::from_utf8_lossy(&namespace.stderr)
    );
    for topic in &topics {
        for i in 0..5 {
            redis_cli_publish(&cluster, topic, &format!("e{i}"));
        }
        assert!(
            stream(&cluster, topic).len() <= 3,
            "{topic} keeps 2 on its shard"
        );
    }
    wait_until("the replica to show the cluster's table", || {
        let (_, status) = support::get_json(gw.addr, "/status");
        status["retention"]["default"]["max_len"] == 2
    });

    let keyed = |topic: &str| {
        let owner = cluster.owner_of_slot(slot_of(topic)).unwrap();
        let (host, port) = owner.rsplit_once(':').unwrap();
        let output = std::process::Command::new("redis-cli")
            .args(["-c", "-h", host, "-p", port, "FCALL", "ssegw_publish", "2"])
            .arg(format!("ssegw:s:{{{topic}}}"))
            .arg(format!("ssegw:i:{{{topic}}}:k1"))
            .args(["once", "", "", "k1"])
            .output()
            .unwrap();
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    };
    for topic in &topics {
        let first = keyed(topic);
        assert!(first.contains('-'), "{first}");
        assert_eq!(keyed(topic), first);
    }

    let mut sse = Sse::open(
        &gw,
        &topics
            .iter()
            .map(|t| format!("topic={t}"))
            .collect::<Vec<_>>()
            .join("&"),
        None,
    )
    .await;
    sse.baseline().await;
    let body: String = (0..30)
        .map(|i| {
            serde_json::json!({ "topic": topics[i % topics.len()], "data": format!("b{i}") })
                .to_string()
                + "\n"
        })
        .collect();
    let send = || async {
        let mut response = awc::Client::default()
            .post(gw.url("/publish"))
            .insert_header(("content-type", "application/x-ndjson"))
            .insert_header(("idempotency-key", "batch-1"))
            .send_body(body.clone())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json::<serde_json::Value>().await.unwrap()
    };
    let first = send().await;
    assert_eq!(
        send().await,
        first,
        "the same batch with its key is published once"
    );
    let events = sse.take(30).await;
    for topic in &topics {
        let sent: Vec<String> = (0..30)
            .filter(|i| topics[i % topics.len()] == *topic)
            .map(|i| format!("b{i}"))
            .collect();
        let got: Vec<String> = events
            .iter()
            .filter(|e| sent.contains(&e.data))
            .map(|e| e.data.clone())
            .collect();
        assert_eq!(got, sent, "{topic}: in order, once");
    }
    sse.assert_quiet(std::time::Duration::from_millis(300))
        .await;
}

/// A Mercure subscription on `gw`: its response's `last-event-id` header and its events.
async fn mercure_stream(
    gw: &Gateway,
    query: &str,
    last_event_id: Option<&str>,
) -> (
    Option<String>,
    futures_util::stream::LocalBoxStream<'static, eventsource_stream::Event>,
) {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    let mut request = awc::Client::builder()
        .disable_timeout()
        .finish()
        .get(gw.url(&format!("/.well-known/mercure?{query}")));
    if let Some(id) = last_event_id {
        request = request.insert_header(("Last-Event-ID", id));
    }
    let response = request.send().await.expect("GET /.well-known/mercure");
    assert_eq!(response.status(), 200, "{query}");
    let header = response
        .headers()
        .get("last-event-id")
        .map(|h| h.to_str().unwrap().to_string());
    let events = response
        .eventsource()
        .filter_map(|e| async move {
            e.ok()
                .filter(|e| !e.data.is_empty() || e.event != "message")
        })
        .boxed_local();
    (header, events)
}

/// Publishes a Mercure update through `gw`; returns its id.
async fn mercure_publish(gw: &Gateway, token: &str, form: &[(&str, &str)]) -> String {
    let mut response = awc::Client::default()
        .post(gw.url("/.well-known/mercure"))
        .insert_header(("Authorization", format!("Bearer {token}")))
        .send_form(&form)
        .await
        .expect("POST /.well-known/mercure");
    let body = response.body().await.unwrap();
    assert_eq!(response.status(), 200, "{}", String::from_utf8_lossy(&body));
    String::from_utf8(body.to_vec()).unwrap()
}

#[actix_web::test]
async fn the_mercure_hub_publishes_and_resumes_across_replicas_on_a_cluster() {
    use futures_util::StreamExt;
    const SECRET: &str = "a-mercure-secret-of-at-least-32-bytes!";
    let cluster = start_cluster();
    let flags = flags(
        &cluster,
        &[
            "--mercure",
            "true",
            "--mercure-jwt-secret",
            SECRET,
            "--mercure-anonymous",
            "true",
            "--mercure-subscriptions",
            "true",
            "--presence-interval",
            "200ms",
        ],
    );
    let a = Gateway::start(&strs(&flags));
    let b = Gateway::start(&strs(&flags));
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"mercure": {"publish": ["*"]}}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();

    let (_, mut live) = mercure_stream(&a, "topic=https://ex.com/books/%7Bid%7D", None).await;
    let mut ids = Vec::new();
    for n in 1..=6 {
        let topic = format!("https://ex.com/books/{n}");
        let data = format!("book {n}");
        ids.push(mercure_publish(&b, &token, &[("topic", &topic), ("data", &data)]).await);
    }
    for (n, id) in ids.iter().enumerate() {
        let event = tokio::time::timeout(support::WAIT, live.next())
            .await
            .expect("an update within WAIT")
            .expect("the stream goes on");
        assert_eq!(
            (event.id.as_str(), event.data.as_str()),
            (id.as_str(), &*format!("book {}", n + 1))
        );
    }

    // Resumed on the other replica after the third update: the rest, in order.
    let (header, mut resumed) =
        mercure_stream(&b, "topic=https://ex.com/books/%7Bid%7D", Some(&ids[2])).await;
    assert_eq!(header.as_deref(), Some(ids[2].as_str()));
    for id in &ids[3..] {
        let event = tokio::time::timeout(support::WAIT, resumed.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&event.id, id);
    }

    // The subscriptions API lists both streams, one on each replica.
    let reader = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"mercure": {"subscribe": ["/.well-known/mercure/subscriptions"]}}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + support::WAIT;
    let listed = loop {
        let mut response = awc::Client::default()
            .get(a.url("/.well-known/mercure/subscriptions"))
            .insert_header(("authorization", format!("Bearer {reader}")))
            .send()
            .await
            .expect("GET the subscriptions");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        let subscribers: BTreeSet<String> = body["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["subscriber"].as_str().unwrap().to_string())
            .collect();
        if subscribers.len() == 2 || std::time::Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let subscriptions = listed["subscriptions"].as_array().unwrap();
    assert_eq!(subscriptions.len(), 2, "{listed}");
    assert!(subscriptions
        .iter()
        .all(|s| s["topic"] == "https://ex.com/books/{id}" && s["active"] == true));

    // The log, its index and the registry live on the shard of the log's slot: six updates
    // and the two subscriptions' updates.
    let owner = cluster.owner_of_slot(slot_of("ssegw.mercure")).unwrap();
    let len = cluster
        .command(&owner, &["XLEN", "ssegw:s:{ssegw.mercure}"])
        .unwrap();
    assert_eq!(len, Reply::Integer(8));
    let indexed = cluster
        .command(&owner, &["HLEN", "ssegw:m:{ssegw.mercure}:ids:0"])
        .unwrap();
    assert_eq!(indexed, Reply::Integer(8));
    let replicas = cluster
        .command(&owner, &["ZCARD", "ssegw:m:{ssegw.mercure}:subs"])
        .unwrap();
    assert_eq!(replicas, Reply::Integer(2));
}
