//! `Commands`: the command connections to the Redis primary, used by the request handlers and
//! the subscriber task: `FCALL`s with a timeout, the function library loaded again when Redis
//! lost it, and pipelined reads of many topics. The only place that runs commands. Errors that
//! say the node may no longer be the primary tell the `Endpoint`, and the connections follow the
//! primary it names.
//!
//! Publishes and history reads are pipelined on one shared connection (redis-rs's
//! `MultiplexedConnection`): concurrent calls never wait for each other's round trips, and none
//! pays for a pool checkout, which costs deadpool-redis a round trip of its own (`UNWATCH` +
//! `PING`). What needs a connection to itself takes one from the pool (deadpool): a publish
//! followed by its `WAIT`, the subscriber's library check, backfills and canaries, and a
//! replica's presence report (`run_all`, pipelines of one command per topic).

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use ssegw_protocol::script;
use ssegw_protocol::{StreamId, Topic};

use super::endpoint::Endpoint;
use super::library::{self, Functions};
use super::reply::{classify, explain, malformed, parse_page, unavailable};
use crate::bus::{BusError, Page};
use crate::config::Durability;
use crate::telemetry::stats::Stats;

/// `FCALL ssegw_read 1 ssegw:s:{<topic>} <after> <count>`; without `after`, only the head is
/// asked for. The stream key, not the topic, is the declared key: during a cluster slot
/// migration, Redis runs the call where the stream is.
pub(super) fn read_cmd(topic: &Topic, after: Option<StreamId>, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(script::READ_FUNCTION)
        .arg(1)
        .arg(script::stream_key(topic))
        .arg(after.map_or(String::new(), |id| id.to_string()))
        .arg(count);
    cmd
}

/// `XRANGE ssegw:s:{<topic>} <after> + COUNT <count + 1>`: a resume page read without the
/// library when the position is an event the stream holds (`reply::parse_range`). A plain
/// `XRANGE` costs Redis a fraction of `ssegw_read`, whose time goes to turning the entries into
/// Lua values and back (BENCHMARKS.md, 2026-12-03, the publish path).
pub(super) fn range_cmd(topic: &Topic, after: StreamId, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(script::stream_key(topic))
        .arg(after.to_string())
        .arg("+")
        .arg("COUNT")
        .arg(count + 1);
    cmd
}

/// `XREVRANGE ssegw:s:{<topic>} + - COUNT <count>`: the topic's newest events, newest first
/// (`GET /history` without a position). No gap can apply: nothing is asked after a position.
pub(super) fn newest_cmd(topic: &Topic, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("XREVRANGE");
    cmd.arg(script::stream_key(topic))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(count);
    cmd
}

/// Most commands sent in one pipeline by `Commands::run_all`: bounds the buffers on both
/// sides, and a replica's report of many topics goes out in several.
const PIPELINE_MAX: usize = 1024;

/// Command-connection work shared by request handlers and the subscriber task.
#[derive(Clone)]
pub(super) struct Commands {
    pub(super) pools: Arc<Pools>,
    /// The library to load, and the fleet's retention table.
    pub(super) functions: Arc<Functions>,
    /// Where the library version found in Redis is shown (`/status`, metrics); `None` for the
    /// `publish` command.
    pub(super) stats: Option<Arc<Stats>>,
    pub(super) timeout: Duration,
}

/// The connections to the current primary: built for the address the endpoint names, and
/// built anew for another address once the endpoint's epoch says the primary may have moved
/// (connections to the old one are dropped as their users let go of them).
pub(super) struct Pools {
    endpoint: Arc<Endpoint>,
    size: usize,
    timeout: Duration,
    /// The connections, the address they go to and the epoch it was checked at. Held only to
    /// read or replace them, never across an `.await`.
    current: std::sync::Mutex<Option<Current>>,
    /// One caller at a time asks the endpoint for the primary or opens the shared connection;
    /// the others wait for its answer.
    resolving: tokio::sync::Mutex<()>,
    /// Callers waiting for the shared connection (for `resolving`, or in it). While there are
    /// any, a new caller queues behind them even if the connection is open by now, so that
    /// calls reach it in the order they were made: a connection's pipelined publishes, which
    /// arrive as one caller each, keep their order when the first ones wait for it to open.
    waiting_for_shared: std::sync::atomic::AtomicUsize,
    /// Numbers the shared connections, so that a caller discards only the one it saw fail.
    next_shared: std::sync::atomic::AtomicU64,
}

struct Current {
    epoch: u64,
    address: String,
    client: redis::Client,
    /// Connections used by one caller at a time.
    pool: Pool,
    /// The connection every caller pipelines on, once one was opened; `None` again after a
    /// call on it failed, so that the next caller opens another.
    shared: Option<Shared>,
}

/// The shared connection to the primary: clones of it send on the same socket. Its driver task
/// runs on the runtime of the caller that opened it, in practice a request handler's worker.
#[derive(Clone)]
pub(super) struct Shared {
    id: u64,
    conn: MultiplexedConnection,
}

impl Pools {
    pub(super) fn new(endpoint: Arc<Endpoint>, size: usize, timeout: Duration) -> Pools {
        Pools {
            endpoint,
            size,
            timeout,
            current: std::sync::Mutex::new(None),
            resolving: tokio::sync::Mutex::new(()),
            waiting_for_shared: std::sync::atomic::AtomicUsize::new(0),
            next_shared: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(super) fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Connections of either kind: no response timeout of redis-rs's own (500 ms by default,
    /// which would cut a longer `WAIT` or a slow call short); every call is bounded by ours.
    fn connection_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(None)
    }

    /// What `pick` takes from the connections, if they are for the endpoint's current epoch.
    fn checked<R>(&self, pick: impl FnOnce(&Current) -> Option<R>) -> Option<R> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current
            .as_ref()
            .filter(|c| c.epoch == self.endpoint.epoch())
            .and_then(pick)
    }

    /// The pool for the primary as of the endpoint's current epoch.
    async fn pool(&self) -> Result<Pool, BusError> {
        if let Some(pool) = self.checked(|c| Some(c.pool.clone())) {
            return Ok(pool);
        }
        let _resolving = self.resolving.lock().await;
        self.resolve(|c| c.pool.clone()).await
    }

    /// The shared connection to the primary as of the endpoint's current epoch, opened if
    /// there is none.
    async fn shared(&self) -> Result<Shared, BusError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.waiting_for_shared.load(SeqCst) == 0 {
            if let Some(shared) = self.checked(|c| c.shared.clone()) {
                return Ok(shared);
            }
        }
        /// Counts its caller among those waiting until it returns (or is dropped).
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, SeqCst);
            }
        }
        self.waiting_for_shared.fetch_add(1, SeqCst);
        let _waiting = Waiting(&self.waiting_for_shared);
        // Bounded: behind a caller whose connect hangs (a blackholed primary), the queue would
        // otherwise wait one timeout per caller ahead of it.
        let Ok(_resolving) = tokio::time::timeout(self.timeout, self.resolving.lock()).await else {
            return Err(BusError::Unavailable(
                "connecting to Redis timed out".into(),
            ));
        };
        if let Some(shared) = self.checked(|c| c.shared.clone()) {
            return Ok(shared);
        }
        let (epoch, client) = self.resolve(|c| (c.epoch, c.client.clone())).await?;
        let config = self.connection_config();
        let conn = match tokio::time::timeout(
            self.timeout,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                self.suspect(&e);
                return Err(unavailable(e));
            }
            Err(_) => {
                self.endpoint.moved("the primary did not answer in time");
                return Err(BusError::Unavailable(
                    "connecting to Redis timed out".into(),
                ));
            }
        };
        let shared = Shared {
            id: self
                .next_shared
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            conn,
        };
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        // Kept only for the primary it was opened to; after a move it serves this call alone.
        if let Some(current) = current.as_mut().filter(|c| c.epoch == epoch) {
            current.shared = Some(shared.clone());
        }
        Ok(shared)
    }

    /// A call on shared connection `id` failed: the next caller opens another. A connection
    /// opened meanwhile stays.
    fn discard(&self, id: u64) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = current.as_mut() {
            if current.shared.as_ref().is_some_and(|s| s.id == id) {
                current.shared = None;
            }
        }
    }

    /// `pick` from the connections for the endpoint's current epoch, asking the endpoint for
    /// the primary first if the epoch moved. Called holding `resolving`.
    async fn resolve<R>(&self, pick: impl FnOnce(&Current) -> R) -> Result<R, BusError> {
        {
            let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(current) = current
                .as_ref()
                .filter(|c| c.epoch == self.endpoint.epoch())
            {
                return Ok(pick(current));
            }
        }
        let epoch = self.endpoint.epoch();
        let info = self.endpoint.primary().await?;
        let address = format!("{:?}", info.addr());
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match current.as_mut() {
            Some(same) if same.address == address => same.epoch = epoch,
            _ => {
                if current.is_some() {
                    tracing::warn!(redis = %self.endpoint.address(), "following the primary to another node");
                }
                // The manager straight from the connection info: deadpool-redis's own `Config`
                // copies the address without its TLS parameters (the CA, the client
                // certificate).
                let manager = deadpool_redis::Manager::new_with_config(
                    info.clone(),
                    self.connection_config(),
                )
                .map_err(unavailable)?;
                let pool = Pool::builder(manager)
                    .max_size(self.size)
                    // deadpool waits forever by default; a drained pool must fail like a dead
                    // Redis.
                    .wait_timeout(Some(self.timeout))
                    .create_timeout(Some(self.timeout))
                    .recycle_timeout(Some(self.timeout))
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(|e| BusError::Unavailable(e.to_string()))?;
                *current = Some(Current {
                    epoch,
                    address,
                    client: redis::Client::open(info).map_err(unavailable)?,
                    pool,
                    shared: None,
                });
            }
        }
        Ok(pick(current.as_ref().expect("just set")))
    }

    /// After an error that says the node may no longer be the primary (it is read-only now,
    /// or unreachable), the endpoint asks the sentinels again.
    fn suspect(&self, e: &redis::RedisError) {
        if e.code() == Some("READONLY") {
            self.endpoint.moved("the node answered READONLY");
        } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            self.endpoint.moved("the connection to the primary failed");
        }
    }
}

impl Commands {
    /// A connection of the pool, to use alone.
    pub(super) async fn connection(&self) -> Result<deadpool_redis::Connection, BusError> {
        let pool = self.pools.pool().await?;
        pool.get().await.map_err(|e| match e {
            deadpool_redis::PoolError::Backend(e) => {
                self.suspect(&e);
                unavailable(e)
            }
            other => BusError::Unavailable(other.to_string()),
        })
    }

    /// The shared connection, for calls that need no connection to themselves.
    pub(super) async fn shared(&self) -> Result<Shared, BusError> {
        self.pools.shared().await
    }

    fn suspect(&self, e: &redis::RedisError) {
        self.pools.suspect(e)
    }

    /// Runs an `FCALL` on the shared connection, loading the library first if Redis lost it (a
    /// restart without persistence, `FUNCTION FLUSH`).
    ///
    /// A `READONLY` answer means the node was demoted and the call did nothing: it is sent once
    /// more, to the primary the sentinels name now.
    pub(super) async fn fcall<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, BusError> {
        match self.fcall_shared(self.shared().await?, cmd).await {
            Err(BusError::Unavailable(reason)) if reason.contains("READONLY") => {
                self.fcall_shared(self.shared().await?, cmd).await
            }
            other => other,
        }
    }

    /// `fcall_on` the shared connection. An outage drops the connection for every caller: it
    /// may be broken (a cut, or a link that no longer answers, which redis-rs does not notice
    /// by itself), and opening another costs one round trip.
    pub(super) async fn fcall_shared<T: redis::FromRedisValue>(
        &self,
        mut shared: Shared,
        cmd: &redis::Cmd,
    ) -> Result<T, BusError> {
        let result = self.fcall_on(&mut shared.conn, cmd).await;
        if let Err(BusError::Unavailable(_)) = &result {
            self.pools.discard(shared.id);
        }
        result
    }

    /// `fcall` on a connection of the pool, returning the connection too.
    async fn fcall_holding<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<(deadpool_redis::Connection, T), BusError> {
        let mut conn = self.connection().await?;
        match self.fcall_on(&mut conn, cmd).await {
            Err(BusError::Unavailable(reason)) if reason.contains("READONLY") => {
                drop(conn);
                let mut conn = self.connection().await?;
                let value = self.fcall_on(&mut conn, cmd).await?;
                Ok((conn, value))
            }
            other => other.map(|value| (conn, value)),
        }
    }

    /// Runs the publish `FCALL`, then `WAIT`s on the same connection for `durability`'s
    /// replicas; returns the id and how many replicas confirmed every write on the connection
    /// so far. A demoted node's `READONLY` is retried as in `fcall`.
    ///
    /// Both run on a connection of the pool, not the shared one. `WAIT` counts the writes of
    /// its connection up to itself, so on the shared one it would still confirm this event
    /// (and others' too: a conservative answer), but it blocks its connection in Redis until
    /// the replicas answer, and every call pipelined behind it would wait as long.
    pub(super) async fn fcall_confirmed(
        &self,
        cmd: &redis::Cmd,
        durability: Durability,
    ) -> Result<(String, u32), BusError> {
        let (mut conn, id): (_, String) = self.fcall_holding(cmd).await?;
        let confirmed = self.wait(&mut conn, durability).await;
        Ok((id, confirmed))
    }

    /// `WAIT`s on `conn` for `durability`'s replicas: how many confirmed every write made on
    /// the connection so far (0 when the `WAIT` failed).
    async fn wait(&self, conn: &mut deadpool_redis::Connection, durability: Durability) -> u32 {
        let mut wait = redis::cmd("WAIT");
        wait.arg(durability.replicas)
            .arg(durability.timeout.as_millis() as u64);
        // WAIT answers by its own timeout; ours only guards against a Redis that stopped.
        match tokio::time::timeout(
            durability.timeout + self.timeout,
            wait.query_async::<u32>(conn),
        )
        .await
        {
            Ok(Ok(confirmed)) => confirmed,
            Ok(Err(e)) => {
                self.suspect(&e);
                tracing::warn!(error = %explain(&e), "WAIT for replicas failed");
                0
            }
            Err(_) => 0,
        }
    }

    pub(super) async fn fcall_on<T: redis::FromRedisValue>(
        &self,
        conn: &mut MultiplexedConnection,
        cmd: &redis::Cmd,
    ) -> Result<T, BusError> {
        match self.query(cmd, conn).await {
            Err(BusError::Rejected(msg)) if msg.contains("Function not found") => {
                self.load_library(conn).await?;
                match self.query(cmd, conn).await {
                    // Still missing: an outage to retry, never the caller's fault.
                    Err(BusError::Rejected(msg)) if msg.contains("Function not found") => {
                        Err(BusError::Unavailable(msg))
                    }
                    other => other,
                }
            }
            other => other,
        }
    }

    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        conn: &mut MultiplexedConnection,
    ) -> Result<T, BusError> {
        self.bounded(cmd.query_async(conn)).await
    }

    /// A call within the timeout; a primary that does not answer in time, or that the error
    /// says may have moved, is reported to the endpoint.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BusError> {
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => {
                self.pools
                    .endpoint
                    .moved("the primary did not answer in time");
                Err(BusError::Unavailable("Redis did not answer in time".into()))
            }
            Ok(result) => result.map_err(|e| {
                self.suspect(&e);
                classify(e)
            }),
        }
    }

    /// Makes sure Redis has the function library: loads it (`FUNCTION LOAD REPLACE`), or,
    /// with `--redis-install-functions false`, only checks that an administrator did.
    pub(super) async fn load_library(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> Result<(), BusError> {
        // One command at a time on `conn`: the closure borrows it for each.
        let conn = tokio::sync::Mutex::new(conn);
        let run = |cmd: redis::Cmd| {
            let conn = &conn;
            async move {
                let mut conn = conn.lock().await;
                self.query::<Value>(&cmd, &mut conn).await
            }
        };
        let record = |version| self.record_library(version);
        library::ensure(&self.functions, self.pools.endpoint.address(), run, record).await
    }

    /// Loads `retention` in the library on the primary (`sse-gateway namespace`).
    pub(super) async fn load_retention(
        &self,
        retention: &ssegw_protocol::retention::Retention,
    ) -> Result<(), BusError> {
        let mut conn = self.connection().await?;
        let conn = tokio::sync::Mutex::new(&mut conn);
        let run = |cmd: redis::Cmd| {
            let conn = &conn;
            async move {
                let mut conn = conn.lock().await;
                self.query::<Value>(&cmd, &mut conn).await
            }
        };
        library::load_retention(
            &self.functions,
            self.pools.endpoint.address(),
            run,
            retention,
        )
        .await
    }

    /// Runs a pipeline on `conn` (see `bounded`).
    async fn query_pipe<T: redis::FromRedisValue, C: redis::aio::ConnectionLike>(
        &self,
        pipe: &redis::Pipeline,
        conn: &mut C,
    ) -> Result<T, BusError> {
        self.bounded(pipe.query_async(conn)).await
    }

    /// Runs several publish `FCALL`s in one pipeline on one connection, then, for
    /// `durability`, one `WAIT` for all of them; one result per call, and how many replicas
    /// confirmed them all. A connection that fails part-way fails the calls it did not answer.
    pub(super) async fn fcall_many(
        &self,
        cmds: &[redis::Cmd],
        durability: Option<Durability>,
    ) -> Result<(Vec<Result<String, BusError>>, Option<u32>), BusError> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for cmd in cmds {
            pipe.add_command(cmd.clone());
        }
        let mut replies: Vec<redis::RedisResult<String>> =
            self.query_pipe(&pipe, &mut conn).await?;
        // Redis lost the library (all calls then failed alike): load it, and send again only
        // the calls that did not run.
        let missing = |r: &redis::RedisResult<String>| {
            r.as_ref()
                .err()
                .and_then(|e| e.detail())
                .is_some_and(|d| d.contains("Function not found"))
        };
        if replies.iter().any(missing) {
            self.load_library(&mut conn).await?;
            let mut again = redis::pipe();
            again.ignore_errors();
            let resend: Vec<usize> = (0..replies.len())
                .filter(|&i| missing(&replies[i]))
                .collect();
            for &i in &resend {
                again.add_command(cmds[i].clone());
            }
            let answers: Vec<redis::RedisResult<String>> =
                self.query_pipe(&again, &mut conn).await?;
            for (i, answer) in resend.into_iter().zip(answers) {
                replies[i] = answer;
            }
        }
        let confirmed = match durability {
            None => None,
            Some(durability) => Some(self.wait(&mut conn, durability).await),
        };
        Ok((
            replies.into_iter().map(|r| r.map_err(classify)).collect(),
            confirmed,
        ))
    }

    /// Runs `cmds` in order on `conn`, a connection of the pool, in pipelines of at most
    /// `PIPELINE_MAX` commands (a replica's presence report: one command per topic), not on the
    /// shared connection, where publishes would wait behind them. Replies are dropped; the
    /// first error fails the call, and the commands after it may or may not have run.
    pub(super) async fn run_all(
        &self,
        conn: &mut deadpool_redis::Connection,
        cmds: &[redis::Cmd],
    ) -> Result<(), BusError> {
        for chunk in cmds.chunks(PIPELINE_MAX) {
            let mut pipe = redis::pipe();
            for cmd in chunk {
                pipe.add_command(cmd.clone()).ignore();
            }
            self.query_pipe::<(), _>(&pipe, conn).await?;
        }
        Ok(())
    }

    /// Runs `cmds` in one pipeline on the shared connection (reads of a request: a presence
    /// read); one reply each, in order.
    pub(super) async fn pipeline_shared(
        &self,
        cmds: &[redis::Cmd],
    ) -> Result<Vec<Value>, BusError> {
        let mut shared = self.shared().await?;
        let mut pipe = redis::pipe();
        for cmd in cmds {
            pipe.add_command(cmd.clone());
        }
        let result = self.query_pipe(&pipe, &mut shared.conn).await;
        if let Err(BusError::Unavailable(_)) = &result {
            self.pools.discard(shared.id);
        }
        result
    }

    fn record_library(&self, version: u64) {
        if let Some(stats) = &self.stats {
            stats
                .redis_library
                .store(version, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Reads several topics in one pipelined round trip: `count` events after each position,
    /// or only the head where no position is given. On a connection of the pool: the
    /// subscriber's backfills run on its own runtime, where the shared connection's driver
    /// should not be started.
    pub(super) async fn read_many(
        &self,
        requests: &[(&Topic, Option<StreamId>)],
        count: usize,
    ) -> Result<Vec<Page>, BusError> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        for (topic, after) in requests {
            pipe.add_command(read_cmd(topic, *after, count));
        }
        let replies: Vec<Value> = self.query_pipe(&pipe, &mut conn).await?;
        replies
            .into_iter()
            .map(parse_page)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(malformed)
    }
}
