//! ssegw-testkit: starts and controls real `redis-server` (or `valkey-server`) processes on free
//! loopback ports, for the gateway's integration tests and the load tester's `--spawn`. A
//! topology (`Standalone` now; Sentinel groups and clusters beside it) owns its `Server`s and
//! kills them on drop. Never a dependency of the gateway's normal build.

mod server;
mod tls;
mod topology;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

pub use server::{die_with_parent, Server, ServerOptions};
pub use tls::{Authority, TlsOptions};
pub use topology::Standalone;

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
}

/// "; see LOG" when the server's output went to a file, for the end of an error message.
fn see(log: Option<&Path>) -> String {
    log.map(|log| format!("; see {}", log.display()))
        .unwrap_or_default()
}

/// A loopback port that was free a moment ago: the kernel's choice for `127.0.0.1:0`. (Another
/// process may take it before the caller binds it; rare enough for tests.)
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
