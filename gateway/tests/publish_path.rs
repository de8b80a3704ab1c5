//! The publish path beyond one event: idempotency keys (HTTP, CLI, FCALL), NDJSON batches, and
//! the fleet's retention table per namespace kept in Redis, applied whoever publishes and
//! changed at run time without restarting anything.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::{get_json, Cluster, Gateway, RedisServer, Replica, Sse};

const BIN: &str = env!("CARGO_BIN_EXE_sse-gateway");

/// `POST /publish` with a content type, extra headers and a raw body: status and JSON answer.
async fn post(
    gw: &Gateway,
    content_type: &str,
    headers: &[(&str, &str)],
    body: String,
) -> (u16, Value) {
    let mut request = awc::Client::default()
        .post(gw.url("/publish"))
        .insert_header(("content-type", content_type));
    for header in headers {
        request = request.insert_header(*header);
    }
    let mut response = request.send_body(body).await.expect("POST /publish");
    let status = response.status().as_u16();
    let json = response.json().await.unwrap_or(Value::Null);
    (status, json)
}

async fn publish_once(gw: &Gateway, topic: &str, data: &str, key: &str) -> (u16, Value) {
    let body = serde_json::json!({ "topic": topic, "data": data }).to_string();
    post(gw, "application/json", &[("idempotency-key", key)], body).await
}

fn xlen(redis: &RedisServer, topic: &str) -> u64 {
    redis
        .cmd(redis::cmd("XLEN").arg(format!("ssegw:s:{{{topic}}}")))
        .unwrap()
}

async fn idempotent_publishes(cluster: Cluster) {
    let gw = cluster.replica(0);
    let mut a = Sse::open(gw, "topic=once", None).await;
    a.baseline().await;
    let (status, first) = publish_once(gw, "once", "charge 42", "order-42").await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = publish_once(gw, "once", "charge 42", "order-42").await;
    assert_eq!(
        (status, &again),
        (200, &first),
        "a repeat answers the first id"
    );
    let delivered = a.next().await;
    assert_eq!(
        (delivered.id.as_str(), delivered.data.as_str()),
        (first["id"].as_str().unwrap(), "charge 42")
    );
    a.assert_quiet(Duration::from_millis(300)).await;
    if let Some(redis) = &cluster.redis {
        assert_eq!(xlen(redis, "once"), 1, "stored once");
    }
    // The same key with another event is refused, not taken for a repeat.
    let (status, reused) = publish_once(gw, "once", "charge 43", "order-42").await;
    assert_eq!(status, 422, "{reused}");
    assert!(
        reused["error"]
            .as_str()
            .unwrap()
            .contains("idempotency key already used"),
        "{reused}"
    );
    // The same key on another topic is another event.
    let (status, other) = publish_once(gw, "twice", "charge 42", "order-42").await;
    assert_eq!(status, 200);
    assert_ne!(other["id"], first["id"]);
    // A bad key is a 400 that says so.
    let (status, bad) = publish_once(gw, "once", "x", "has space").await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("Idempotency-Key"),
        "{bad}"
    );
    // Concurrent retries of one publish: one event.
    let tries = (0..20).map(|_| publish_once(gw, "race", "once only", "race-1"));
    let answers = futures_util::future::join_all(tries).await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(status, json)| {
            assert_eq!(*status, 200, "{json}");
            json["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "concurrent retries gave {ids:?}");
    if let Some(redis) = &cluster.redis {
        assert_eq!(xlen(redis, "race"), 1);
    }
}

#[actix_web::test]
async fn an_idempotency_key_publishes_once_redis() {
    idempotent_publishes(Cluster::redis(&[])).await;
}

#[actix_web::test]
async fn an_idempotency_key_publishes_once_embedded() {
    idempotent_publishes(Cluster::embedded(&[])).await;
}

/// The key lives for the window; after it, the same publish is a new event. Also through
/// `FCALL` (the documented call, with the record's key declared) and the CLI.
#[actix_web::test]
async fn idempotency_windows_fcall_and_cli() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &["--idempotency-window", "1s"]);
    let (_, first) = publish_once(&gw, "win", "d", "k").await;
    let record = "ssegw:i:{win}:k";
    let ttl: i64 = redis.cmd(redis::cmd("PTTL").arg(record)).unwrap();
    assert!(
        (1..=1000).contains(&ttl),
        "the record lives for the window: {ttl} ms"
    );
    support::wait_until("the idempotency record to expire", || {
        redis.cmd::<i64>(redis::cmd("EXISTS").arg(record)).unwrap() == 0
    });
    let (_, after) = publish_once(&gw, "win", "d", "k").await;
    assert_ne!(after["id"], first["id"], "after the window, a new event");
    assert_eq!(xlen(&redis, "win"), 2);

    let fcall = |keys: &[&str], key: &str| {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("ssegw_publish")
            .arg(keys.len())
            .arg(keys)
            .arg("payload")
            .arg("")
            .arg("")
            .arg(key)
            .arg(60);
        redis.cmd::<String>(&cmd)
    };
    let one = fcall(&["ssegw:s:{f}", "ssegw:i:{f}:abc"], "abc").unwrap();
    assert_eq!(
        fcall(&["f"], "abc").unwrap(),
        one,
        "both call forms find the record"
    );
    let wrong = fcall(&["ssegw:s:{f}", "ssegw:i:{other}:abc"], "abc").unwrap_err();
    assert!(wrong.to_string().contains("second key must be"), "{wrong}");
    assert_eq!(xlen(&redis, "f"), 1);

    let cli = |key: &str| {
        let out = Command::new(BIN)
            .args([
                "publish",
                "--redis-url",
                &redis.url(),
                "--topic",
                "c",
                "--data",
                "x",
                "--idempotency-key",
                key,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(cli("cli-1"), cli("cli-1"));
    assert_eq!(xlen(&redis, "c"), 1);
    // Through a gateway's HTTP API too (no Redis URL).
    let out = Command::new(BIN)
        .args([
            "publish",
            "--url",
            &gw.url(""),
            "--topic",
            "c",
            "--data",
            "x",
            "--idempotency-key",
            "cli-2",
        ])
        .env_remove("SSEGW_REDIS_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, again) = publish_once(&gw, "c", "x", "cli-2").await;
    assert_eq!(
        again["id"].as_str().unwrap(),
        String::from_utf8(out.stdout).unwrap().trim()
    );
    assert_eq!(xlen(&redis, "c"), 2);
}

fn ndjson(events: &[(&str, &str)]) -> String {
    events
        .iter()
        .map(|(topic, data)| serde_json::json!({ "topic": topic, "data": data }).to_string() + "\n")
        .collect()
}

async fn batches(cluster: Cluster) {
    let gw = cluster.replica(0);
    let mut sse = Sse::open(gw, "topic=b1&topic=b2", None).await;
    sse.baseline().await;
    let events: Vec<(String, String)> = (0..100)
        .map(|i| (format!("b{}", 1 + i % 2), format!("event {i}")))
        .collect();
    let pairs: Vec<(&str, &str)> = events
        .iter()
        .map(|(t, d)| (t.as_str(), d.as_str()))
        .collect();
    let (status, answer) = post(gw, "application/x-ndjson", &[], ndjson(&pairs)).await;
    assert_eq!(status, 200, "{answer}");
    let ids: Vec<&str> = answer["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 100);
    let delivered = sse.take(100).await;
    for topic in ["b1", "b2"] {
        let sent: Vec<(&str, &str)> = pairs
            .iter()
            .zip(&ids)
            .filter(|((t, _), _)| *t == topic)
            .map(|((_, d), id)| (*id, *d))
            .collect();
        let parse = |id: &str| ssegw_protocol::StreamId::parse(id).unwrap();
        assert!(
            sent.windows(2).all(|w| parse(w[0].0) < parse(w[1].0)),
            "ids in order on {topic}"
        );
        let got: Vec<&str> = delivered
            .iter()
            .filter(|e| sent.iter().any(|(_, d)| *d == e.data))
            .map(|e| e.data.as_str())
            .collect();
        let want: Vec<&str> = sent.iter().map(|(_, d)| *d).collect();
        assert_eq!(got, want, "{topic} delivered in order, once");
    }
    // A bad line refuses the whole batch, named by its number; nothing is published.
    let body = format!(
        "{}\n{}\n{{\"topic\": \"b1\", \"data\": \"\"}}\n",
        serde_json::json!({"topic": "b1", "data": "fine"}),
        serde_json::json!({"topic": "b2", "data": "fine"})
    );
    let (status, bad) = post(gw, "application/x-ndjson", &[], body).await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .starts_with("line 3: data must not be empty"),
        "{bad}"
    );
    let (status, bad) = post(
        gw,
        "application/x-ndjson",
        &[],
        "{\"topic\": \"b1\", \"data\": \"x\"}\nnot json\n".into(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .starts_with("line 2: invalid publish body"),
        "{bad}"
    );
    let (status, _) = post(gw, "application/x-ndjson", &[], "\n\n".into()).await;
    assert_eq!(status, 400, "an empty batch");
    let (status, _) = post(gw, "text/plain", &[], ndjson(&[("b1", "x")])).await;
    assert_eq!(status, 415);
    let long = "k".repeat(254);
    let (status, bad) = post(
        gw,
        "application/x-ndjson",
        &[("idempotency-key", &long)],
        ndjson(&[("b1", "x")]),
    )
    .await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .contains("must fit in 255 bytes"),
        "{bad}"
    );
    sse.assert_quiet(Duration::from_millis(300)).await;
    // The same batch sent again with its key is published once.
    let keyed = ndjson(&[("b1", "k1"), ("b2", "k2")]);
    let (_, first) = post(
        gw,
        "application/x-ndjson",
        &[("idempotency-key", "batch-7")],
        keyed.clone(),
    )
    .await;
    let (_, again) = post(
        gw,
        "application/x-ndjson",
        &[("idempotency-key", "batch-7")],
        keyed,
    )
    .await;
    assert_eq!(first, again);
    assert_eq!(sse.take(2).await.len(), 2);
    sse.assert_quiet(Duration::from_millis(300)).await;
}

#[actix_web::test]
async fn ndjson_batches_keep_order_and_refuse_bad_lines_whole_redis() {
    batches(Cluster::redis(&["--publish-batch-max", "100"])).await;
}

#[actix_web::test]
async fn ndjson_batches_keep_order_and_refuse_bad_lines_whole_embedded() {
    batches(Cluster::embedded(&["--publish-batch-max", "100"])).await;
}

/// Limits: events per batch; and a batch Redis takes only in part answers per event.
#[actix_web::test]
async fn a_batch_redis_takes_in_part_answers_per_event() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &["--publish-batch-max", "3"]);
    let four = ndjson(&[("p", "1"), ("p", "2"), ("p", "3"), ("p", "4")]);
    let (status, answer) = post(&gw, "application/x-ndjson", &[], four).await;
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("at most 3 events"),
        "{answer}"
    );
    // Event 2's key was used before for another event: Redis refuses that one only.
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("ssegw_publish")
        .arg(1)
        .arg("p")
        .arg("something else")
        .arg("")
        .arg("")
        .arg("K/2");
    let _: String = redis.cmd(&cmd).unwrap();
    let three = ndjson(&[("p", "1"), ("p", "2"), ("p", "3")]);
    let (status, answer) = post(
        &gw,
        "application/x-ndjson",
        &[("idempotency-key", "K")],
        three,
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert!(
        results[0]["id"].is_string() && results[2]["id"].is_string(),
        "{answer}"
    );
    assert!(results[1]["error"]
        .as_str()
        .unwrap()
        .contains("idempotency key already used"));
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .starts_with("1 of 3 events were not published"));
    assert_eq!(xlen(&redis, "p"), 3);
}

fn namespace(redis: &RedisServer, args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .arg("namespace")
        .args(args)
        .args(["--redis-url", &redis.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "namespace {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fcall(redis: &RedisServer, topic: &str, data: &str) -> redis::RedisResult<String> {
    redis.cmd(
        redis::cmd("FCALL")
            .arg("ssegw_publish")
            .arg(1)
            .arg(topic)
            .arg(data),
    )
}

/// Replicas started with different flags share the table the first one seeded: publishing
/// through either keeps one retention, never flapping between theirs.
#[actix_web::test]
async fn replicas_with_different_flags_share_one_retention() {
    let redis = RedisServer::start();
    let first = Gateway::with_redis(&redis, &["--history-max-len", "8"]);
    let second = Gateway::with_redis(&redis, &["--history-max-len", "80"]);
    for i in 0..60 {
        let gw = if i % 2 == 0 { &first } else { &second };
        support::blocking_http_publish(gw.addr(), "flap", &format!("e{i}"));
        let len = xlen(&redis, "flap");
        assert!(
            len <= 8 + 1,
            "{len} events kept after publish {i}: the table flapped"
        );
    }
    assert!(xlen(&redis, "flap") >= 8);
    for gw in [&first, &second] {
        let (_, status) = get_json(gw.addr(), "/status");
        assert_eq!(status["retention"]["default"]["max_len"], 8, "{status}");
        assert_eq!(status["retention"]["generation"], 0);
    }
}

/// `sse-gateway namespace`: a change applies to the next publish, whoever publishes (FCALL,
/// HTTP, EVAL excepted), reaches every replica's `/status`, and survives a replica's restart.
#[actix_web::test]
async fn namespaces_change_retention_at_run_time() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &["--history-max-len", "20"]);
    let table = namespace(&redis, &["list"]);
    assert_eq!(table["default"]["max_len"], 20);
    assert_eq!(table["namespaces"], serde_json::json!({}));

    let table = namespace(&redis, &["set", "chat.", "--max-len", "3", "--ttl", "1h"]);
    assert_eq!(table["namespaces"]["chat."]["max_len"], 3);
    assert_eq!(table["namespaces"]["chat."]["ttl_seconds"], 3600);
    assert_eq!(
        table["namespaces"]["chat."]["max_event_bytes"], 65536,
        "unset limits come from the default"
    );
    assert!(table["generation"].as_u64().unwrap() > 0);
    for i in 0..10 {
        fcall(&redis, "chat.room", &format!("m{i}")).unwrap();
        fcall(&redis, "other", &format!("m{i}")).unwrap();
        support::blocking_http_publish(gw.addr(), "chat.http", &format!("m{i}"));
    }
    assert!(
        xlen(&redis, "chat.room") <= 4,
        "chat. keeps 3 (+1 before trimming)"
    );
    assert!(xlen(&redis, "chat.http") <= 4);
    assert_eq!(xlen(&redis, "other"), 10, "the default keeps 20");
    let ttl: i64 = redis
        .cmd(redis::cmd("TTL").arg("ssegw:s:{chat.room}"))
        .unwrap();
    assert!(
        (3590..=3600).contains(&ttl),
        "chat. expires after an hour: {ttl}"
    );
    // A short ttl is refreshed by the publishes that follow, however short: the stream lives on
    // while published to.
    namespace(&redis, &["set", "brief.", "--ttl", "1s"]);
    let pttl = || -> i64 {
        redis
            .cmd(redis::cmd("PTTL").arg("ssegw:s:{brief.t}"))
            .unwrap()
    };
    fcall(&redis, "brief.t", "first").unwrap();
    for _ in 0..3 {
        support::wait_until("the ttl to run down past an eighth", || {
            (0..800).contains(&pttl())
        });
        fcall(&redis, "brief.t", "again").unwrap();
        assert!(pttl() > 900, "a publish refreshed the ttl: {}", pttl());
    }
    assert_eq!(xlen(&redis, "brief.t"), 4);
    // The longest prefix wins; a namespace may allow larger events than the default.
    namespace(&redis, &["set", "chat.big.", "--max-event-bytes", "100000"]);
    let big = "x".repeat(70_000);
    fcall(&redis, "chat.big.files", &big).unwrap();
    let refused = fcall(&redis, "chat.room", &big).unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("data is larger than 65536 bytes"),
        "{refused}"
    );
    support::wait_until("the replica to show the new table", || {
        let (_, status) = get_json(gw.addr(), "/status");
        status["retention"]["namespaces"]["chat.big."]["max_event_bytes"] == 100_000
    });
    let body = serde_json::json!({ "topic": "chat.big.http", "data": big }).to_string();
    let (status, answer) = post(&gw, "application/json", &[], body).await;
    assert_eq!(status, 200, "HTTP follows the fleet's table: {answer}");
    let body = serde_json::json!({ "topic": "other", "data": big }).to_string();
    let (status, _) = post(&gw, "application/json", &[], body).await;
    assert_eq!(status, 413);
    // Removing a namespace sends its topics back to the default.
    namespace(&redis, &["unset", "chat."]);
    for i in 0..10 {
        fcall(&redis, "chat.room", &format!("n{i}")).unwrap();
    }
    assert!(xlen(&redis, "chat.room") >= 13);
    let table = namespace(&redis, &["set", "--default", "--max-len", "5"]);
    assert_eq!(table["default"]["max_len"], 5);
    fcall(&redis, "other", "trim now").unwrap();
    assert!(xlen(&redis, "other") <= 6);
    // A replica started later with other flags takes the table, not its flags.
    let late = Gateway::with_redis(&redis, &["--history-max-len", "999"]);
    let (_, status) = get_json(late.addr(), "/status");
    assert_eq!(status["retention"]["default"]["max_len"], 5, "{status}");
    // Bad changes are refused with a clear message and change nothing.
    for (args, says) in [
        (&["set", "a b", "--max-len", "3"][..], "not a topic prefix"),
        (
            &["set", "x.", "--max-len", "0"][..],
            "max-len must be at least 1",
        ),
        (&["unset", "nothing."][..], "no namespace"),
    ] {
        let out = Command::new(BIN)
            .arg("namespace")
            .args(args)
            .args(["--redis-url", &redis.url()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert_eq!(namespace(&redis, &["list"])["default"]["max_len"], 5);
    let out = Command::new(BIN)
        .args(["namespace", "list"])
        .env_remove("SSEGW_REDIS_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lives in Redis"));
    // `list` only reads: on a Redis without the library it says so and loads nothing.
    let empty = RedisServer::start();
    let out = Command::new(BIN)
        .args(["namespace", "list", "--redis-url", &empty.url()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not in Redis"));
    let libraries: Vec<redis::Value> = empty.cmd(redis::cmd("FUNCTION").arg("LIST")).unwrap();
    assert!(libraries.is_empty(), "list loaded a library");
}
