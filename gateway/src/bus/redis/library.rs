//! The function library in a Redis node: finding which version (and which kind of channels)
//! it has, and loading this replica's when it is missing or older. The only place that sends
//! `FUNCTION LOAD`. It runs commands through whatever connection its caller hands it: the
//! standalone pool's, or the cluster connection routed to one primary.

use std::future::Future;

use redis::Value;
use ssegw_protocol::script;

use crate::bus::BusError;

/// What the caller needs to load or check the library on one node.
pub(super) struct Library<'a> {
    /// `FUNCTION LOAD REPLACE`'s argument.
    pub(super) code: &'a str,
    /// What `ssegw_channels` answers for `code`: `"sharded"` or `"global"`.
    pub(super) channels: &'static str,
    /// `--redis-install-functions`: load the library when it is missing, or only say so.
    pub(super) install: bool,
}

/// Makes sure the node `run` talks to has a usable library. `run` sends one command to that
/// node; `record` is told the version the node has, first as found (0 for none), then as
/// loaded.
///
/// A newer library is kept (a newer replica loaded it during a rolling upgrade, and it answers
/// older gateways' calls); an older or missing one is replaced, unless `install` is false.
/// Either way its channels must be the kind this replica subscribes to, or it would deliver
/// nothing live.
pub(super) async fn ensure<F, Fut>(
    library: &Library<'_>,
    node: &str,
    run: F,
    record: impl Fn(u64),
) -> Result<(), BusError>
where
    F: Fn(redis::Cmd) -> Fut,
    Fut: Future<Output = Result<Value, BusError>>,
{
    let found = version(&run).await?;
    record(found.unwrap_or(0));
    let ours = script::LIBRARY_VERSION;
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
        Some(theirs) if theirs == ours && !library.install => true,
        _ if !library.install => {
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
                if library.channels == "sharded" {
                    " --sharded"
                } else {
                    ""
                },
            )));
        }
        _ => false,
    };
    if keep {
        let theirs = channels(&run).await?;
        if theirs != library.channels {
            return Err(BusError::Unavailable(format!(
                "the {} function library on {node} publishes on {theirs} channels, and this \
                 replica subscribes to {} ones: load the library made for this topology \
                 (`sse-gateway script{}`)",
                script::LIBRARY_NAME,
                library.channels,
                if library.channels == "sharded" {
                    " --sharded"
                } else {
                    ""
                },
            )));
        }
        return Ok(());
    }
    let mut load = redis::cmd("FUNCTION");
    load.arg("LOAD").arg("REPLACE").arg(library.code);
    run(load).await?;
    if let Some(older) = found.filter(|found| *found < ours) {
        tracing::info!(from = older, to = ours, %node, "upgraded the ssegw function library in Redis");
    }
    record(ours);
    Ok(())
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
        Ok(Value::BulkString(kind)) => Ok(String::from_utf8_lossy(&kind).into_owned()),
        Ok(Value::SimpleString(kind)) => Ok(kind),
        Ok(other) => Err(BusError::Unavailable(format!(
            "{} answered {other:?}",
            script::CHANNELS_FUNCTION
        ))),
        Err(BusError::Rejected(message)) if message.contains("Function not found") => {
            Ok("global".into())
        }
        Err(e) => Err(e),
    }
}
