//! The gateway as browsers use it: the demo page in headless Chromium with the browser's own
//! `EventSource` (published events with their ids, a failover through `deploy/nginx.conf` with
//! the browser's own `Last-Event-ID`, the `ssegw-gap` control event, several topics on one
//! connection, a token on a gateway without anonymous access: refusals, grants and the
//! `ssegw-expired` control event), the live status page, many streams over one HTTP/2
//! connection, and the `eventsource` package under Node as a second, independent client
//! resuming across a kill. The Mercure hub as its JavaScript examples use it: a page's
//! `EventSource` on `/.well-known/mercure` and its form-encoded `fetch` publishes, private
//! updates, and a reconnection through nginx with the browser's own `Last-Event-ID`.
//! Each scenario saves a screenshot in `target/browser-artifacts/` (or `SSEGW_ARTIFACTS`).

mod support;

use serde_json::{json, Value};
use support::browser::{Browser, NodeEventSource};
use support::nginx::Fleet;
use support::{Certificate, Gateway, RedisServer, Replica};

/// Reconnection delay for the failover scenarios: the browser waits this long after a drop.
const RETRY: &str = "300ms";

/// The events the demo page recorded, as `[id, type, topic, data]`.
fn page_events(browser: &mut Browser, page: &str) -> Vec<Value> {
    let events = browser.eval(
        page,
        "window.ssegw.events.map(e => [e.id, e.type, e.topic, e.data])",
    );
    events.as_array().expect("an array of events").clone()
}

/// Waits until the demo page has recorded `count` events (or more).
fn wait_events(browser: &mut Browser, page: &str, count: usize) {
    browser.wait(page, &format!("window.ssegw.events.length >= {count}"));
}

/// `[id, "message", topic, data]`: an untyped event as the page records it.
fn message(id: &str, topic: &str, data: &str) -> Value {
    json!([id, "message", topic, data])
}

#[test]
fn the_demo_page_shows_published_events_with_their_ids() {
    let redis = RedisServer::start();
    let gateway = Gateway::with_redis(&redis, &[]);
    let mut browser = Browser::start();
    browser.goto("demo", &gateway.url("/"));
    browser.fill("demo", "#topics", "orders");
    browser.fill("demo", "#types", "order.created");
    browser.click("demo", "#connect");
    browser.wait("demo", "window.ssegw.state === 'open'");

    // From a service, straight into Redis; one event typed.
    let mut expected = Vec::new();
    for n in 1..=3 {
        let data = format!(r#"{{"order":{n}}}"#);
        let event = (n == 2).then_some("order.created");
        let id = redis.fcall_publish("orders", &data, event);
        expected.push(json!([id, event.unwrap_or("message"), "orders", data]));
    }
    // And from the page's own form.
    browser.fill("demo", "#publish-topic", "orders");
    browser.fill("demo", "#publish-data", "from the form");
    browser.click("demo", "#publish");
    let result = browser.wait(
        "demo",
        "document.querySelector('#publish-result').dataset.outcome === 'ok' \
         && document.querySelector('#publish-result').textContent",
    );
    let result = result.as_str().unwrap();
    let id = result
        .strip_prefix("published ")
        .and_then(|rest| rest.strip_suffix(" on orders"))
        .unwrap_or_else(|| panic!("publish result {result:?}"));
    expected.push(message(id, "orders", "from the form"));

    wait_events(&mut browser, "demo", expected.len());
    assert_eq!(page_events(&mut browser, "demo"), expected);
    // The table shows the same, newest first, and the last id is on display.
    let rows = browser.eval(
        "demo",
        "[...document.querySelectorAll('[data-testid=event-row]')].map(r => \
         [r.dataset.id, r.cells[3].textContent, r.cells[4].textContent, r.cells[5].textContent])",
    );
    let mut shown: Vec<Value> = rows.as_array().unwrap().clone();
    shown.reverse();
    assert_eq!(shown, expected, "the event table");
    assert_eq!(
        browser.eval("demo", "document.querySelector('#last-id').textContent"),
        json!(id)
    );

    // A refused publish shows the gateway's own message instead of breaking the page.
    browser.fill("demo", "#publish-topic", "not a topic");
    browser.click("demo", "#publish");
    let refused = browser.wait(
        "demo",
        "document.querySelector('#publish-result').dataset.outcome === 'error' \
         && document.querySelector('#publish-result').textContent",
    );
    let refused = refused.as_str().unwrap();
    assert!(
        refused.starts_with("400: invalid topic \"not a topic\""),
        "{refused:?}"
    );
    browser.fill("demo", "#publish-topic", "orders");
    browser.screenshot("demo", "demo-published.png");
    // Nothing else arrived: the refused event was not stored.
    assert_eq!(page_events(&mut browser, "demo").len(), expected.len());
}

#[test]
fn a_page_whose_replica_is_killed_resumes_through_the_balancer_without_gap_or_duplicate() {
    let fleet = Fleet::start(&["--retry", RETRY]);
    let mut browser = Browser::start();
    // A link to a live view: the page subscribes at once.
    browser.goto("demo", &fleet.nginx.url("/?topic=failover"));
    browser.wait("demo", "window.ssegw.state === 'open'");
    let on = fleet
        .wait_connections(1)
        .iter()
        .position(|&n| n == 1)
        .unwrap();

    let publish = |n: usize| {
        let data = format!("e{n}");
        let id = fleet.redis.fcall_publish("failover", &data, None);
        message(&id, "failover", &data)
    };
    let mut expected: Vec<Value> = (1..=5).map(publish).collect();
    wait_events(&mut browser, "demo", 5);
    let last_before_kill = expected[4][0].clone();

    support::signal(fleet.replicas[on].pid(), "KILL");
    // Published while the page is away or coming back: the replay must bring them.
    expected.extend((6..=10).map(publish));
    browser.wait(
        "demo",
        "window.ssegw.reconnects === 1 && window.ssegw.state === 'open'",
    );
    // And live again on the new replica.
    expected.extend((11..=15).map(publish));
    wait_events(&mut browser, "demo", expected.len());

    assert_eq!(
        page_events(&mut browser, "demo"),
        expected,
        "every event, exactly once and in order, across the kill"
    );
    // The browser reconnected by itself, after the last event it had, and said so: the page's
    // URL carries no id, so the replica counts a resume only for a `Last-Event-ID` header.
    assert_eq!(
        browser.eval("demo", "window.ssegw.resumedFrom"),
        json!([last_before_kill])
    );
    let resumed: u64 = fleet.counter("resumed").iter().sum();
    assert_eq!(resumed, 1, "resumes counted by the surviving replicas");
    assert_eq!(browser.eval("demo", "window.ssegw.gaps.length"), json!(0));
    assert_eq!(
        browser.eval(
            "demo",
            "document.querySelectorAll('[data-testid=note-row][data-kind=resumed]').length"
        ),
        json!(1),
        "the page shows the resume"
    );
    browser.screenshot("demo", "demo-failover.png");
}

#[test]
fn the_page_script_sees_the_gap_control_event_when_history_is_trimmed() {
    let redis = RedisServer::start();
    let gateway = Gateway::with_redis(&redis, &["--history-max-len", "5"]);
    let ids: Vec<String> = (1..=12)
        .map(|n| redis.fcall_publish("trimmed", &format!("t{n}"), None))
        .collect();

    // Resume after the first event: seven of the eleven after it are gone.
    let mut browser = Browser::start();
    browser.goto("demo", &gateway.url("/"));
    browser.fill("demo", "#topics", "trimmed");
    browser.fill("demo", "#resume-id", &ids[0]);
    browser.click("demo", "#connect");
    wait_events(&mut browser, "demo", 6);

    let mut expected = vec![json!([
        null,
        "ssegw-gap",
        "trimmed",
        r#"{"topic":"trimmed","reason":"trimmed"}"#
    ])];
    for n in 8..=12 {
        expected.push(message(&ids[n - 1], "trimmed", &format!("t{n}")));
    }
    assert_eq!(page_events(&mut browser, "demo"), expected);
    assert_eq!(
        browser.eval("demo", "window.ssegw.gaps"),
        json!([{ "topic": "trimmed", "reason": "trimmed" }]),
        "the control event's data, parsed by the page's script"
    );
    assert_eq!(
        browser.eval(
            "demo",
            "document.querySelectorAll('[data-testid=gap-row]').length"
        ),
        json!(1),
        "the gap is shown"
    );
    // Live after the replay.
    let id = redis.fcall_publish("trimmed", "t13", None);
    expected.push(message(&id, "trimmed", "t13"));
    wait_events(&mut browser, "demo", expected.len());
    assert_eq!(page_events(&mut browser, "demo"), expected);
    browser.screenshot("demo", "demo-gap.png");
}

/// The HMAC secret of the gateway in the token scenario.
const JWT_SECRET: &str = "browser-test-secret-0123456789abcdef";

/// A token for `JWT_SECRET`, granting `subscribe` and `publish`, that expires in `seconds`.
fn token(subscribe: &[&str], publish: &[&str], seconds: u64) -> String {
    let claims = json!({
        "sub": "browser",
        "exp": jsonwebtoken::get_current_timestamp() + seconds,
        "ssegw": { "subscribe": subscribe, "publish": publish },
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// Publishes from the demo page's form and waits for the answer: `[status, text shown]`.
fn publish_from_form(browser: &mut Browser, page: &str, topic: &str, data: &str) -> Value {
    browser.fill(page, "#publish-topic", topic);
    browser.fill(page, "#publish-data", data);
    browser.click(page, "#publish");
    browser.wait(
        page,
        "(r => !['none', 'pending'].includes(r.dataset.outcome) \
         && [Number(r.dataset.status), r.textContent])(document.querySelector('#publish-result'))",
    )
}

/// Waits until the demo page's stream was refused; returns the gateway's message as shown.
fn wait_refusal(browser: &mut Browser, page: &str) -> Value {
    browser.wait(
        page,
        "window.ssegw.state === 'closed' && window.ssegw.refusal \
         && document.querySelector('#state-reason').textContent === window.ssegw.refusal \
         && window.ssegw.refusal",
    )
}

/// A gateway without anonymous access: the page needs the token of its Token field to
/// subscribe and publish, never takes one from its URL, never shows or logs it, and shows the
/// `ssegw-expired` control event when the gateway ends a stream whose token ran out.
#[test]
fn the_demo_page_subscribes_and_publishes_with_a_token_and_shows_its_expiry() {
    let redis = RedisServer::start();
    let gateway = Gateway::with_redis(&redis, &["--jwt-secret", JWT_SECRET, "--jwt-leeway", "0s"]);
    let granted = token(&["orders.*"], &["orders.eu"], 600);
    let mut browser = Browser::start();

    // Without a token: refused, with the gateway's own message. A token in the page's URL is
    // not one the page takes (and the page's URL loses it).
    browser.goto(
        "demo",
        &gateway.url(&format!(
            "/?topic=orders.eu&token={granted}&access_token={granted}"
        )),
    );
    let missing = "401: missing token: subscribe on topic \"orders.eu\" needs one (send \
                   Authorization: Bearer <token> or the ssegw_token cookie or the access_token \
                   query parameter)";
    assert_eq!(wait_refusal(&mut browser, "demo"), json!(missing));
    assert_eq!(
        browser.eval(
            "demo",
            "[...document.querySelectorAll('[data-testid=note-row][data-kind=closed]')]\
             .map(r => r.textContent.replace(/^\\S+\\s+/, ''))"
        ),
        json!([format!("the gateway refused the stream: {missing}")]),
        "the table says so too (after the time)"
    );
    assert_eq!(
        browser.eval("demo", "location.search"),
        json!("?topic=orders.eu")
    );
    assert_eq!(browser.eval("demo", "window.ssegw.opens"), json!(0));
    // Published while the page is refused: it must never show up.
    redis.fcall_publish("orders.eu", "refused", None);
    assert_eq!(
        publish_from_form(&mut browser, "demo", "orders.eu", "no token"),
        json!([
            401,
            "401: missing token: publish on topic \"orders.eu\" needs one (send Authorization: \
             Bearer <token>) (this gateway wants a token: see Token)"
        ])
    );

    // With a token granting `orders.*` and publishing on `orders.eu`.
    browser.fill("demo", "#token", &granted);
    browser.click("demo", "#connect");
    browser.wait("demo", "window.ssegw.state === 'open'");
    assert_eq!(
        browser.eval("demo", "document.querySelector('#stream-url').textContent"),
        json!("/events?topic=orders.eu&access_token=…"),
        "the token is masked"
    );
    let shell = browser.eval(
        "demo",
        "document.querySelector('#shell-commands').textContent",
    );
    assert!(
        shell
            .as_str()
            .unwrap()
            .starts_with(r#"curl -N -H "Authorization: Bearer $TOKEN" 'http"#),
        "the shell commands name a variable instead: {shell}"
    );
    let mut expected = Vec::new();
    for n in 1..=2 {
        let data = format!("order {n}");
        let id = redis.fcall_publish("orders.eu", &data, None);
        expected.push(message(&id, "orders.eu", &data));
    }
    let published = publish_from_form(&mut browser, "demo", "orders.eu", "from the form");
    assert_eq!(published[0], json!(200), "{published}");
    let text = published[1].as_str().unwrap();
    let id = text
        .strip_prefix("published ")
        .and_then(|rest| rest.strip_suffix(" on orders.eu"))
        .unwrap_or_else(|| panic!("publish result {text:?}"));
    expected.push(message(id, "orders.eu", "from the form"));
    wait_events(&mut browser, "demo", expected.len());
    assert_eq!(page_events(&mut browser, "demo"), expected);
    assert_eq!(
        publish_from_form(&mut browser, "demo", "orders.us", "not granted"),
        json!([
            403,
            "403: the token does not grant publish on topic \"orders.us\""
        ])
    );
    // A topic outside the token's grant refuses the stream, with the gateway's reason.
    browser.fill("demo", "#topics", "invoices");
    browser.click("demo", "#connect");
    assert_eq!(
        wait_refusal(&mut browser, "demo"),
        json!("403: the token does not grant subscribe on topic \"invoices\"")
    );

    // A token that expires in about two seconds (its `exp` is a whole second): the gateway
    // sends `ssegw-expired` and ends the stream; the page shows it and stays closed.
    let short = token(&["orders.*"], &[], 3);
    browser.fill("demo", "#token", &short);
    browser.fill("demo", "#topics", "orders.eu");
    browser.click("demo", "#connect");
    browser.wait("demo", "window.ssegw.state === 'open'");
    let last = redis.fcall_publish("orders.eu", "before expiry", None);
    expected.push(message(&last, "orders.eu", "before expiry"));
    browser.wait(
        "demo",
        "window.ssegw.expired === 1 && window.ssegw.state === 'expired'",
    );
    expected.push(json!([
        null,
        "ssegw-expired",
        "orders.eu",
        r#"{"reason":"token-expired"}"#
    ]));
    assert_eq!(page_events(&mut browser, "demo"), expected);
    assert_eq!(
        browser.eval(
            "demo",
            "[document.querySelector('#state').textContent, \
              document.querySelectorAll('[data-testid=expired-row]').length, \
              window.ssegw.opens, window.ssegw.reconnects]"
        ),
        json!(["token expired", 1, 1, 0]),
        "shown once; the page did not reconnect with the expired token"
    );
    support::wait_until("the gateway ends the expired stream", || {
        support::get_json(gateway.addr, "/status").1["connections"] == json!(0)
    });
    // Ready to resume with a fresh token.
    assert_eq!(
        browser.eval("demo", "document.querySelector('#resume-id').value"),
        json!(last)
    );
    browser.screenshot("demo", "demo-auth.png");

    // Which it does, with what was published meanwhile.
    let id = redis.fcall_publish("orders.eu", "while expired", None);
    expected.push(message(&id, "orders.eu", "while expired"));
    browser.fill("demo", "#token", &granted);
    browser.click("demo", "#connect");
    wait_events(&mut browser, "demo", expected.len());
    assert_eq!(page_events(&mut browser, "demo"), expected);
    assert_eq!(browser.eval("demo", "window.ssegw.state"), json!("open"));

    // The tokens were nowhere but in the field and the requests: not in the page (the table,
    // the stream URL shown, the shell commands), `window.ssegw`, the page's URL or the console
    // (where only Chromium's own lines about the refused requests are, without their URLs).
    let console = browser.console("demo");
    for secret in [&granted, &short] {
        let check = format!(
            "[document.documentElement.outerHTML, JSON.stringify(window.ssegw), location.href]\
             .filter(text => text.includes({secret:?})).length"
        );
        assert_eq!(browser.eval("demo", &check), json!(0), "the token leaked");
        assert!(
            console.iter().all(|line| !line.contains(secret.as_str())),
            "the token in the console: {console:?}"
        );
    }
}

#[test]
fn the_page_subscribes_to_several_topics_on_one_connection() {
    let redis = RedisServer::start();
    let gateway = Gateway::with_redis(&redis, &[]);
    let mut browser = Browser::start();
    browser.goto("demo", &gateway.url("/"));
    browser.fill("demo", "#topics", "gamma, alpha, beta");
    browser.click("demo", "#connect");
    browser.wait("demo", "window.ssegw.state === 'open'");
    let (status, body) = support::get_json(gateway.addr, "/status");
    assert_eq!(status, 200);
    assert_eq!(
        (&body["connections"], &body["topics"]),
        (&json!(1), &json!(3)),
        "one connection for three topics"
    );

    // One at a time, so that the order across topics is the order of publishing.
    let plan = [
        ("alpha", "a1"),
        ("beta", "b1"),
        ("alpha", "a2"),
        ("gamma", "g1"),
        ("beta", "b2"),
        ("gamma", "g2"),
    ];
    for (n, (topic, data)) in plan.iter().enumerate() {
        redis.fcall_publish(topic, data, None);
        wait_events(&mut browser, "demo", n + 1);
    }
    let events = page_events(&mut browser, "demo");
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e[2].as_str().unwrap(), e[3].as_str().unwrap()))
        .collect();
    // Each event's topic as the page worked it out from the cursors.
    assert_eq!(seen, plan);
    let ids: Vec<&str> = events.iter().map(|e| e[0].as_str().unwrap()).collect();
    for id in &ids {
        assert_eq!(id.split('.').count(), 5, "a cursor over three topics: {id}");
    }
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), ids.len(), "every event has its own id");

    // Away, two events later, back with the last cursor: one id resumes all three topics.
    browser.click("demo", "#disconnect");
    redis.fcall_publish("beta", "b3", None);
    redis.fcall_publish("alpha", "a3", None);
    browser.fill("demo", "#resume-id", ids.last().unwrap());
    browser.click("demo", "#connect");
    wait_events(&mut browser, "demo", plan.len() + 2);
    let events = page_events(&mut browser, "demo");
    let mut resumed: Vec<(&str, &str)> = events[plan.len()..]
        .iter()
        .map(|e| (e[2].as_str().unwrap(), e[3].as_str().unwrap()))
        .collect();
    // The replay goes topic by topic; only the set and each topic's order are promised.
    resumed.sort_unstable();
    assert_eq!(resumed, [("alpha", "a3"), ("beta", "b3")]);
    assert_eq!(browser.eval("demo", "window.ssegw.gaps.length"), json!(0));
    browser.screenshot("demo", "demo-multi-topic.png");
}

#[test]
fn the_status_page_follows_the_replica_over_sse() {
    let redis = RedisServer::start();
    let gateway = Gateway::with_redis(&redis, &[]);
    let mut browser = Browser::start();
    browser.goto("status", &gateway.url("/status/page"));
    browser.wait(
        "status",
        "window.ssegwStatus.state === 'live' && window.ssegwStatus.updates > 0",
    );
    // Its own stream is not an event stream of the replica's.
    assert_eq!(
        browser.eval("status", "window.ssegwStatus.last.connections"),
        json!(0)
    );

    // A subscriber elsewhere shows up within a tick or two.
    browser.goto("demo", &gateway.url("/?topic=watched"));
    browser.wait("demo", "window.ssegw.state === 'open'");
    browser.wait(
        "status",
        "window.ssegwStatus.last.connections === 1 && window.ssegwStatus.last.topics === 1 \
         && document.querySelector('#connections').textContent === '1'",
    );
    for n in 0..20 {
        redis.fcall_publish("watched", &format!("w{n}"), None);
    }
    wait_events(&mut browser, "demo", 20);
    let delivered = browser.wait(
        "status",
        "window.ssegwStatus.last.events_delivered >= 20 \
         && window.ssegwStatus.rates.some(r => r > 0) \
         && window.ssegwStatus.last.events_delivered",
    );
    assert_eq!(delivered, json!(20));
    browser.screenshot("status", "status-page.png");
}

/// Opens `count` EventSources in the page, on topics `<prefix>-0`, `<prefix>-1`, ...; each
/// records whether it opened and the data of its last event in `window.streams`.
fn open_streams(browser: &mut Browser, page: &str, prefix: &str, count: usize) {
    browser.eval(
        page,
        &format!(
            "window.streams = Array.from({{ length: {count} }}, (_, i) => {{
                const stream = {{ open: false, data: null }};
                const source = new EventSource('/events?topic={prefix}-' + i);
                source.onopen = () => {{ stream.open = true; }};
                source.onmessage = (e) => {{ stream.data = e.data; }};
                return stream;
            }}); null"
        ),
    );
}

/// Browsers open at most six HTTP/1.1 connections per origin, so a page with more event
/// streams than that stalls. Over TLS the gateway speaks HTTP/2 and one connection carries
/// them all; over plain HTTP/1.1 the same page gets six.
#[test]
fn chromium_multiplexes_more_than_six_event_streams_over_http2() {
    const STREAMS: usize = 10;
    let redis = RedisServer::start();
    let cert = Certificate::self_signed("browser-tls");
    let url = redis.url();
    let tls = Gateway::start_unchecked(&[
        "--redis-url",
        &url,
        "--tls-cert",
        &cert.cert_path,
        "--tls-key",
        &cert.key_path,
    ]);
    let mut browser = Browser::start();
    browser.goto("h2", &format!("https://127.0.0.1:{}/", tls.addr.port()));
    assert_eq!(
        browser.eval(
            "h2",
            "performance.getEntriesByType('navigation')[0].nextHopProtocol"
        ),
        json!("h2")
    );
    assert_eq!(
        browser.eval("h2", "document.querySelector('#protocol').textContent"),
        json!("h2"),
        "the page says so"
    );
    // The demo's own stream, and nine more from the page's script.
    browser.fill("h2", "#topics", "h2-demo");
    browser.click("h2", "#connect");
    open_streams(&mut browser, "h2", "h2", STREAMS - 1);
    browser.wait(
        "h2",
        "window.ssegw.state === 'open' && window.streams.every(s => s.open)",
    );
    let status = browser.eval("h2", "fetch('/status').then(r => r.json())");
    assert_eq!(status["connections"], json!(STREAMS));
    let id = redis.fcall_publish("h2-demo", "over HTTP/2", None);
    for i in 0..STREAMS - 1 {
        redis.fcall_publish(&format!("h2-{i}"), &format!("hello {i}"), None);
    }
    browser.wait(
        "h2",
        "window.streams.every((s, i) => s.data === 'hello ' + i) && window.ssegw.events.length === 1",
    );
    assert_eq!(
        page_events(&mut browser, "h2"),
        [message(&id, "h2-demo", "over HTTP/2")]
    );
    browser.screenshot("h2", "demo-http2.png");

    // The same over HTTP/1.1: six open, the rest wait for a connection that never frees.
    let plain = Gateway::with_redis(&redis, &[]);
    browser.goto("h1", &plain.url("/"));
    assert_eq!(
        browser.eval(
            "h1",
            "performance.getEntriesByType('navigation')[0].nextHopProtocol"
        ),
        json!("http/1.1")
    );
    open_streams(&mut browser, "h1", "h1", STREAMS);
    // Open means subscribed: an event published now reaches the stream.
    browser.wait("h1", "window.streams.filter(s => s.open).length === 6");
    assert_eq!(
        support::get_json(plain.addr, "/status").1["connections"],
        json!(6)
    );
    for i in 0..STREAMS {
        redis.fcall_publish(&format!("h1-{i}"), &format!("hello {i}"), None);
    }
    browser.wait(
        "h1",
        "window.streams.filter(s => s.data !== null).length === 6",
    );
    // Those six got their events; the other four never opened.
    assert_eq!(
        browser.eval(
            "h1",
            "window.streams.map(s => s.open && s.data !== null).filter(Boolean).length"
        ),
        json!(6),
        "HTTP/1.1 allows six connections per origin"
    );
    assert_eq!(
        browser.eval("h1", "window.streams.filter(s => s.open).length"),
        json!(6)
    );
    assert_eq!(
        support::get_json(plain.addr, "/status").1["connections"],
        json!(6)
    );
}

#[test]
fn the_node_eventsource_package_resumes_across_a_killed_replica() {
    let fleet = Fleet::start(&["--retry", RETRY]);
    let client = NodeEventSource::open(&fleet.nginx.url("/events?topic=node-failover"));
    assert_eq!(client.next()["kind"], "open");
    let on = fleet
        .wait_connections(1)
        .iter()
        .position(|&n| n == 1)
        .unwrap();
    let publish = |n: usize| {
        let data = format!("n{n}");
        let id = fleet.redis.fcall_publish("node-failover", &data, None);
        (id, data)
    };
    let event = |line: Value| -> (String, String) {
        assert_eq!(line["kind"], "event", "{line}");
        assert_eq!(line["type"], "message", "{line}");
        let text = |v: &Value| v.as_str().unwrap().to_string();
        (text(&line["id"]), text(&line["data"]))
    };

    let mut expected: Vec<(String, String)> = (1..=5).map(publish).collect();
    let mut received: Vec<(String, String)> = (0..5).map(|_| event(client.next())).collect();

    support::signal(fleet.replicas[on].pid(), "KILL");
    expected.extend((6..=10).map(publish));
    // The stream ends, the client says it reconnects (readyState CONNECTING), and does.
    let lost = client.next();
    assert_eq!(
        (&lost["kind"], &lost["readyState"]),
        (&json!("error"), &json!(0)),
        "{lost}"
    );
    loop {
        let line = client.next();
        if line["kind"] == "open" {
            break;
        }
        // Events replayed before `open` cannot come; a failed attempt may.
        assert_eq!(line["kind"], "error", "{line}");
    }
    expected.extend((11..=15).map(publish));
    while received.len() < expected.len() {
        received.push(event(client.next()));
    }
    assert_eq!(
        received, expected,
        "every event, exactly once and in order, across the kill"
    );
    let resumed: u64 = fleet.counter("resumed").iter().sum();
    assert_eq!(resumed, 1, "the client sent Last-Event-ID on its reconnect");
}

/// The HMAC secret of the Mercure hub in the Mercure scenarios (at least 32 bytes).
const MERCURE_SECRET: &str = "browser-mercure-secret-0123456789abcdef";
/// A Mercure hub beside the native API: tokens for publishers, anonymous subscribers allowed.
const MERCURE_FLAGS: [&str; 6] = [
    "--mercure",
    "true",
    "--mercure-jwt-secret",
    MERCURE_SECRET,
    "--mercure-anonymous",
    "true",
];
/// What the pages subscribe to: a URI template, as in the Mercure examples.
const BOOKS: &str = "https://example.com/books/{id}";

/// A Mercure token for `MERCURE_SECRET` with these `mercure` claims and no `exp`, as Mercure
/// publishers' tokens often are.
fn mercure_token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "mercure": claims }),
        &jsonwebtoken::EncodingKey::from_secret(MERCURE_SECRET.as_bytes()),
    )
    .unwrap()
}

/// A publisher's token: `mercure.publish` `["*"]`.
fn mercure_publisher() -> String {
    mercure_token(json!({ "publish": ["*"] }))
}

/// Opens the page's `EventSource` on its own origin's hub for `BOOKS`, as the Mercure
/// examples do, and records in `window.mercure` its opens, its errors and each message as
/// `[lastEventId, data]`; the messages are listed on the page too, for its screenshot.
fn mercure_subscribe(browser: &mut Browser, page: &str) {
    browser.eval(
        page,
        &format!(
            r#"(() => {{
                const seen = {{ opens: 0, errors: 0, events: [] }};
                const list = document.createElement("pre");
                list.dataset.testid = "mercure-events";
                list.style.margin = "16px";
                list.textContent = "Mercure updates of " + {books};
                document.body.prepend(list);
                const url = "/.well-known/mercure?topic=" + encodeURIComponent({books});
                const source = new EventSource(url);
                source.onopen = () => {{ seen.opens += 1; }};
                source.onerror = () => {{ seen.errors += 1; }};
                source.onmessage = (e) => {{
                    seen.events.push([e.lastEventId, e.data]);
                    list.textContent += "\n" + JSON.stringify([e.lastEventId, e.data]);
                }};
                window.mercure = seen;
                return null;
            }})()"#,
            books = json!(BOOKS)
        ),
    );
}

/// A form-encoded `POST /.well-known/mercure` by the page's `fetch` on its own origin, with the
/// publisher's token in `Authorization`, as the Mercure examples publish: `[status, content
/// type, body]`.
fn page_publish(browser: &mut Browser, page: &str, fields: &[(&str, &str)]) -> Value {
    browser.eval(
        page,
        &format!(
            r#"fetch("/.well-known/mercure", {{
                method: "POST",
                headers: {{ Authorization: "Bearer " + {token} }},
                body: new URLSearchParams({fields}),
            }}).then(async (r) => [r.status, r.headers.get("content-type"), await r.text()])"#,
            token = json!(mercure_publisher()),
            fields = json!(fields)
        ),
    )
}

/// What a service's publish gets back: 200, `text/plain`, the update's id.
fn accepted(id: &str) -> Value {
    json!([200, "text/plain; charset=utf-8", id])
}

/// A service's form-encoded `POST /.well-known/mercure` with the publisher's token, straight
/// to one replica: `(status, body)`.
fn service_publish(addr: std::net::SocketAddr, fields: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\n\r\n{body}",
        mercure_publisher(),
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"));
    let (_, body) = reply.split_once("\r\n\r\n").unwrap_or_default();
    (status, body.to_string())
}

/// The Mercure messages the page received, as `[lastEventId, data]`, once there are `count`.
fn mercure_events(browser: &mut Browser, page: &str, count: usize) -> Value {
    browser.wait(page, &format!("window.mercure.events.length >= {count}"));
    browser.eval(page, "window.mercure.events")
}

/// The Mercure hub as its JavaScript examples use it: a page's `EventSource` on
/// `/.well-known/mercure` receives what the page's form-encoded `fetch` publishes, with the
/// publisher's id and multi-line data; an anonymous page never receives a private update,
/// which a page with a subscriber's `mercureAuthorization` cookie does receive.
#[test]
fn a_page_receives_what_its_fetch_publishes_on_the_mercure_hub() {
    let redis = RedisServer::start();
    let gateway = Gateway::with_redis(&redis, &MERCURE_FLAGS);
    let mut browser = Browser::start();
    // Two pages on the gateway's origin, each in a browser context (and cookie jar) of its
    // own: one anonymous, one with the cookie an application's server sets for its users.
    browser.goto("anonymous", &gateway.url("/"));
    mercure_subscribe(&mut browser, "anonymous");
    browser.goto("subscriber", &gateway.url("/"));
    let cookie = mercure_token(json!({ "subscribe": [BOOKS] }));
    browser.eval(
        "subscriber",
        &format!(
            "document.cookie = 'mercureAuthorization=' + {} + '; path=/.well-known/mercure; \
             SameSite=Strict'",
            json!(cookie)
        ),
    );
    mercure_subscribe(&mut browser, "subscriber");
    browser.wait("anonymous", "window.mercure.opens === 1");
    browser.wait("subscriber", "window.mercure.opens === 1");

    let hello = [
        ("topic", "https://example.com/books/1"),
        ("data", "hello\nworld"),
        ("id", "b1"),
    ];
    assert_eq!(
        page_publish(&mut browser, "anonymous", &hello),
        accepted("b1")
    );
    assert_eq!(
        mercure_events(&mut browser, "anonymous", 1),
        json!([["b1", "hello\nworld"]])
    );

    // A private update, then a public one. Every stream follows the hub's one log in order,
    // so had the anonymous page been sent the private update, it would have come first.
    let private = [
        ("topic", "https://example.com/books/2"),
        ("data", "for subscribers"),
        ("id", "p1"),
        ("private", "on"),
    ];
    assert_eq!(
        page_publish(&mut browser, "anonymous", &private),
        accepted("p1")
    );
    let after = [
        ("topic", "https://example.com/books/3"),
        ("data", "public again"),
        ("id", "b2"),
    ];
    assert_eq!(
        page_publish(&mut browser, "anonymous", &after),
        accepted("b2")
    );
    assert_eq!(
        mercure_events(&mut browser, "subscriber", 3),
        json!([
            ["b1", "hello\nworld"],
            ["p1", "for subscribers"],
            ["b2", "public again"]
        ]),
        "the cookie's subscribe claim matches the private update's topic"
    );
    assert_eq!(
        mercure_events(&mut browser, "anonymous", 2),
        json!([["b1", "hello\nworld"], ["b2", "public again"]]),
        "no private update for an anonymous subscriber"
    );
    for page in ["anonymous", "subscriber"] {
        assert_eq!(
            browser.eval(page, "[window.mercure.opens, window.mercure.errors]"),
            json!([1, 0]),
            "{page}: one connection, never dropped"
        );
    }
    browser.screenshot("anonymous", "mercure-anonymous.png");
    browser.screenshot("subscriber", "mercure-subscriber.png");
}

/// Through `deploy/nginx.conf` in front of three Mercure replicas: the page's `EventSource`
/// loses its replica to a SIGKILL, reconnects by itself with its `Last-Event-ID` (a publisher's
/// id) to another replica and receives what was published meanwhile and after, once each.
#[test]
fn a_mercure_page_whose_replica_is_killed_resumes_with_its_last_event_id() {
    let mut flags = vec!["--retry", RETRY];
    flags.extend(MERCURE_FLAGS);
    let fleet = Fleet::start(&flags);
    let mut browser = Browser::start();
    browser.goto("mercure", &fleet.nginx.url("/"));
    mercure_subscribe(&mut browser, "mercure");
    browser.wait("mercure", "window.mercure.opens === 1");
    let on = fleet
        .wait_connections(1)
        .iter()
        .position(|&n| n == 1)
        .unwrap();
    let others: Vec<usize> = (0..fleet.replicas.len()).filter(|&i| i != on).collect();

    // Published by the page, through nginx.
    for (id, data) in [("f1", "before 1"), ("f2", "before 2")] {
        let fields = [
            ("topic", "https://example.com/books/7"),
            ("data", data),
            ("id", id),
        ];
        assert_eq!(page_publish(&mut browser, "mercure", &fields), accepted(id));
    }
    mercure_events(&mut browser, "mercure", 2);

    support::signal(fleet.replicas[on].pid(), "KILL");
    // Published by a service on another replica while the page is away or coming back.
    let away = [
        ("topic", "https://example.com/books/7"),
        ("data", "while away"),
        ("id", "f3"),
    ];
    assert_eq!(
        service_publish(fleet.replicas[others[0]].addr, &away),
        (200, "f3".to_string())
    );
    browser.wait(
        "mercure",
        "window.mercure.opens === 2 && window.mercure.events.length >= 3",
    );
    // And live on the new replica.
    let live = [
        ("topic", "https://example.com/books/7"),
        ("data", "live again"),
        ("id", "f4"),
    ];
    assert_eq!(
        service_publish(fleet.replicas[others[1]].addr, &live),
        (200, "f4".to_string())
    );
    assert_eq!(
        mercure_events(&mut browser, "mercure", 4),
        json!([
            ["f1", "before 1"],
            ["f2", "before 2"],
            ["f3", "while away"],
            ["f4", "live again"]
        ]),
        "every update, exactly once and in order, across the kill"
    );
    // The page's URL has no `lastEventID`: the replica counts a resume only for the browser's
    // own `Last-Event-ID` header (here `f2`, a publisher's id, found in the log).
    let resumed: u64 = fleet.counter("resumed").iter().sum();
    assert_eq!(resumed, 1, "resumes counted by the surviving replicas");
    assert_eq!(
        browser.eval("mercure", "window.mercure.opens"),
        json!(2),
        "one reconnection"
    );
    assert_eq!(
        fleet.connections().iter().sum::<u64>(),
        1,
        "the page's one stream"
    );
    browser.screenshot("mercure", "mercure-failover.png");
}
