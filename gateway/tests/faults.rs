//! Faults lose nothing. Continuous publishing to several topics while the Redis link is cut,
//! blackholed, paused or Redis restarts empty; a replica process killed or drained under
//! hundreds of clients. Every client must receive every event Redis still holds exactly once,
//! in order, and a control event where history is gone.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use ssegw_protocol::{StreamId, Topic, TopicSet};
use support::proxy::Proxy;
use support::{get_json, Gateway, GatewayProcess, RedisServer, Replica, Sse};

const TOPICS: [&str; 3] = ["f0", "f1", "f2"];
/// Fault-test timing: canaries every 200 ms, overdue (and Redis calls failing) after 1 s.
const FAST_FAULTS: [&str; 4] = ["--canary-interval", "200ms", "--redis-timeout", "1s"];

/// What Redis acknowledged, per topic, in order.
type Published = HashMap<String, Vec<(StreamId, String)>>;

/// Publishes `<topic>#<n>` to each topic in turn through `FCALL` on its own connection until
/// stopped, retrying a publish that fails (Redis restarting); records what Redis acknowledged.
struct Publisher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    published: Arc<Mutex<Published>>,
    redis_url: String,
}

impl Publisher {
    fn start(redis_url: String, period: Duration) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(Mutex::new(HashMap::new()));
        let (flag, log, url) = (stop.clone(), published.clone(), redis_url.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                for topic in TOPICS {
                    let data = format!("{topic}#{n}");
                    let id = publish_retrying(&url, topic, &data);
                    log.lock()
                        .unwrap()
                        .entry(topic.to_string())
                        .or_insert_with(Vec::new)
                        .push((id, data));
                }
                n += 1;
                std::thread::sleep(period);
            }
        });
        Publisher {
            stop,
            thread,
            published,
            redis_url,
        }
    }

    /// Stops publishing, then sends `<topic>#end` on every topic; returns what was published
    /// before it, per topic.
    fn finish(self) -> Published {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("publisher panicked");
        for topic in TOPICS {
            publish_retrying(&self.redis_url, topic, &format!("{topic}#end"));
        }
        std::mem::take(&mut *self.published.lock().unwrap())
    }
}

fn publish_retrying(url: &str, topic: &str, data: &str) -> StreamId {
    let deadline = Instant::now() + support::WAIT;
    loop {
        let result = redis::Client::open(url)
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
            .and_then(|mut conn| {
                redis::cmd("FCALL")
                    .arg("ssegw_publish")
                    .arg(1)
                    .arg(topic)
                    .arg(data)
                    .query::<String>(&mut conn)
            });
        match result {
            Ok(id) => return StreamId::parse(&id).unwrap(),
            // Until a replica has loaded the functions into a restarted Redis, or it is back.
            Err(e) => assert!(Instant::now() < deadline, "cannot publish: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One client's view: where it started and the data it received per topic, in order.
struct Received {
    topics: Vec<String>,
    start: Vec<StreamId>,
    data: HashMap<String, Vec<String>>,
    gaps: HashMap<String, Vec<String>>,
}

impl Received {
    async fn open(gw: &impl Replica, topics: &[&str]) -> (Sse, Received) {
        let query: Vec<String> = topics.iter().map(|t| format!("topic={t}")).collect();
        let mut sse = Sse::open(gw, &query.join("&"), None).await;
        let set = TopicSet::new(topics.iter().map(|t| Topic::new(t).unwrap()).collect()).unwrap();
        let start = ssegw_protocol::cursor::decode(&set, &sse.baseline().await).unwrap();
        let received = Received {
            topics: set.iter().map(|t| t.as_str().to_string()).collect(),
            start,
            data: HashMap::new(),
            gaps: HashMap::new(),
        };
        (sse, received)
    }

    /// Reads until `end` arrived on every topic.
    async fn read_to_end(&mut self, sse: &mut Sse) {
        while !self.ended() {
            let event = sse.next().await;
            self.record(&event);
        }
    }

    fn ended(&self) -> bool {
        let ended = |d: &Vec<String>| d.last().is_some_and(|l| l.ends_with("#end"));
        self.data.values().filter(|d| ended(d)).count() == self.topics.len()
    }

    fn record(&mut self, event: &eventsource_stream::Event) {
        if event.event == "ssegw-gap" {
            let gap: serde_json::Value = serde_json::from_str(&event.data).unwrap();
            let topic = gap["topic"].as_str().unwrap().to_string();
            let at = self.data.get(&topic).map_or(0, Vec::len);
            self.gaps
                .entry(topic)
                .or_default()
                .push(format!("{}@{at}", gap["reason"].as_str().unwrap()));
            return;
        }
        let topic = event.data.split('#').next().unwrap().to_string();
        self.data.entry(topic).or_default().push(event.data.clone());
    }

    /// Everything published after the client's start, exactly once and in order, per topic.
    fn assert_complete(&self, published: &Published) {
        for (topic, start) in self.topics.iter().zip(&self.start) {
            let mut expected: Vec<&str> = published[topic]
                .iter()
                .filter(|(id, _)| id > start)
                .map(|(_, data)| data.as_str())
                .collect();
            let end = format!("{topic}#end");
            expected.push(&end);
            let got: Vec<&str> = self.data[topic].iter().map(String::as_str).collect();
            assert_eq!(got, expected, "topic {topic} of client {:?}", self.topics);
            assert!(self.gaps.is_empty(), "unexpected gap {:?}", self.gaps);
        }
    }
}

/// Clients on `gw`: each topic alone (twelve times: the first eight members of a topic receive
/// from its channel, the others through their worker's relay, which writes the caught-up ones
/// in its sweep) and all topics on one connection.
async fn clients(gw: &impl Replica) -> Vec<(Sse, Received)> {
    let mut clients = Vec::new();
    for topic in TOPICS {
        for _ in 0..12 {
            clients.push(Received::open(gw, &[topic]).await);
        }
    }
    clients.push(Received::open(gw, &TOPICS).await);
    clients
}

/// Asserts that some of what `gw` delivered went out in a relay's sweep, so that a test covers
/// swept streams as well as streams woken one by one.
fn assert_some_swept(gw: &impl Replica) {
    let (_, status) = get_json(gw.addr(), "/status");
    let swept = status["events_swept"].as_u64().unwrap();
    let delivered = status["events_delivered"].as_u64().unwrap();
    assert!(
        swept > 0 && swept < delivered,
        "swept {swept} of {delivered} deliveries"
    );
}

/// Runs `fault` (which must heal before returning) under continuous publishing and asserts that
/// every client received everything, exactly once, in order, on the stream it opened first.
async fn survives(redis: &RedisServer, gw: &impl Replica, fault: impl FnOnce()) {
    let mut clients = clients(gw).await;
    let publisher = Publisher::start(redis.url(), Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(300));
    fault();
    gw.wait_readyz(200);
    std::thread::sleep(Duration::from_millis(300));
    let published = publisher.finish();
    assert!(
        published["f0"].len() > 20,
        "published too little to prove anything"
    );
    for (sse, received) in &mut clients {
        received.read_to_end(sse).await;
        received.assert_complete(&published);
    }
    assert_some_swept(gw);
}

/// Waits until `/readyz` answers 503; returns how long that took.
fn time_to_not_ready(gw: &impl Replica) -> Duration {
    let start = Instant::now();
    gw.wait_readyz(503);
    start.elapsed()
}

#[actix_web::test]
async fn a_cut_redis_link_loses_nothing() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr());
    let url = proxy.redis_url();
    let gw = Gateway::start(&[&["--redis-url", url.as_str()][..], &FAST_FAULTS].concat());
    survives(&redis, &gw, || {
        proxy.cut();
        let took = time_to_not_ready(&gw);
        assert!(took < Duration::from_secs(2), "not-ready after {took:?}");
        std::thread::sleep(Duration::from_secs(2));
        proxy.restore();
    })
    .await;
}

#[actix_web::test]
async fn client_kill_of_every_gateway_connection_loses_nothing() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &FAST_FAULTS);
    survives(&redis, &gw, || {
        for kind in ["pubsub", "normal"] {
            let killed: i64 = redis
                .cmd(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg(kind))
                .unwrap();
            assert!(killed >= 1, "no {kind} connection to kill");
        }
        support::wait_until("the replica to subscribe again", || {
            let list: String = redis
                .cmd(redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub"))
                .unwrap();
            list.contains("sub=") && list.lines().count() == 1
        });
    })
    .await;
}

#[actix_web::test]
async fn a_blackholed_redis_link_loses_nothing_and_readiness_follows_it() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr());
    let url = proxy.redis_url();
    let gw = Gateway::start(&[&["--redis-url", url.as_str()][..], &FAST_FAULTS].concat());
    survives(&redis, &gw, || {
        proxy.blackhole();
        // Nothing is closed: only the canary notices. Bound: interval + timeout + polling.
        let took = time_to_not_ready(&gw);
        assert!(
            took < Duration::from_millis(2500),
            "not-ready after {took:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
        proxy.restore();
    })
    .await;
}

#[actix_web::test]
async fn a_paused_redis_loses_nothing() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &FAST_FAULTS);
    survives(&redis, &gw, || {
        redis.pause();
        let took = time_to_not_ready(&gw);
        assert!(
            took < Duration::from_millis(2500),
            "not-ready after {took:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
        redis.resume();
    })
    .await;
}

#[actix_web::test]
async fn redis_restarted_empty_gives_the_control_event_and_loses_nothing_after() {
    let mut redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &FAST_FAULTS);
    let mut clients = clients(&gw).await;
    let publisher = Publisher::start(redis.url(), Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(400));
    let restarted_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    redis.restart();
    gw.wait_readyz(200);
    std::thread::sleep(Duration::from_millis(400));
    let published = publisher.finish();
    for (sse, received) in &mut clients {
        received.read_to_end(sse).await;
        for (topic, start) in received.topics.iter().zip(&received.start) {
            // Ids after the restart are newer than any before it: the new stream starts after
            // the current millisecond.
            let (before, after): (Vec<_>, Vec<_>) = published[topic]
                .iter()
                .filter(|(id, _)| id > start)
                .partition(|(id, _)| id.ms <= restarted_at.as_millis() as u64);
            let got = &received.data[topic];
            let before_gap: Vec<&String> = got.iter().take(got.len() - after.len() - 1).collect();
            let gaps = &received.gaps[topic];
            assert_eq!(
                gaps,
                &[format!("lost@{}", before_gap.len())],
                "one control event, at the restart, for {topic}"
            );
            // Before it: in order, without duplicates, and nothing Redis acknowledged skipped
            // except at the end (events whose pub/sub message died with the old server).
            let before_data: Vec<&String> = before.iter().map(|(_, d)| d).collect();
            assert!(
                before_gap.len() <= before_data.len() + 1,
                "{topic}: more before the gap than published"
            );
            assert_eq!(
                before_gap[..before_gap.len().min(before_data.len())],
                before_data[..before_gap.len().min(before_data.len())],
                "{topic}: before the restart"
            );
            // After it: everything, in order.
            let after_data: Vec<&String> = after.iter().map(|(_, d)| d).collect();
            assert_eq!(
                got[got.len() - after.len() - 1..got.len() - 1]
                    .iter()
                    .collect::<Vec<_>>(),
                after_data,
                "{topic}: after the restart"
            );
            assert!(
                !after_data.is_empty(),
                "nothing published after the restart"
            );
        }
    }
    // The gap markers reached swept streams too.
    assert_some_swept(&gw);
}

/// A client of a replica process that is about to go: follows `first` until its stream ends,
/// then resumes on `second` with the last id it saw, until `end`.
struct Follower {
    received: Received,
    /// When the first stream ended, and its last block.
    ended: Option<(Instant, String)>,
}

async fn follow(first: SocketAddr, second: SocketAddr, topic: &str) -> Follower {
    let (mut sse, mut received) = Received::open(&first, &[topic]).await;
    let mut last = received.start[0].to_string();
    while let Some(event) = sse.try_next().await {
        received.record(&event);
        if received.ended() {
            return Follower {
                received,
                ended: None,
            };
        }
        last = event.id;
    }
    let raw = sse.raw();
    let last_block = raw.trim_end().rsplit("\n\n").next().unwrap().to_string();
    let ended = Some((Instant::now(), last_block));
    let mut sse = Sse::open(&second, &format!("topic={topic}"), Some(&last)).await;
    received.read_to_end(&mut sse).await;
    Follower { received, ended }
}

enum Fault {
    Kill,
    /// SIGTERM; records when it was sent, and how and when the process exited.
    Term {
        sent: Option<Instant>,
        exit: Option<(std::process::ExitStatus, Duration)>,
    },
}

const DRAIN_WINDOW: Duration = Duration::from_secs(3);

/// `clients` followers on a replica process `a` (spread over the topics) while publishing;
/// `fault` hits `a` meanwhile, and they resume on replica `b`.
async fn under_fault(clients: usize, fault: &mut Fault) -> Vec<Follower> {
    let redis = RedisServer::start();
    let mut a = GatewayProcess::start(&redis.url(), &["--drain-window", "3s"]);
    let b = GatewayProcess::start(&redis.url(), &[]);
    let publisher = Publisher::start(redis.url(), Duration::from_millis(50));
    let followers =
        join_all((0..clients).map(|i| follow(a.addr, b.addr, TOPICS[i % TOPICS.len()])));
    let control = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        match fault {
            Fault::Kill => support::signal(a.pid(), "KILL"),
            Fault::Term { sent, exit } => {
                let start = Instant::now();
                *sent = Some(start);
                support::signal(a.pid(), "TERM");
                let status = a.exited(DRAIN_WINDOW + Duration::from_secs(2)).await;
                *exit = Some((status, start.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        publisher.finish()
    };
    let (followers, published) = futures_util::join!(followers, control);
    for follower in &followers {
        follower.received.assert_complete(&published);
    }
    followers
}

#[actix_web::test]
async fn sigkill_of_a_replica_under_hundreds_of_clients_loses_nothing() {
    let followers = under_fault(300, &mut Fault::Kill).await;
    assert!(
        followers.iter().all(|f| f.ended.is_some()),
        "every client was on the killed replica"
    );
}

#[actix_web::test]
async fn sigterm_drains_streams_spread_over_the_window_and_clients_resume_without_loss() {
    let mut fault = Fault::Term {
        sent: None,
        exit: None,
    };
    let followers = under_fault(60, &mut fault).await;
    let Fault::Term {
        sent: Some(sent),
        exit: Some((status, exited_after)),
    } = fault
    else {
        unreachable!("the fault ran")
    };
    assert!(status.success(), "drained replica exited with {status}");
    assert!(
        exited_after < DRAIN_WINDOW,
        "exited {exited_after:?} after SIGTERM"
    );
    let mut ends: Vec<Duration> = followers
        .iter()
        .map(|f| {
            let (at, last_block) = f.ended.as_ref().expect("stream not ended by the drain");
            assert!(
                last_block.starts_with("retry: ") && !last_block.contains("data:"),
                "no reconnection delay before the close: {last_block:?}"
            );
            at.duration_since(sent)
        })
        .collect();
    ends.sort();
    let (first, last) = (ends[0], ends[ends.len() - 1]);
    assert!(
        last < DRAIN_WINDOW,
        "last stream closed {last:?} after SIGTERM"
    );
    assert!(
        last - first > DRAIN_WINDOW / 2,
        "closes not spread: from {first:?} to {last:?}"
    );
}

#[actix_web::test]
async fn a_draining_replica_refuses_new_connections_at_once() {
    let redis = RedisServer::start();
    let mut a = GatewayProcess::start(&redis.url(), &["--drain-window", "2s"]);
    let _stream = Sse::open(&a, "topic=held", None).await;
    support::signal(a.pid(), "TERM");
    // Refused, not left hanging in a backlog: the listening socket is closed.
    support::wait_until("the listener to close", || {
        std::net::TcpStream::connect(a.addr).is_err()
    });
    let status = a.exited(Duration::from_secs(4)).await;
    assert!(status.success());
}

#[actix_web::test]
async fn a_resume_during_an_outage_waits_for_redis_and_then_replays() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr());
    let url = proxy.redis_url();
    let gw = Gateway::start(&[&["--redis-url", url.as_str()][..], &FAST_FAULTS].concat());
    let mut live = Sse::open(&gw, "topic=r", None).await;
    let ids: Vec<String> = (0..5)
        .map(|i| redis.fcall_publish("r", &format!("r#{i}"), None))
        .collect();
    for id in &ids {
        assert_eq!(&live.next().await.id, id);
    }

    proxy.cut();
    time_to_not_ready(&gw);
    // The topic is served here, so the stream opens; its history read waits for Redis.
    let mut resumed = Sse::open(&gw, "topic=r", Some(&ids[0])).await;
    resumed.assert_quiet(Duration::from_millis(1500)).await;
    assert!(
        resumed.raw().contains(":\n\n"),
        "no keep-alive while waiting: {:?}",
        resumed.raw()
    );
    proxy.restore();
    let replayed: Vec<String> = resumed.take(4).await.into_iter().map(|e| e.id).collect();
    assert_eq!(replayed, ids[1..]);
    let id = redis.fcall_publish("r", "after", None);
    assert_eq!(resumed.next().await.id, id);
    assert_eq!(live.next().await.id, id);
}

#[actix_web::test]
async fn a_backlog_larger_than_the_client_buffer_is_caught_up_on_the_same_stream() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr());
    let url = proxy.redis_url();
    let flags = [
        &["--redis-url", url.as_str(), "--client-buffer", "16"][..],
        &FAST_FAULTS,
    ]
    .concat();
    let gw = Gateway::start(&flags);
    let mut sse = Sse::open(&gw, "topic=backlog", None).await;
    sse.baseline().await;
    proxy.cut();
    time_to_not_ready(&gw);
    // Ten buffers' worth, published while the replica is cut off.
    let missed: Vec<String> = (0..160)
        .map(|i| redis.fcall_publish("backlog", &format!("m{i}"), None))
        .collect();
    proxy.restore();
    gw.wait_readyz(200);
    let got: Vec<String> = sse.take(160).await.into_iter().map(|e| e.id).collect();
    assert_eq!(
        got, missed,
        "the whole backlog, in order, on the first stream"
    );
}
