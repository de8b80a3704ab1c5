//! A shard of SSE client connections, run in the harness process or in a worker process: opens
//! its connections at a set rate, keeps each one open (reconnecting to another gateway and
//! resuming with `Last-Event-ID` whenever it drops), accounts for every event, reports every
//! interval, and on `Finish` waits for stragglers and hands back each connection's record.
//! Against a baseline target a connection is owed every event from its 200 response on and
//! reconnects without resuming.
//!
//! Memory per connection is kept small: one task, its socket, a parser holding only a split
//! line and the current event's fields, and a `ConnState` behind an uncontended mutex. Bytes
//! are read into one buffer per runtime thread, not one per connection.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use ssegw_protocol::{cursor, StreamId, Topic, TopicSet};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::http1::{self, BaseUrl, Chunked, Framing};
use crate::latency::{Buckets, Latency};
use crate::layout::Layout;
use crate::payload;
use crate::publisher::resolve;
use crate::sse;
use crate::target::Target;
use crate::tracking::{StreamIdRepr, TopicTrack};

/// Longest wait for a TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnection delay after the first failed attempt in a row; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// An open stream that ends sooner than this counts as a failed attempt for the backoff.
const SHORT_SESSION: Duration = Duration::from_secs(1);
/// How often the drain checks whether every connection has caught up.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// How often a shard checks whether all its connections are open.
const OPEN_POLL: Duration = Duration::from_millis(10);

thread_local! {
    /// The read buffer of every connection polled on this runtime thread; borrowed only
    /// between a `try_read` and the parsing of what it returned, never across an await.
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; 64 * 1024].into_boxed_slice());
}

/// What a shard is asked to do; sent as JSON to a worker process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardPlan {
    pub shard: usize,
    pub target: Target,
    pub layout: Layout,
    /// Connections `first..first + count` of the run.
    pub first: u64,
    pub count: u64,
    /// New connections per second for this shard.
    pub connect_rate: f64,
    /// Churn: each connection closes after a random lifetime with this mean and resumes at
    /// once. `None`: connections stay open.
    pub churn_mean_lifetime_ms: Option<u64>,
    pub interval_ms: u64,
    /// Runtime threads of a worker process.
    pub threads: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToShard {
    /// Publishing has stopped: `last[t]` is the last stored event of topic `t` (sequence
    /// number and stream id).
    /// Wait until every connection saw it (at most `drain_ms`), then report and end.
    Finish {
        last: Vec<Option<(u64, StreamIdRepr)>>,
        drain_ms: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ShardReport {
    pub shard: usize,
    pub message: FromShard,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum FromShard {
    Tick(Tick),
    Done(ShardResult),
}

/// One interval of a shard: gauges, counts since the last tick, and running totals.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Tick {
    pub connected: u64,
    /// Connections that have opened at least once.
    pub opened: u64,
    /// When (µs since the epoch) every connection was last open at once; 0: not yet.
    pub all_open_at_us: u64,
    /// Events received in this interval (duplicates included).
    pub delivered: u64,
    pub latency: Buckets,
    pub totals: Totals,
    /// The first failed connection attempt, as text.
    pub first_connect_error: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct Totals {
    /// A connection opened again after having been open.
    pub reconnects: u64,
    /// Reconnections that sent a `Last-Event-ID`.
    pub resumes: u64,
    /// Attempts that failed before a 200 response (refused, reset, timeout, non-200).
    pub connect_errors: u64,
    /// Open streams ended by the server or the network (not by churn).
    pub dropped: u64,
    pub gap_events: u64,
    /// Events whose data is not a harness payload of one of the connection's topics.
    pub unknown_events: u64,
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, o: Totals) {
        self.reconnects += o.reconnects;
        self.resumes += o.resumes;
        self.connect_errors += o.connect_errors;
        self.dropped += o.dropped;
        self.gap_events += o.gap_events;
        self.unknown_events += o.unknown_events;
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ShardResult {
    pub conns: Vec<ConnRecord>,
    /// Every connection saw the last event of each of its topics before the drain ended.
    pub caught_up: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnRecord {
    pub index: u64,
    pub opened: bool,
    pub reconnects: u32,
    pub tracks: Vec<TopicTrack>,
}

/// A connection's accounting, shared between its task and the shard (for the drain and the
/// final records). Locked once per read, never across an await.
struct ConnState {
    /// One per topic, in `TopicSet` (sorted name) order, the order of cursor positions.
    tracks: Vec<TopicTrack>,
    /// The last event id received (or the preamble's), sent as `Last-Event-ID` on reconnect.
    last_id: Option<String>,
    opened: bool,
    reconnects: u32,
}

#[derive(Default)]
struct IntervalStats {
    delivered: u64,
    latency: Latency,
}

struct Shared {
    plan: ShardPlan,
    targets: Vec<(SocketAddr, BaseUrl)>,
    conns: Vec<Mutex<ConnState>>,
    /// Events of the current interval, from every connection; taken by the shard each tick.
    interval: Mutex<IntervalStats>,
    connected: AtomicU64,
    opened: AtomicU64,
    all_open_at_us: AtomicU64,
    reconnects: AtomicU64,
    resumes: AtomicU64,
    connect_errors: AtomicU64,
    dropped: AtomicU64,
    gap_events: AtomicU64,
    unknown_events: AtomicU64,
    first_connect_error: Mutex<Option<String>>,
}

/// Runs the shard until `Finish` (or until `commands` closes: the parent is gone).
pub async fn run_shard(
    plan: ShardPlan,
    mut commands: mpsc::Receiver<ToShard>,
    reports: mpsc::Sender<ShardReport>,
) -> anyhow::Result<()> {
    let mut targets = Vec::new();
    for url in &plan.layout.urls {
        let base = BaseUrl::parse(url)?;
        targets.push((resolve(&base.authority).await?, base));
    }
    let conns = (plan.first..plan.first + plan.count)
        .map(|conn| {
            let tracks = topic_order(&plan.layout, conn)
                .into_iter()
                .map(TopicTrack::new)
                .collect();
            Mutex::new(ConnState {
                tracks,
                last_id: None,
                opened: false,
                reconnects: 0,
            })
        })
        .collect();
    let shard = plan.shard;
    let shared = Arc::new(Shared {
        targets,
        conns,
        interval: Mutex::default(),
        connected: AtomicU64::new(0),
        opened: AtomicU64::new(0),
        all_open_at_us: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        resumes: AtomicU64::new(0),
        connect_errors: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        gap_events: AtomicU64::new(0),
        unknown_events: AtomicU64::new(0),
        first_connect_error: Mutex::default(),
        plan,
    });
    let send = |message| reports.send(ShardReport { shard, message });
    let mut tasks = JoinSet::new();
    let mut launched: u64 = 0;
    let mut all_open = false;
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(shared.plan.interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(1)), if launched < shared.plan.count => {
                let due = (start.elapsed().as_secs_f64() * shared.plan.connect_rate) as u64 + 1;
                while launched < due.min(shared.plan.count) {
                    tasks.spawn(connection(shared.clone(), launched as usize));
                    launched += 1;
                }
            }
            _ = ticker.tick() => {
                if send(FromShard::Tick(shared.tick())).await.is_err() {
                    return Ok(());
                }
            }
            // Tell the parent at once when every connection is open (again): it times the
            // connect phase and the recovery from a resume storm by that, not by the ticks.
            _ = tokio::time::sleep(OPEN_POLL) => {
                let was_full = all_open;
                all_open = shared.connected.load(Ordering::Relaxed) >= shared.plan.count;
                if all_open && !was_full && send(FromShard::Tick(shared.tick())).await.is_err() {
                    return Ok(());
                }
            }
            command = commands.recv() => {
                let Some(ToShard::Finish { last, drain_ms }) = command else {
                    return Ok(());
                };
                let caught_up = drain(&shared, &last, Duration::from_millis(drain_ms), &send).await;
                // The last tick while the connections are still open, so the gauge says so.
                let _ = send(FromShard::Tick(shared.tick())).await;
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                let _ = send(FromShard::Done(shared.records(caught_up))).await;
                return Ok(());
            }
        }
    }
}

/// Waits until every opened connection saw the last event of each of its topics, ticking
/// meanwhile; false if `limit` passed first.
async fn drain<F, Fut>(
    shared: &Shared,
    last: &[Option<(u64, StreamIdRepr)>],
    limit: Duration,
    send: &F,
) -> bool
where
    F: Fn(FromShard) -> Fut,
    Fut: std::future::Future<Output = Result<(), mpsc::error::SendError<ShardReport>>>,
{
    let deadline = Instant::now() + limit;
    let mut next_tick = Instant::now() + Duration::from_millis(shared.plan.interval_ms);
    loop {
        let all = shared.conns.iter().all(|conn| {
            let state = conn.lock().expect("conn state poisoned");
            !state.opened
                || state
                    .tracks
                    .iter()
                    .all(|t| t.caught_up(last.get(t.topic as usize).copied().flatten()))
        });
        if all {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        if Instant::now() >= next_tick {
            let _ = send(FromShard::Tick(shared.tick())).await;
            next_tick += Duration::from_millis(shared.plan.interval_ms);
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

impl Shared {
    fn tick(&self) -> Tick {
        let (delivered, latency) = {
            let mut interval = self.interval.lock().expect("interval stats poisoned");
            let buckets = interval.latency.to_buckets();
            interval.latency.reset();
            (std::mem::take(&mut interval.delivered), buckets)
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Tick {
            connected: load(&self.connected),
            opened: load(&self.opened),
            all_open_at_us: load(&self.all_open_at_us),
            delivered,
            latency,
            totals: Totals {
                reconnects: load(&self.reconnects),
                resumes: load(&self.resumes),
                connect_errors: load(&self.connect_errors),
                dropped: load(&self.dropped),
                gap_events: load(&self.gap_events),
                unknown_events: load(&self.unknown_events),
            },
            first_connect_error: self.first_connect_error.lock().expect("poisoned").clone(),
        }
    }

    fn records(&self, caught_up: bool) -> ShardResult {
        let conns = self
            .conns
            .iter()
            .enumerate()
            .map(|(slot, conn)| {
                let state = conn.lock().expect("conn state poisoned");
                ConnRecord {
                    index: self.plan.first + slot as u64,
                    opened: state.opened,
                    reconnects: state.reconnects,
                    tracks: state.tracks.clone(),
                }
            })
            .collect();
        ShardResult { conns, caught_up }
    }
}

/// The connection's topics in `TopicSet` order (sorted by name).
fn topic_order(layout: &Layout, conn: u64) -> Vec<u32> {
    let mut topics: Vec<u32> = layout.topics_of(conn).collect();
    topics.sort_by_key(|&t| layout.topic_name(t));
    topics.dedup();
    topics
}

fn topic_set(layout: &Layout, topics: &[u32]) -> Option<TopicSet> {
    let topics = topics
        .iter()
        .map(|&t| Topic::new(&layout.topic_name(t)).ok())
        .collect::<Option<Vec<_>>>()?;
    TopicSet::new(topics)
}

/// How a session ended.
enum Ended {
    /// The churn lifetime ran out; the harness closed it.
    Churned,
    /// The server ended the stream or the connection dropped after a 200 response.
    Dropped,
}

/// One client connection, for the whole run: sessions one after another, each to another
/// gateway in the list (like a client its load balancer moved), resuming where the last ended.
async fn connection(shared: Arc<Shared>, slot: usize) {
    let conn = shared.plan.first + slot as u64;
    let mut url = shared.plan.layout.first_url(conn);
    let mut failures: u32 = 0;
    loop {
        let lifetime = shared.plan.churn_mean_lifetime_ms.map(|mean| {
            // Exponential lifetimes: closings form a Poisson process of the intended rate.
            let ms = -(mean as f64) * (1.0 - fastrand::f64()).ln();
            Instant::now() + Duration::from_millis(ms as u64)
        });
        let began = Instant::now();
        match session(&shared, slot, url, lifetime).await {
            Ok(Ended::Churned) => failures = 0,
            Ok(Ended::Dropped) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                // A stream that ends as soon as it opened (a replica shutting down, say) is
                // retried with backoff like a failure, not in a hot loop.
                failures = if began.elapsed() < SHORT_SESSION {
                    failures + 1
                } else {
                    0
                };
            }
            Err(e) => {
                if shared.connect_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    let mut first = shared.first_connect_error.lock().expect("poisoned");
                    *first = Some(format!("{e:#}"));
                }
                failures += 1;
            }
        }
        url = next_url(url, shared.targets.len(), fastrand::usize(..));
        // The first retry goes to another gateway at once; repeated failures back off.
        if failures > 1 {
            let backoff = FIRST_BACKOFF
                .saturating_mul(1 << (failures - 2).min(6))
                .min(MAX_BACKOFF);
            tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
        }
    }
}

/// The gateway a connection that left `url` tries next: another one, picked by `random`, so the
/// clients of a lost replica spread over all the others as behind a load balancer (all to the
/// next one would overload it).
fn next_url(url: usize, urls: usize, random: usize) -> usize {
    if urls < 2 {
        return 0;
    }
    (url + 1 + random % (urls - 1)) % urls
}

/// Lets `bind` leave the port to `connect` (Linux `IP_BIND_ADDRESS_NO_PORT`), which picks one
/// free for the whole address pair. Otherwise every bound socket holds a port of its source
/// address exclusively, TIME_WAIT ones included, and a resume storm runs out of ports
/// ("Address already in use"). Best effort: without it, binding still works, with fewer ports.
fn bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and an int option of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Keeps the `connected` gauge right however a session ends (including task abort).
struct Open<'a>(&'a AtomicU64);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-session parsing state.
#[derive(Default)]
struct Reader {
    /// Set once the response head is in.
    framing: Option<Framing>,
    /// The response head while it is incomplete.
    head: Vec<u8>,
    chunked: Chunked,
    sse: sse::Parser,
}

/// One HTTP connection: an error before the 200 response, `Ok` after it.
async fn session(
    shared: &Shared,
    slot: usize,
    url: usize,
    lifetime: Option<Instant>,
) -> anyhow::Result<Ended> {
    let conn = shared.plan.first + slot as u64;
    let (addr, base) = &shared.targets[url];
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = shared.plan.layout.source_addr(conn) {
        bind_address_no_port(&socket);
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("cannot bind {source}"))?;
    }
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(*addr))
        .await
        .context("connect timeout")??;
    stream.set_nodelay(true)?;
    let (request, resuming) = {
        let state = shared.conns[slot].lock().expect("conn state poisoned");
        let names: Vec<String> = state
            .tracks
            .iter()
            .map(|t| shared.plan.layout.topic_name(t.topic))
            .collect();
        (
            http1::subscribe_request(base, shared.plan.target, &names, state.last_id.as_deref()),
            state.last_id.is_some() && shared.plan.target.resumes(),
        )
    };
    stream.write_all(&request).await?;
    let mut reader = Reader::default();
    let mut open: Option<Open<'_>> = None;
    let churn = tokio::time::sleep_until(
        lifetime.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365)),
    );
    tokio::pin!(churn);
    loop {
        // One `read` per delivery: `poll_read` forgets the socket's readiness after a short
        // read, so the next poll waits for new data instead of reading again to learn that
        // nothing is there (as `readable()` and `try_read` would: twice the syscalls).
        let read = std::future::poll_fn(|cx| {
            READ_BUF.with_borrow_mut(|buf| {
                let mut input = ReadBuf::new(buf);
                match Pin::new(&mut stream).poll_read(cx, &mut input) {
                    Poll::Ready(Ok(())) => {
                        Poll::Ready(take_input(input.filled(), shared, slot, &mut reader))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
                    Poll::Pending => Poll::Pending,
                }
            })
        });
        let (ended, status) = tokio::select! {
            taken = read => taken?,
            _ = &mut churn, if lifetime.is_some() => {
                return match open {
                    Some(_) => Ok(Ended::Churned),
                    None => bail!("closed before the response"),
                };
            }
        };
        if let Some(status) = status {
            if status != 200 {
                bail!("the subscribe request was answered {status}");
            }
            if shared.connected.fetch_add(1, Ordering::Relaxed) + 1 >= shared.plan.count {
                shared
                    .all_open_at_us
                    .store(payload::now_us(), Ordering::Relaxed);
            }
            open = Some(Open(&shared.connected));
            let mut state = shared.conns[slot].lock().expect("conn state poisoned");
            if !shared.plan.target.resumes() {
                // A baseline sends no starting position: the connection is owed every event of
                // the run (published once the connections are open), which the publisher logs
                // under synthetic ids, all after ZERO.
                for track in &mut state.tracks {
                    track.set_baseline(StreamId::ZERO);
                }
            }
            if state.opened {
                state.reconnects += 1;
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
                if resuming {
                    shared.resumes.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                state.opened = true;
                shared.opened.fetch_add(1, Ordering::Relaxed);
            }
        }
        if ended {
            return match open {
                Some(_) => Ok(Ended::Dropped),
                None => bail!("closed before the response"),
            };
        }
    }
}

/// Parses what one read returned (nothing: the server closed the connection). Returns whether
/// the stream ended, and the response status when this read completed the head.
fn take_input(
    input: &[u8],
    shared: &Shared,
    slot: usize,
    reader: &mut Reader,
) -> anyhow::Result<(bool, Option<u16>)> {
    if input.is_empty() {
        return Ok((true, None));
    }
    let mut input = input;
    let mut status = None;
    let head_bytes;
    if reader.framing.is_none() {
        reader.head.extend_from_slice(input);
        let Some(head) = http1::parse_head(&reader.head)? else {
            if reader.head.len() > 16 * 1024 {
                bail!("response head too long");
            }
            return Ok((false, None));
        };
        status = Some(head.status);
        if head.status != 200 {
            return Ok((false, status));
        }
        reader.framing = Some(head.framing);
        head_bytes = std::mem::take(&mut reader.head);
        input = &head_bytes[head.len..];
    }
    let now_us = payload::now_us();
    let mut state = shared.conns[slot].lock().expect("conn state poisoned");
    let mut stats = shared.interval.lock().expect("interval stats poisoned");
    let layout = &shared.plan.layout;
    let conn = shared.plan.first + slot as u64;
    let mut on_frame = |frame: sse::Frame<'_>| {
        on_frame(frame, &mut state, &mut stats, shared, layout, conn, now_us)
    };
    let ended = match reader.framing {
        Some(Framing::Chunked) => reader
            .chunked
            .feed(input, &mut |body| reader.sse.feed(body, &mut on_frame))?,
        _ => {
            reader.sse.feed(input, &mut on_frame);
            false
        }
    };
    Ok((ended, status))
}

fn on_frame(
    frame: sse::Frame<'_>,
    state: &mut ConnState,
    stats: &mut IntervalStats,
    shared: &Shared,
    layout: &Layout,
    conn: u64,
    now_us: u64,
) {
    if let Some(id) = frame.id {
        let last = state.last_id.get_or_insert_with(String::new);
        last.clear();
        last.push_str(id);
    }
    let Some(data) = frame.data else {
        // The gateway's preamble of a fresh connection: its starting position in every topic.
        if let (Some(id), true) = (frame.id, shared.plan.target.resumes()) {
            set_baselines(state, layout, conn, id);
        }
        return;
    };
    if frame.event == Some("ssegw-gap") {
        shared.gap_events.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let parsed = match shared.plan.target {
        Target::Reference => payload::parse_reference(data),
        _ => payload::parse(data),
    };
    let track = parsed.and_then(|p| {
        let track = state.tracks.iter_mut().find(|t| t.topic == p.topic)?;
        Some((track, p))
    });
    match track {
        Some((track, p)) => {
            track.on_event(p.seq);
            stats.delivered += 1;
            stats.latency.record(now_us.saturating_sub(p.sent_us));
        }
        None => {
            shared.unknown_events.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn set_baselines(state: &mut ConnState, layout: &Layout, conn: u64, id: &str) {
    if state.tracks.iter().all(|t| t.baseline.is_some()) {
        return;
    }
    let topics: Vec<u32> = state.tracks.iter().map(|t| t.topic).collect();
    let positions = match topic_set(layout, &topics).map(|set| cursor::decode(&set, id)) {
        Some(Ok(positions)) => positions,
        _ => {
            eprintln!("ssegw-loadtest: connection {conn}: unreadable starting id {id:?}");
            vec![StreamId::ZERO; topics.len()]
        }
    };
    for (track, position) in state.tracks.iter_mut().zip(positions) {
        track.set_baseline(position);
    }
}

#[cfg(test)]
mod tests {
    use super::next_url;

    #[test]
    fn a_reconnect_goes_to_any_other_gateway() {
        assert_eq!(next_url(0, 1, 7), 0);
        assert_eq!(next_url(1, 2, 7), 0);
        let picked: std::collections::BTreeSet<usize> =
            (0..10).map(|r| next_url(1, 3, r)).collect();
        assert_eq!(picked.into_iter().collect::<Vec<_>>(), [0, 2]);
    }
}
