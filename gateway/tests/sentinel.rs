//! Redis behind Sentinel: two gateway replicas follow the primary the sentinels name through a
//! forced failover and then the SIGKILL of the new primary, with a publisher running all along.
//! Every client gets every acknowledged event once and in order, or a `lost` gap for what the
//! dead primary had not passed on; readiness drops and returns; publishes in between fail with
//! a clean 503. With `--publish-replicas 1` the SIGKILL loses no acknowledged event. A group
//! that speaks TLS only, with client certificates, is followed through a failover the same way.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ssegw_testkit::{Authority, Sentinel, SentinelOptions, ServerOptions, TlsOptions};
use support::failover::{self, check_client, watch_readiness, Publisher};
use support::{strs, try_blocking_http_publish, wait_until, Gateway, Sse};

const TOPICS: [&str; 3] = ["s0", "s1", "s2"];

fn start_group() -> Sentinel {
    Sentinel::start(SentinelOptions::default()).expect("a Sentinel group of redis-server processes")
}

/// The gateway's flags for this group, plus `extra`.
fn flags(group: &Sentinel, extra: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = [
        "--redis-sentinels",
        &group.sentinel_addrs().join(","),
        "--redis-master-name",
        group.master_name(),
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

/// The topic's stream on the current primary: (id, data) in order.
fn stream(group: &Sentinel, topic: &str) -> Vec<(String, String)> {
    let primary = group.master_addr().unwrap();
    let key = format!("ssegw:s:{{{topic}}}");
    let reply = group
        .command(&primary, &["XRANGE", &key, "-", "+"])
        .unwrap();
    failover::entries(&reply)
}

#[actix_web::test]
async fn replicas_follow_the_primary_through_a_failover_and_a_kill() {
    let mut group = start_group();
    let flags = flags(&group, &[]);
    let a = Gateway::start(&strs(&flags));
    let b = Gateway::start(&strs(&flags));
    let mut clients = Vec::new();
    for (name, gw) in [("a", &a), ("b", &b)] {
        for topic in TOPICS {
            let mut sse = Sse::open(gw, &format!("topic={topic}"), None).await;
            sse.baseline().await;
            clients.push((format!("client of {topic} on {name}"), topic, sse));
        }
    }
    let (publisher, publishing) = Publisher::start(&TOPICS, vec![a.addr, b.addr]);
    publisher.wait_for(20, "before the failover");

    let promoted = group.failover().expect("SENTINEL FAILOVER");
    publisher.wait_for(20, "after the failover");

    let stop_watching = Arc::new(AtomicBool::new(false));
    let readiness = watch_readiness(vec![a.addr, b.addr], stop_watching.clone());
    group.master_mut().unwrap().kill();
    let third = group
        .wait_for_new_master(&promoted, Duration::from_secs(30))
        .expect("a new primary after the SIGKILL");
    assert_ne!(third, promoted);
    publisher.wait_for(20, "after the primary was killed");
    for gw in [&a, &b] {
        support::Replica::wait_readyz(gw, 200);
    }
    stop_watching.store(true, Ordering::Release);
    assert_eq!(
        readiness.join().unwrap(),
        [true, true],
        "readiness never dropped"
    );
    let by_topic = publisher.finish(publishing);

    // Publishes while there was no primary were refused cleanly, saying to retry.
    for reply in publisher.refused.lock().unwrap().iter() {
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
        assert!(reply.contains("\"error\""), "{reply}");
    }
    for (who, topic, mut sse) in clients {
        let events = sse.drain(Duration::from_millis(1500)).await;
        let kept = stream(&group, topic);
        check_client(&who, &events, topic, &by_topic[topic], &kept);
    }
}

#[actix_web::test]
async fn with_publish_replicas_a_killed_primary_loses_no_acknowledged_event() {
    // Two replicas: after the kill, the promoted one still has one to confirm publishes.
    let mut group = Sentinel::start(SentinelOptions {
        replicas: 2,
        ..SentinelOptions::default()
    })
    .expect("a Sentinel group of redis-server processes");
    let flags = flags(
        &group,
        &[
            "--publish-replicas",
            "1",
            "--publish-replicas-timeout",
            "500ms",
        ],
    );
    let gw = Gateway::start(&strs(&flags));
    let mut sse = Sse::open(&gw, "topic=s0&topic=s1&topic=s2", None).await;
    sse.baseline().await;

    // No replica to confirm: the publish is answered 503, saying what is known.
    let primary = group.master_addr().unwrap();
    let replicas: Vec<_> = group
        .servers()
        .iter()
        .filter(|s| format!("127.0.0.1:{}", s.port()) != primary)
        .collect();
    assert_eq!(replicas.len(), 2);
    for replica in &replicas {
        replica.pause().unwrap();
    }
    let reply = try_blocking_http_publish(gw.addr, "s0", "unconfirmed", None).unwrap_err();
    for replica in &replicas {
        replica.resume().unwrap();
    }
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(
        reply.contains("may or may not survive a failover"),
        "{reply}"
    );
    assert!(reply.contains("only 0 of 1 replicas"), "{reply}");

    let (publisher, publishing) = Publisher::start(&TOPICS, vec![gw.addr]);
    publisher.wait_for(30, "before the kill");
    let old = group.master_addr().unwrap();
    group.master_mut().unwrap().kill();
    group
        .wait_for_new_master(&old, Duration::from_secs(30))
        .expect("a new primary after the SIGKILL");
    publisher.wait_for(20, "after the kill");
    publisher.stop.store(true, Ordering::Release);
    publishing.join().unwrap();

    let acked = publisher.acked.lock().unwrap().clone();
    for topic in TOPICS {
        let kept = stream(&group, topic);
        for (_, id, data) in acked.iter().filter(|(t, _, _)| t == topic) {
            assert!(
                kept.contains(&(id.clone(), data.clone())),
                "acknowledged {id} {data} is not on the new primary"
            );
        }
    }
    // Once the replica is back on the new primary (and has backfilled), the one connection
    // has seen every acknowledged event, with no gap.
    wait_until("the replica to be ready again", || {
        support::http_status(gw.addr, "GET", "/readyz") == Some(200)
    });
    let received = sse.drain(Duration::from_millis(1500)).await;
    assert!(
        received.iter().all(|e| e.event != "ssegw-gap"),
        "{received:?}"
    );
    let data: Vec<&str> = received.iter().map(|e| e.data.as_str()).collect();
    for (_, _, sent) in &acked {
        assert!(data.contains(&sent.as_str()), "{sent} never arrived");
    }
}

/// Nodes and sentinels that require passwords of their own: the gateway logs in to each with
/// its own, and delivers as usual.
#[actix_web::test]
async fn nodes_and_sentinels_with_passwords_of_their_own() {
    let group = Sentinel::start(SentinelOptions {
        password: Some("node-pw-51c".into()),
        sentinel_password: Some("sentinel-pw-7d2".into()),
        ..SentinelOptions::default()
    })
    .expect("a Sentinel group with passwords");
    let dir = support::tempdir("sentinel-passwords");
    let node = dir.join("node");
    let sentinel = dir.join("sentinel");
    std::fs::write(&node, "node-pw-51c\n").unwrap();
    std::fs::write(&sentinel, "sentinel-pw-7d2\n").unwrap();
    let (node, sentinel) = (node.display().to_string(), sentinel.display().to_string());
    let flags = flags(
        &group,
        &[
            "--redis-password-file",
            &node,
            "--redis-sentinel-password-file",
            &sentinel,
        ],
    );
    let gw = Gateway::start(&strs(&flags));
    let mut sse = Sse::open(&gw, "topic=s0", None).await;
    sse.baseline().await;
    let id = try_blocking_http_publish(gw.addr, "s0", "behind passwords", None).unwrap();
    let event = sse.next().await;
    assert_eq!((event.id, event.data.as_str()), (id, "behind passwords"));
}

/// Every node and sentinel speaks TLS only and requires a client certificate: with
/// `--redis-tls`, the test CA and the client certificate, the gateway finds the primary through
/// the sentinels, delivers, and follows a forced failover.
#[actix_web::test]
async fn a_group_over_tls_with_client_certificates() {
    let dir = support::tempdir("sentinel-tls");
    let authority = Authority::create(&dir, "sentinel").expect("test certificates");
    let group = Sentinel::start(SentinelOptions {
        server: ServerOptions {
            // Always redis-server: `./test` runs this file again with SSEGW_REDIS_SERVER naming
            // Valkey's wheel, which is built without TLS.
            binary: "redis-server".into(),
            tls: Some(TlsOptions {
                authority: authority.clone(),
                require_client_cert: true,
            }),
            ..ServerOptions::default()
        },
        ..SentinelOptions::default()
    })
    .expect("a Sentinel group of redis-server processes over TLS");
    let [ca, cert, key] = [&authority.ca, &authority.client_cert, &authority.client_key]
        .map(|path| path.display().to_string());
    let flags = flags(
        &group,
        &[
            "--redis-tls",
            "true",
            "--redis-ca-file",
            &ca,
            "--redis-client-cert",
            &cert,
            "--redis-client-key",
            &key,
        ],
    );
    let gw = Gateway::start(&strs(&flags));
    let mut sse = Sse::open(&gw, "topic=s0", None).await;
    sse.baseline().await;
    let id = try_blocking_http_publish(gw.addr, "s0", "before the failover", None).unwrap();
    let event = sse.next().await;
    assert_eq!((event.id, event.data.as_str()), (id, "before the failover"));

    group.failover().expect("SENTINEL FAILOVER over TLS");
    // Until the gateway has switched to the new primary, a publish may be refused with a 503.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        match try_blocking_http_publish(gw.addr, "s0", "after the failover", None) {
            Ok(id) => break id,
            Err(reply) => {
                assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
                assert!(Instant::now() < deadline, "still refused: {reply}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    // Nothing but the new event arrives (or an earlier copy of it, from a refused publish that
    // reached the primary all the same): no gap, and nothing twice.
    loop {
        let event = sse.next().await;
        assert_eq!(
            (event.event.as_str(), event.data.as_str()),
            ("message", "after the failover"),
            "{event:?}"
        );
        if event.id == id {
            break;
        }
    }
}
