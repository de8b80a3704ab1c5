//! Publishing and framing: every publish path yields the same event; frames parse back to the
//! published payload with an independent SSE parser; bad input gets a clear 4xx and disturbs
//! nobody; bad configuration exits before serving.

mod support;

use std::process::Command;
use std::time::Duration;

use ssegw_protocol::script::{publish_eval_script, ScriptSettings};
use support::{http_publish, Cluster, Gateway, RedisServer, Replica, Sse};

const BIN: &str = env!("CARGO_BIN_EXE_sse-gateway");

/// Payloads that exercise every line-break form, UTF-8 and edge whitespace.
const PAYLOADS: &[&str] = &[
    "plain",
    "two\nlines",
    "crlf\r\nline",
    "lone\rcr",
    "mixed\r\n\n\rbreaks",
    "trailing newline\n",
    "\nleading newline",
    "  two leading spaces",
    "data: looks like a field",
    ": looks like a comment",
    "Gr\u{fc}\u{df}e \u{4e16}\u{754c} \u{1f389}",
    "{\"json\":[1,2,3]}",
];

async fn frames_round_trip(cluster: Cluster) {
    let mut sse = Sse::open(cluster.replica(0), "topic=frames", None).await;
    for payload in PAYLOADS {
        cluster.publish("frames", payload).await;
    }
    for payload in PAYLOADS {
        let event = sse.next().await;
        // WHATWG: CRLF, CR and LF all end a line; lines are joined with LF.
        let expected = payload.replace("\r\n", "\n").replace('\r', "\n");
        assert_eq!(event.data, expected, "payload {payload:?}");
        assert_eq!(event.event, "message");
    }
}

#[actix_web::test]
async fn frames_parse_back_to_the_payload_redis() {
    frames_round_trip(Cluster::redis(&[])).await;
}

#[actix_web::test]
async fn frames_parse_back_to_the_payload_embedded() {
    frames_round_trip(Cluster::embedded(&[])).await;
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SSEGW_REDIS_URL")
        .output()
        .expect("run sse-gateway")
}

fn cli_publish(args: &[&str]) -> String {
    let output = cli(args);
    assert!(
        output.status.success(),
        "publish failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

#[actix_web::test]
async fn http_cli_fcall_and_eval_publish_identical_events() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &[]);
    let mut sse = Sse::open(&gw, "topic=same", None).await;
    let (data, event) = ("line one\nline two", "update");

    let via_cli = |flag: &str, target: &str| {
        cli_publish(&[
            "publish", flag, target, "--topic", "same", "--data", data, "--event", event,
        ])
    };
    let mut ids = vec![
        http_publish(&gw, "same", data, Some(event)).await,
        via_cli("--redis-url", &redis.url()),
        via_cli("--url", &gw.url("")),
        redis.fcall_publish("same", data, Some(event)),
    ];
    let script = publish_eval_script(&ScriptSettings::default());
    ids.push(
        redis
            .cmd(
                redis::cmd("EVAL")
                    .arg(&script)
                    .arg(1)
                    .arg("same")
                    .arg(data)
                    .arg(event),
            )
            .unwrap(),
    );

    for id in &ids {
        let got = sse.next().await;
        assert_eq!(
            (&got.id, got.event.as_str(), got.data.as_str()),
            (id, event, data)
        );
    }
    // Identical on the wire, but for the id line.
    let raw = sse.raw();
    let blocks: Vec<&str> = raw.split("\n\n").filter(|b| b.contains("data:")).collect();
    assert_eq!(blocks.len(), ids.len());
    for (block, id) in blocks.iter().zip(&ids) {
        assert_eq!(
            *block,
            format!("id: {id}\nevent: {event}\ndata: line one\ndata: line two")
        );
    }
    // The stream expires after the configured idle time (24h by default), refreshed by publishes.
    let ttl: i64 = redis.cmd(redis::cmd("TTL").arg("ssegw:s:{same}")).unwrap();
    assert!((86_300..=86_400).contains(&ttl), "stream TTL {ttl}");
    // Identical in the stream.
    let entries: Vec<(String, Vec<(String, String)>)> = redis
        .cmd(redis::cmd("XRANGE").arg("ssegw:s:{same}").arg("-").arg("+"))
        .unwrap();
    assert_eq!(entries.len(), ids.len());
    for (entry, id) in entries.iter().zip(&ids) {
        assert_eq!(&entry.0, id);
        assert_eq!(
            entry.1,
            vec![("d".into(), data.into()), ("e".into(), event.into())]
        );
    }
}

#[actix_web::test]
async fn publish_command_reports_bad_input_and_unreachable_targets() {
    for (topic, message) in [("a b", "invalid topic"), ("t", "cannot reach")] {
        let output = cli(&[
            "publish",
            "--url",
            "http://127.0.0.1:1",
            "--topic",
            topic,
            "--data",
            "x",
        ]);
        assert!(!output.status.success(), "topic {topic:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(message),
            "topic {topic:?}: {stderr:?} lacks {message:?}"
        );
    }
}

/// One request of the bad-input table.
struct Bad {
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    body: String,
    status: u16,
    message: &'static str,
}

fn bad(
    method: &'static str,
    path: impl Into<String>,
    body: &str,
    status: u16,
    message: &'static str,
) -> Bad {
    Bad {
        method,
        path: path.into(),
        content_type: Some("application/json"),
        body: body.to_string(),
        status,
        message,
    }
}

#[actix_web::test]
async fn bad_requests_get_clear_errors_and_disturb_nobody() {
    let cluster = Cluster::redis(&["--max-topics", "3", "--max-event-bytes", "1024"]);
    let gw = cluster.replica(0);
    let mut bystander = Sse::open(gw, "topic=calm", None).await;

    let big = "x".repeat(1025);
    let table = [
        bad("GET", "/events", "", 400, "missing topic"),
        bad("GET", "/events?topic=", "", 400, "must not be empty"),
        bad("GET", "/events?topic=a%20b", "", 400, "invalid topic"),
        bad("GET", "/events?topic=a%7Bb%7D", "", 400, "invalid topic"),
        bad("GET", "/events?topic=orders.*", "", 400, "invalid topic"),
        bad(
            "GET",
            format!("/events?topic={}", "t".repeat(129)),
            "",
            400,
            "longer than 128",
        ),
        bad(
            "GET",
            "/events?topic=a&topic=b&topic=c&topic=d",
            "",
            400,
            "too many topics",
        ),
        bad("POST", "/publish", "{", 400, "invalid publish body"),
        bad(
            "POST",
            "/publish",
            r#"{"topic":"t"}"#,
            400,
            "missing field `data`",
        ),
        bad(
            "POST",
            "/publish",
            r#"{"topic":"t","data":"x","extra":1}"#,
            400,
            "unknown field",
        ),
        bad(
            "POST",
            "/publish",
            r#"{"topic":"a b","data":"x"}"#,
            400,
            "invalid topic",
        ),
        bad(
            "POST",
            "/publish",
            r#"{"topic":"t","data":""}"#,
            400,
            "must not be empty",
        ),
        bad(
            "POST",
            "/publish",
            r#"{"topic":"t","data":null}"#,
            400,
            "must not be null",
        ),
        bad(
            "POST",
            "/publish",
            r#"{"topic":"t","data":"x","event":"ssegw-gap"}"#,
            400,
            "reserved",
        ),
        bad(
            "POST",
            "/publish",
            r#"{"topic":"t","data":"x","event":"a\nb"}"#,
            400,
            "invalid event",
        ),
        bad(
            "POST",
            "/publish",
            &format!(r#"{{"topic":"t","data":"{big}"}}"#),
            413,
            "larger than 1024",
        ),
        bad(
            "POST",
            "/publish",
            &format!(r#"{{"topic":"t","data":"{}"}}"#, "x".repeat(20_000)),
            413,
            "larger than",
        ),
        Bad {
            content_type: Some("text/plain"),
            ..bad(
                "POST",
                "/publish",
                r#"{"topic":"t","data":"x"}"#,
                415,
                "application/json",
            )
        },
        bad("GET", "/nowhere", "", 404, "no route for /nowhere"),
        bad("DELETE", "/events?topic=a", "", 405, "use GET"),
        bad("GET", "/publish", "", 405, "use POST"),
        bad("POST", "/healthz", "", 405, "use GET"),
    ];
    let client = awc::Client::default();
    for case in &table {
        let mut request = client.request(case.method.parse().unwrap(), gw.url(&case.path));
        if let Some(ct) = case.content_type {
            request = request.insert_header(("content-type", ct));
        }
        let mut response = request.send_body(case.body.clone()).await.unwrap();
        let body = response.body().limit(1 << 20).await.unwrap();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(
            response.status().as_u16(),
            case.status,
            "{} {}: {text}",
            case.method,
            case.path
        );
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        let message = json["error"].as_str().unwrap();
        assert!(
            message.contains(case.message),
            "{} {}: {message:?} lacks {:?}",
            case.method,
            case.path,
            case.message
        );
        if case.status == 405 {
            assert!(response.headers().contains_key("allow"));
        }
    }
    // The FCALL path refuses the same bad input with the same reasons.
    let redis = cluster.redis.as_ref().unwrap();
    for (topic, data, event, message) in [
        ("a b", "x", None, "invalid topic"),
        ("t", "", None, "must not be empty"),
        ("t", "x", Some("ssegw-gap"), "invalid event type"),
    ] {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("ssegw_publish").arg(1).arg(topic).arg(data);
        if let Some(event) = event {
            cmd.arg(event);
        }
        let err = redis.cmd::<String>(&cmd).unwrap_err();
        assert!(err.to_string().contains(message), "{err}");
    }

    // Nobody else noticed.
    let id = redis.fcall_publish("calm", "still here", None);
    let event = bystander.next().await;
    assert_eq!((event.id, event.data), (id, "still here".to_string()));
    bystander.assert_quiet(Duration::from_millis(200)).await;
}

#[test]
fn bad_configuration_exits_non_zero_before_serving() {
    let cases: &[(&str, &str, &str)] = &[
        ("SSEGW_KEEPALIVE", "1ms", "SSEGW_KEEPALIVE"),
        ("SSEGW_MAX_TOPICS", "0", "SSEGW_MAX_TOPICS"),
        ("SSEGW_REDIS_URL", "http://example", "SSEGW_REDIS_URL"),
        ("SSEGW_HISTORY_TTL", "forever", "--history-ttl"),
        ("SSEGW_LISTEN", "not-an-address", "--listen"),
    ];
    for (var, value, message) in cases {
        let output = Command::new(BIN)
            .env(var, value)
            .env(
                "SSEGW_LISTEN",
                if *var == "SSEGW_LISTEN" {
                    value
                } else {
                    "127.0.0.1:0"
                },
            )
            .output()
            .expect("run sse-gateway");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{var}={value}: {stderr}");
        assert!(
            stderr.contains(message),
            "{var}={value}: {stderr:?} lacks {message:?}"
        );
        assert!(
            !stderr.contains("listening"),
            "{var}={value} started serving: {stderr}"
        );
    }
}

#[actix_web::test]
async fn streams_start_with_retry_and_keep_idle_connections_alive() {
    let gw = Gateway::start(&["--keepalive", "150ms", "--retry", "750ms"]);
    let mut sse = Sse::open(&gw, "topic=quiet", None).await;
    assert_eq!(sse.baseline().await, "0-0");
    assert!(
        sse.raw().starts_with("retry: 750\nid: 0-0\n\n"),
        "{:?}",
        sse.raw()
    );
    // Keep-alive comments arrive while nothing is published (and no event does).
    let deadline = std::time::Instant::now() + support::WAIT;
    while sse.raw().matches(":\n\n").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no keep-alives: {:?}",
            sse.raw()
        );
        sse.assert_quiet(Duration::from_millis(50)).await;
    }
    let id = http_publish(&gw, "quiet", "finally", None).await;
    assert_eq!(sse.next().await.id, id);
}

#[actix_web::test]
async fn readiness_follows_redis_and_open_streams_survive_its_restart() {
    let mut redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &["--redis-timeout", "500ms"]);
    assert_eq!(support::http_status(gw.addr, "GET", "/healthz"), Some(200));
    let mut before = Sse::open(&gw, "topic=r", None).await;
    redis.kill();
    gw.wait_readyz(503);
    assert_eq!(
        support::http_status(gw.addr, "GET", "/healthz"),
        Some(200),
        "alive while not ready"
    );
    // A topic this replica does not serve yet cannot be subscribed without Redis.
    let response = awc::Client::default()
        .get(gw.url("/events?topic=elsewhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry_after), "Retry-After {retry_after}");
    // Open streams stay open through the outage.
    before.assert_quiet(Duration::from_millis(300)).await;

    redis.restart();
    gw.wait_readyz(200);
    let mut after = Sse::open(&gw, "topic=r", None).await;
    let id = redis.fcall_publish("r", "back", None);
    for sse in [&mut before, &mut after] {
        let event = sse.next().await;
        assert_eq!(
            (event.id.as_str(), event.data.as_str()),
            (id.as_str(), "back")
        );
    }
}

/// The HTTP chunks of a raw `GET /events` response, read until `want` chunks holding events
/// have arrived. Each chunk is one write of the gateway's body.
fn event_chunks(
    addr: std::net::SocketAddr,
    query: &str,
    want: usize,
    ready: impl FnOnce(),
) -> Vec<String> {
    let mut raw = support::RawChunks::open(
        addr,
        &format!("GET /events?{query} HTTP/1.1\r\nHost: x\r\n"),
    );
    let mut ready = Some(ready);
    let mut chunks = Vec::new();
    while chunks.len() < want {
        let chunk = String::from_utf8(raw.next()).unwrap();
        if chunk.contains("data:") {
            chunks.push(chunk);
        } else if let Some(ready) = ready.take() {
            // The preamble: the stream is subscribed.
            ready();
        }
    }
    chunks
}

#[test]
fn write_coalescing_sends_the_events_of_one_delay_in_one_write() {
    let redis = RedisServer::start();
    let gw = support::GatewayProcess::start(&redis.url(), &["--write-coalesce", "300ms"]);
    let mut ids = Vec::new();
    let mut published_at = None;
    let chunks = event_chunks(gw.addr, "topic=burst", 1, || {
        published_at = Some(std::time::Instant::now());
        for i in 0..5 {
            ids.push(redis.fcall_publish("burst", &format!("e{i}"), None));
        }
    });
    let waited = published_at.expect("subscribed").elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "written before the delay was over: {waited:?}"
    );
    let expected: String = ids
        .iter()
        .enumerate()
        .map(|(i, id)| format!("id: {id}\ndata: e{i}\n\n"))
        .collect();
    assert_eq!(
        chunks,
        [expected],
        "the burst must leave in one write, in order"
    );
}
