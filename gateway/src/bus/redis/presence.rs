//! Presence in Redis (see `bus::presence`): the task that writes this replica's report every
//! `--presence-interval`, and a read of the fleet's reports. Commands run through `Commands`
//! (one primary) or `ClusterCommands`; nothing here opens a connection.
//!
//! A report is `TIME` on the node that keeps the registry of reporting replicas
//! (`ssegw:p:replicas`), then this replica's registry entry (scored with that time plus the
//! expiry; entries past theirs are removed), then per topic with local subscribers `SET
//! ssegw:p:{<topic>}:<replica> "<subscribers> <time>" PX <expiry>`, and `DEL` of the report of
//! a topic that lost its last local subscriber. Reports expire in Redis, by Redis's clock, so a
//! replica that dies drops out without anyone's help and no replica's clock matters; the time
//! in the value only tells a reader how old the report is, against the same node's `TIME`.
//!
//! A read is `TIME` and the registry's members, then per topic one `MGET` of every member's
//! report (the topic is their hash tag: one slot, one node in a cluster).

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use ssegw_protocol::script::{presence_key, PRESENCE_REPLICAS};
use ssegw_protocol::Topic;
use tokio_util::sync::CancellationToken;

use super::reply::malformed;
use super::Backend;
use crate::bus::presence::{self, PresenceConfig, Report, Reporter, TopicPresence};
use crate::bus::BusError;
use crate::fanout::hub::Hub;

/// The report task of a replica, and how to stop it.
pub(super) struct Presence {
    /// Cancelled to stop the task, which then withdraws this replica's reports; a child of the
    /// bus's shutdown token.
    stop: CancellationToken,
    /// The task, awaited by `withdraw`.
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Presence {
    /// Starts reporting `hub`'s counts every `config.interval` as `replica`, until `shutdown`
    /// or `withdraw`.
    pub(super) fn start(
        backend: Backend,
        hub: Arc<Hub>,
        config: PresenceConfig,
        replica: String,
        shutdown: &CancellationToken,
    ) -> Presence {
        let stop = shutdown.child_token();
        let task = tokio::spawn(report_every_interval(
            backend,
            hub,
            config,
            replica,
            stop.clone(),
        ));
        Presence {
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }

    /// Stops reporting and removes this replica's reports (a graceful shutdown: its clients,
    /// resuming elsewhere, are not counted twice until the reports expire). Waits at most
    /// `limit`; a report that cannot be removed expires.
    pub(super) async fn withdraw(&self, limit: Duration) {
        self.stop.cancel();
        if let Some(task) = self.task.lock().await.take() {
            if tokio::time::timeout(limit, task).await.is_err() {
                tracing::debug!("presence reports not withdrawn in time; they expire");
            }
        }
    }
}

/// Writes a report every interval until `stop`, then withdraws them all. A report that fails
/// is tried again at the next interval; the first failure of a run is a warning (a Redis user
/// without the presence keys and commands, say), the others are logged at debug level (the
/// canaries report outages).
async fn report_every_interval(
    backend: Backend,
    hub: Arc<Hub>,
    config: PresenceConfig,
    replica: String,
    stop: CancellationToken,
) {
    let mut reporter = Reporter::default();
    let mut failing = false;
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let report = reporter.next(hub.member_counts());
        let written = tokio::select! {
            _ = stop.cancelled() => {
                reporter.failed(&report);
                break;
            }
            written = write(&backend, &replica, config.expiry(), &report) => written,
        };
        match written {
            Ok(()) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("presence reports written again");
                }
                reporter.written(&report);
            }
            Err(e) => {
                if std::mem::replace(&mut failing, true) {
                    tracing::debug!(error = %e, "presence report failed");
                } else {
                    tracing::warn!(error = %e, "presence report failed; this replica's subscribers are not counted by /presence until one succeeds");
                }
                reporter.failed(&report);
            }
        }
    }
    let last = reporter.withdrawal();
    let mut cmds = vec![redis::cmd("ZREM")
        .arg(PRESENCE_REPLICAS)
        .arg(&replica)
        .clone()];
    cmds.extend(last.gone.iter().map(|topic| del(topic, &replica)));
    match run_all(&backend, cmds).await {
        Ok(()) => tracing::debug!(topics = last.gone.len(), "presence reports withdrawn"),
        Err(e) => tracing::debug!(error = %e, "presence reports not withdrawn; they expire"),
    }
}

fn del(topic: &Topic, replica: &str) -> redis::Cmd {
    redis::cmd("DEL").arg(presence_key(topic, replica)).clone()
}

/// Writes one report (see the module's comment): the registry entry first, so that a reader
/// who finds a topic's report also finds whose it is. On one primary the whole report, `TIME`
/// included, goes on one connection of the pool: never on the shared connection, which it would
/// open, and where it would hold up the publishes pipelined behind it.
async fn write(
    backend: &Backend,
    replica: &str,
    expiry: Duration,
    report: &Report,
) -> Result<(), BusError> {
    let expiry_ms = expiry.as_millis() as u64;
    match backend {
        Backend::Single(commands) => {
            let mut conn = commands.connection().await?;
            let time = commands
                .query::<Value>(&redis::cmd("TIME"), &mut conn)
                .await?;
            let now = parse_time(&time).ok_or_else(malformed)?;
            commands
                .run_all(&mut conn, &registry_cmds(replica, expiry_ms, now))
                .await?;
            for topics in topic_cmds(replica, expiry_ms, now, report) {
                commands.run_all(&mut conn, &topics).await?;
            }
            Ok(())
        }
        Backend::Cluster(commands) => {
            let time = commands
                .run_at(PRESENCE_REPLICAS, redis::cmd("TIME"))
                .await?;
            let now = parse_time(&time).ok_or_else(malformed)?;
            commands
                .run_each(registry_cmds(replica, expiry_ms, now))
                .await?;
            for topics in topic_cmds(replica, expiry_ms, now, report) {
                commands.run_each(topics).await?;
            }
            Ok(())
        }
    }
}

/// Topics per pipeline of a report: a report of 10,000 topics built whole held some 3 MB for
/// a moment every interval, which the allocator kept (0.3 KiB more per connection with a
/// topic each).
const REPORT_CHUNK: usize = 500;

/// A report's registry commands at Redis time `now`.
fn registry_cmds(replica: &str, expiry_ms: u64, now: u64) -> Vec<redis::Cmd> {
    vec![
        redis::cmd("ZADD")
            .arg(PRESENCE_REPLICAS)
            .arg(now + expiry_ms)
            .arg(replica)
            .clone(),
        redis::cmd("ZREMRANGEBYSCORE")
            .arg(PRESENCE_REPLICAS)
            .arg("-inf")
            .arg(format!("({now}"))
            .clone(),
    ]
}

/// A report's topic commands at Redis time `now`, built a pipeline (`REPORT_CHUNK`) at a time.
fn topic_cmds<'a>(
    replica: &'a str,
    expiry_ms: u64,
    now: u64,
    report: &'a Report,
) -> impl Iterator<Item = Vec<redis::Cmd>> + 'a {
    let mut cmds = report
        .counts
        .iter()
        .map(move |(topic, subscribers)| {
            redis::cmd("SET")
                .arg(presence_key(topic, replica))
                .arg(presence::value(*subscribers, now))
                .arg("PX")
                .arg(expiry_ms)
                .clone()
        })
        .chain(report.gone.iter().map(move |topic| del(topic, replica)));
    std::iter::from_fn(move || {
        let chunk: Vec<redis::Cmd> = cmds.by_ref().take(REPORT_CHUNK).collect();
        (!chunk.is_empty()).then_some(chunk)
    })
}

async fn run_all(backend: &Backend, cmds: Vec<redis::Cmd>) -> Result<(), BusError> {
    match backend {
        Backend::Single(commands) => {
            let mut conn = commands.connection().await?;
            commands.run_all(&mut conn, &cmds).await
        }
        Backend::Cluster(commands) => commands.run_each(cmds).await.map(drop),
    }
}

/// The fleet's figure for each of `topics`, in order.
pub(super) async fn read(
    backend: &Backend,
    topics: &[Topic],
) -> Result<Vec<TopicPresence>, BusError> {
    let members = redis::cmd("ZRANGE")
        .arg(PRESENCE_REPLICAS)
        .arg(0)
        .arg(-1)
        .clone();
    let (now, replicas) = match backend {
        Backend::Single(commands) => {
            let replies = commands
                .pipeline_shared(&[redis::cmd("TIME"), members])
                .await?;
            match &replies[..] {
                [time, members] => (parse_time(time), parse_texts(members)),
                _ => (None, None),
            }
        }
        Backend::Cluster(commands) => {
            let time = commands
                .run_at(PRESENCE_REPLICAS, redis::cmd("TIME"))
                .await?;
            let members = commands.run_at(PRESENCE_REPLICAS, members).await?;
            (parse_time(&time), parse_texts(&members))
        }
    };
    let (Some(now), Some(replicas)) = (now, replicas) else {
        return Err(malformed());
    };
    if replicas.is_empty() {
        return Ok(vec![TopicPresence::default(); topics.len()]);
    }
    let reads: Vec<redis::Cmd> = topics
        .iter()
        .map(|topic| {
            let mut mget = redis::cmd("MGET");
            for replica in &replicas {
                mget.arg(presence_key(topic, replica));
            }
            mget
        })
        .collect();
    let replies = match backend {
        Backend::Single(commands) => commands.pipeline_shared(&reads).await?,
        Backend::Cluster(commands) => commands.run_each(reads).await?,
    };
    replies
        .iter()
        .map(|reply| {
            let Value::Array(values) = reply else {
                return Err(malformed());
            };
            let reports = values.iter().filter_map(|value| match value {
                Value::BulkString(bytes) => Some(bytes.as_slice()),
                _ => None,
            });
            Ok(presence::tally(now, reports))
        })
        .collect()
}

/// `TIME`'s `[seconds, microseconds]`, in milliseconds.
fn parse_time(reply: &Value) -> Option<u64> {
    let texts = parse_texts(reply)?;
    let [seconds, micros] = &texts[..] else {
        return None;
    };
    Some(seconds.parse::<u64>().ok()? * 1000 + micros.parse::<u64>().ok()? / 1000)
}

/// An array of strings (the registry's members, `TIME`'s two numbers).
fn parse_texts(reply: &Value) -> Option<Vec<String>> {
    let Value::Array(items) = reply else {
        return None;
    };
    items
        .iter()
        .map(|item| match item {
            Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
            Value::SimpleString(text) => Some(text.clone()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn reads_redis_time_in_milliseconds() {
        let reply = Value::Array(vec![bulk("1764763200"), bulk("123456")]);
        assert_eq!(parse_time(&reply), Some(1_764_763_200_123));
        assert_eq!(parse_time(&Value::Array(vec![bulk("1")])), None);
        assert_eq!(parse_time(&Value::Nil), None);
        assert_eq!(
            parse_texts(&Value::Array(vec![bulk("a"), bulk("b")])),
            Some(vec!["a".into(), "b".into()])
        );
    }
}
