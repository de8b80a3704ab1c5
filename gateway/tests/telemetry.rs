//! Seeing inside a fleet: `/metrics` in the Prometheus text format with counters that move by
//! exactly what happened, and over OTLP (to an in-test receiver) the spans of a publish and of
//! each replica's delivery, linked by the trace id the publisher sent, plus the metrics; log
//! lines carry request and trace ids. (Whether anything is exported at all is decided by
//! `telemetry::TelemetryConfig`, unit-tested beside it.)

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::otlp::OtlpReceiver;
use support::{wait_until, Gateway, GatewayProcess, RedisServer, Replica, Sse, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `/metrics`, parsed as Prometheus text: every sample by name and labels.
fn scrape(gw: &impl Replica) -> HashMap<String, f64> {
    let text = metrics_body(gw);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let mut samples = HashMap::new();
    for sample in scrape.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        let key = if labels.is_empty() {
            sample.metric.clone()
        } else {
            format!("{}{{{}}}", sample.metric, labels.join(","))
        };
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => continue,
        };
        samples.insert(key, value);
    }
    samples
}

/// `/metrics` as text, checked to be served as the Prometheus text format.
fn metrics_body(gw: &impl Replica) -> String {
    let (status, head, body) = support::get_text(gw.addr(), "/metrics");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body
}

/// The change of each named sample between two scrapes.
fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    let get = |m: &HashMap<String, f64>| m.get(key).copied().unwrap_or(0.0);
    assert!(after.contains_key(key), "no sample {key} in {after:?}");
    get(after) - get(before)
}

#[actix_web::test]
async fn metrics_count_exactly_what_happened() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(
        &redis,
        &[
            "--client-buffer",
            "16",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
            "--anonymous-subscribe",
            "m,slow",
            "--anonymous-publish",
            "*",
        ],
    );
    let before = scrape(&gw);

    // A subscriber gets N events; a second resumes from the third-to-last; both leave.
    const N: usize = 25;
    let mut first = Sse::open(&gw, "topic=m", None).await;
    first.baseline().await;
    let ids: Vec<String> = (0..N)
        .map(|i| redis.fcall_publish("m", &format!("e{i}"), None))
        .collect();
    let received = first.take(N).await;
    assert_eq!(received.last().unwrap().id, ids[N - 1]);
    let mut resumed = Sse::open(&gw, "topic=m", Some(&ids[N - 3])).await;
    assert_eq!(
        resumed.take(2).await.last().unwrap().data,
        format!("e{}", N - 1)
    );
    // 401: a topic outside anonymous access, without a token.
    assert_eq!(
        support::http_status(gw.addr, "GET", "/events?topic=private"),
        Some(401)
    );
    let bytes = first.raw().len() + resumed.raw().len();
    drop(first);
    drop(resumed);
    wait_until("both streams closed", || {
        scrape(&gw)["ssegw_connections_open"] == 0.0
    });
    let after = scrape(&gw);
    for (key, expected) in [
        ("ssegw_connections_opened_total", 2.0),
        ("ssegw_connections_closed_total{reason=client_left}", 2.0),
        ("ssegw_connections_closed_total{reason=slow}", 0.0),
        ("ssegw_connections_refused_total{reason=unauthorized}", 1.0),
        ("ssegw_connections_refused_total{reason=limit}", 0.0),
        ("ssegw_events_received_total", N as f64),
        ("ssegw_frames_delivered_total", (N + 2) as f64),
        ("ssegw_bytes_written_total", bytes as f64),
        ("ssegw_resume_requests_total", 1.0),
        ("ssegw_replayed_events_total", 2.0),
        ("ssegw_control_events_total{kind=gap}", 0.0),
        ("ssegw_delivery_lag_seconds_count", N as f64),
        ("ssegw_redis_reconnects_total", 0.0),
    ] {
        assert_eq!(delta(&before, &after, key), expected, "{key}");
    }
    assert!(
        after["ssegw_redis_canary_rtt_seconds_count"] >= 1.0,
        "no canary round trip"
    );

    // A slow consumer: it reads its response head, then nothing while a fast one gets more
    // than the buffers hold (the hub's 16 places, actix's and the kernel's), then reads again
    // and finds its stream ended.
    let before = after;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /events?topic=slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(WAIT, slow.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    let mut fast = Sse::open(&gw, "topic=slow", None).await;
    fast.baseline().await;
    const SENT: usize = 200;
    let padding = "p".repeat(60_000);
    for i in 0..SENT {
        redis.fcall_publish("slow", &format!("{i}:{padding}"), None);
        if i % 10 == 9 {
            fast.take(10).await;
        }
    }
    loop {
        match tokio::time::timeout(WAIT, slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) if buf[..n].ends_with(b"\r\n0\r\n\r\n") => break,
            Ok(Ok(_)) => {}
            Err(_) => panic!("the slow consumer's stream did not end"),
        }
    }
    let sent = SENT;
    let after = scrape(&gw);
    assert_eq!(
        delta(
            &before,
            &after,
            "ssegw_connections_closed_total{reason=slow}"
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "ssegw_connections_closed_total{reason=client_left}"
        ),
        0.0
    );
    assert_eq!(
        delta(&before, &after, "ssegw_connections_opened_total"),
        2.0
    );
    assert_eq!(
        delta(&before, &after, "ssegw_events_received_total"),
        sent as f64
    );
}

/// A subscription refused because Redis does not answer counts as refused, not as a stream
/// opened: opened = closed + open stays true.
#[actix_web::test]
async fn a_subscription_refused_while_redis_is_away_is_counted_as_refused() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &["--redis-timeout", "500ms"]);
    let before = scrape(&gw);
    redis.pause();
    let status = support::http_status(gw.addr, "GET", "/events?topic=never-subscribed");
    redis.resume();
    assert_eq!(status, Some(503));
    let after = scrape(&gw);
    for (key, expected) in [
        ("ssegw_connections_refused_total{reason=unavailable}", 1.0),
        ("ssegw_connections_opened_total", 0.0),
        ("ssegw_connections_closed_total{reason=client_left}", 0.0),
        ("ssegw_connections_open", 0.0),
    ] {
        assert_eq!(delta(&before, &after, key), expected, "{key}");
    }
}

/// A publish over HTTP with the caller's `traceparent` is a child span of it; the replica that
/// delivers it to its client records a `deliver` span linked to the publish, with the number
/// of local recipients; metrics arrive over OTLP too; and the publish's log line carries the
/// request id and the trace id.
#[actix_web::test]
async fn a_publish_and_its_deliveries_are_traced_over_otlp() {
    let redis = RedisServer::start();
    let receiver = OtlpReceiver::start();
    let endpoint = receiver.endpoint();
    let dir = support::tempdir("otel");
    let log = dir.join("publisher.log");
    let env = |service: &'static str, log: &'static str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", service),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            ("SSEGW_LOG_FORMAT", "json"),
            ("SSEGW_LOG", log),
        ]
    };
    let publisher_env = env("gw-publisher", "info,sse_gateway=debug");
    let publisher = GatewayProcess::spawn(&redis.url(), &[], &publisher_env, Some(&log));
    // A quiet log does not silence the traces.
    let deliverer_env = env("gw-deliverer", "error");
    let deliverer = GatewayProcess::spawn(&redis.url(), &[], &deliverer_env, None);
    let mut a = Sse::open(&deliverer, "topic=traced", None).await;
    let mut b = Sse::open(&deliverer, "topic=traced", None).await;
    a.baseline().await;
    b.baseline().await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let reply = awc::Client::default()
        .post(publisher.url("/publish"))
        .insert_header(("traceparent", format!("00-{trace_id}-{caller_span}-01")))
        .insert_header(("x-request-id", "req-42"))
        .send_json(&serde_json::json!({"topic": "traced", "data": "hello"}))
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.headers().get("x-request-id").unwrap(), "req-42");
    assert_eq!(a.next().await.data, "hello");
    assert_eq!(b.next().await.data, "hello");

    let (publish, deliver) = {
        let mut found = None;
        wait_until("the publish and deliver spans", || {
            let spans = receiver.spans();
            let publish = spans
                .iter()
                .find(|s| s.span.name == "publish" && s.trace_id() == trace_id);
            let deliver = spans.iter().find(|s| s.span.name == "deliver");
            if let (Some(p), Some(d)) = (publish, deliver) {
                found = Some((p.clone(), d.clone()));
            }
            found.is_some()
        });
        found.unwrap()
    };
    assert_eq!(publish.service, "gw-publisher");
    assert_eq!(
        publish.parent_span_id(),
        caller_span,
        "a child of the caller's span"
    );
    assert_eq!(
        publish.attribute("messaging.destination.name").as_deref(),
        Some("traced")
    );
    assert_eq!(deliver.service, "gw-deliverer");
    assert_eq!(
        deliver.links(),
        vec![(trace_id.to_string(), publish.span_id())]
    );
    assert_eq!(deliver.attribute("recipients").as_deref(), Some("2"));
    // One delivery span per replica and event, never one per recipient; the publisher's
    // replica has no subscriber of the topic, so it records none.
    std::thread::sleep(Duration::from_millis(500));
    let deliveries: Vec<_> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.span.name == "deliver")
        .collect();
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");

    // The CLI starts a trace of its own, carried the same way.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .args([
            "publish",
            "--redis-url",
            &redis.url(),
            "--topic",
            "traced",
            "--data",
            "from the shell",
        ])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_SERVICE_NAME", "cli")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(a.next().await.data, "from the shell");
    let mut linked = None;
    wait_until("the CLI's publish span and its delivery", || {
        let spans = receiver.spans();
        let Some(cli) = spans
            .iter()
            .find(|s| s.service == "cli" && s.span.name == "publish")
        else {
            return false;
        };
        linked = spans
            .iter()
            .find(|s| {
                s.span.name == "deliver" && s.links() == vec![(cli.trace_id(), cli.span_id())]
            })
            .cloned();
        linked.is_some()
    });
    assert_eq!(
        linked.unwrap().attribute("recipients").as_deref(),
        Some("2")
    );

    wait_until("metrics over OTLP", || {
        receiver
            .metric_names("gw-deliverer")
            .iter()
            .any(|name| name == "ssegw.frames.delivered")
    });
    let names = receiver.metric_names("gw-deliverer");
    for name in [
        "ssegw.connections.open",
        "ssegw.delivery.lag",
        "ssegw.events.received",
    ] {
        assert!(names.iter().any(|n| n == name), "no {name} in {names:?}");
    }

    // The publish's log line names its request and its trace.
    let text = std::fs::read_to_string(&log).unwrap();
    let line: serde_json::Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "published")
        .unwrap_or_else(|| panic!("no 'published' line in:\n{text}"));
    assert_eq!(line["span"]["request_id"], "req-42", "{line}");
    assert_eq!(line["span"]["trace_id"], trace_id, "{line}");
    assert!(!text.contains("hello"), "the payload reached the log");
    let _ = std::fs::remove_dir_all(&dir);
}
