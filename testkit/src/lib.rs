//! ssegw-testkit: starts and controls real `redis-server` (or `valkey-server`) processes on free
//! loopback ports, for the gateway's integration tests and the load tester's `--spawn`. A
//! topology (`Standalone`, `Sentinel`, `Cluster`) owns its `Server`s and kills them on drop.
//! Never a dependency of the gateway's normal build.
//!
//! The program is `redis-server` unless the environment variable `SSEGW_REDIS_SERVER` names
//! another (a path, or a name on `PATH`), such as `valkey-server`: `./test` runs the
//! Redis-backed suites a second time that way. It is read by `ServerOptions::default()`.

mod cluster;
mod resp;
mod server;
mod tls;
mod topology;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

pub use cluster::{slot_of, Cluster, ClusterOptions, SLOTS};
pub use resp::{command, Connection, Reply, COMMAND_TIMEOUT};
pub use server::{die_with_parent, Server, ServerOptions, SERVER_VARIABLE};
pub use tls::{Authority, TlsOptions};
pub use topology::{Sentinel, SentinelOptions, Standalone};

/// Why a server could not be started or controlled. A caller branches on `Spawn` to say the
/// program is required; the other kinds are failures of a server that did start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificates could not be made or written.
    #[error("test certificates: {0}")]
    Tls(String),
    #[error("no free port on 127.0.0.1: {0}")]
    Port(std::io::Error),
    #[error("cannot create the log file {}: {cause}", path.display())]
    Log {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The program could not be started: usually it is not installed.
    #[error("cannot start {binary}: {cause}")]
    Spawn {
        binary: String,
        cause: std::io::Error,
    },
    /// The server exited before it answered PING (a bad flag, a port taken meanwhile).
    #[error("{binary} exited ({status}){}", see(.log.as_deref()))]
    Exited {
        binary: String,
        status: ExitStatus,
        log: Option<PathBuf>,
    },
    #[error("{binary} on port {port} did not answer PING within {within:?}{}", see(.log.as_deref()))]
    NoAnswer {
        binary: String,
        port: u16,
        within: Duration,
        log: Option<PathBuf>,
    },
    /// A signal was asked for a server that was killed or stopped (restart it first).
    #[error("{binary} on port {port} is not running")]
    NotRunning { binary: String, port: u16 },
    #[error("cannot signal {binary} (pid {pid}): {cause}")]
    Signal {
        binary: String,
        pid: u32,
        cause: std::io::Error,
    },
    /// A command could not be sent, or no well-formed reply came back in time.
    #[error("{command} to {addr}: {cause}")]
    Command {
        addr: String,
        /// The command's name only: its arguments may hold a password.
        command: String,
        cause: std::io::Error,
    },
    /// A server refused a command the topology needed, or answered it unexpectedly.
    #[error("{command} to {addr} was answered {reply}")]
    Refused {
        addr: String,
        command: String,
        reply: String,
    },
    /// A topology did not reach a state it waits for (replicas linked, sentinels agreeing, a
    /// new master) within its deadline; `last` says what was still missing.
    #[error("waited {within:?} for {goal}, but {last}{}", see_dir(.logs.as_deref()))]
    Timeout {
        goal: String,
        within: Duration,
        last: String,
        /// Where the topology's processes wrote their logs and configuration.
        logs: Option<PathBuf>,
    },
    /// A sentinel named a master that is none of the group's data nodes.
    #[error(
        "sentinel {sentinel} names {master} as the master, which is not one of the group's nodes"
    )]
    UnknownMaster { sentinel: String, master: String },
    /// A cluster has no live replica of the primary asked about.
    #[error("no node of the cluster is a replica of {primary}")]
    NoReplica { primary: String },
    #[error("cannot write {}: {cause}", path.display())]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// "; see LOG" when the server's output went to a file, for the end of an error message.
fn see(log: Option<&Path>) -> String {
    log.map(|log| format!("; see {}", log.display()))
        .unwrap_or_default()
}

/// "; logs in DIR" when a topology kept its directory, for the end of an error message.
fn see_dir(dir: Option<&Path>) -> String {
    dir.map(|dir| format!("; logs in {}", dir.display()))
        .unwrap_or_default()
}

/// Polls `check` every `interval` until it returns `Ok`, or fails after `within` with the last
/// thing it said was missing (and where the topology's logs are): how a topology waits to
/// settle.
fn poll_until<T>(
    goal: &str,
    within: Duration,
    interval: Duration,
    logs: &Path,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, Error> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let last = match check() {
            Ok(value) => return Ok(value),
            Err(last) => last,
        };
        if std::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                goal: goal.to_string(),
                within,
                last,
                logs: Some(logs.to_path_buf()),
            });
        }
        std::thread::sleep(interval);
    }
}

/// A loopback port that was free a moment ago: the kernel's choice for `127.0.0.1:0`. (Another
/// process may take it before the caller binds it; rare enough for tests.)
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
