//! The open-loop publisher: events go out on schedule at `rate` per second whatever the
//! server's speed, through the real contract (`FCALL ssegw_publish 1 ssegw:s:{topic}` on Redis,
//! on a cluster routed to the primary of the topic's slot, or pipelined `POST /publish`), each
//! carrying its topic, per-topic sequence number and publish time. It
//! never waits for a reply before sending the next event; when `max_in_flight` replies are
//! outstanding, an event due is skipped and counted instead of delayed.
//!
//! A baseline target (`--target actix|nchan`) is published to over HTTP too, with the event
//! data as the raw body; it gives no stream id back, so each acknowledged event is logged under
//! the synthetic id `StreamId::new(seq + 1, 0)`. Those ids grow with the sequence number and are
//! all after `StreamId::ZERO`, the position a baseline's connection starts at, so
//! `tracking::reconcile` owes every connection every stored event, unchanged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use ssegw_protocol::{script, StreamId, Topic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fleet::RedisAddr;
use crate::http1::{self, BaseUrl};
use crate::layout::Layout;
use crate::payload::{self, Payload};
use crate::target::Target;
use crate::tracking::AckLog;

/// An event sent later than this after its scheduled time counts as late.
const LATE: Duration = Duration::from_millis(5);
/// How long, after publishing stops, replies still in flight are awaited.
const FINISH_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub enum Via {
    /// `FCALL ssegw_publish` on one multiplexed connection to this Redis, or on a cluster
    /// connection (one multiplexed connection per primary, each call sent to the primary of
    /// its key's slot).
    Redis(RedisAddr),
    /// `target`'s publish request (`http1::publish_request`) on this many pipelined
    /// connections, spread over the URLs.
    Http {
        urls: Vec<String>,
        lanes: usize,
        target: Target,
    },
    /// `../shared/bench/floor`'s one `POST /go?count=N&rate=R` at this URL: it paces and
    /// stamps the events itself, starting each once the one before is written.
    Go { url: String, count: u64 },
}

#[derive(Debug, Clone)]
pub struct PublishPlan {
    pub rate: f64,
    pub via: Via,
    pub max_in_flight: usize,
    pub padding: usize,
}

/// Running totals, read by the orchestrator every interval.
#[derive(Debug, Default)]
pub struct Counters {
    /// Events handed to the connection (on schedule or late).
    pub sent: AtomicU64,
    /// Events the server accepted (for the gateway: Redis stored them, an id came back).
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    /// Events due while `max_in_flight` replies were outstanding: never sent.
    pub skipped: AtomicU64,
    /// Events sent more than `LATE` after their scheduled time (the harness fell behind).
    pub late: AtomicU64,
}

pub struct Outcome {
    /// Per topic, what was stored, in sequence order.
    pub logs: Vec<AckLog>,
    pub first_error: Option<String>,
    /// From the first event due to the end of the schedule.
    pub elapsed: Duration,
}

/// Publishes until `stop` fires, then waits for the replies still in flight.
pub async fn run(
    plan: PublishPlan,
    layout: &Layout,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> anyhow::Result<Outcome> {
    if let Via::Go { url, count } = &plan.via {
        return run_go(url, *count, plan.rate, layout, &counters).await;
    }
    let sender = Sender::connect(&plan.via, plan.max_in_flight).await?;
    let names: Vec<String> = (0..layout.topics).map(|t| layout.topic_name(t)).collect();
    // What an FCALL declares as its key: the topic's stream, so that a cluster routes it to
    // the primary of the topic's slot (and, during a slot migration, to the stream's node).
    let keys: Vec<String> = names
        .iter()
        .map(|name| Topic::new(name).map(|t| script::stream_key(&t)))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("a run's topic name is invalid: {e}"))?;
    let mut next_seq = vec![0u64; names.len()];
    let mut logs = vec![AckLog::default(); names.len()];
    let mut first_error = None;
    // Each publish is pushed here in sequence order and reaches its connection in that order
    // (an HTTP lane's queue takes it at once; a Redis command is queued when first polled,
    // in push order, into a queue with room for every event in flight): a topic's sequence
    // numbers are stored in order.
    let mut in_flight = FuturesUnordered::new();
    let period = Duration::from_secs_f64(1.0 / plan.rate);
    let start = Instant::now();
    let mut n: u64 = 0;
    let record =
        |reply: Reply, logs: &mut Vec<AckLog>, first_error: &mut Option<String>| match reply.result
        {
            Ok(id) => {
                logs[reply.topic as usize].acked.push((reply.seq, id));
                counters.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        };
    loop {
        let due_at = start + period.mul_f64(n as f64);
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                record(reply, &mut logs, &mut first_error);
            }
            _ = tokio::time::sleep_until(due_at) => {
                let now = Instant::now();
                while start + period.mul_f64(n as f64) <= now {
                    let scheduled = start + period.mul_f64(n as f64);
                    n += 1;
                    if in_flight.len() >= plan.max_in_flight {
                        counters.skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if now - scheduled > LATE {
                        counters.late.fetch_add(1, Ordering::Relaxed);
                    }
                    let topic = ((n - 1) % names.len() as u64) as u32;
                    let seq = next_seq[topic as usize];
                    next_seq[topic as usize] += 1;
                    let data = payload::format(
                        &Payload { topic, seq, sent_us: payload::now_us() },
                        plan.padding,
                    );
                    let (name, key) = (&names[topic as usize], &keys[topic as usize]);
                    in_flight.push(sender.publish(name, key, topic, seq, data));
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let finish = tokio::time::sleep(FINISH_WAIT);
    tokio::pin!(finish);
    while !in_flight.is_empty() {
        tokio::select! {
            Some(reply) = in_flight.next() => record(reply, &mut logs, &mut first_error),
            _ = &mut finish => break,
        }
    }
    for log in &mut logs {
        log.acked.sort_unstable_by_key(|&(seq, _)| seq);
    }
    Ok(Outcome {
        logs,
        first_error,
        elapsed,
    })
}

/// Asks the reference for `count` events at `rate` a second and waits for its answer, which
/// comes once the last is written, however long that takes (it does not stop when the run's
/// duration is up). Every event is then logged as acknowledged, under the synthetic ids of the
/// baselines, and `elapsed` is the time it took: the rate the reference reached.
async fn run_go(
    url: &str,
    count: u64,
    rate: f64,
    layout: &Layout,
    counters: &Counters,
) -> anyhow::Result<Outcome> {
    let base = BaseUrl::parse(url)?;
    let mut socket = TcpStream::connect(resolve(&base.authority).await?)
        .await
        .with_context(|| format!("cannot connect to {}", base.authority))?;
    let start = Instant::now();
    socket
        .write_all(&http1::go_request(&base, count, rate as u64))
        .await
        .context("cannot send POST /go")?;
    counters.sent.store(count, Ordering::Relaxed);
    // It answers once its last event is written: at the rate asked, or slower where it cannot
    // keep up. Ten times the schedule is a reference that has stopped.
    let limit = Duration::from_secs_f64(count as f64 / rate * 10.0 + 60.0);
    let mut answer = Vec::new();
    tokio::time::timeout(limit, socket.read_to_end(&mut answer))
        .await
        .map_err(|_| anyhow!("POST /go: no answer within {limit:?}"))?
        .context("POST /go: no answer")?;
    let elapsed = start.elapsed();
    let (status, body, _) = http1::parse_sized_response(&answer)?.with_context(|| {
        format!(
            "POST /go: incomplete answer {:?}",
            String::from_utf8_lossy(&answer)
        )
    })?;
    let published = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|json| json["published"].as_u64());
    if status != 200 || published != Some(count) {
        bail!(
            "POST /go answered {status}: {}",
            String::from_utf8_lossy(body).trim()
        );
    }
    let mut logs = vec![AckLog::default(); layout.topics as usize];
    logs[0].acked = (0..count)
        .map(|seq| (seq, StreamId::new(seq + 1, 0)))
        .collect();
    counters.acked.store(count, Ordering::Relaxed);
    eprintln!(
        "ssegw-loadtest: the reference published {count} events in {:.2} s: {:.1} events/s of {rate} asked",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
    Ok(Outcome {
        logs,
        first_error: None,
        elapsed,
    })
}

struct Reply {
    topic: u32,
    seq: u64,
    result: anyhow::Result<StreamId>,
}

enum Sender {
    Redis(redis::aio::MultiplexedConnection),
    RedisCluster(redis::cluster_async::ClusterConnection),
    /// Topic `t` always goes to lane `t % lanes.len()`, which keeps its order.
    Http(Vec<mpsc::UnboundedSender<LaneRequest>>),
}

impl Sender {
    /// `max_in_flight` sizes the Redis connection's command queue so that sending never waits
    /// for room: a send that waited could be overtaken by a later one, swapping a topic's
    /// events.
    async fn connect(via: &Via, max_in_flight: usize) -> anyhow::Result<Sender> {
        match via {
            Via::Go { .. } => bail!("the reference paces its own publishing: see run_go"),
            Via::Redis(RedisAddr::Cluster(seeds)) => {
                let urls = seeds.iter().map(|node| format!("redis://{node}"));
                let client = redis::cluster::ClusterClient::builder(urls)
                    .response_timeout(Duration::from_secs(30))
                    .build()
                    .with_context(|| format!("bad Redis Cluster nodes {seeds:?}"))?;
                let conn = client
                    .get_async_connection()
                    .await
                    .with_context(|| format!("cannot connect to the Redis Cluster at {seeds:?}"))?;
                Ok(Sender::RedisCluster(conn))
            }
            Via::Redis(RedisAddr::Url(url)) => {
                let client = redis::Client::open(url.as_str())
                    .with_context(|| format!("bad Redis URL {url}"))?;
                // The default 500 ms response timeout would turn an overloaded server into
                // failed publishes; an open-loop run wants to see the latency instead.
                let config = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(Duration::from_secs(30)))
                    .set_pipeline_buffer_size(max_in_flight.max(4096));
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .with_context(|| format!("cannot connect to Redis at {url}"))?;
                Ok(Sender::Redis(conn))
            }
            Via::Http {
                urls,
                lanes,
                target,
            } => {
                let mut targets = Vec::new();
                for url in urls {
                    let base = BaseUrl::parse(url)?;
                    let addr = resolve(&base.authority).await?;
                    targets.push((addr, base));
                }
                let targets = Arc::new(targets);
                Ok(Sender::Http(
                    (0..*lanes)
                        .map(|lane| start_lane(targets.clone(), *target, lane))
                        .collect(),
                ))
            }
        }
    }

    /// Publishes `data` on topic `topic_name`, whose stream key is `key`.
    fn publish(
        &self,
        topic_name: &str,
        key: &str,
        topic: u32,
        seq: u64,
        data: String,
    ) -> BoxFuture<'static, Reply> {
        let fcall_cmd = || {
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("ssegw_publish").arg(1).arg(key).arg(&data);
            cmd
        };
        match self {
            Sender::Redis(conn) => {
                let (conn, cmd) = (conn.clone(), fcall_cmd());
                Box::pin(async move {
                    Reply {
                        topic,
                        seq,
                        result: fcall(cmd, conn).await,
                    }
                })
            }
            Sender::RedisCluster(conn) => {
                let (conn, cmd) = (conn.clone(), fcall_cmd());
                Box::pin(async move {
                    Reply {
                        topic,
                        seq,
                        result: fcall(cmd, conn).await,
                    }
                })
            }
            Sender::Http(lanes) => {
                // Queued now, in the order the events are published, not when the future is
                // first polled: a bounded queue's `send().await` let a later event of a topic
                // overtake one waiting for room (adjacent events stored swapped, counted as out
                // of order). The in-flight bound keeps the queue short.
                let (tx, rx) = oneshot::channel();
                let request = LaneRequest {
                    topic: topic_name.to_string(),
                    data,
                    seq,
                    reply: tx,
                };
                let queued = lanes[topic as usize % lanes.len()].send(request);
                Box::pin(async move {
                    let result = match queued {
                        Err(_) => Err(anyhow!("publish lane closed")),
                        Ok(()) => rx
                            .await
                            .map_err(|_| anyhow!("publish connection lost"))
                            .and_then(|r| r),
                    };
                    Reply { topic, seq, result }
                })
            }
        }
    }
}

/// Runs a publish `FCALL` and reads the id it answers.
async fn fcall(
    cmd: redis::Cmd,
    mut conn: impl redis::aio::ConnectionLike,
) -> anyhow::Result<StreamId> {
    let id: String = cmd.query_async(&mut conn).await?;
    StreamId::parse(&id).map_err(|_| anyhow!("FCALL answered {id:?}, not an id"))
}

pub async fn resolve(authority: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(authority)
        .await
        .with_context(|| format!("cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to no address"))
}

struct LaneRequest {
    topic: String,
    data: String,
    seq: u64,
    reply: oneshot::Sender<anyhow::Result<StreamId>>,
}

/// A reply the server owes a lane: the event's sequence number (for a baseline's synthetic
/// id) and where the outcome goes.
struct Owed {
    seq: u64,
    reply: oneshot::Sender<anyhow::Result<StreamId>>,
}

/// One pipelined HTTP/1.1 connection for publish requests. The server answers a connection's
/// requests one at a time and in order (for the gateway, so the FCALLs behind them run in
/// order too).
fn start_lane(
    targets: Arc<Vec<(SocketAddr, BaseUrl)>>,
    target: Target,
    lane: usize,
) -> mpsc::UnboundedSender<LaneRequest> {
    // Requests waiting for the connection; the publisher's in-flight bound keeps it short.
    let (tx, mut rx) = mpsc::unbounded_channel::<LaneRequest>();
    tokio::spawn(async move {
        let mut url = lane % targets.len();
        loop {
            let (addr, base) = &targets[url];
            if let Err(e) = run_lane(*addr, base, target, &mut rx).await {
                if rx.is_closed() {
                    return;
                }
                eprintln!("ssegw-loadtest: publish connection to {addr}: {e:#}");
                url = (url + 1) % targets.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
            } else {
                return;
            }
        }
    });
    tx
}

/// Runs one connection until it fails (error) or the publisher is done (`Ok`).
async fn run_lane(
    addr: SocketAddr,
    base: &BaseUrl,
    target: Target,
    rx: &mut mpsc::UnboundedReceiver<LaneRequest>,
) -> anyhow::Result<()> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut read, mut write) = stream.into_split();
    // Replies owed by the server, in request order: the writer pushes, the reader pops.
    // Unbounded, but never longer than the publisher's in-flight bound.
    let (owed_tx, mut owed_rx) = mpsc::unbounded_channel::<Owed>();
    let writer = async {
        while let Some(request) = rx.recv().await {
            let bytes = http1::publish_request(base, target, &request.topic, &request.data);
            let owed = Owed {
                seq: request.seq,
                reply: request.reply,
            };
            owed_tx.send(owed).map_err(|_| anyhow!("reader ended"))?;
            write.write_all(&bytes).await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    let reader = async {
        let mut buf = Vec::with_capacity(16 * 1024);
        loop {
            while let Some((status, body, used)) = http1::parse_sized_response(&buf)? {
                let owed = owed_rx.recv().await.context("answer without a request")?;
                let result = publish_answer(target, status, body, owed.seq);
                buf.drain(..used);
                let _ = owed.reply.send(result);
            }
            if read.read_buf(&mut buf).await? == 0 {
                bail!("server closed the publish connection");
            }
        }
    };
    tokio::select! {
        result = writer => result,
        result = reader => result,
    }
}

/// The stream id an answer to the publish of event `seq` stands for: the gateway's stored id,
/// or for a baseline, which stores nothing, the synthetic `StreamId::new(seq + 1, 0)` on any
/// 2xx (actix answers 200 `{"receivers":n}`, nchan 201 or 202 with channel figures).
fn publish_answer(target: Target, status: u16, body: &[u8], seq: u64) -> anyhow::Result<StreamId> {
    if target != Target::Gateway {
        if (200..300).contains(&status) {
            return Ok(StreamId::new(seq + 1, 0));
        }
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
        bail!(
            "{} publish answered {status}: {}",
            target.name(),
            text.trim()
        );
    }
    let json: serde_json::Value =
        serde_json::from_slice(body).context("unreadable publish answer")?;
    if status != 200 {
        bail!(
            "POST /publish answered {status}: {}",
            json["error"].as_str().unwrap_or("?")
        );
    }
    let id = json["id"].as_str().context("publish answer without id")?;
    StreamId::parse(id).map_err(|_| anyhow!("publish answer with invalid id {id:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(target: Target, status: u16, body: &str, expected: Result<StreamId, &str>) {
        let got = publish_answer(target, status, body.as_bytes(), 41).map_err(|e| e.to_string());
        match expected {
            Ok(id) => assert_eq!(got.ok(), Some(id), "{target:?} {status} {body:?}"),
            Err(part) => assert!(
                got.as_ref().is_err_and(|e| e.contains(part)),
                "{target:?} {status} {body:?}: {got:?}"
            ),
        }
    }

    /// The bodies of the HTTP/1.1 requests complete in `buf`, removed from it.
    fn take_requests(buf: &mut Vec<u8>) -> Vec<String> {
        let mut bodies = Vec::new();
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() < end + 4 + length {
                break;
            }
            bodies.push(String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned());
            buf.drain(..end + 4 + length);
        }
        bodies
    }

    /// A topic's events go on the wire in the order they were published, whatever order their
    /// futures are polled in (the publisher polls many at once; a queue taken at first poll
    /// let a later event overtake an earlier one).
    #[tokio::test]
    async fn http_events_reach_the_wire_in_publish_order_whatever_the_poll_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let (mut buf, mut seen) = (Vec::new(), Vec::new());
            while seen.len() < 2 {
                let mut chunk = [0u8; 4096];
                let n = socket.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the publisher closed its connection");
                buf.extend_from_slice(&chunk[..n]);
                for body in take_requests(&mut buf) {
                    seen.push(body);
                    let answer = format!(r#"{{"id":"{}-0"}}"#, seen.len());
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    socket.write_all(response.as_bytes()).await.unwrap();
                }
            }
            seen
        });
        let via = Via::Http {
            urls: vec![format!("http://{addr}")],
            lanes: 1,
            target: Target::Gateway,
        };
        let sender = Sender::connect(&via, 16).await.unwrap();
        let first = sender.publish("a", "ssegw:s:{a}", 0, 0, "first".into());
        let second = sender.publish("a", "ssegw:s:{a}", 0, 1, "second".into());
        // The later event's future is polled first.
        let second = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("the second publish was answered");
        let first = tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .expect("the first publish was answered");
        let seen = server.await.unwrap();
        assert!(
            seen[0].contains(r#""data":"first""#) && seen[1].contains(r#""data":"second""#),
            "sent in this order: {seen:?}"
        );
        assert_eq!(first.result.unwrap(), StreamId::new(1, 0));
        assert_eq!(second.result.unwrap(), StreamId::new(2, 0));
    }

    #[test]
    fn answers_per_target() {
        check(
            Target::Gateway,
            200,
            r#"{"id":"17-3"}"#,
            Ok(StreamId::new(17, 3)),
        );
        check(
            Target::Gateway,
            400,
            r#"{"error":"bad topic"}"#,
            Err("bad topic"),
        );
        check(Target::Gateway, 200, "{}", Err("without id"));
        let synthetic = Ok(StreamId::new(42, 0));
        check(Target::Actix, 200, r#"{"receivers":3}"#, synthetic);
        check(Target::Nchan, 201, "queued messages: 1\n", synthetic);
        check(Target::Nchan, 202, "active subscribers: 0\n", synthetic);
        check(Target::Actix, 400, "give ?topic=NAME", Err("answered 400"));
    }
}
