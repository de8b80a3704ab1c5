//! The function library in a Redis node: finding which version (which kind of channels, which
//! retention table) it has, loading this replica's when it is missing or older, and bringing
//! the fleet's newest retention table to every node. The only place that sends `FUNCTION LOAD`. It runs commands through whatever connection its caller hands it: the
//! standalone pool's, or the cluster connection routed to one primary.

use std::future::Future;
use std::sync::{Arc, Mutex};

use redis::Value;
use ssegw_protocol::retention::{Limits, Retention};
use ssegw_protocol::script::{self, ScriptSettings};

use super::reply::text_reply;
use crate::bus::BusError;

/// The library this replica loads, and the fleet's retention table as far as it has seen it.
///
/// The retention lives in Redis, compiled into the library; a replica's `--history-*` and
/// `--max-event-bytes` flags only seed a Redis that has no library yet. Of two tables the newer
/// generation wins (then the larger text, so that seeds of equal generation settle on one):
/// a node found with an older table than another node's gets the newer one, so the nodes of a
/// cluster converge after a change that reached only some of them, or a node that was loaded
/// from a stale seed.
pub(in crate::bus::redis) struct Functions {
    /// Publish on sharded channels (Redis Cluster).
    pub(in crate::bus::redis) sharded: bool,
    /// `--redis-install-functions`: load the library when it is missing, or only say so.
    pub(in crate::bus::redis) install: bool,
    /// The table for a Redis that has none: this replica's flags, generation 0.
    seed: Retention,
    /// The newest table seen on any node, shared with every request that checks a publish
    /// against it. Held only to read or replace it.
    newest: Mutex<Option<Arc<Retention>>>,
}

impl Functions {
    pub(in crate::bus::redis) fn new(seed: Limits, sharded: bool, install: bool) -> Functions {
        Functions {
            sharded,
            install,
            seed: Retention::new(seed, 0),
            newest: Mutex::new(None),
        }
    }

    /// What `ssegw_channels` answers for this replica's library.
    pub(in crate::bus::redis) fn channels(&self) -> &'static str {
        if self.sharded {
            "sharded"
        } else {
            "global"
        }
    }

    fn settings(&self, retention: Retention) -> ScriptSettings {
        ScriptSettings {
            retention,
            sharded: self.sharded,
        }
    }

    /// The newest table seen in Redis; `None` before any was read.
    pub(in crate::bus::redis) fn retention(&self) -> Option<Arc<Retention>> {
        self.newest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The table to load where a node has none, or an older one.
    fn wanted(&self) -> Retention {
        self.retention()
            .map_or_else(|| self.seed.clone(), |newest| (*newest).clone())
    }

    /// Keeps `seen` if it is newer than what was seen so far.
    pub(in crate::bus::redis) fn observe(&self, seen: &Retention) {
        let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        if newest.as_ref().is_none_or(|known| newer(seen, known)) {
            *newest = Some(Arc::new(seen.clone()));
        }
    }
}

/// True when `a` is the newer of two tables.
fn newer(a: &Retention, b: &Retention) -> bool {
    (a.generation(), a.to_text()) > (b.generation(), b.to_text())
}

/// Makes sure the node `run` talks to has a usable library with the fleet's retention. `run`
/// sends one command to that node; `record` is told the version the node has, first as found
/// (0 for none), then as loaded.
///
/// A newer library is kept (a newer replica loaded it during a rolling upgrade, and it answers
/// older gateways' calls); an older or missing one is replaced, unless `install` is false, and
/// so is one of this version with an older retention table than another node's. Either way its
/// channels must be the kind this replica subscribes to, or it would deliver nothing live.
pub(super) async fn ensure<F, Fut>(
    functions: &Functions,
    node: &str,
    run: F,
    record: impl Fn(u64),
) -> Result<(), BusError>
where
    F: Fn(redis::Cmd) -> Fut,
    Fut: Future<Output = Result<Value, BusError>>,
{
    // Twice at most: a library that appeared between our look and our load (another replica
    // starting at the same instant, or one from before `ssegw_version`) is looked at again,
    // and replaced if it is still not versioned.
    let mut unversioned = false;
    for _ in 0..2 {
        let found = version(&run).await?;
        record(found.unwrap_or(0));
        let theirs = match found {
            Some(v) if v >= 4 => Some(retention(&run).await?),
            _ => None,
        };
        if let Some(theirs) = &theirs {
            functions.observe(theirs);
        }
        let ours = script::LIBRARY_VERSION;
        let stale = theirs
            .as_ref()
            .is_some_and(|theirs| newer(&functions.wanted(), theirs));
        let keep = match found {
            Some(theirs) if theirs > ours => {
                tracing::warn!(
                    redis = theirs,
                    replica = ours,
                    %node,
                    "Redis has a newer ssegw function library than this replica: keeping it; \
                     upgrade this replica"
                );
                true
            }
            Some(theirs) if theirs == ours && (!stale || !functions.install) => true,
            _ if !functions.install => {
                let what = match found {
                    None => "is not in Redis".to_string(),
                    Some(older) => {
                        format!("in Redis is version {older}, older than this replica's {ours}")
                    }
                };
                return Err(BusError::Unavailable(format!(
                    "the {} function library on {node} {what}, and --redis-install-functions is \
                     false: load this replica's once with `sse-gateway script{} | redis-cli -x \
                     FUNCTION LOAD REPLACE`",
                    script::LIBRARY_NAME,
                    if functions.sharded { " --sharded" } else { "" },
                )));
            }
            _ => false,
        };
        if keep {
            let theirs = channels(&run).await?;
            if theirs != functions.channels() {
                return Err(BusError::Unavailable(format!(
                    "the {} function library on {node} publishes on {theirs} channels, and this \
                     replica subscribes to {} ones: load the library made for this topology \
                     (`sse-gateway script{}`)",
                    script::LIBRARY_NAME,
                    functions.channels(),
                    if functions.sharded { " --sharded" } else { "" },
                )));
            }
            return Ok(());
        }
        let wanted = functions.wanted();
        // Where there is no library, another replica may be loading one right now: load only if
        // there is still none, and look again otherwise.
        match load(
            &run,
            &functions.settings(wanted.clone()),
            found.is_some() || unversioned,
        )
        .await
        {
            Err(BusError::Rejected(message) | BusError::Unavailable(message))
                if message.contains("already exists") =>
            {
                unversioned = true;
                continue;
            }
            other => other?,
        }
        match found {
            Some(older) if older < ours => {
                tracing::info!(from = older, to = ours, %node, "upgraded the ssegw function library in Redis")
            }
            Some(_) => tracing::info!(
                generation = wanted.generation(),
                %node,
                "brought the fleet's newer retention table to this node"
            ),
            None => {
                tracing::info!(generation = wanted.generation(), %node, "loaded the ssegw function library")
            }
        }
        functions.observe(&wanted);
        record(ours);
        return Ok(());
    }
    Err(BusError::Unavailable(format!(
        "the {} function library on {node} keeps changing under this replica",
        script::LIBRARY_NAME
    )))
}

/// `FUNCTION LOAD [REPLACE]` of the library with `settings`.
async fn load<F, Fut>(run: &F, settings: &ScriptSettings, replace: bool) -> Result<(), BusError>
where
    F: Fn(redis::Cmd) -> Fut,
    Fut: Future<Output = Result<Value, BusError>>,
{
    let mut load = redis::cmd("FUNCTION");
    load.arg("LOAD");
    if replace {
        load.arg("REPLACE");
    }
    load.arg(script::function_library(settings));
    run(load).await.map(|_| ())
}

/// Loads `retention` on the node `run` talks to, replacing its library (`sse-gateway
/// namespace`). Refused where the node has a newer library than this build: loading ours would
/// take its newer functions away from the replicas that use them.
pub(super) async fn load_retention<F, Fut>(
    functions: &Functions,
    node: &str,
    run: F,
    retention: &Retention,
) -> Result<(), BusError>
where
    F: Fn(redis::Cmd) -> Fut,
    Fut: Future<Output = Result<Value, BusError>>,
{
    if let Some(theirs) = version(&run).await? {
        if theirs > script::LIBRARY_VERSION {
            return Err(BusError::Unavailable(format!(
                "{node} has version {theirs} of the {} function library, newer than this \
                 program's {}: change the retention with the newer sse-gateway",
                script::LIBRARY_NAME,
                script::LIBRARY_VERSION
            )));
        }
    }
    load(&run, &functions.settings(retention.clone()), true).await?;
    functions.observe(retention);
    Ok(())
}

/// The retention table a library of version 4 or later holds (`FCALL ssegw_retention 0`).
async fn retention<F, Fut>(run: &F) -> Result<Retention, BusError>
where
    F: Fn(redis::Cmd) -> Fut,
    Fut: Future<Output = Result<Value, BusError>>,
{
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(script::RETENTION_FUNCTION).arg(0);
    let text = text_reply(run(cmd).await?)?;
    Retention::parse(&text)
        .map_err(|e| BusError::Unavailable(format!("{} answered {e}", script::RETENTION_FUNCTION)))
}

/// The version of the library the node has (`FCALL ssegw_version 0`): `None` when it has none,
/// or only one from before versions (1).
async fn version<F, Fut>(run: &F) -> Result<Option<u64>, BusError>
where
    F: Fn(redis::Cmd) -> Fut,
    Fut: Future<Output = Result<Value, BusError>>,
{
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(script::VERSION_FUNCTION).arg(0);
    match run(cmd).await {
        Ok(Value::Int(version)) => Ok(Some(version.max(0) as u64)),
        Ok(other) => Err(BusError::Unavailable(format!(
            "{} answered {other:?}, not a version",
            script::VERSION_FUNCTION
        ))),
        Err(BusError::Rejected(message)) if message.contains("Function not found") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The kind of channels the node's library publishes on; libraries before version 3 only
/// knew global ones.
async fn channels<F, Fut>(run: &F) -> Result<String, BusError>
where
    F: Fn(redis::Cmd) -> Fut,
    Fut: Future<Output = Result<Value, BusError>>,
{
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(script::CHANNELS_FUNCTION).arg(0);
    match run(cmd).await {
        Ok(kind) => text_reply(kind),
        Err(BusError::Rejected(message)) if message.contains("Function not found") => {
            Ok("global".into())
        }
        Err(e) => Err(e),
    }
}
