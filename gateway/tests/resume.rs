//! Resumption on any replica: exactly the missed events, in order, then live; under concurrent
//! publishing; across several topics with one id; and the control event for every gap. Each
//! scenario runs against two replicas on a real Redis and against the embedded bus.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::{Cluster, Sse};

#[actix_web::test]
async fn two_replicas_resume_exactly_the_missed_events_then_live() {
    let cluster = Cluster::redis(&[]);
    let redis = cluster.redis.as_ref().unwrap();

    let mut a = Sse::open(cluster.replica(0), "topic=news", None).await;
    let first = redis.fcall_publish("news", "zero", None);
    let event = a.next().await;
    assert_eq!(
        (event.id.as_str(), event.data.as_str()),
        (first.as_str(), "zero")
    );
    drop(a);

    let missed: Vec<String> = (1..=5)
        .map(|i| redis.fcall_publish("news", &format!("missed {i}"), None))
        .collect();
    let mut b = Sse::open(cluster.replica(1), "topic=news", Some(&first)).await;
    let replayed = b.take(5).await;
    for (i, (event, id)) in replayed.iter().zip(&missed).enumerate() {
        assert_eq!(&event.id, id);
        assert_eq!(event.data, format!("missed {}", i + 1));
    }
    let live = redis.fcall_publish("news", "live", None);
    let event = b.next().await;
    assert_eq!(
        (event.id.as_str(), event.data.as_str()),
        (live.as_str(), "live")
    );
    b.assert_quiet(Duration::from_millis(300)).await;

    // Clients that cannot set headers pass the id as `lastEventId`.
    let mut q = Sse::open(
        cluster.replica(1),
        &format!("topic=news&lastEventId={first}"),
        None,
    )
    .await;
    let ids: Vec<String> = q.take(6).await.into_iter().map(|e| e.id).collect();
    assert_eq!(ids[..5], missed[..]);
    assert_eq!(ids[5], live);
}

#[actix_web::test]
async fn one_subscription_per_replica_whatever_the_number_of_clients() {
    let cluster = Cluster::redis(&[]);
    let redis = cluster.redis.as_ref().unwrap();
    let numsub = || -> i64 {
        let reply: (String, i64) = redis
            .cmd(redis::cmd("PUBSUB").arg("NUMSUB").arg("ssegw:c:{crowd}"))
            .unwrap();
        reply.1
    };
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(Sse::open(cluster.replica(0), "topic=crowd", None).await);
    }
    assert_eq!(numsub(), 1, "one replica, one subscription");
    clients.push(Sse::open(cluster.replica(1), "topic=crowd", None).await);
    assert_eq!(numsub(), 2, "two replicas, two subscriptions");
    let id = redis.fcall_publish("crowd", "hello", None);
    for client in &mut clients {
        assert_eq!(client.next().await.id, id);
    }
    drop(clients);
    let deadline = std::time::Instant::now() + support::WAIT;
    while numsub() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "replicas did not unsubscribe after the last client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Many short-lived connections, alternating replicas, while events keep arriving: the
/// concatenation of what each connection saw is every event once, in order.
async fn resume_while_publishing(cluster: Cluster) {
    const TOTAL: usize = 300;
    let mut sse = Sse::open(cluster.replica(0), "topic=flow", None).await;
    let mut last = sse.baseline().await;
    drop(sse);
    let publish = cluster.blocking_publisher();
    let publisher = std::thread::spawn(move || {
        for seq in 0..TOTAL {
            publish("flow", &seq.to_string());
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let mut seen = Vec::with_capacity(TOTAL);
    let mut round = 0;
    while seen.len() < TOTAL {
        let mut sse = Sse::open(cluster.replica(round), "topic=flow", Some(&last)).await;
        for _ in 0..(1 + round % 7).min(TOTAL - seen.len()) {
            let event = sse.next().await;
            seen.push(event.data.parse::<usize>().unwrap());
            last = event.id;
        }
        round += 1;
    }
    publisher.join().unwrap();
    assert_eq!(seen, (0..TOTAL).collect::<Vec<_>>(), "after {round} rounds");
    assert!(round > 40, "too few rounds to mean anything: {round}");
}

#[actix_web::test]
async fn resume_while_publishing_redis() {
    resume_while_publishing(Cluster::redis(&[])).await;
}

#[actix_web::test]
async fn resume_while_publishing_embedded() {
    resume_while_publishing(Cluster::embedded(&[])).await;
}

/// Events grouped by topic (the payload's prefix before ':'), in arrival order.
fn by_topic(events: &[eventsource_stream::Event]) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for event in events {
        let (topic, _) = event.data.split_once(':').unwrap();
        map.entry(topic.to_string())
            .or_default()
            .push(event.data.clone());
    }
    map
}

fn groups(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(t, v)| (t.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect()
}

async fn multi_topic_resume(cluster: Cluster) {
    let query = "topic=m1&topic=m2&topic=m3";
    let mut a = Sse::open(cluster.replica(0), query, None).await;
    let baseline = a.baseline().await;
    cluster.publish("m1", "m1:a").await;
    cluster.publish("m2", "m2:a").await;
    let got = a.take(2).await;
    let cursor = got[1].id.clone();
    assert!(
        cursor.contains('.'),
        "a multi-topic id is a cursor: {cursor}"
    );
    drop(a);

    for (topic, data) in [
        ("m1", "m1:b"),
        ("m3", "m3:a"),
        ("m2", "m2:b"),
        ("m3", "m3:b"),
    ] {
        cluster.publish(topic, data).await;
    }
    let mut b = Sse::open(cluster.replica(1), query, Some(&cursor)).await;
    let resumed = b.take(4).await;
    assert_eq!(
        by_topic(&resumed),
        groups(&[
            ("m1", &["m1:b"]),
            ("m2", &["m2:b"]),
            ("m3", &["m3:a", "m3:b"])
        ])
    );
    cluster.publish("m2", "m2:c").await;
    assert_eq!(b.next().await.data, "m2:c");
    b.assert_quiet(Duration::from_millis(200)).await;

    // The baseline a fresh connection got before any event resumes everything since.
    let mut c = Sse::open(cluster.replica(1), query, Some(&baseline)).await;
    let all = c.take(7).await;
    assert_eq!(
        by_topic(&all),
        groups(&[
            ("m1", &["m1:a", "m1:b"]),
            ("m2", &["m2:a", "m2:b", "m2:c"]),
            ("m3", &["m3:a", "m3:b"]),
        ])
    );
    c.assert_quiet(Duration::from_millis(200)).await;
}

#[actix_web::test]
async fn multi_topic_connection_resumes_every_topic_from_one_id_redis() {
    multi_topic_resume(Cluster::redis(&[])).await;
}

#[actix_web::test]
async fn multi_topic_connection_resumes_every_topic_from_one_id_embedded() {
    multi_topic_resume(Cluster::embedded(&[])).await;
}

fn assert_gap(event: &eventsource_stream::Event, topic: &str, reason: &str) {
    assert_eq!(
        event.event, "ssegw-gap",
        "expected the control event, got {event:?}"
    );
    let data: serde_json::Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(
        data,
        serde_json::json!({ "topic": topic, "reason": reason })
    );
}

/// The control event carries no `id:` line, so it never moves the client's resume position.
fn assert_gap_blocks_have_no_id(sse: &Sse) {
    let raw = sse.raw();
    for block in raw.split("\n\n").filter(|b| b.contains("event: ssegw-gap")) {
        assert!(!block.contains("id:"), "gap block with an id: {block:?}");
    }
    assert!(raw.contains("event: ssegw-gap"));
}

async fn gaps_are_announced(cluster: Cluster) {
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(cluster.publish("g", &i.to_string()).await);
    }
    let retained = ["3", "4", "5"];
    let data = |events: Vec<eventsource_stream::Event>| -> Vec<String> {
        events.into_iter().map(|e| e.data).collect()
    };

    // Event 1 was trimmed (history keeps 3): the client missed it.
    let mut s = Sse::open(cluster.replica(1), "topic=g", Some(&ids[0])).await;
    assert_gap(&s.next().await, "g", "trimmed");
    assert_eq!(data(s.take(3).await), retained);
    assert_gap_blocks_have_no_id(&s);

    // Resuming from the newest trimmed event misses nothing: no control event.
    let mut s = Sse::open(cluster.replica(1), "topic=g", Some(&ids[2])).await;
    assert_eq!(data(s.take(3).await), retained);

    for bad in ["garbage", "12", "1-2-3", "99999999999999999999999-0"] {
        let mut s = Sse::open(cluster.replica(0), "topic=g", Some(bad)).await;
        assert_gap(&s.next().await, "g", "invalid-id");
        assert_eq!(data(s.take(3).await), retained, "after {bad:?}");
    }

    // A position ahead of the stream belongs to a history that is gone.
    let mut s = Sse::open(cluster.replica(0), "topic=g", Some("99999999999999-0")).await;
    assert_gap(&s.next().await, "g", "lost");
    assert_eq!(data(s.take(3).await), retained);
    let live = cluster.publish("g", "6").await;
    let event = s.next().await;
    assert_eq!((event.id, event.data), (live, "6".to_string()));

    // A cursor minted for another topic set is not applied to this one.
    let mut multi = Sse::open(cluster.replica(0), "topic=g&topic=h", None).await;
    let cursor = multi.baseline().await;
    let mut s = Sse::open(cluster.replica(0), "topic=g&topic=other", Some(&cursor)).await;
    // Topics replay one after the other, each announcing its own gap.
    assert_gap(&s.next().await, "g", "invalid-id");
    assert_eq!(data(s.take(3).await), ["4", "5", "6"]);
    assert_gap(&s.next().await, "other", "invalid-id");
    s.assert_quiet(Duration::from_millis(200)).await;
}

#[actix_web::test]
async fn trimmed_lost_and_unparseable_ids_produce_the_control_event_redis() {
    gaps_are_announced(Cluster::redis(&["--history-max-len", "3"])).await;
}

#[actix_web::test]
async fn trimmed_lost_and_unparseable_ids_produce_the_control_event_embedded() {
    gaps_are_announced(Cluster::embedded(&["--history-max-len", "3"])).await;
}

#[actix_web::test]
async fn a_deleted_stream_is_lost_history_not_a_silent_gap() {
    let cluster = Cluster::redis(&[]);
    let redis = cluster.redis.as_ref().unwrap();
    let old = redis.fcall_publish("d", "old", None);
    // Incarnations are told apart by time (ARCHITECTURE.md, failure model): let the old history
    // exist for a few of Redis's milliseconds before it is lost.
    let redis_ms = || -> u64 {
        let (secs, micros): (u64, u64) = redis.cmd(&redis::cmd("TIME")).unwrap();
        secs * 1000 + micros / 1000
    };
    let until = redis_ms() + 3;
    while redis_ms() < until {
        tokio::task::yield_now().await;
    }
    let _: i64 = redis.cmd(redis::cmd("DEL").arg("ssegw:s:{d}")).unwrap();
    let fresh = redis.fcall_publish("d", "fresh", None);
    let mut s = Sse::open(cluster.replica(0), "topic=d", Some(&old)).await;
    assert_gap(&s.next().await, "d", "lost");
    let event = s.next().await;
    assert_eq!((event.id, event.data), (fresh, "fresh".to_string()));
}

/// A failover can lose what the old primary acknowledged: a client saw event X there, and the
/// promoted replica, which never had X, appended events past it. X lies within the stream's
/// range yet was never in it: resuming from X is a `lost` gap, never a silent skip of the
/// events around it.
#[actix_web::test]
async fn a_position_the_stream_never_held_is_lost_history() {
    let cluster = Cluster::redis(&[]);
    let redis = cluster.redis.as_ref().unwrap();
    let redis_ms = || -> u64 {
        let (secs, micros): (u64, u64) = redis.cmd(&redis::cmd("TIME")).unwrap();
        secs * 1000 + micros / 1000
    };
    let kept = redis.fcall_publish("f", "kept", None);
    // The event only the dead primary had: an id after `kept`, before what follows.
    let kept_ms: u64 = kept.split('-').next().unwrap().parse().unwrap();
    let seen_only_there = format!("{}-0", kept_ms + 1);
    let until = kept_ms + 3;
    while redis_ms() < until {
        tokio::task::yield_now().await;
    }
    let after = redis.fcall_publish("f", "after the failover", None);
    let mut s = Sse::open(cluster.replica(0), "topic=f", Some(&seen_only_there)).await;
    assert_gap(&s.next().await, "f", "lost");
    let replayed: Vec<(String, String)> = s
        .take(2)
        .await
        .into_iter()
        .map(|e| (e.id, e.data))
        .collect();
    assert_eq!(
        replayed,
        [
            (kept, "kept".to_string()),
            (after, "after the failover".to_string())
        ]
    );
}

/// Events written into Redis around the publish function (a raw `XADD` or `PUBLISH`) cannot
/// forge SSE fields through the event type.
#[actix_web::test]
async fn entries_written_around_the_publish_function_cannot_forge_fields() {
    let redis = support::RedisServer::start();
    let gw = support::Gateway::with_redis(&redis, &[]);
    let first = redis.fcall_publish("raw", "first", None);
    let forged = "a\rid: 9-0\rdata: forged";
    let raw_id: String = redis
        .cmd(
            redis::cmd("XADD")
                .arg("ssegw:s:{raw}")
                .arg("*")
                .arg("d")
                .arg("x")
                .arg("e")
                .arg(forged),
        )
        .unwrap();
    let mut sse = Sse::open(&gw, "topic=raw", Some(&first)).await;
    let event = sse.next().await;
    assert_eq!(
        (event.id.as_str(), event.event.as_str(), event.data.as_str()),
        (raw_id.as_str(), "message", "x"),
        "replayed without its invalid type"
    );

    let _: i64 = redis
        .cmd(
            redis::cmd("PUBLISH")
                .arg("ssegw:c:{raw}")
                .arg(format!("i99999999999999-0\ne{forged}\n\ny")),
        )
        .unwrap();
    let next = redis.fcall_publish("raw", "next", None);
    assert_eq!(sse.next().await.id, next, "the forged message is ignored");
    assert!(!sse.raw().contains("forged"), "{}", sse.raw());
}

/// History reads Redis has served so far: `ssegw_read` calls and the plain `XRANGE`s a resume
/// from a held position is read with.
fn history_reads(redis: &support::RedisServer) -> u64 {
    let info: String = redis
        .cmd(redis::cmd("INFO").arg("commandstats"))
        .expect("INFO commandstats");
    // FCALLs of every function are counted together; nothing but the reads runs meanwhile.
    let calls = |command: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |calls| calls.parse::<u64>().expect("a count"))
    };
    calls("fcall") + calls("xrange")
}

#[actix_web::test]
async fn a_storm_of_resumes_from_one_position_reads_history_once() {
    let cluster = Cluster::redis(&[]);
    let redis = cluster.redis.as_ref().unwrap();
    // The topic is subscribed on the replica, so resuming needs only the history read.
    let mut live = Sse::open(cluster.replica(0), "topic=storm", None).await;
    let from = redis.fcall_publish("storm", "seen", None);
    let missed: Vec<String> = (1..=3)
        .map(|i| redis.fcall_publish("storm", &format!("missed {i}"), None))
        .collect();
    assert_eq!(live.take(4).await.len(), 4);
    let before = history_reads(redis);
    // Frozen, Redis holds the first read, and every later resume finds it under way.
    redis.pause();
    let mut resumed = Vec::new();
    for _ in 0..40 {
        resumed.push(Sse::open(cluster.replica(0), "topic=storm", Some(&from)).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.resume();
    for sse in &mut resumed {
        let ids: Vec<String> = sse.take(3).await.into_iter().map(|e| e.id).collect();
        assert_eq!(ids, missed);
    }
    let reads = history_reads(redis) - before;
    assert_eq!(
        reads, 1,
        "40 resumes from one position, {reads} history reads"
    );
}

/// A resume over large events is written in bounded chunks, every event once and in order: a
/// slow resuming client makes the replica hold a few hundred KiB for it, not a whole history
/// page (500 events of up to 64 KiB).
#[actix_web::test]
async fn a_replay_of_large_events_goes_out_in_bounded_chunks() {
    const EVENTS: usize = 40;
    let cluster = Cluster::redis(&[]);
    let redis = cluster.redis.as_ref().unwrap();
    let padding = "p".repeat(60_000);
    let first = redis.fcall_publish("big", "first", None);
    for i in 0..EVENTS {
        redis.fcall_publish("big", &format!("{i}:{padding}"), None);
    }
    let mut raw = support::RawChunks::open(
        cluster.replica(0).addr,
        &format!("GET /events?topic=big HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {first}\r\n"),
    );
    let events = |body: &[u8]| {
        body.split(|&b| b == b'\n')
            .filter(|l| l.starts_with(b"data: "))
            .count()
    };
    let (mut body, mut largest) = (Vec::new(), 0);
    while events(&body) < EVENTS {
        let chunk = raw.next();
        largest = largest.max(chunk.len());
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(body).unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| d.split(':').next().unwrap())
        .collect();
    let expected: Vec<String> = (0..EVENTS).map(|i| i.to_string()).collect();
    assert_eq!(data, expected, "every event once, in order");
    assert!(
        largest <= 256 * 1024 + 61_000,
        "a replay chunk of {largest} bytes"
    );
}
