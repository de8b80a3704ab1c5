//! The built-in pages over plain HTTP: served with their content types, revalidated by ETag,
//! under a strict Content-Security-Policy; `/status/stream` sends the status every second, ends
//! when the replica drains, and is open at most `MAX_STATUS_STREAMS` times at once; `--pages
//! false` leaves only the API. The `/status` counters the pages show (resumes, gaps,
//! deliveries) count what they say. What the pages do in a browser is `browser.rs`.

mod support;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use support::{Gateway, Sse, WAIT};

/// `GET <path>` with these headers: the status, the headers and the body.
async fn get(
    gateway: &Gateway,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, awc::http::header::HeaderMap, String) {
    let mut request = awc::Client::default().get(gateway.url(path));
    for &header in headers {
        request = request.insert_header(header);
    }
    let mut response = request.send().await.expect("GET");
    let body = response.body().await.expect("body");
    let mut head = awc::http::header::HeaderMap::new();
    for (name, value) in response.headers() {
        head.append(name.clone(), value.clone());
    }
    (
        response.status().as_u16(),
        head,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

#[actix_web::test]
async fn pages_are_served_with_their_types_and_revalidated() {
    let gateway = Gateway::start(&[]);
    for (path, content_type, contains) in [
        ("/", "text/html; charset=utf-8", "src=\"/assets/demo.js\""),
        (
            "/status/page",
            "text/html; charset=utf-8",
            "src=\"/assets/status.js\"",
        ),
        (
            "/assets/demo.js",
            "text/javascript; charset=utf-8",
            "new EventSource(url)",
        ),
        (
            "/assets/status.js",
            "text/javascript; charset=utf-8",
            "/status/stream",
        ),
        ("/assets/pages.css", "text/css; charset=utf-8", ".badge"),
        ("/assets/icon.svg", "image/svg+xml", "<svg"),
    ] {
        let (status, headers, body) = get(&gateway, path, &[]).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(headers.get("content-type").unwrap(), content_type, "{path}");
        assert_eq!(headers.get("cache-control").unwrap(), "no-cache", "{path}");
        assert_eq!(headers.get("x-content-type-options").unwrap(), "nosniff");
        let csp = headers
            .get("content-security-policy")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(csp.starts_with("default-src 'self'"), "{path}: {csp}");
        assert!(body.contains(contains), "{path} lacks {contains:?}");
        // Revalidation: unchanged, so no body.
        let etag = headers
            .get("etag")
            .expect("ETag")
            .to_str()
            .unwrap()
            .to_string();
        let (status, _, body) = get(&gateway, path, &[("If-None-Match", &etag)]).await;
        assert_eq!((status, body.as_str()), (304, ""), "{path}");
        let (status, _, _) = get(&gateway, path, &[("If-None-Match", "\"other\"")]).await;
        assert_eq!(status, 200, "{path}");
    }
    let response = awc::Client::default()
        .post(gateway.url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers().get("allow").unwrap(), "GET");
}

#[actix_web::test]
async fn the_status_stream_ticks_every_second_and_ends_when_the_replica_drains() {
    // A long drain window: the stream must end because of the drain, not because `run` did.
    let gateway = Gateway::start(&["--drain-window", "30s"]);
    let response = awc::Client::builder()
        .disable_timeout()
        .finish()
        .get(gateway.url("/status/stream"))
        .send()
        .await
        .expect("GET /status/stream");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    let mut events = response.eventsource();
    let mut next = async || -> serde_json::Value {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("no status within WAIT")
            .expect("the stream ended")
            .expect("a well-formed event");
        serde_json::from_str(&event.data).expect("JSON status")
    };
    let first = next().await;
    assert_eq!(first["delivery_rate"], serde_json::Value::Null, "{first}");
    assert_eq!(first["connections"], 0, "the status stream is not counted");
    assert_eq!(first["ready"], true);

    let mut sse = Sse::open(&gateway, "topic=counted", None).await;
    sse.baseline().await;
    for n in 0..3 {
        support::http_publish(&gateway, "counted", &format!("c{n}"), None).await;
    }
    sse.take(3).await;
    // Within a tick or two the deliveries show, and the tick that first shows them has a rate.
    let mut ticks = 0;
    let status = loop {
        let status = next().await;
        if status["events_delivered"] == 3 {
            break status;
        }
        ticks += 1;
        assert!(ticks < 5, "deliveries not shown: {status}");
    };
    assert_eq!(status["connections"], 1, "{status}");
    let rate = status["delivery_rate"]
        .as_f64()
        .expect("a rate after the first tick");
    assert!(rate > 0.0, "{status}");

    gateway.begin_drain();
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            event.expect("a well-formed event");
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the status stream outlived the drain by {WAIT:?}"
    );
}

#[actix_web::test]
async fn status_streams_are_limited_per_replica() {
    let gateway = Gateway::start(&[]);
    let client = awc::Client::builder().disable_timeout().finish();
    let open = || async {
        client
            .get(gateway.url("/status/stream"))
            .send()
            .await
            .expect("GET /status/stream")
    };
    let mut streams = Vec::new();
    for _ in 0..sse_gateway::http::pages::MAX_STATUS_STREAMS {
        let response = open().await;
        assert_eq!(response.status(), 200);
        streams.push(response);
    }
    let refused = open().await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    // A place frees when a stream ends.
    drop(streams.pop());
    support::wait_until("a freed status stream place", || {
        support::http_status(gateway.addr, "GET", "/status/stream") == Some(200)
    });
}

#[actix_web::test]
async fn pages_can_be_turned_off() {
    let gateway = Gateway::start(&["--pages", "false"]);
    for path in [
        "/",
        "/status/page",
        "/status/stream",
        "/assets/demo.js",
        "/assets/pages.css",
    ] {
        let (status, _, body) = get(&gateway, path, &[]).await;
        assert_eq!(status, 404, "{path}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        let message = error["error"].as_str().unwrap();
        assert!(
            message.ends_with(
                "see /events, /publish, /presence, /history, /healthz, /readyz, /status, /metrics"
            ),
            "{message}"
        );
    }
    let (status, _, _) = get(&gateway, "/status", &[]).await;
    assert_eq!(status, 200);
}

#[actix_web::test]
async fn status_counts_resumes_gaps_and_deliveries() {
    let gateway = Gateway::start(&[]);
    let first = support::http_publish(&gateway, "tally", "one", None).await;
    support::http_publish(&gateway, "tally", "two", None).await;
    // A resume after the first event: one replayed.
    let mut resumed = Sse::open(&gateway, "topic=tally", Some(&first)).await;
    assert_eq!(resumed.next().await.data, "two");
    // An id that cannot be read: a gap, then both replayed.
    let mut invalid = Sse::open(&gateway, "topic=tally", Some("not-an-id")).await;
    assert_eq!(invalid.next().await.event, "ssegw-gap");
    assert_eq!(invalid.take(2).await.len(), 2);
    // And a fresh one, which counts no resume.
    let mut fresh = Sse::open(&gateway, "topic=tally", None).await;
    fresh.baseline().await;
    support::http_publish(&gateway, "tally", "three", None).await;
    for sse in [&mut resumed, &mut invalid, &mut fresh] {
        assert_eq!(sse.next().await.data, "three");
    }
    let (status, body) = support::get_json(gateway.addr, "/status");
    assert_eq!(status, 200);
    assert_eq!(body["resumed"], 2, "{body}");
    assert_eq!(body["gaps_sent"], 1, "{body}");
    assert_eq!(body["events_delivered"], 1 + 2 + 3, "{body}");
    assert_eq!(body["connections_opened"], 3, "{body}");
}
