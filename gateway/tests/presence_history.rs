//! `GET /presence` and `GET /history` end to end. Presence: three replica processes on one
//! Redis, clients spread over them: every replica answers the fleet's count within the
//! reporting bound; a SIGKILLed replica's reports expire within it (its clients, resumed
//! elsewhere, are not counted twice past it), a SIGTERMed one withdraws its reports at once.
//! History: the newest events, after a position, a trimmed, a lost and an invalid position
//! (each the same outcome a resume from there gets), the limits and the 400s, on Redis and on
//! the embedded bus; both routes' authorization table; both across a Redis Cluster's shards,
//! and through a Sentinel failover.

mod support;

use std::time::{Duration, Instant};

use jsonwebtoken::{encode, get_current_timestamp, EncodingKey, Header};
use serde_json::{json, Value};
use ssegw_testkit::{
    slot_of, Cluster as RedisCluster, ClusterOptions, Reply as NodeReply, Sentinel, SentinelOptions,
};
use support::{
    get_json, http_publish, Cluster, Gateway, GatewayProcess, RedisServer, Replica, Sse, WAIT,
};

/// Reports every 250 ms, counted for 750 ms.
const INTERVAL: &str = "250ms";
const EXPIRY_MS: u64 = 750;

/// A response read to its end.
struct Reply {
    status: u16,
    headers: actix_web::http::header::HeaderMap,
    json: Value,
}

/// `GET <path>` with these request headers.
async fn get(gw: &impl Replica, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = awc::Client::default().get(gw.url(path));
    for &header in headers {
        request = request.insert_header(header);
    }
    let mut response = request.send().await.expect("GET");
    let body = response.body().await.expect("a complete body");
    Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        json: serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("{path}: not JSON: {}", String::from_utf8_lossy(&body))),
    }
}

/// `GET <path>` that must answer 200; its JSON.
async fn get_ok(gw: &impl Replica, path: &str) -> Value {
    let reply = get(gw, path, &[]).await;
    assert_eq!(reply.status, 200, "{path}: {}", reply.json);
    reply.json
}

/// The figure of each topic as `(subscribers, replicas)`.
fn figures(answer: &Value, topics: &[&str]) -> Vec<(u64, u64)> {
    topics
        .iter()
        .map(|t| {
            let figure = &answer["topics"][t];
            (
                figure["subscribers"].as_u64().unwrap(),
                figure["replicas"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Polls `/presence` on every replica until each answers `expected` for `topics`; panics after
/// `WAIT` with the last answers. Returns the answers.
async fn wait_for_presence(
    replicas: &[&dyn ReplicaAddr],
    topics: &[&str],
    expected: &[(u64, u64)],
) -> Vec<Value> {
    let query: Vec<String> = topics.iter().map(|t| format!("topic={t}")).collect();
    let path = format!("/presence?{}", query.join("&"));
    let deadline = Instant::now() + WAIT;
    loop {
        let mut answers = Vec::new();
        for replica in replicas {
            answers.push(get_ok(&replica.addr(), &path).await);
        }
        if answers.iter().all(|a| figures(a, topics) == expected) {
            return answers;
        }
        assert!(
            Instant::now() < deadline,
            "presence never became {expected:?} for {topics:?}: {answers:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Any replica, as a dynamic reference (processes and in-process replicas side by side).
trait ReplicaAddr {
    fn addr(&self) -> std::net::SocketAddr;
}

impl<R: Replica> ReplicaAddr for R {
    fn addr(&self) -> std::net::SocketAddr {
        Replica::addr(self)
    }
}

/// Opens `n` streams on `query` at `gw`, each with its starting id.
async fn open(gw: &impl Replica, query: &str, n: usize) -> Vec<(Sse, String)> {
    let mut streams = Vec::new();
    for _ in 0..n {
        let mut sse = Sse::open(gw, query, None).await;
        let id = sse.baseline().await;
        streams.push((sse, id));
    }
    streams
}

/// The replica's id, as `/status` names it (and its presence reports in Redis).
fn replica_id(gw: &impl Replica) -> String {
    let (status, body) = get_json(gw.addr(), "/status");
    assert_eq!(status, 200);
    body["replica"].as_str().unwrap().to_string()
}

/// The keys of the presence reports of replica `id`.
fn reports_of(redis: &RedisServer, id: &str) -> Vec<String> {
    redis
        .cmd(redis::cmd("KEYS").arg(format!("ssegw:p:*:{id}")))
        .unwrap()
}

#[actix_web::test]
async fn three_replicas_count_the_fleet_and_a_killed_one_drops_out_within_the_bound() {
    let redis = RedisServer::start();
    let flags = ["--presence-interval", INTERVAL];
    let a = GatewayProcess::start(&redis.url(), &flags);
    let b = GatewayProcess::start(&redis.url(), &flags);
    let mut c = GatewayProcess::start(&redis.url(), &flags);
    let (id_a, id_c) = (replica_id(&a), replica_id(&c));

    // `room`: 3 on A (one of them also on `lobby`), 2 on B, 4 on C; `lobby`: 1 on A, 1 on C.
    let mut on_a = open(&a, "topic=room", 2).await;
    on_a.extend(open(&a, "topic=room&topic=lobby", 1).await);
    let mut on_b = open(&b, "topic=room", 2).await;
    let on_c = [
        open(&c, "topic=room", 4).await,
        open(&c, "topic=lobby", 1).await,
    ];
    let topics = ["room", "lobby", "empty"];
    let all: [&dyn ReplicaAddr; 3] = [&a, &b, &c];
    let answers = wait_for_presence(&all, &topics, &[(9, 3), (2, 2), (0, 0)]).await;
    for answer in &answers {
        assert_eq!(
            (&answer["interval_ms"], &answer["expiry_ms"]),
            (&json!(250), &json!(EXPIRY_MS))
        );
        // How old the oldest report in a sum is: under the expiry, but for the moment between
        // Redis's clock read and the write.
        for topic in ["room", "lobby"] {
            let age = answer["topics"][topic]["age_ms"].as_u64().unwrap();
            assert!(age < EXPIRY_MS + 1000, "{topic}: {answer}");
        }
        assert_eq!(answer["topics"]["empty"]["age_ms"], Value::Null);
    }
    // A client leaves B.
    drop(on_b.pop());
    wait_for_presence(&all, &topics, &[(8, 3), (2, 2), (0, 0)]).await;

    // A dies. Its reports were written with an expiry of three intervals: none counts longer
    // than that from now, whatever happens next.
    support::signal(a.pid(), "KILL");
    let dead = reports_of(&redis, &id_a);
    assert_eq!(dead.len(), 2, "A reported room and lobby: {dead:?}");
    for key in &dead {
        let ttl: i64 = redis.cmd(redis::cmd("PTTL").arg(key)).unwrap();
        assert!(ttl <= EXPIRY_MS as i64, "{key} lives {ttl} ms more");
    }
    // Its clients resume on B and C, from where they were.
    let mut resumed = Vec::new();
    for (i, (sse, id)) in on_a.drain(..).enumerate() {
        drop(sse);
        let query = if i == 2 {
            "topic=room&topic=lobby"
        } else {
            "topic=room"
        };
        let replica: &dyn ReplicaAddr = if i % 2 == 0 { &b } else { &c };
        resumed.push(Sse::open(&replica.addr(), query, Some(&id)).await);
    }
    let survivors: [&dyn ReplicaAddr; 2] = [&b, &c];
    wait_for_presence(&survivors, &topics, &[(8, 2), (2, 2), (0, 0)]).await;
    assert!(reports_of(&redis, &id_a).is_empty(), "A's reports expired");
    // And it stays right: A is not counted again, nobody twice.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for replica in survivors {
            let answer = get_ok(&replica.addr(), "/presence?topic=room&topic=lobby").await;
            assert_eq!(figures(&answer, &["room", "lobby"]), [(8, 2), (2, 2)]);
        }
    }

    // C stops gracefully: its reports go with it, without waiting for them to expire.
    assert_eq!(reports_of(&redis, &id_c).len(), 2);
    support::signal(c.pid(), "TERM");
    let status = c.exited(WAIT).await;
    assert!(status.success(), "{status:?}");
    assert!(
        reports_of(&redis, &id_c).is_empty(),
        "C withdrew its reports"
    );
    let registry: Vec<String> = redis
        .cmd(redis::cmd("ZRANGE").arg("ssegw:p:replicas").arg(0).arg(-1))
        .unwrap();
    assert!(!registry.contains(&id_c), "{registry:?}");
    drop(on_c);
    let answer = get_ok(&b, "/presence?topic=room&topic=lobby").await;
    // B holds 1 of its own and 2 of A's on `room` (one with `lobby`).
    assert_eq!(figures(&answer, &["room", "lobby"]), [(3, 1), (1, 1)]);
    drop(resumed);
}

#[actix_web::test]
async fn the_embedded_bus_counts_its_own_and_presence_can_be_off() {
    let cluster = Cluster::embedded(&[]);
    let gw = cluster.replica(0);
    let _streams = open(gw, "topic=e", 2).await;
    let answer = get_ok(gw, "/presence?topic=e&topic=f").await;
    assert_eq!(
        answer,
        json!({
            "topics": {
                "e": {"subscribers": 2, "replicas": 1, "age_ms": 0},
                "f": {"subscribers": 0, "replicas": 0, "age_ms": null},
            },
            "interval_ms": 0,
            "expiry_ms": 0,
        })
    );

    // Off: nothing reported to Redis, and no figure to give.
    let redis = RedisServer::start();
    let off = Gateway::with_redis(&redis, &["--presence-interval", "0"]);
    let _stream = open(&off, "topic=e", 1).await;
    let reply = get(&off, "/presence?topic=e", &[]).await;
    assert_eq!(reply.status, 404);
    assert!(
        reply.json["error"]
            .as_str()
            .unwrap()
            .contains("--presence-interval 0"),
        "{}",
        reply.json
    );
    let keys: Vec<String> = redis.cmd(redis::cmd("KEYS").arg("ssegw:p:*")).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    // History does not depend on presence.
    get_ok(&off, "/history?topic=e").await;
}

/// `/history?<query>` on `gw`: the answer's events as `(id, event, data)`, `next` and `gap`.
async fn history(gw: &Gateway, query: &str) -> (Vec<(String, Value, String)>, String, Value) {
    let answer = get_ok(gw, &format!("/history?{query}")).await;
    let events = answer["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_string(),
                e["event"].clone(),
                e["data"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (
        events,
        answer["next"].as_str().unwrap().to_string(),
        answer["gap"].clone(),
    )
}

fn ids(events: &[(String, Value, String)]) -> Vec<&str> {
    events.iter().map(|(id, _, _)| id.as_str()).collect()
}

/// What a resume from `last_event_id` on `topic` starts with: the `ssegw-gap` reason, if any.
async fn resume_gap(gw: &Gateway, topic: &str, last_event_id: &str) -> Value {
    let mut sse = Sse::open(gw, &format!("topic={topic}"), Some(last_event_id)).await;
    let first = sse.next().await;
    if first.event == "ssegw-gap" {
        let data: Value = serde_json::from_str(&first.data).unwrap();
        data["reason"].clone()
    } else {
        Value::Null
    }
}

/// The history cases, on `cluster` (Redis or embedded) started with `--history-max-len 4`.
async fn history_cases(cluster: Cluster) {
    let gw = cluster.replica(0);
    // Five events, one with a type, one with every kind of line break.
    let mut published = Vec::new();
    for (data, event) in [
        ("one", None),
        ("two", Some("order.created")),
        ("a\r\nb\rc", None),
        ("{\"n\":4}", None),
    ] {
        published.push(http_publish(gw, "h", data, event).await);
    }
    let (events, next, gap) = history(gw, "topic=h").await;
    assert_eq!(
        events,
        [
            (published[0].clone(), Value::Null, "one".to_string()),
            (published[1].clone(), json!("order.created"), "two".into()),
            (published[2].clone(), Value::Null, "a\nb\nc".into()),
            (published[3].clone(), Value::Null, "{\"n\":4}".into()),
        ]
    );
    assert_eq!((next.as_str(), &gap), (published[3].as_str(), &Value::Null));

    // The newest N; after a position; at the head; from the start.
    let (events, next, _) = history(gw, "topic=h&limit=2").await;
    assert_eq!(ids(&events), [&published[2], &published[3]]);
    assert_eq!(next, published[3]);
    let (events, next, gap) = history(gw, &format!("topic=h&after={}&limit=2", published[0])).await;
    assert_eq!(ids(&events), [&published[1], &published[2]]);
    assert_eq!((next.as_str(), gap), (published[2].as_str(), Value::Null));
    let (events, next, gap) = history(gw, &format!("topic=h&after={}", published[3])).await;
    assert!(events.is_empty());
    assert_eq!((next.as_str(), gap), (published[3].as_str(), Value::Null));
    let (events, _, gap) = history(gw, "topic=h&after=0-0").await;
    assert_eq!((events.len(), gap), (4, Value::Null));
    // `next` continues without loss: what comes after it is what was published after.
    let more = http_publish(gw, "h", "five", None).await;
    let (events, next, _) = history(gw, &format!("topic=h&after={}", published[3])).await;
    assert_eq!(
        (ids(&events), next.as_str()),
        (vec![more.as_str()], more.as_str())
    );

    // Trimmed: more than the four kept were published since the position.
    for n in 0..12 {
        http_publish(gw, "h", &format!("more {n}"), None).await;
    }
    let (events, next, gap) =
        history(gw, &format!("topic=h&after={}&limit=1000", published[0])).await;
    assert_eq!(gap, json!("trimmed"));
    assert_eq!(resume_gap(gw, "h", &published[0]).await, gap);
    let (newest, newest_next, _) = history(gw, "topic=h&limit=1000").await;
    assert_eq!(events, newest, "from the oldest retained event on");
    assert_eq!(next, newest_next);
    assert_eq!(events.last().unwrap().2, "more 11");

    // Lost: a position ahead of the stream (another incarnation's), and one of a stream gone.
    let ahead = {
        let (ms, _) = next.split_once('-').unwrap();
        format!("{}-0", ms.parse::<u64>().unwrap() + 60_000)
    };
    let (events, _, gap) = history(gw, &format!("topic=h&after={ahead}&limit=1000")).await;
    assert_eq!((gap.clone(), events), (json!("lost"), newest.clone()));
    assert_eq!(resume_gap(gw, "h", &ahead).await, gap);
    let (events, next, gap) = history(gw, "topic=never&after=1-0").await;
    assert_eq!(
        (events.len(), next.as_str(), gap),
        (0, "0-0", json!("lost"))
    );
    let (events, next, gap) = history(gw, "topic=never").await;
    assert_eq!((events.len(), next.as_str(), gap), (0, "0-0", Value::Null));

    // Invalid: a cursor of a connection on several topics is no position in one.
    let mut several = Sse::open(gw, "topic=h&topic=x", None).await;
    let cursor = several.baseline().await;
    let (events, _, gap) = history(gw, &format!("topic=h&after={cursor}&limit=1000")).await;
    assert_eq!((gap.clone(), events), (json!("invalid-id"), newest));
    assert_eq!(resume_gap(gw, "h", &cursor).await, gap);

    // Limits and bad parameters: a 400 that names the parameter.
    for (query, message) in [
        ("", "missing topic"),
        ("topic=a%7Bb%7D", "invalid topic"),
        ("topic=h&topic=x", "more than one topic"),
        ("topic=h&after=yesterday", "invalid after \"yesterday\""),
        (
            "topic=h&limit=0",
            "invalid limit \"0\": a number from 1 to 1000",
        ),
        ("topic=h&limit=1001", "invalid limit \"1001\""),
        ("topic=h&limit=all", "invalid limit \"all\""),
    ] {
        let reply = get(gw, &format!("/history?{query}"), &[]).await;
        assert_eq!(reply.status, 400, "{query}");
        let text = reply.json["error"].as_str().unwrap();
        assert!(text.contains(message), "{query}: {text}");
    }
    let (events, _, _) = history(gw, "topic=h&limit=1").await;
    assert_eq!(events.len(), 1);
    // Without `limit`, up to 100: all that `h` holds.
    let (events, _, _) = history(gw, "topic=h").await;
    assert_eq!(events, history(gw, "topic=h&limit=1000").await.0);
}

#[actix_web::test]
async fn history_on_redis() {
    history_cases(Cluster::redis(&["--history-max-len", "4"])).await;
}

#[actix_web::test]
async fn history_on_the_embedded_bus() {
    history_cases(Cluster::embedded(&["--history-max-len", "4"])).await;
}

const SECRET: &str = "test-secret-0123456789abcdef-0123456789";

fn token(subscribe: &[&str], publish: &[&str], ttl: i64) -> String {
    let claims = json!({
        "sub": "user-1",
        "exp": (get_current_timestamp() as i64 + ttl) as u64,
        "ssegw": {"subscribe": subscribe, "publish": publish},
    });
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A row of the authorization table.
struct Case {
    what: &'static str,
    query: String,
    header: Option<(&'static str, String)>,
    status: u16,
    message: &'static str,
}

impl Case {
    fn new(
        what: &'static str,
        query: &str,
        header: Option<(&'static str, String)>,
        status: u16,
        message: &'static str,
    ) -> Case {
        Case {
            what,
            query: query.to_string(),
            header,
            status,
            message,
        }
    }
}

#[actix_web::test]
async fn both_reads_are_authorized_as_subscribing_is() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(
        &redis,
        &[
            "--jwt-secret",
            SECRET,
            "--jwt-leeway",
            "0s",
            "--anonymous-subscribe",
            "public.*",
        ],
    );
    let orders = token(&["orders.*"], &[], 60);
    let publish_only = token(&[], &["orders.*"], 60);
    let expired = token(&["orders.*"], &[], -60);
    let bearer = format!("Bearer {orders}");
    // What is asked, with which credentials, and the status and message it gets.
    let header = |t: &str| Some(("Authorization", format!("Bearer {t}")));
    let cookie = |t: &str| Some(("Cookie", format!("ssegw_token={t}")));
    let cases = [
        Case::new(
            "anonymous, anonymous topic",
            "topic=public.news",
            None,
            200,
            "",
        ),
        Case::new(
            "anonymous, other topic",
            "topic=orders.eu",
            None,
            401,
            "\"orders.eu\" needs one",
        ),
        Case::new(
            "token in the header",
            "topic=orders.eu",
            header(&orders),
            200,
            "",
        ),
        Case::new(
            "token in the query",
            &format!("topic=orders.eu&access_token={orders}"),
            None,
            200,
            "",
        ),
        Case::new(
            "token in the cookie",
            "topic=orders.eu",
            cookie(&orders),
            200,
            "",
        ),
        Case::new(
            "token adds to anonymous",
            "topic=orders.eu&topic=public.news",
            header(&orders),
            200,
            "",
        ),
        Case::new(
            "token, topic not granted",
            "topic=private.x",
            header(&orders),
            403,
            "topic \"private.x\"",
        ),
        Case::new(
            "publish grant only",
            "topic=orders.eu",
            header(&publish_only),
            403,
            "topic \"orders.eu\"",
        ),
        Case::new(
            "expired token",
            "topic=orders.eu",
            header(&expired),
            401,
            "expired",
        ),
        Case::new(
            "invalid token, anonymous topic",
            "topic=public.news",
            header("not.a.token"),
            401,
            "invalid token",
        ),
        Case::new(
            "invalid topic before any token",
            "topic=%7Bx%7D",
            None,
            400,
            "invalid topic",
        ),
    ];
    for route in ["/presence", "/history"] {
        for case in &cases {
            if route == "/history" && case.query.matches("topic=").count() > 1 {
                continue;
            }
            let headers: Vec<(&str, &str)> =
                case.header.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let reply = get(&gw, &format!("{route}?{}", case.query), &headers).await;
            let what = format!("{route}, {}", case.what);
            assert_eq!(reply.status, case.status, "{what}: {}", reply.json);
            if case.status == 200 {
                continue;
            }
            let text = reply.json["error"].as_str().unwrap();
            assert!(text.contains(case.message), "{what}: {text}");
            if case.status != 400 {
                let challenge = reply.headers.get("www-authenticate").unwrap();
                assert!(challenge.to_str().unwrap().starts_with("Bearer"), "{what}");
            }
        }
    }
    // One topic outside the grant refuses the whole presence request, and names it.
    let reply = get(
        &gw,
        "/presence?topic=orders.eu&topic=private.x",
        &[("Authorization", &bearer)],
    )
    .await;
    assert_eq!(reply.status, 403);
    assert!(reply.json["error"]
        .as_str()
        .unwrap()
        .contains("\"private.x\""));
    // A refused read says nothing about the topic.
    assert!(reply.json.get("topics").is_none() && reply.json.get("events").is_none());
}

/// One topic on each primary of `cluster`: `c<n>` names whose slots fall there.
fn topic_per_primary(cluster: &RedisCluster) -> Vec<(String, String)> {
    cluster
        .primaries()
        .unwrap()
        .into_iter()
        .map(|primary| {
            let topic = (0..)
                .map(|n| format!("c{n}"))
                .find(|t| cluster.owner_of_slot(slot_of(t)).unwrap() == primary)
                .unwrap();
            (topic, primary)
        })
        .collect()
}

#[actix_web::test]
async fn presence_and_history_across_a_clusters_shards() {
    let cluster = RedisCluster::start(ClusterOptions {
        replicas_per_primary: 0,
        ..ClusterOptions::default()
    })
    .expect("a cluster of three primaries");
    let seeds = cluster.seeds()[..2].join(",");
    let flags = [
        "--redis-cluster",
        &seeds,
        "--redis-timeout",
        "1s",
        "--canary-interval",
        "100ms",
        "--presence-interval",
        INTERVAL,
    ];
    let a = Gateway::start(&flags);
    let b = Gateway::start(&flags);
    let topics = topic_per_primary(&cluster);
    let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
    let mut streams = Vec::new();
    for topic in &names {
        streams.extend(open(&a, &format!("topic={topic}"), 1).await);
        streams.extend(open(&b, &format!("topic={topic}"), 2).await);
    }
    let both: [&dyn ReplicaAddr; 2] = [&a, &b];
    let expected = vec![(3, 2); names.len()];
    wait_for_presence(&both, &names, &expected).await;
    // Each topic's reports are on its own shard.
    for (topic, primary) in &topics {
        let NodeReply::Array(keys) = cluster
            .command(primary, &["KEYS", &format!("ssegw:p:{{{topic}}}:*")])
            .unwrap()
        else {
            panic!("KEYS answers an array");
        };
        assert_eq!(keys.len(), 2, "{topic} on {primary}: {keys:?}");
    }

    for topic in &names {
        let mut published = Vec::new();
        for n in 0..3 {
            let data = format!("{topic} {n}");
            published.push(support::try_blocking_http_publish(a.addr, topic, &data, None).unwrap());
        }
        let (events, next, gap) = history(&b, &format!("topic={topic}&limit=2")).await;
        assert_eq!(ids(&events), [&published[1], &published[2]], "{topic}");
        assert_eq!((next.as_str(), gap), (published[2].as_str(), Value::Null));
        let (events, _, _) = history(&a, &format!("topic={topic}&after={}", published[0])).await;
        let data: Vec<&str> = events.iter().map(|e| e.2.as_str()).collect();
        assert_eq!(
            data,
            [format!("{topic} 1"), format!("{topic} 2")],
            "{topic}"
        );
    }

    // A leaves: its reports go with it, at once, on every shard.
    let id_a = replica_id(&a);
    a.stop();
    for (topic, primary) in &topics {
        let key = format!("ssegw:p:{{{topic}}}:{id_a}");
        let exists = cluster.command(primary, &["EXISTS", &key]).unwrap();
        assert_eq!(exists, NodeReply::Integer(0), "{key} on {primary}");
    }
    let b_only: [&dyn ReplicaAddr; 1] = [&b];
    wait_for_presence(&b_only, &names, &vec![(2, 1); names.len()]).await;
    drop(streams);
}

/// A number a node answered (`TIME`'s seconds and microseconds, a sorted set's score).
fn number(reply: &NodeReply) -> f64 {
    match reply {
        NodeReply::Bulk(bytes) => std::str::from_utf8(bytes).unwrap().parse().unwrap(),
        NodeReply::Integer(n) => *n as f64,
        other => panic!("not a number: {other:?}"),
    }
}

#[actix_web::test]
async fn presence_and_history_follow_a_sentinel_failover() {
    let group = Sentinel::start(SentinelOptions::default()).expect("a Sentinel group");
    let sentinels = group.sentinel_addrs().join(",");
    let flags = [
        "--redis-sentinels",
        &sentinels,
        "--redis-master-name",
        group.master_name(),
        "--redis-timeout",
        "1s",
        "--canary-interval",
        "100ms",
        "--presence-interval",
        INTERVAL,
    ];
    let a = Gateway::start(&flags);
    let b = Gateway::start(&flags);
    let _streams = [open(&a, "topic=s", 1).await, open(&b, "topic=s", 2).await];
    let both: [&dyn ReplicaAddr; 2] = [&a, &b];
    wait_for_presence(&both, &["s"], &[(3, 2)]).await;
    let sent = support::try_blocking_http_publish(a.addr, "s", "before", None).unwrap();

    let primary = group.failover().expect("SENTINEL FAILOVER");
    // Both replicas report to the new primary: each one's registry entry there is renewed
    // after the failover (a report's score is its Redis time plus the expiry).
    let NodeReply::Array(time) = group.command(&primary, &["TIME"]).unwrap() else {
        panic!("TIME answers an array");
    };
    let failed_over_ms = number(&time[0]) * 1000.0 + number(&time[1]) / 1000.0;
    for gw in [&a, &b] {
        let id = replica_id(gw);
        support::wait_until("a report to the new primary", || {
            let score = group.command(&primary, &["ZSCORE", "ssegw:p:replicas", &id]);
            matches!(&score, Ok(NodeReply::Bulk(_)))
                && number(&score.unwrap()) > failed_over_ms + EXPIRY_MS as f64
        });
    }
    wait_for_presence(&both, &["s"], &[(3, 2)]).await;
    let after = support::try_blocking_http_publish(b.addr, "s", "after", None).unwrap();
    let (events, next, gap) = history(&a, &format!("topic=s&after={sent}")).await;
    assert_eq!(
        (ids(&events), next.as_str(), gap),
        (vec![after.as_str()], after.as_str(), Value::Null)
    );
}
