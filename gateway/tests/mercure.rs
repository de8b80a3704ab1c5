//! The Mercure hub end to end, on replicas sharing a real Redis (and once on the embedded
//! bus): selectors and delivery, frames and ids, private updates, token sources and keys,
//! publish refusals, resume on another replica (by update id, `#position`, `earliest`, after a
//! SIGKILL, across trimming and the id index's generations), the reserved log topic, and
//! configurations refused before binding. Cases are named as in the design notes (S*, F*, P*,
//! A*, B*, R*).

mod support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderMap;
use bytes::Bytes;
use eventsource_stream::{Event, Eventsource};
use futures_util::stream::{LocalBoxStream, StreamExt};
use jsonwebtoken::{encode, get_current_timestamp, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{Gateway, GatewayProcess, RedisServer, Replica, WAIT};

const HUB: &str = "/.well-known/mercure";
/// The HS256 key of the Mercure examples (34 bytes).
const SECRET: &str = "!ChangeThisMercureHubJWTSecretKey!";
/// A key for publishers only, in the hub of the authorization tests.
const PUBLISHER_SECRET: &str = "publisher-only-secret-0123456789abcdef";
const ORIGIN: &str = "https://app.test";
const LOG_KEY: &str = "ssegw:s:{ssegw.mercure}";
const BIN: &str = env!("CARGO_BIN_EXE_sse-gateway");

/// Form fields or request headers: (name, value) pairs.
type Pairs<'a> = Vec<(&'a str, &'a str)>;
/// Form fields in a table of cases.
type Fields<'a> = &'a [(&'a str, &'a str)];
/// Topics, selectors or update ids in a table of cases.
type Names<'a> = &'a [&'a str];

/// The flags of a hub that serves anonymous subscribers, plus `extra`.
fn hub_flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--mercure",
        "true",
        "--mercure-jwt-secret",
        SECRET,
        "--mercure-anonymous",
        "true",
    ];
    flags.extend_from_slice(extra);
    flags
}

fn fixture(name: &str) -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
        .display()
        .to_string()
}

fn sign_with(algorithm: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    encode(&Header::new(algorithm), claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign_with(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

/// A token whose `mercure.subscribe` lists `selectors` (no `exp`, as Mercure allows).
fn subscriber(selectors: &[&str]) -> String {
    hs256(&json!({"mercure": {"subscribe": selectors}}))
}

/// A token that may publish anywhere.
fn publisher() -> String {
    hs256(&json!({"mercure": {"publish": ["*"]}}))
}

/// A form body.
fn form(fields: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

/// The pairs with a value: a table's "" stands for an absent header or parameter.
fn present(pairs: Pairs) -> Pairs {
    pairs.into_iter().filter(|(_, v)| !v.is_empty()).collect()
}

/// A query subscribing to each of `selectors`, and `extra` pairs.
fn query(selectors: &[&str], extra: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(&str, &str)> = selectors.iter().map(|s| ("topic", *s)).collect();
    pairs.extend_from_slice(extra);
    form(&pairs)
}

/// A response read to its end.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// A refusal: `status`, a JSON error containing `message`, and for 401 a Bearer challenge.
    fn assert_refused(&self, status: u16, message: &str, case: &str) {
        assert_eq!(self.status, status, "{case}: {}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{case}"
        );
        let error: Value = serde_json::from_str(&self.body).unwrap();
        let text = error["error"].as_str().unwrap();
        assert!(text.contains(message), "{case}: {text:?} lacks {message:?}");
        if status == 401 {
            let challenge = self.header("www-authenticate").unwrap_or_default();
            assert!(challenge.starts_with("Bearer"), "{case}: {challenge:?}");
        }
    }
}

/// `POST /.well-known/mercure<query>` with these headers (form-encoded unless they name
/// another content type).
async fn post(gw: &impl Replica, query: &str, headers: &[(&str, &str)], body: String) -> Reply {
    let mut request = awc::Client::default().post(gw.url(&format!("{HUB}{query}")));
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        request = request.insert_header(("content-type", "application/x-www-form-urlencoded"));
    }
    for &header in headers {
        request = request.insert_header(header);
    }
    let mut response = request.send_body(body).await.expect("POST");
    let body = response.body().limit(1 << 20).await.expect("a whole body");
    Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Publishes `fields` with a token that may publish anywhere; returns the update's id.
async fn publish(gw: &impl Replica, fields: &[(&str, &str)]) -> String {
    let token = format!("Bearer {}", publisher());
    let reply = post(gw, "", &[("authorization", &token)], form(fields)).await;
    assert_eq!(reply.status, 200, "publish {fields:?}: {}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    reply.body
}

/// `POST` over a blocking socket, for publisher threads: the status and the body.
fn blocking_publish(addr: SocketAddr, fields: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let body = form(fields);
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "POST {HUB} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        publisher(),
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply[9..12].parse().expect("status line");
    let (_, body) = reply.split_once("\r\n\r\n").expect("no body");
    (status, body.to_string())
}

/// An open Mercure stream: its response headers, the raw bytes, and the events as an
/// independent parser (`eventsource-stream`) reads them.
struct Stream {
    headers: HeaderMap,
    events: LocalBoxStream<'static, Result<Event, String>>,
    pending: VecDeque<Event>,
    raw: Arc<Mutex<Vec<u8>>>,
}

/// `GET /.well-known/mercure?<query>` with these headers: the stream, or the refusal.
async fn open(gw: &impl Replica, query: &str, headers: &[(&str, &str)]) -> Result<Stream, Reply> {
    let mut request = awc::Client::builder()
        .disable_timeout()
        .finish()
        .get(gw.url(&format!("{HUB}?{query}")));
    for &header in headers {
        request = request.insert_header(header);
    }
    let mut response = request.send().await.expect("GET");
    if response.status() != 200 {
        let body = response.body().await.expect("a whole body");
        return Err(Reply {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    let headers = response.headers().clone();
    assert_eq!(headers.get("content-type").unwrap(), "text/event-stream");
    let cache = headers.get("cache-control").unwrap().to_str().unwrap();
    assert!(
        cache.split(", ").any(|d| d == "private") && cache.contains("no-store"),
        "{cache}"
    );
    let raw = Arc::new(Mutex::new(Vec::new()));
    let tap = raw.clone();
    let events = response
        .map(move |chunk| {
            let chunk: Bytes = chunk.map_err(|e| e.to_string())?;
            tap.lock().unwrap().extend_from_slice(&chunk);
            Ok::<_, String>(chunk)
        })
        .eventsource()
        .map(|e| e.map_err(|e| e.to_string()))
        .boxed_local();
    Ok(Stream {
        headers,
        events,
        pending: VecDeque::new(),
        raw,
    })
}

/// A subscription that must be accepted.
async fn subscribe(gw: &impl Replica, query: &str, headers: &[(&str, &str)]) -> Stream {
    match open(gw, query, headers).await {
        Ok(stream) => stream,
        Err(reply) => panic!("GET {HUB}?{query} refused: {reply:?}"),
    }
}

/// A subscription that must be refused.
async fn refused(gw: &impl Replica, query: &str, headers: &[(&str, &str)]) -> Reply {
    match open(gw, query, headers).await {
        Ok(mut stream) => panic!("GET {HUB}?{query} accepted: {}", stream.raw_after(20).await),
        Err(reply) => reply,
    }
}

/// What a test compares of an event: the id of a plain message, else its type and data.
fn summary(event: &Event) -> String {
    if event.event == "message" {
        event.id.clone()
    } else {
        format!("{} {}", event.event, event.data)
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

impl Stream {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// The next event, or `None` once the stream has ended; panics after `WAIT`.
    async fn try_next(&mut self) -> Option<Event> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        match tokio::time::timeout(WAIT, self.events.next()).await {
            Ok(Some(Ok(event))) => Some(event),
            Ok(Some(Err(_))) | Ok(None) => None,
            Err(_) => panic!("no event and no end within {WAIT:?}: {}", self.raw()),
        }
    }

    async fn next(&mut self) -> Event {
        match self.try_next().await {
            Some(event) => event,
            None => panic!("stream ended: {}", self.raw()),
        }
    }

    /// Every event up to the message whose id is `last`, included.
    async fn until(&mut self, last: &str) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await;
            let done = event.event == "message" && event.id == last;
            events.push(event);
            if done {
                return events;
            }
        }
    }

    /// The summaries of every event up to the message `last`, included.
    async fn summaries_until(&mut self, last: &str) -> Vec<String> {
        self.until(last).await.iter().map(summary).collect()
    }

    fn raw(&self) -> String {
        String::from_utf8_lossy(&self.raw.lock().unwrap()).into_owned()
    }

    /// What arrives within `ms` milliseconds (for messages about a stream that should not be).
    async fn raw_after(&mut self, ms: u64) -> String {
        let _ = tokio::time::timeout(Duration::from_millis(ms), self.events.next()).await;
        self.raw()
    }

    /// The raw blocks (events, comments, the preamble) received so far, keep-alives left out.
    fn blocks(&self) -> Vec<String> {
        self.raw()
            .split_inclusive("\n\n")
            .filter(|b| *b != ":\n\n")
            .map(str::to_string)
            .collect()
    }

    /// The id of a fresh stream's preamble (`retry:` and `id: #<position>`, no data).
    async fn baseline(&mut self) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let raw = self.raw();
            if let Some((block, _)) = raw.split_once("\n\n") {
                assert!(block.starts_with("retry: "), "preamble {block:?}");
                assert!(!block.contains("data:"), "preamble {block:?}");
                let id = block
                    .lines()
                    .find_map(|l| l.strip_prefix("id: "))
                    .expect("a fresh stream's preamble names its position");
                assert!(id.starts_with('#'), "{id}");
                return id.to_string();
            }
            assert!(Instant::now() < deadline, "no preamble: {raw:?}");
            if let Ok(Some(Ok(event))) =
                tokio::time::timeout(Duration::from_millis(20), self.events.next()).await
            {
                self.pending.push_back(event);
            }
        }
    }
}

/// `urn:uuid:` and a lower-case, hyphenated UUID v7.
fn assert_generated(id: &str) {
    let uuid = id
        .strip_prefix("urn:uuid:")
        .unwrap_or_else(|| panic!("{id}"));
    let parsed = uuid::Uuid::parse_str(uuid).unwrap_or_else(|e| panic!("{id}: {e}"));
    assert_eq!(parsed.get_version_num(), 7, "{id}");
    assert_eq!(parsed.hyphenated().to_string(), uuid, "{id}");
}

/// S1-S13: every kind of selector, against updates published on another replica. Each
/// subscriber also follows `end`, published last: what it received before `end` is all it
/// receives, each matching update exactly once, whatever the number of its topics and selectors
/// that match.
#[actix_web::test]
async fn selectors_deliver_each_matching_update_once() {
    let redis = RedisServer::start();
    let a = Gateway::with_redis(&redis, &hub_flags(&[]));
    let b = Gateway::with_redis(&redis, &hub_flags(&[]));
    let users = "https://ex.com/users/foo/?topic=https%3A%2F%2Fex.com%2Fbooks%2F1";
    let updates: &[(&str, Names)] = &[
        ("room", &["room-1"]),
        ("books1", &["https://ex.com/books/1"]),
        ("books42", &["https://ex.com/books/42"]),
        ("reviews", &["https://ex.com/books/42/reviews"]),
        ("path", &["https://ex.com/a/b?c=d"]),
        ("users", &[users]),
        ("brace", &["will-not-match}"]),
        ("foox", &["https://ex.com/foo/x"]),
        ("invalid", &["https://ex.com/{"]),
        ("x", &["https://ex.com/x"]),
        ("r2", &["r2"]),
        ("ab", &["a", "b"]),
        ("alt", &["canonical", "alt"]),
    ];
    let every = &[
        "room", "books1", "books42", "reviews", "path", "users", "brace", "foox", "invalid", "x",
        "r2", "ab", "alt",
    ];
    let cases: &[(&str, Names, Names)] = &[
        ("S1 exact", &["room-1"], &["room"]),
        ("S2 exact URI", &["https://ex.com/books/1"], &["books1"]),
        (
            "S3/S4 template",
            &["https://ex.com/books/{id}"],
            &["books1", "books42"],
        ),
        (
            "S5 reserved expansion",
            &["https://ex.com/{+path}"],
            &["books1", "books42", "reviews", "path", "users", "foox", "x"],
        ),
        (
            "S6 query expansion",
            &["https://ex.com/users/foo/{?topic}"],
            &["users"],
        ),
        ("S7 *", &["*"], every),
        ("S8 no match", &["another-name"], &[]),
        ("S9 other path", &["https://ex.com/bar/{var}"], &[]),
        ("S10 invalid template", &["https://ex.com/{"], &["invalid"]),
        ("S11 two selectors", &["foo", "r2"], &["r2"]),
        ("S12 two topics, two selectors", &["a", "b"], &["ab"]),
        ("S13 alternate topic", &["alt"], &["alt"]),
        (
            "several matching selectors",
            &["*", "room-1", "https://ex.com/{+path}", "a"],
            every,
        ),
    ];
    let mut streams = Vec::new();
    for (_, selectors, _) in cases {
        let mut all = selectors.to_vec();
        all.push("end");
        streams.push(subscribe(&a, &query(&all, &[]), &[]).await);
    }
    for (id, topics) in updates {
        let mut fields: Vec<(&str, &str)> = topics.iter().map(|t| ("topic", *t)).collect();
        fields.extend([("id", *id), ("data", *id)]);
        assert_eq!(publish(&b, &fields).await, *id);
    }
    publish(&b, &[("topic", "end"), ("id", "end"), ("data", "end")]).await;
    for ((case, _, expected), stream) in cases.iter().zip(&mut streams) {
        let events = stream.until("end").await;
        let mut want = strings(expected);
        want.push("end".into());
        assert_eq!(
            events.iter().map(summary).collect::<Vec<_>>(),
            want,
            "{case}"
        );
        for event in &events {
            assert_eq!(
                event.data, event.id,
                "{case}: the publisher's id is the SSE id"
            );
        }
        assert!(stream.header("last-event-id").is_none(), "{case}");
    }
    // A subscription names at least one topic and at most 1,000.
    refused(&a, "lastEventID=x", &[]).await.assert_refused(
        400,
        "Missing \"topic\" parameter",
        "no topic",
    );
    let many: Vec<String> = (0..=1000).map(|i| format!("t{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    refused(&a, &query(&many, &[]), &[]).await.assert_refused(
        400,
        "Too many \"topic\" parameters",
        "1,001 topics",
    );
}

/// F1-F7 and ids: the bytes of each frame as the Mercure hub writes them (`event:`, `retry:`,
/// `id:`, one `data:` line per line), what an EventSource parser makes of them, generated
/// `urn:uuid` v7 ids and publishers' ids used verbatim.
#[actix_web::test]
async fn frames_carry_data_type_retry_and_ids_as_the_hub_writes_them() {
    let redis = RedisServer::start();
    let a = Gateway::with_redis(&redis, &hub_flags(&[]));
    let b = Gateway::with_redis(&redis, &hub_flags(&[]));
    let mut stream = subscribe(&a, "topic=t", &[]).await;
    let preamble = stream.baseline().await;
    // (case, fields besides the topic, frame ("": none, not for this anonymous subscriber),
    // event type and data as parsed)
    let cases: &[(&str, Fields, &str, &str, &str)] = &[
        (
            "F1 multi-line",
            &[("id", "f1"), ("data", "a\nb")],
            "id: f1\ndata: a\ndata: b\n\n",
            "message",
            "a\nb",
        ),
        (
            "F2 blank line, leading spaces",
            &[("id", "f2"), ("data", "data for\n\n        x")],
            "id: f2\ndata: data for\ndata: \ndata:         x\n\n",
            "message",
            "data for\n\n        x",
        ),
        (
            "F3 CRLF and CR",
            &[("id", "f3"), ("data", "a\r\nb\rc")],
            "id: f3\ndata: a\ndata: b\ndata: c\n\n",
            "message",
            "a\nb\nc",
        ),
        (
            "F4 no data",
            &[("id", "f4")],
            "id: f4\ndata: \n\n",
            "message",
            "",
        ),
        (
            "F4 empty data",
            &[("id", "f4e"), ("data", "")],
            "id: f4e\ndata: \n\n",
            "message",
            "",
        ),
        (
            "F5 type",
            &[("id", "f5"), ("type", "book.updated"), ("data", "x")],
            "event: book.updated\nid: f5\ndata: x\n\n",
            "book.updated",
            "x",
        ),
        (
            "F6 retry",
            &[("id", "f6"), ("retry", "5000"), ("data", "x")],
            "retry: 5000\nid: f6\ndata: x\n\n",
            "message",
            "x",
        ),
        (
            "F6 retry 0",
            &[("id", "f6z"), ("retry", "0"), ("data", "x")],
            "id: f6z\ndata: x\n\n",
            "message",
            "x",
        ),
        (
            "F7 quotes and brackets",
            &[("id", r#"id-["x"]"#), ("data", "x")],
            "id: id-[\"x\"]\ndata: x\n\n",
            "message",
            "x",
        ),
        (
            "id: IRI, spaces, non-ASCII",
            &[("id", "https://ex.com/ü?a=b&c={d} e"), ("data", "x")],
            "id: https://ex.com/ü?a=b&c={d} e\ndata: x\n\n",
            "message",
            "x",
        ),
        (
            "private",
            &[
                ("id", "f8"),
                ("type", "e"),
                ("retry", "10"),
                ("data", "1\n2"),
                ("private", ""),
            ],
            "",
            "",
            "",
        ),
        (
            "all fields, public",
            &[
                ("id", "f9"),
                ("type", "e"),
                ("retry", "10"),
                ("data", " 1\n2 "),
            ],
            "event: e\nretry: 10\nid: f9\ndata:  1\ndata: 2 \n\n",
            "e",
            " 1\n2 ",
        ),
    ];
    for (case, fields, ..) in cases {
        let mut all = vec![("topic", "t")];
        all.extend_from_slice(fields);
        let id = publish(&b, &all).await;
        let sent = fields.iter().find(|(k, _)| *k == "id").unwrap().1;
        assert_eq!(id, sent, "{case}: the publisher's id comes back");
    }
    // Without an id, or with an empty one, the hub makes one.
    let generated = publish(&b, &[("topic", "t"), ("data", "g")]).await;
    assert_generated(&generated);
    let empty = publish(&b, &[("topic", "t"), ("id", ""), ("data", "g2")]).await;
    assert_generated(&empty);

    let events = stream.until(&empty).await;
    let public: Vec<_> = cases.iter().filter(|c| !c.2.is_empty()).collect();
    assert_eq!(events.len(), public.len() + 2, "{events:?}");
    for ((case, fields, _, kind, data), event) in public.iter().zip(&events) {
        let field = |name| fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        assert_eq!(
            (event.id.as_str(), event.event.as_str(), event.data.as_str()),
            (field("id").unwrap(), *kind, *data),
            "{case}"
        );
        let retry = field("retry")
            .map(|r| r.parse().unwrap())
            .filter(|&r| r != 0);
        assert_eq!(event.retry, retry.map(Duration::from_millis), "{case}");
    }
    let tail = &events[public.len()..];
    assert_eq!(
        (tail[0].id.as_str(), tail[0].data.as_str()),
        (generated.as_str(), "g")
    );
    assert_eq!(
        (tail[1].id.as_str(), tail[1].data.as_str()),
        (empty.as_str(), "g2")
    );

    let mut want = vec![format!("retry: 2000\nid: {preamble}\n\n")];
    want.extend(public.iter().map(|c| c.2.to_string()));
    want.push(format!("id: {generated}\ndata: g\n\n"));
    want.push(format!("id: {empty}\ndata: g2\n\n"));
    assert_eq!(stream.blocks(), want, "the bytes on the wire");
}

/// P1-P6: a private update reaches a subscriber only if one of its topics matches one of the
/// subscription's selectors and one of its topics (maybe another) one of the token's
/// `mercure.subscribe` selectors; never an anonymous subscriber.
#[actix_web::test]
async fn private_updates_reach_only_matching_tokens() {
    let redis = RedisServer::start();
    let a = Gateway::with_redis(&redis, &hub_flags(&[]));
    let b = Gateway::with_redis(&redis, &hub_flags(&[]));
    let books = "https://ex.com/books/{id}";
    let users = "https://ex.com/users/foo/{?topic}";
    let no_claim = hs256(&json!({"sub": "someone"}));
    let star = subscriber(&["*"]);
    // The claim under its namespaced name, as the Mercure hub also reads it.
    let namespaced = hs256(&json!({"https://mercure.rocks/": {"subscribe": ["*"]}}));
    let user = subscriber(&[users]);
    let t = subscriber(&["t"]);
    // (case, selectors, token, expected before `end`)
    let cases: &[(&str, Names, Option<&str>, Names)] = &[
        ("P1 anonymous", &["t"], None, &["pub"]),
        ("anonymous, template", &[books], None, &[]),
        ("no mercure claim", &["t"], Some(&no_claim), &["pub"]),
        ("P2 subscribe *", &["t"], Some(&star), &["p1", "pub"]),
        (
            "namespaced claim",
            &["t"],
            Some(&namespaced),
            &["p1", "pub"],
        ),
        (
            "subscribe *, every topic",
            &["*"],
            Some(&star),
            &["p1", "p3", "p4", "pub"],
        ),
        ("P3/P4 the spec's example", &[books], Some(&user), &["p3"]),
        ("P5 claim without subscription", &["other"], Some(&t), &[]),
        ("claim and subscription", &["t"], Some(&t), &["p1", "pub"]),
    ];
    let mut streams = Vec::new();
    for (_, selectors, token, _) in cases {
        let mut all = selectors.to_vec();
        all.push("end");
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        streams.push(subscribe(&a, &query(&all, &[]), &headers).await);
    }
    let spec_topics = [
        "https://ex.com/books/1",
        "https://ex.com/users/foo/?topic=https%3A%2F%2Fex.com%2Fbooks%2F1",
    ];
    publish(&b, &[("topic", "t"), ("id", "p1"), ("private", "on")]).await;
    // P6: `private` with an empty value is private too.
    publish(
        &b,
        &[
            ("topic", spec_topics[0]),
            ("topic", spec_topics[1]),
            ("id", "p3"),
            ("private", ""),
        ],
    )
    .await;
    publish(
        &b,
        &[
            ("topic", "https://ex.com/books/2"),
            ("id", "p4"),
            ("private", "1"),
        ],
    )
    .await;
    publish(&b, &[("topic", "t"), ("id", "pub")]).await;
    publish(&b, &[("topic", "end"), ("id", "end")]).await;
    for ((case, _, _, expected), stream) in cases.iter().zip(&mut streams) {
        let mut want = strings(expected);
        want.push("end".into());
        assert_eq!(stream.summaries_until("end").await, want, "{case}");
    }
}

/// A1-A12 and keys: the token comes from the Authorization header (then nothing else counts),
/// else the `authorization` query parameter, else the cookie; a bad token is refused wherever
/// it comes from; HS256 and RS256 keys; publishers' and subscribers' keys kept apart; a
/// stream ends at its token's `exp`.
#[actix_web::test]
async fn tokens_come_from_header_query_or_cookie_and_expire() {
    let redis = RedisServer::start();
    let rsa = fixture("rsa-public.pem");
    let gw = Gateway::with_redis(
        &redis,
        &[
            "--mercure",
            "true",
            "--mercure-jwt-secret",
            SECRET,
            "--mercure-publisher-jwt-secret",
            PUBLISHER_SECRET,
            "--mercure-subscriber-jwt-public-key",
            &rsa,
            "--jwt-leeway",
            "0s",
        ],
    );
    let now = get_current_timestamp();
    let good = subscriber(&["t"]);
    // Signed with another key.
    let forged = sign_with(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-0123456789abcdefghij"),
        &json!({"mercure": {"subscribe": ["t"]}}),
    );
    let expired = hs256(&json!({"exp": now - 10, "mercure": {"subscribe": ["t"]}}));
    let later = hs256(&json!({"exp": now + 60, "mercure": {"subscribe": ["t"]}}));
    let rsa_key =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa-private.pem")).unwrap()).unwrap();
    let rs256 = sign_with(
        Algorithm::RS256,
        &rsa_key,
        &json!({"mercure": {"subscribe": ["t"]}}),
    );
    let other_rsa =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("other-rsa-private.pem")).unwrap())
            .unwrap();
    let unknown_rsa = sign_with(
        Algorithm::RS256,
        &other_rsa,
        &json!({"mercure": {"subscribe": ["t"]}}),
    );
    // HS256 keyed with the RSA public key the hub trusts: the classic confusion.
    let confused = sign_with(
        Algorithm::HS256,
        &EncodingKey::from_secret(&std::fs::read(&rsa).unwrap()),
        &json!({"mercure": {"subscribe": ["t"]}}),
    );
    // A publisher-only key does not let anyone subscribe.
    let publisher_only = sign_with(
        Algorithm::HS256,
        &EncodingKey::from_secret(PUBLISHER_SECRET.as_bytes()),
        &json!({"mercure": {"subscribe": ["t"], "publish": ["*"]}}),
    );
    let bearer = |t: &str| format!("Bearer {t}");
    let cookie = |t: &str| format!("mercureAuthorization={t}");
    let [good_header, good_cookie] = [bearer(&good), cookie(&good)];
    let [bad_header, bad_cookie] = [bearer("invalid"), cookie("invalid")];
    let [expired, later] = [bearer(&expired), bearer(&later)];
    let [rs256_header, unknown_rsa, confused] =
        [bearer(&rs256), bearer(&unknown_rsa), bearer(&confused)];
    let [publisher_only_header, other_cookie] = [bearer(&publisher_only), format!("other={good}")];
    let basic = "Basic dXNlcjpwYXNz";
    let selectors: Vec<String> = (0..=1000).map(|i| format!("t{i}")).collect();
    let too_many = bearer(&hs256(&json!({"mercure": {"subscribe": selectors}})));
    // (case, Authorization header, authorization parameter, cookie, accepted); "" for none
    let cases: &[(&str, &str, &str, &str, bool)] = &[
        ("A1/A11 header, no exp", &good_header, "", "", true),
        ("A2 query", "", &good, "", true),
        ("A3 cookie", "", "", &good_cookie, true),
        ("A4 header wins", &good_header, "invalid", &bad_cookie, true),
        (
            "A5 no fallback from the header",
            &bad_header,
            &good,
            &good_cookie,
            false,
        ),
        (
            "A6 query wins over the cookie",
            "",
            &good,
            &bad_cookie,
            true,
        ),
        (
            "A7 no fallback from the query",
            "",
            "invalid",
            &good_cookie,
            false,
        ),
        ("A8 Basic", basic, "", "", false),
        ("A9 no token, anonymous off", "", "", "", false),
        ("A9 another cookie", "", "", &other_cookie, false),
        ("A10 expired", &expired, "", "", false),
        ("A10 expires later", &later, "", "", true),
        ("A12 RS256", &rs256_header, "", "", true),
        ("A12 RS256, unknown key", &unknown_rsa, "", "", false),
        ("A12 HS256 keyed with the PEM", &confused, "", "", false),
        ("forged", "", &forged, "", false),
        ("1,001 selectors in the claim", &too_many, "", "", false),
        ("publisher key", &publisher_only_header, "", "", false),
    ];
    // Signed last (RSA signing is slow in a debug build), so that its short life is all ahead.
    let expires = get_current_timestamp() + 3;
    let soon = hs256(&json!({"exp": expires, "mercure": {"subscribe": ["t"]}}));
    let mut expiring = subscribe(
        &gw,
        "topic=t&topic=end",
        &[("authorization", &bearer(&soon))],
    )
    .await;
    // Read beside the rest of the test, so that the time it ends is when it ends.
    let expiring = actix_web::rt::spawn(async move {
        let mut seen = Vec::new();
        while let Some(event) = expiring.try_next().await {
            seen.push(summary(&event));
        }
        (seen, get_current_timestamp(), expiring.raw())
    });
    let mut streams = Vec::new();
    for &(case, header, query_token, cookie, accepted) in cases {
        let q = query(
            &["t", "end"],
            &present(vec![("authorization", query_token)]),
        );
        let headers = present(vec![("authorization", header), ("cookie", cookie)]);
        if accepted {
            streams.push((case, subscribe(&gw, &q, &headers).await));
        } else {
            refused(&gw, &q, &headers)
                .await
                .assert_refused(401, "", case);
        }
    }
    // Publishing takes a publisher key: the shared secret or the publisher's own, not the
    // subscribers' RSA key.
    publish(
        &gw,
        &[("topic", "t"), ("id", "secret-1"), ("private", "on")],
    )
    .await;
    let reply = post(
        &gw,
        "",
        &[("authorization", &bearer(&publisher_only))],
        form(&[("topic", "end"), ("id", "end")]),
    )
    .await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "end"));
    let rs256_publisher = sign_with(
        Algorithm::RS256,
        &rsa_key,
        &json!({"mercure": {"publish": ["*"]}}),
    );
    post(
        &gw,
        "",
        &[("authorization", &bearer(&rs256_publisher))],
        form(&[("topic", "t")]),
    )
    .await
    .assert_refused(401, "", "RS256 publisher");
    for (case, stream) in &mut streams {
        assert_eq!(
            stream.summaries_until("end").await,
            ["secret-1", "end"],
            "{case}"
        );
    }
    // The stream whose token expires ends then, with a last named event: what it received
    // before is what was published while the token was valid.
    let (seen, ended, raw) = expiring.await.unwrap();
    assert_eq!(
        seen.last().map(String::as_str),
        Some(r#"ssegw-expired {"reason":"token-expired"}"#),
        "{raw}"
    );
    assert!(
        strings(&["secret-1", "end"]).starts_with(&seen[..seen.len() - 1]),
        "{seen:?}"
    );
    assert!(
        (expires..=expires + 1).contains(&ended),
        "ended at {ended}, the token expires at {expires}"
    );
}

/// B1-B13 and 413/415: every refusal of a publish, with its status and message, stores and
/// delivers nothing; the accepted ones answer the id as text. B13: Redis down → 503; after its
/// restart (empty) an old id resumes as unknown (R13).
#[actix_web::test]
async fn publish_refusals_store_and_deliver_nothing() {
    let mut redis = RedisServer::start();
    let gw = Gateway::with_redis(
        &redis,
        &hub_flags(&[
            "--mercure-publish-origins",
            ORIGIN,
            "--redis-timeout",
            "500ms",
        ]),
    );
    let mut all = subscribe(&gw, "topic=*", &[]).await;
    let bearer = |claims: Value| format!("Bearer {}", hs256(&claims));
    let star = bearer(json!({"mercure": {"publish": ["*"]}}));
    let only_a = bearer(json!({"mercure": {"publish": ["a"]}}));
    let template = bearer(json!({"mercure": {"publish": ["https://ex.com/{x}"]}}));
    let no_claim = bearer(json!({"sub": "x"}));
    let empty_publish = bearer(json!({"mercure": {"publish": []}}));
    let subscribe_only = bearer(json!({"mercure": {"subscribe": ["*"]}}));
    let publish_cookie = format!("mercureAuthorization={}", publisher());
    let wrong_key = format!(
        "Bearer {}",
        sign_with(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another-secret-0123456789abcdefghij"),
            &json!({"mercure": {"publish": ["*"]}}),
        )
    );
    let big = "x".repeat(70_000);
    let ok = form(&[("topic", "a"), ("data", "d")]);
    // (case, headers, body, status, message)
    let cases: Vec<(&str, Pairs, String, u16, &str)> = vec![
        ("B1 no token", vec![], ok.clone(), 401, "needs a token"),
        (
            "B1 wrong key",
            vec![("authorization", &wrong_key)],
            ok.clone(),
            401,
            "signature",
        ),
        (
            "B1 Basic",
            vec![("authorization", "Basic dXNlcjpwYXNz")],
            ok.clone(),
            401,
            "Bearer",
        ),
        (
            "B2 no mercure claim",
            vec![("authorization", &no_claim)],
            ok.clone(),
            401,
            "mercure.publish",
        ),
        (
            "B2 empty publish",
            vec![("authorization", &empty_publish)],
            ok.clone(),
            401,
            "mercure.publish",
        ),
        (
            "B2 subscribe only",
            vec![("authorization", &subscribe_only)],
            ok.clone(),
            401,
            "mercure.publish",
        ),
        (
            "B3 a topic not allowed",
            vec![("authorization", &only_a)],
            form(&[("topic", "a"), ("topic", "b")]),
            403,
            "mercure.publish",
        ),
        (
            "B3 template not matching",
            vec![("authorization", &template)],
            form(&[("topic", "https://ex.com/1/2")]),
            403,
            "mercure.publish",
        ),
        (
            "B5 cookie without origin",
            vec![("cookie", &publish_cookie)],
            ok.clone(),
            401,
            "--mercure-publish-origins",
        ),
        (
            "B5 cookie from another origin",
            vec![("cookie", &publish_cookie), ("origin", "https://evil.test")],
            ok.clone(),
            401,
            "--mercure-publish-origins",
        ),
        (
            "B5 cookie, another referer",
            vec![
                ("cookie", &publish_cookie),
                ("referer", "https://evil.test/app.test"),
            ],
            ok.clone(),
            401,
            "--mercure-publish-origins",
        ),
        (
            "B6 no topic",
            vec![("authorization", &star)],
            form(&[("data", "d")]),
            400,
            "Missing \"topic\"",
        ),
        (
            "B7 retry abc",
            vec![("authorization", &star)],
            form(&[("topic", "a"), ("retry", "abc")]),
            400,
            "retry",
        ),
        (
            "B7 retry -1",
            vec![("authorization", &star)],
            form(&[("topic", "a"), ("retry", "-1")]),
            400,
            "retry",
        ),
        (
            "B8 id with LF",
            vec![("authorization", &star)],
            form(&[("topic", "a"), ("id", "a\nb")]),
            400,
            "control character",
        ),
        (
            "B8 id with CR",
            vec![("authorization", &star)],
            form(&[("topic", "a"), ("id", "a\rb")]),
            400,
            "control character",
        ),
        (
            "B8 id with NUL",
            vec![("authorization", &star)],
            form(&[("topic", "a"), ("id", "a\0b")]),
            400,
            "control character",
        ),
        (
            "B8 id starting with #",
            vec![("authorization", &star)],
            form(&[("topic", "a"), ("id", "#1-0")]),
            400,
            "must not start with #",
        ),
        (
            "B8 id earliest",
            vec![("authorization", &star)],
            form(&[("topic", "a"), ("id", "earliest")]),
            400,
            "earliest",
        ),
        (
            "B8 type with CR",
            vec![("authorization", &star)],
            form(&[("topic", "a"), ("type", "a\rb")]),
            400,
            "control character",
        ),
        (
            "B9 reserved topic",
            vec![("authorization", &star)],
            form(&[
                ("topic", "a"),
                ("topic", "/.well-known/mercure/subscriptions/x/y"),
            ]),
            403,
            "reserved",
        ),
        (
            "415 JSON",
            vec![
                ("authorization", &star),
                ("content-type", "application/json"),
            ],
            r#"{"topic":"a"}"#.into(),
            415,
            "x-www-form-urlencoded",
        ),
        (
            "415 multipart",
            vec![
                ("authorization", &star),
                ("content-type", "multipart/form-data; boundary=x"),
            ],
            ok.clone(),
            415,
            "x-www-form-urlencoded",
        ),
        (
            "413 too large",
            vec![("authorization", &star)],
            form(&[("topic", "a"), ("data", &big)]),
            413,
            "larger than 65536 bytes",
        ),
    ];
    for (case, headers, body, status, message) in &cases {
        post(&gw, "", headers, body.clone())
            .await
            .assert_refused(*status, message, case);
    }
    let xlen = || -> u64 { redis.cmd(redis::cmd("XLEN").arg(LOG_KEY)).unwrap() };
    assert_eq!(xlen(), 0, "a refused update was stored");
    // Accepted: B4, B5 with an allowed origin or referer, the query token, a type with a
    // parameter, B10, B12.
    let query_token = format!("?authorization={}", publisher());
    let accepted: Vec<(&str, &str, Pairs, Pairs)> = vec![
        (
            "B4 template",
            "",
            vec![("authorization", &template)],
            vec![("topic", "https://ex.com/1"), ("id", "b4")],
        ),
        (
            "B5 cookie from the origin",
            "",
            vec![("cookie", &publish_cookie), ("origin", ORIGIN)],
            vec![("topic", "a"), ("id", "b5")],
        ),
        (
            "B5 cookie, referer",
            "",
            vec![
                ("cookie", &publish_cookie),
                ("referer", "https://app.test/page?x"),
            ],
            vec![("topic", "a"), ("id", "b5r")],
        ),
        (
            "query token",
            &query_token,
            vec![],
            vec![("topic", "a"), ("id", "bq")],
        ),
        (
            "charset",
            "",
            vec![
                ("authorization", &star),
                (
                    "content-type",
                    "application/x-www-form-urlencoded; charset=UTF-8",
                ),
            ],
            vec![("topic", "a"), ("id", "bc")],
        ),
        (
            "B10",
            "",
            vec![("authorization", &star)],
            vec![("topic", "a"), ("id", "x")],
        ),
        (
            "B12 same id again",
            "",
            vec![("authorization", &star)],
            vec![("topic", "a"), ("id", "x"), ("data", "again")],
        ),
        (
            "B3 allowed topic",
            "",
            vec![("authorization", &only_a)],
            vec![("topic", "a"), ("id", "b3")],
        ),
    ];
    for (case, q, headers, fields) in &accepted {
        let reply = post(&gw, q, headers, form(fields)).await;
        let id = fields.iter().find(|(k, _)| *k == "id").unwrap().1;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, id),
            "{case}: {}",
            reply.body
        );
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; charset=utf-8"),
            "{case}"
        );
    }
    // Only the accepted updates were delivered, in order, the duplicate id both times.
    let want = ["b4", "b5", "b5r", "bq", "bc", "x", "x", "b3"];
    let events = all.until("b3").await;
    assert_eq!(events.iter().map(summary).collect::<Vec<_>>(), want);
    assert_eq!(events[6].data, "again");
    assert_eq!(xlen(), want.len() as u64);

    // B13: no Redis, no publish.
    redis.kill();
    gw.wait_readyz(503);
    let reply = post(&gw, "", &[("authorization", &star)], ok.clone()).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    // R13: back, empty: an old id is unknown; the replay is what the new log holds.
    redis.restart();
    gw.wait_readyz(200);
    publish(&gw, &[("topic", "a"), ("id", "after")]).await;
    let mut resumed = subscribe(&gw, "topic=a", &[("last-event-id", "b4")]).await;
    assert_eq!(resumed.header("last-event-id"), Some("earliest"));
    assert_eq!(
        resumed.summaries_until("after").await,
        [r#"ssegw-gap {"reason":"unknown-id"}"#, "after"]
    );
}

/// R1-R3, R5, R6, R8-R11: resuming on the replica that did not publish, by a publisher's id,
/// a generated one, a `#position` from a preamble, `earliest` or an unknown id, with the
/// `Last-Event-ID` header or the `lastEventID` parameter (the header wins); the response's
/// `Last-Event-ID`; private updates replayed only to tokens that may see them; duplicates; and
/// live updates after the replay, once.
#[actix_web::test]
async fn resume_on_another_replica_by_any_id() {
    let redis = RedisServer::start();
    let a = Gateway::with_redis(&redis, &hub_flags(&[]));
    let b = Gateway::with_redis(&redis, &hub_flags(&[]));
    let mut before = subscribe(&a, "topic=t", &[]).await;
    let first_position = before.baseline().await;
    drop(before);
    publish(&a, &[("topic", "t"), ("id", "u1")]).await;
    publish(&a, &[("topic", "t"), ("id", "d"), ("data", "d-first")]).await;
    publish(&a, &[("topic", "t"), ("id", "u2")]).await;
    // R9: a stream that dropped before its first update resumes from its preamble's position.
    let mut fresh = subscribe(&b, "topic=t", &[]).await;
    let position = fresh.baseline().await;
    drop(fresh);
    publish(&a, &[("topic", "other"), ("id", "u3")]).await;
    publish(&a, &[("topic", "t"), ("id", "u4")]).await;
    publish(&a, &[("topic", "t"), ("id", "d"), ("data", "d-second")]).await;
    publish(&a, &[("topic", "t"), ("id", "pv"), ("private", "on")]).await;
    publish(&a, &[("topic", "t"), ("id", "u5")]).await;
    let generated = publish(&a, &[("topic", "t")]).await;
    assert_generated(&generated);
    publish(&a, &[("topic", "t"), ("topic", "other"), ("id", "end")]).await;
    let g = generated.as_str();
    let token = format!("Bearer {}", subscriber(&["t"]));
    let gap = r#"ssegw-gap {"reason":"unknown-id"}"#;
    // (case, query, headers, response's Last-Event-ID, replay up to `end`)
    let cases: Vec<(&str, &str, Pairs, &str, Vec<&str>)> = vec![
        (
            "R1 header",
            "topic=t",
            vec![("last-event-id", "u2")],
            "u2",
            vec!["u4", "d", "u5", g, "end"],
        ),
        (
            "R2 query",
            "topic=t&lastEventID=u2",
            vec![],
            "u2",
            vec!["u4", "d", "u5", g, "end"],
        ),
        (
            "R3 the header wins",
            "topic=t&lastEventID=u2",
            vec![("last-event-id", "u4")],
            "u4",
            vec!["d", "u5", g, "end"],
        ),
        (
            "R3 an empty header does not",
            "topic=t&lastEventID=u4",
            vec![("last-event-id", "")],
            "u4",
            vec!["d", "u5", g, "end"],
        ),
        (
            "R5 earliest",
            "topic=t&lastEventID=earliest",
            vec![],
            "earliest",
            vec!["u1", "d", "u2", "u4", "d", "u5", g, "end"],
        ),
        (
            "R6 unknown id",
            "topic=t",
            vec![("last-event-id", "nope")],
            "earliest",
            vec![gap, "u1", "d", "u2", "u4", "d", "u5", g, "end"],
        ),
        (
            "R6 malformed position",
            "topic=t&lastEventID=%23x",
            vec![],
            "earliest",
            vec![gap, "u1", "d", "u2", "u4", "d", "u5", g, "end"],
        ),
        (
            "R8 generated id",
            "topic=t",
            vec![("last-event-id", g)],
            g,
            vec!["end"],
        ),
        (
            "R9 preamble position",
            "topic=t",
            vec![("last-event-id", position.as_str())],
            position.as_str(),
            vec!["u4", "d", "u5", g, "end"],
        ),
        (
            "R9 position of the empty log",
            "topic=t",
            vec![("last-event-id", first_position.as_str())],
            first_position.as_str(),
            vec!["u1", "d", "u2", "u4", "d", "u5", g, "end"],
        ),
        (
            "R10 token sees the private update",
            "topic=t",
            vec![("last-event-id", "u4"), ("authorization", token.as_str())],
            "u4",
            vec!["d", "pv", "u5", g, "end"],
        ),
        (
            "R11 duplicate id: after its first occurrence",
            "topic=t",
            vec![("last-event-id", "d")],
            "d",
            vec!["u2", "u4", "d", "u5", g, "end"],
        ),
        (
            "another selector",
            "topic=other&lastEventID=u1",
            vec![],
            "u1",
            vec!["u3", "end"],
        ),
        (
            "every selector",
            "topic=*",
            vec![("last-event-id", "u2")],
            "u2",
            vec!["u3", "u4", "d", "u5", g, "end"],
        ),
    ];
    let mut streams = Vec::new();
    for (case, q, headers, header, replay) in &cases {
        let mut stream = subscribe(&b, q, headers).await;
        assert_eq!(stream.header("last-event-id"), Some(*header), "{case}");
        assert_eq!(stream.summaries_until("end").await, *replay, "{case}");
        streams.push(stream);
    }
    // Then live, each once: nothing replayed again.
    publish(&a, &[("topic", "t"), ("topic", "other"), ("id", "live")]).await;
    for ((case, ..), stream) in cases.iter().zip(&mut streams) {
        assert_eq!(summary(&stream.next().await), "live", "{case}");
    }
    // A fresh stream's preamble is the only block with no data; a resumed one has none.
    assert!(!streams[0].raw().contains("id: #"), "{}", streams[0].raw());
}

/// R4: a replica SIGKILLed under its subscribers while updates keep coming; they reconnect to
/// another replica with the last id they saw (the `Last-Event-ID` header for one, the
/// `lastEventID` parameter for the other) and receive every later update exactly once, in
/// order.
#[actix_web::test]
async fn sigkill_resume_on_another_replica_loses_nothing() {
    const TOTAL: usize = 150;
    let redis = RedisServer::start();
    let flags = hub_flags(&[]);
    let a = GatewayProcess::start(&redis.url(), &flags);
    let b = GatewayProcess::start(&redis.url(), &flags);
    let selectors = ["k", "https://ex.com/{x}"];
    let mut header_client = subscribe(&a, &query(&selectors, &[]), &[]).await;
    let mut query_client = subscribe(&a, &query(&selectors, &[]), &[]).await;
    let baselines = [
        header_client.baseline().await,
        query_client.baseline().await,
    ];
    let publisher = b.addr;
    let published = std::thread::spawn(move || {
        let mut ids = Vec::new();
        for i in 0..TOTAL {
            // Alternately a generated id and the publisher's; between them, updates that the
            // clients do not follow or may not see.
            let id = format!("k-{i}");
            let fields: Vec<(&str, &str)> = if i % 2 == 0 {
                vec![("topic", "k"), ("data", &id)]
            } else {
                vec![
                    ("topic", "https://ex.com/1"),
                    ("topic", "k"),
                    ("id", &id),
                    ("data", &id),
                ]
            };
            let (status, body) = blocking_publish(publisher, &fields);
            assert_eq!(status, 200, "{body}");
            ids.push(body);
            let (status, _) = blocking_publish(publisher, &[("topic", "elsewhere")]);
            assert_eq!(status, 200);
            let (status, _) = blocking_publish(publisher, &[("topic", "k"), ("private", "on")]);
            assert_eq!(status, 200);
            std::thread::sleep(Duration::from_millis(3));
        }
        ids
    });
    let mut received: [Vec<Event>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..30 {
        received[0].push(header_client.next().await);
    }
    support::signal(a.pid(), "KILL");
    for (client, seen) in [&mut header_client, &mut query_client]
        .into_iter()
        .zip(&mut received)
    {
        while let Some(event) = client.try_next().await {
            seen.push(event);
        }
    }
    let before_kill = [received[0].len(), received[1].len()];
    // The last id each saw, or its preamble's position if it saw none.
    let last: Vec<String> = received
        .iter()
        .zip(&baselines)
        .map(|(seen, baseline)| seen.last().map_or(baseline.clone(), |e| e.id.clone()))
        .collect();
    let mut header_client =
        subscribe(&b, &query(&selectors, &[]), &[("last-event-id", &last[0])]).await;
    let mut query_client =
        subscribe(&b, &query(&selectors, &[("lastEventID", &last[1])]), &[]).await;
    assert_eq!(
        header_client.header("last-event-id"),
        Some(last[0].as_str())
    );
    assert_eq!(query_client.header("last-event-id"), Some(last[1].as_str()));
    let ids = published.join().unwrap();
    for (client, seen) in [&mut header_client, &mut query_client]
        .into_iter()
        .zip(&mut received)
    {
        seen.extend(client.until(ids.last().unwrap()).await);
    }
    for seen in &received {
        let got: Vec<&str> = seen.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(got, ids, "every update once, in order, across the kill");
        let data: Vec<String> = seen.iter().map(|e| e.data.clone()).collect();
        assert_eq!(
            data,
            (0..TOTAL).map(|i| format!("k-{i}")).collect::<Vec<_>>()
        );
    }
    assert!(
        before_kill.iter().all(|&n| n < TOTAL) && before_kill[0] >= 30,
        "the kill came mid-stream: {before_kill:?}"
    );
}

/// Calls `ssegw_m_find` as the replicas do: the log entry of an update id, or "".
fn find(redis: &RedisServer, id: &str) -> String {
    let base = "ssegw:m:{ssegw.mercure}:";
    redis
        .cmd(
            redis::cmd("FCALL")
                .arg("ssegw_m_find")
                .arg(4)
                .arg(LOG_KEY)
                .arg(format!("{base}ids:0"))
                .arg(format!("{base}ids:1"))
                .arg(format!("{base}gen"))
                .arg(id),
        )
        .unwrap()
}

/// The log's retained entries: (entry id, update id).
fn retained(redis: &RedisServer) -> Vec<(String, String)> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis
        .cmd(redis::cmd("XRANGE").arg(LOG_KEY).arg("-").arg("+"))
        .unwrap();
    entries
        .into_iter()
        .map(|(entry, fields)| {
            let id = fields
                .into_iter()
                .find_map(|(k, v)| (k == "m").then_some(v))
                .expect("an update id");
            (entry, id)
        })
        .collect()
}

/// R7 and R12: with the log's namespace kept short (`sse-gateway namespace set ssegw.mercure`),
/// every retained update id still resolves after each publish, across the id index's
/// generation flips, and a resume from it on another replica replays exactly what follows;
/// an id or a position trimmed away resumes as a gap (`unknown-id`, `trimmed`) from the oldest
/// retained update.
#[actix_web::test]
async fn retained_ids_resolve_across_index_generations_and_trimmed_ones_report_a_gap() {
    const MAX_LEN: usize = 17;
    let redis = RedisServer::start();
    let a = Gateway::with_redis(&redis, &hub_flags(&[]));
    let b = Gateway::with_redis(&redis, &hub_flags(&[]));
    let out = Command::new(BIN)
        .args([
            "namespace",
            "set",
            "ssegw.mercure",
            "--max-len",
            &MAX_LEN.to_string(),
        ])
        .args(["--redis-url", &redis.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    publish(&a, &[("topic", "r"), ("id", "r0")]).await;
    let mut early = subscribe(&b, "topic=r", &[]).await;
    let early_position = early.baseline().await;
    drop(early);
    for i in 1..(3 * MAX_LEN + 5) {
        publish(&a, &[("topic", "r"), ("id", &format!("r{i}"))]).await;
        let kept = retained(&redis);
        assert!(
            kept.len() >= MAX_LEN.min(i + 1),
            "{} kept after r{i}",
            kept.len()
        );
        for (entry, id) in &kept {
            assert_eq!(&find(&redis, id), entry, "{id} after r{i}: kept {kept:?}");
        }
        // The oldest retained id resumes exactly, on the other replica.
        let (_, oldest) = &kept[0];
        let mut resumed = subscribe(&b, "topic=r", &[("last-event-id", oldest)]).await;
        assert_eq!(
            resumed.header("last-event-id"),
            Some(oldest.as_str()),
            "after r{i}"
        );
        let want: Vec<&str> = kept[1..].iter().map(|(_, id)| id.as_str()).collect();
        if let Some(newest) = want.last() {
            let got = resumed.summaries_until(newest).await;
            assert_eq!(got, want, "after r{i}");
        }
    }
    let kept = retained(&redis);
    assert!(kept.len() <= MAX_LEN + MAX_LEN / 8, "{} kept", kept.len());
    let newest = kept.last().unwrap().1.clone();
    let all_kept: Vec<String> = kept.iter().map(|(_, id)| id.clone()).collect();
    // R7: trimmed ids and positions.
    for (last_event_id, reason) in [
        ("r0", "unknown-id"),
        ("r1", "unknown-id"),
        (early_position.as_str(), "trimmed"),
    ] {
        let mut resumed = subscribe(&b, "topic=r", &[("last-event-id", last_event_id)]).await;
        assert_eq!(
            resumed.header("last-event-id"),
            Some("earliest"),
            "{last_event_id}"
        );
        let mut want = vec![format!(r#"ssegw-gap {{"reason":"{reason}"}}"#)];
        want.extend(all_kept.iter().cloned());
        assert_eq!(
            resumed.summaries_until(&newest).await,
            want,
            "{last_event_id}"
        );
    }
}

/// The log is the native topic `ssegw.mercure`: the native API refuses it (and every
/// `ssegw.` topic) on every route, and so does the native publish function.
#[actix_web::test]
async fn native_routes_and_functions_refuse_the_log_topic() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &hub_flags(&[]));
    publish(&gw, &[("topic", "t"), ("id", "private"), ("private", "on")]).await;
    let client = awc::Client::default();
    for topic in ["ssegw.mercure", "ssegw.other"] {
        for path in [
            format!("/events?topic={topic}"),
            format!("/events?topic=fine&topic={topic}"),
            format!("/history?topic={topic}"),
            format!("/presence?topic={topic}"),
        ] {
            let mut response = client.get(gw.url(&path)).send().await.unwrap();
            let body = response.body().await.unwrap();
            let body = String::from_utf8_lossy(&body);
            assert_eq!(response.status(), 400, "{path}: {body}");
            assert!(body.contains("reserved to the gateway"), "{path}: {body}");
        }
        let one = json!({"topic": topic, "data": "x"}).to_string();
        let batch = format!("{}\n{one}\n", json!({"topic": "fine", "data": "x"}));
        for (content_type, body) in [("application/json", one), ("application/x-ndjson", batch)] {
            let mut response = client
                .post(gw.url("/publish"))
                .insert_header(("content-type", content_type))
                .send_body(body.clone())
                .await
                .unwrap();
            let text = response.body().await.unwrap();
            let text = String::from_utf8_lossy(&text);
            assert_eq!(response.status(), 400, "{body}: {text}");
            assert!(text.contains("reserved to the gateway"), "{body}: {text}");
        }
    }
    for key in ["ssegw.mercure", LOG_KEY, "ssegw.x"] {
        let refused = redis
            .cmd::<String>(
                redis::cmd("FCALL")
                    .arg("ssegw_publish")
                    .arg(1)
                    .arg(key)
                    .arg("forged"),
            )
            .unwrap_err();
        assert!(
            refused.to_string().contains("reserved to the gateway"),
            "{key}: {refused}"
        );
    }
    // Only the Mercure update is in the log.
    let kept = retained(&redis);
    assert_eq!(
        kept.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>(),
        ["private"]
    );
    let xlen: u64 = redis.cmd(redis::cmd("XLEN").arg("ssegw:s:{fine}")).unwrap();
    assert_eq!(xlen, 0, "a batch with a reserved topic publishes nothing");
}

/// The embedded bus (no Redis) serves the hub too: publish, subscribe, resume by id, by
/// position, from `earliest`, and an unknown id as a gap.
#[actix_web::test]
async fn embedded_bus_publishes_and_resumes() {
    let gw = Gateway::start(&hub_flags(&[]));
    let selector = query(&["https://ex.com/{x}"], &[]);
    let mut live = subscribe(&gw, &selector, &[]).await;
    let position = live.baseline().await;
    publish(
        &gw,
        &[
            ("topic", "https://ex.com/1"),
            ("id", "e1"),
            ("data", "one\ntwo"),
        ],
    )
    .await;
    publish(&gw, &[("topic", "https://ex.com/1/2"), ("id", "skip")]).await;
    publish(
        &gw,
        &[
            ("topic", "https://ex.com/2"),
            ("id", "e2"),
            ("private", "on"),
        ],
    )
    .await;
    let generated = publish(&gw, &[("topic", "https://ex.com/3")]).await;
    assert_generated(&generated);
    let events = live.until(&generated).await;
    assert_eq!(
        events.iter().map(summary).collect::<Vec<_>>(),
        ["e1", generated.as_str()]
    );
    assert_eq!(events[0].data, "one\ntwo");
    let g = generated.as_str();
    let token = format!("Bearer {}", subscriber(&["*"]));
    let gap = r#"ssegw-gap {"reason":"unknown-id"}"#;
    let cases: Vec<(&str, Pairs, &str, Vec<&str>)> = vec![
        ("by id", vec![("last-event-id", "e1")], "e1", vec![g]),
        (
            "by id, with a token",
            vec![("last-event-id", "e1"), ("authorization", token.as_str())],
            "e1",
            vec!["e2", g],
        ),
        (
            "by position",
            vec![("last-event-id", position.as_str())],
            position.as_str(),
            vec!["e1", g],
        ),
        (
            "earliest",
            vec![("last-event-id", "earliest")],
            "earliest",
            vec!["e1", g],
        ),
        (
            "unknown",
            vec![("last-event-id", "nope")],
            "earliest",
            vec![gap, "e1", g],
        ),
    ];
    for (case, headers, header, want) in cases {
        let mut resumed = subscribe(&gw, &selector, &headers).await;
        assert_eq!(resumed.header("last-event-id"), Some(header), "{case}");
        assert_eq!(resumed.summaries_until(&generated).await, want, "{case}");
    }
}

/// A hub that could serve no one, or with a weak key, is refused before any port is bound.
#[test]
fn bad_mercure_configuration_exits_2_before_binding() {
    let cases: &[(&[&str], &str)] = &[
        (&["--mercure", "true"], "needs a key for publishers"),
        (
            &["--mercure", "true", "--mercure-anonymous", "true"],
            "needs a key for publishers",
        ),
        (
            &[
                "--mercure",
                "true",
                "--mercure-publisher-jwt-secret",
                SECRET,
            ],
            "serves no subscriber",
        ),
        (
            &["--mercure", "true", "--mercure-jwt-secret", "0123456789"],
            "at least 32 bytes",
        ),
        (
            &[
                "--mercure",
                "true",
                "--mercure-jwt-secret",
                SECRET,
                "--mercure-jwt-algorithms",
                "HS999",
            ],
            "unknown algorithm",
        ),
        (
            &[
                "--mercure",
                "true",
                "--mercure-jwt-secret",
                SECRET,
                "--mercure-jwt-algorithms",
                "RS256",
            ],
            "none of --mercure-jwt-algorithms uses this key",
        ),
        (
            &[
                "--mercure",
                "true",
                "--mercure-jwt-secret",
                SECRET,
                "--mercure-cookie-name",
                "a b",
            ],
            "must be a cookie name",
        ),
        (
            &[
                "--mercure",
                "true",
                "--mercure-jwt-secret",
                SECRET,
                "--mercure-subscriber-jwt-public-key",
                "/nonexistent.pem",
            ],
            "/nonexistent.pem",
        ),
        (
            &[
                "--mercure",
                "true",
                "--mercure-publisher-jwt-secret",
                SECRET,
                "--mercure-anonymous",
                "true",
                "--mercure-subscriptions",
                "true",
            ],
            "--mercure-subscriptions true needs a subscriber key",
        ),
    ];
    let port = support::free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    for (flags, message) in cases {
        let out = Command::new(BIN)
            .args(["--listen", &listen])
            .args(*flags)
            .env("SSEGW_LOG", "info")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(
            stderr.contains(message),
            "{flags:?}: {stderr:?} lacks {message:?}"
        );
        assert!(
            !stderr.contains(SECRET),
            "{flags:?} printed the secret: {stderr}"
        );
        assert!(!stderr.contains("listening"), "{flags:?} served: {stderr}");
    }
}

/// Publishes a public update on `topic` straight into Redis, as `POST` does.
fn fcall_mercure(redis: &RedisServer, topic: &str, data: &str) {
    use ssegw_protocol::mercure::update::{encode, Update};
    let update = Update {
        id: format!("urn:uuid:{}", uuid::Uuid::now_v7()),
        topics: vec![topic.to_string()],
        private: false,
        kind: None,
        retry: None,
        data: data.to_string(),
    };
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("ssegw_m_publish")
        .arg(4)
        .arg(LOG_KEY)
        .arg("ssegw:m:{ssegw.mercure}:ids:0")
        .arg("ssegw:m:{ssegw.mercure}:ids:1")
        .arg("ssegw:m:{ssegw.mercure}:gen")
        .arg(&update.id)
        .arg(encode(&update));
    let _: String = redis.cmd(&cmd).expect("FCALL ssegw_m_publish");
}

/// A busy log does not make a subscriber of a quiet topic lag, nor leave it silent: each
/// replica's router hands a subscription only its own updates (a burst of others' updates
/// larger than its buffer leaves it live), and a keep-alive every interval in which it got
/// nothing.
#[actix_web::test]
async fn a_busy_log_neither_closes_nor_silences_a_quiet_subscriber() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(
        &redis,
        &hub_flags(&["--client-buffer", "16", "--keepalive", "200ms"]),
    );
    let mut quiet = subscribe(&gw, &query(&["quiet"], &[]), &[]).await;
    let first = publish(&gw, &[("topic", "quiet"), ("data", "q1")]).await;
    assert_eq!(quiet.next().await.id, first);
    // Live now: before routing, a lag here closed the stream as too slow.
    let started = Instant::now();
    for n in 0..200 {
        let data = format!("busy {n}");
        fcall_mercure(&redis, "busy", &data);
    }
    let raw_before = quiet.raw().len();
    // Others' updates for a while: the quiet subscriber gets keep-alives meanwhile.
    while started.elapsed() < Duration::from_millis(900) {
        fcall_mercure(&redis, "busy", "more");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = publish(&gw, &[("topic", "quiet"), ("data", "q2")]).await;
    let event = quiet.next().await;
    assert_eq!(
        (event.id.as_str(), event.data.as_str()),
        (last.as_str(), "q2")
    );
    let during = quiet.raw()[raw_before..].to_string();
    assert!(
        during.matches(":\n\n").count() >= 2,
        "keep-alives while others' updates flowed: {during:?}"
    );
    assert!(!during.contains("busy"), "{during:?}");
}

/// `HEAD` answers what a `GET` would, its checks included, without a stream.
#[actix_web::test]
async fn head_answers_the_head_of_a_subscription() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &hub_flags(&[]));
    let head = |query: String, token: Option<&'static str>| {
        let url = gw.url(&format!("{HUB}?{query}"));
        async move {
            let mut request = awc::Client::default().head(url);
            if let Some(token) = token {
                request = request.insert_header(("Authorization", format!("Bearer {token}")));
            }
            let mut response = request.send().await.expect("HEAD");
            let body = response.body().await.unwrap();
            let kind = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string());
            (response.status().as_u16(), kind, body.len())
        }
    };
    assert_eq!(
        head(query(&["https://ex.com/books/{id}"], &[]), None).await,
        (200, Some("text/event-stream".to_string()), 0)
    );
    assert_eq!(head(query(&[], &[]), None).await.0, 400);
    assert_eq!(head(query(&["t"], &[]), Some("not-a-token")).await.0, 401);
    // Nothing subscribed: the replica follows no log for it.
    assert!(
        support::get_json(gw.addr, "/status").1["topics"] == 0,
        "a HEAD joined the log"
    );
}

/// The subscriptions API's path, and the selector of every subscription update.
const SUBSCRIPTIONS: &str = "/.well-known/mercure/subscriptions";
const SUBSCRIPTION_TEMPLATE: &str = "/.well-known/mercure/subscriptions{/topic}{/subscriber}";
/// A subscription as a test compares it: selector, subscriber, active, payload (as JSON).
type Sub = (String, String, bool, String);

/// `GET <path>` with these headers, read to its end.
async fn get(gw: &impl Replica, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = awc::Client::default().get(gw.url(path));
    for &header in headers {
        request = request.insert_header(header);
    }
    let mut response = request.send().await.expect("GET");
    let body = response.body().limit(1 << 20).await.expect("a whole body");
    Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A successful subscriptions API answer: its JSON, with the headers the spec asks for.
async fn api_document(gw: &impl Replica, path: &str, token: &str) -> Value {
    let bearer = format!("Bearer {token}");
    let reply = get(gw, path, &[("authorization", &bearer)]).await;
    assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/ld+json"));
    let document: Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(document["@context"], "https://mercure.rocks/");
    assert!(document["lastEventID"].is_string(), "{document}");
    // A strong tag: the log's position, which every change moves.
    let etag = reply.header("etag").unwrap();
    let position = etag
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{path}: ETag {etag:?} is not quoted"));
    assert!(
        position
            .split_once('-')
            .is_some_and(|(ms, seq)| ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok()),
        "{path}: ETag {etag:?}"
    );
    document
}

/// The subscriptions of a collection answer whose selector is one of `selectors`, as
/// (selector, subscriber, active, payload), sorted.
fn listed(collection: &Value, selectors: &[&str]) -> Vec<Sub> {
    assert_eq!(collection["type"], "Subscriptions");
    let mut out: Vec<_> = collection["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| selectors.contains(&s["topic"].as_str().unwrap()))
        .map(|s| {
            assert_eq!(s["type"], "Subscription");
            assert!(s.get("@context").is_none(), "{s}");
            (
                s["topic"].as_str().unwrap().to_string(),
                s["subscriber"].as_str().unwrap().to_string(),
                s["active"].as_bool().unwrap(),
                s["payload"].to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// A subscription update as (selector, subscriber, active, payload), checked against the
/// spec: a JSON-LD document whose id is the subscription's URL.
fn subscription_event(event: &Event) -> Sub {
    assert_eq!(event.event, "message");
    let data: Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(data["@context"], "https://mercure.rocks/");
    assert_eq!(data["type"], "Subscription");
    let (topic, subscriber) = (
        data["topic"].as_str().unwrap(),
        data["subscriber"].as_str().unwrap(),
    );
    // Go's url.QueryEscape: form encoding, except that `*` is escaped and `~` is not.
    let escape = |s: &str| {
        form_urlencoded::byte_serialize(s.as_bytes())
            .collect::<String>()
            .replace('*', "%2A")
            .replace("%7E", "~")
    };
    assert_eq!(
        data["id"],
        format!("{SUBSCRIPTIONS}/{}/{}", escape(topic), escape(subscriber))
    );
    assert!(subscriber.starts_with("urn:uuid:"), "{subscriber}");
    (
        topic.to_string(),
        subscriber.to_string(),
        data["active"].as_bool().unwrap(),
        data["payload"].to_string(),
    )
}

/// The next `n` subscription updates of `selectors` a watcher receives (others skipped),
/// sorted; then nothing more of them within `quiet`.
async fn subscription_events(watcher: &mut Stream, selectors: &[&str], n: usize) -> Vec<Sub> {
    let mut got = Vec::new();
    while got.len() < n {
        let event = subscription_event(&watcher.next().await);
        if selectors.contains(&event.0.as_str()) {
            got.push(event);
        }
    }
    got.sort();
    got
}

/// Subscription updates, the subscriptions API and its `lastEventID` across three replica
/// processes: subscriptions that start and end, a replica taken for dead while paused (its
/// subscriptions end, then start again when it beats), one killed (ended once, by another
/// replica) and one stopped (ended as it leaves); the registry in Redis is empty at the end.
#[actix_web::test]
async fn subscriptions_are_announced_and_listed_across_the_fleet() {
    let redis = RedisServer::start();
    let flags = hub_flags(&[
        "--mercure-subscriptions",
        "true",
        "--presence-interval",
        "200ms",
    ]);
    let a = GatewayProcess::start(&redis.url(), &flags);
    let b = GatewayProcess::start(&redis.url(), &flags);
    let c = GatewayProcess::start(&redis.url(), &flags);
    let all = subscriber(&["*"]);
    let bearer = format!("Bearer {all}");
    let books = "https://ex.com/books/{id}";
    let (ours, theirs) = ([books, "urn:a"], ["urn:b"]);
    let mine: Vec<&str> = ours.iter().chain(&theirs).copied().collect();

    // Before anyone subscribes: nothing listed, and the log is empty.
    let empty = api_document(&c, SUBSCRIPTIONS, &all).await;
    assert_eq!(listed(&empty, &mine), []);
    let mut watcher = subscribe(
        &c,
        &query(&[SUBSCRIPTION_TEMPLATE], &[]),
        &[("authorization", &bearer)],
    )
    .await;
    // An anonymous subscriber never sees subscription updates: they are private.
    let mut anonymous = subscribe(&c, &query(&[SUBSCRIPTION_TEMPLATE, "*"], &[]), &[]).await;

    // X subscribes on A with two selectors and a payload; Y on B, anonymously.
    let x_token = hs256(&json!({"mercure": {"subscribe": ["urn:none"], "payload": {"user": "x"}}}));
    let x = subscribe(
        &a,
        &query(&ours, &[]),
        &[("authorization", &format!("Bearer {x_token}"))],
    )
    .await;
    let y = subscribe(&b, &query(&theirs, &[]), &[]).await;
    let started = subscription_events(&mut watcher, &mine, 3).await;
    let payload = json!({"user": "x"}).to_string();
    let x_id = started
        .iter()
        .find(|e| e.0 == books)
        .map(|e| e.1.clone())
        .unwrap();
    let y_id = started
        .iter()
        .find(|e| e.0 == "urn:b")
        .map(|e| e.1.clone())
        .unwrap();
    assert_ne!(x_id, y_id);
    let x_subscriptions = vec![
        (books.to_string(), x_id.clone(), true, payload.clone()),
        ("urn:a".to_string(), x_id.clone(), true, payload.clone()),
    ];
    let y_subscription = ("urn:b".to_string(), y_id.clone(), true, "null".to_string());
    let mut expected = x_subscriptions.clone();
    expected.push(y_subscription.clone());
    expected.sort();
    assert_eq!(started, expected);

    // The API, on any replica, lists them; its lastEventID is the last update so far.
    for gw in [&a as &dyn Replica, &b, &c] {
        let collection = api_document(&Wrap(gw.addr()), SUBSCRIPTIONS, &all).await;
        assert_eq!(listed(&collection, &mine), expected);
        assert_eq!(collection["id"], SUBSCRIPTIONS);
    }
    let collection = api_document(&c, SUBSCRIPTIONS, &all).await;
    let last = collection["lastEventID"].as_str().unwrap().to_string();
    assert!(last.starts_with("urn:uuid:"), "{last}");
    // Unchanged since: 304 for that ETag, on any replica.
    let etag = get(&c, SUBSCRIPTIONS, &[("authorization", &bearer)]).await;
    let etag = etag.header("etag").unwrap().to_string();
    let not_modified = get(
        &a,
        SUBSCRIPTIONS,
        &[("authorization", &bearer), ("if-none-match", &etag)],
    )
    .await;
    assert_eq!(not_modified.status, 304, "{}", not_modified.body);
    assert_eq!(not_modified.header("etag"), Some(etag.as_str()));
    // A selector's collection, and one subscription.
    let by_selector = format!("{SUBSCRIPTIONS}/urn%3Aa");
    let collection = api_document(&b, &by_selector, &all).await;
    assert_eq!(collection["id"], by_selector);
    assert_eq!(
        listed(&collection, &mine),
        [("urn:a".to_string(), x_id.clone(), true, payload.clone())]
    );
    let one = format!(
        "{SUBSCRIPTIONS}/https%3A%2F%2Fex.com%2Fbooks%2F%7Bid%7D/{}",
        x_id.replace(':', "%3A")
    );
    let document = api_document(&b, &one, &all).await;
    assert_eq!(document["type"], "Subscription");
    assert_eq!(document["id"], one);
    assert_eq!(document["topic"], books);
    assert_eq!(document["subscriber"], x_id.as_str());
    assert_eq!(document["active"], true);
    assert_eq!(document["payload"].to_string(), payload);
    assert_eq!(document["lastEventID"], last.as_str());
    let unknown = get(
        &b,
        &format!("{SUBSCRIPTIONS}/urn%3Aa/urn%3Auuid%3Anobody"),
        &[("authorization", &bearer)],
    )
    .await;
    unknown.assert_refused(404, "no such active subscription", "unknown subscription");

    // Resuming after the API's lastEventID replays exactly what changed since: Y leaves.
    drop(y);
    let ended = subscription_events(&mut watcher, &mine, 1).await;
    assert_eq!(
        ended,
        [("urn:b".to_string(), y_id.clone(), false, "null".to_string())]
    );
    let changed = get(
        &c,
        SUBSCRIPTIONS,
        &[("authorization", &bearer), ("if-none-match", &etag)],
    )
    .await;
    assert_eq!(changed.status, 200, "a change moves the ETag");
    assert_ne!(changed.header("etag"), Some(etag.as_str()));
    let mut resumed = subscribe(
        &a,
        &query(&[SUBSCRIPTION_TEMPLATE], &[("lastEventID", &last)]),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(resumed.header("last-event-id"), Some(last.as_str()));
    assert_eq!(subscription_events(&mut resumed, &mine, 1).await, ended);
    let collection = api_document(&a, SUBSCRIPTIONS, &all).await;
    assert_eq!(listed(&collection, &mine), x_subscriptions);

    // A paused past three beats counts as dead: another replica ends its subscriptions,
    // once; when it runs again, its next beat stores and announces them again.
    support::signal(a.pid(), "STOP");
    let reaped = subscription_events(&mut watcher, &mine, 2).await;
    let inactive: Vec<_> = x_subscriptions
        .iter()
        .map(|(s, id, _, p)| (s.clone(), id.clone(), false, p.clone()))
        .collect();
    assert_eq!(reaped, inactive);
    let collection = api_document(&b, SUBSCRIPTIONS, &all).await;
    assert_eq!(listed(&collection, &mine), []);
    support::signal(a.pid(), "CONT");
    assert_eq!(
        subscription_events(&mut watcher, &mine, 2).await,
        x_subscriptions
    );
    let collection = api_document(&b, SUBSCRIPTIONS, &all).await;
    assert_eq!(listed(&collection, &mine), x_subscriptions);

    // SIGKILLed: ended by another replica, each once.
    drop(resumed);
    support::signal(a.pid(), "KILL");
    assert_eq!(subscription_events(&mut watcher, &mine, 2).await, inactive);
    drop(x);

    // Z on B; B stops (SIGTERM): its subscriptions end as it leaves, and it leaves the
    // registry itself, before anyone could take it for dead (600 ms after its last beat).
    let mut b = b;
    let (_, status) = support::get_json(b.addr, "/status");
    let b_replica = status["replica"].as_str().unwrap().to_string();
    let _z = subscribe(&b, &query(&theirs, &[]), &[]).await;
    let z = subscription_events(&mut watcher, &mine, 1).await;
    assert!(z[0].2, "{z:?}");
    // B's beat in the registry's sorted set, if it is listed.
    let registered = || -> Option<f64> {
        redis
            .cmd(
                redis::cmd("ZSCORE")
                    .arg("ssegw:m:{ssegw.mercure}:subs")
                    .arg(&b_replica),
            )
            .unwrap()
    };
    assert!(registered().is_some(), "B is in the registry while it runs");
    support::signal(b.pid(), "TERM");
    b.exited(WAIT).await;
    assert_eq!(registered(), None, "B left the registry as it stopped");
    let hash: bool = redis
        .cmd(redis::cmd("EXISTS").arg(format!("ssegw:m:{{ssegw.mercure}}:subs:r:{b_replica}")))
        .unwrap();
    assert!(!hash, "B's hash is gone");
    let z_ended = subscription_events(&mut watcher, &mine, 1).await;
    assert_eq!(
        z_ended,
        [(z[0].0.clone(), z[0].1.clone(), false, "null".to_string())]
    );

    // Nothing was announced twice, and anonymous subscribers saw none of it.
    let quiet = watcher.raw_after(1000).await;
    let mut seen = std::collections::HashMap::new();
    for block in quiet
        .split("\n\n")
        .filter(|b| b.contains("\"Subscription\""))
    {
        let data: String = block
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect::<Vec<_>>()
            .join("\n");
        let data: Value = serde_json::from_str(&data).unwrap();
        if mine.contains(&data["topic"].as_str().unwrap()) {
            *seen
                .entry((data["id"].to_string(), data["active"].as_bool().unwrap()))
                .or_insert(0) += 1;
        }
    }
    // X's two subscriptions started and ended twice each (the pause, then the kill); Y's and
    // Z's once.
    assert_eq!(seen.len(), 8, "{seen:?}");
    for ((id, _), n) in &seen {
        let times = if id.contains(&x_id.replace(':', "%3A")) {
            2
        } else {
            1
        };
        assert_eq!(*n, times, "{id}: {seen:?}");
    }
    let anonymous_raw = anonymous.raw_after(200).await;
    assert!(!anonymous_raw.contains("Subscription"), "{anonymous_raw}");

    // The registry holds only C now: A's and B's hashes are gone.
    let replicas: Vec<String> = redis
        .cmd(
            redis::cmd("ZRANGE")
                .arg("ssegw:m:{ssegw.mercure}:subs")
                .arg(0)
                .arg(-1),
        )
        .unwrap();
    assert_eq!(replicas.len(), 1, "{replicas:?}");
    let hashes: Vec<String> = redis
        .cmd(redis::cmd("KEYS").arg("ssegw:m:{ssegw.mercure}:subs:r:*"))
        .unwrap();
    assert_eq!(
        hashes,
        [format!("ssegw:m:{{ssegw.mercure}}:subs:r:{}", replicas[0])]
    );
}

/// A replica's address, to call the helpers on replicas of different types.
struct Wrap(SocketAddr);

impl Replica for Wrap {
    fn addr(&self) -> SocketAddr {
        self.0
    }
}

/// The subscriptions API's refusals (off, no token, a token that does not match the URL, a
/// path it does not serve, another method), its answers on the embedded bus, and the payload
/// bound.
#[actix_web::test]
async fn subscriptions_api_authorizes_by_url_and_serves_one_node() {
    let off = Gateway::start(&hub_flags(&[]));
    let all = format!("Bearer {}", subscriber(&["*"]));
    get(&off, SUBSCRIPTIONS, &[("authorization", &all)])
        .await
        .assert_refused(404, "--mercure-subscriptions true", "API off");
    drop(off);

    let gw = Gateway::start(&hub_flags(&["--mercure-subscriptions", "true"]));
    let collection_only = subscriber(&[SUBSCRIPTIONS]);
    let template_only = subscriber(&[SUBSCRIPTION_TEMPLATE]);
    let one = format!("{SUBSCRIPTIONS}/urn%3Aa");
    let other = format!("Bearer {}", subscriber(&["urn:a"]));
    let exact = format!("Bearer {collection_only}");
    let cases: Vec<(&str, String, Pairs, u16, &str)> = vec![
        (
            "no token",
            SUBSCRIPTIONS.into(),
            vec![],
            401,
            "needs a subscriber's token",
        ),
        (
            "bad token",
            SUBSCRIPTIONS.into(),
            vec![("authorization", "Bearer x.y.z")],
            401,
            "token",
        ),
        (
            "claims miss the URL",
            SUBSCRIPTIONS.into(),
            vec![("authorization", &other)],
            403,
            "do not match this URL",
        ),
        (
            "an exact claim for another URL",
            one.clone(),
            vec![("authorization", &exact)],
            403,
            "do not match this URL",
        ),
        (
            "too many segments",
            format!("{SUBSCRIPTIONS}/a/b/c"),
            vec![("authorization", &all)],
            404,
            "no such resource",
        ),
        (
            "a malformed escape",
            format!("{SUBSCRIPTIONS}/%zz"),
            vec![("authorization", &all)],
            404,
            "no such resource",
        ),
    ];
    for (case, path, headers, status, message) in cases {
        get(&gw, &path, &headers)
            .await
            .assert_refused(status, message, case);
    }
    // Exact claims and templates match the request's URL; the token may come in the query.
    api_document(&gw, SUBSCRIPTIONS, &collection_only).await;
    api_document(&gw, &one, &template_only).await;
    let by_query = get(
        &gw,
        &format!("{SUBSCRIPTIONS}?authorization={}", subscriber(&["*"])),
        &[],
    )
    .await;
    assert_eq!(by_query.status, 200, "{}", by_query.body);
    let post = awc::Client::default()
        .post(gw.url(SUBSCRIPTIONS))
        .insert_header(("authorization", all.as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);

    // On one node: the first listing has no event before it; subscriptions start and end.
    let empty = api_document(&gw, SUBSCRIPTIONS, &template_only).await;
    assert_eq!(empty["lastEventID"], "earliest");
    let token = subscriber(&["*"]);
    let mut watcher = subscribe(
        &gw,
        &query(&[SUBSCRIPTION_TEMPLATE], &[("lastEventID", "earliest")]),
        &[("authorization", &all)],
    )
    .await;
    let client = subscribe(&gw, &query(&["urn:a", "urn:b"], &[]), &[]).await;
    let started = subscription_events(&mut watcher, &["urn:a", "urn:b"], 2).await;
    let id = started[0].1.clone();
    let collection = api_document(&gw, SUBSCRIPTIONS, &token).await;
    assert_eq!(listed(&collection, &["urn:a", "urn:b"]), started);
    // One subscription, however its path is escaped (lower-case hex here).
    let one = api_document(
        &gw,
        &format!("{SUBSCRIPTIONS}/urn%3ab/{}", id.replace(':', "%3a")),
        &token,
    )
    .await;
    assert_eq!(
        (&one["topic"], &one["subscriber"]),
        (&json!("urn:b"), &json!(id))
    );
    assert_eq!(
        one["id"],
        format!("{SUBSCRIPTIONS}/urn%3Ab/{}", id.replace(':', "%3A"))
    );
    assert_ne!(collection["lastEventID"], "earliest");
    drop(client);
    let ended = subscription_events(&mut watcher, &["urn:a", "urn:b"], 2).await;
    assert_eq!(
        ended,
        [
            ("urn:a".to_string(), id.clone(), false, "null".to_string()),
            ("urn:b".to_string(), id, false, "null".to_string())
        ]
    );
    let collection = api_document(&gw, SUBSCRIPTIONS, &token).await;
    assert_eq!(listed(&collection, &["urn:a", "urn:b"]), []);

    // A payload too large to copy into every subscription's document is refused.
    let big = hs256(&json!({"mercure": {"subscribe": ["*"], "payload": "x".repeat(9000)}}));
    refused(
        &gw,
        &query(&["urn:a"], &[]),
        &[("authorization", &format!("Bearer {big}"))],
    )
    .await
    .assert_refused(401, "mercure.payload is larger than", "big payload");
}
