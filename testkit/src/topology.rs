//! Redis topologies a test or the load tester runs against, each owning its `Server`s: a
//! `Standalone` server now. Sentinel groups and clusters belong beside it, built from the same
//! `Server` and `ServerOptions`.

use crate::{Error, Server, ServerOptions};

/// One Redis server on its own, no replicas: what `--redis-url redis://…` points at. Killed
/// on drop.
pub struct Standalone {
    server: Server,
}

impl Standalone {
    /// A `redis-server` on a free port with the default options, answering PING.
    pub fn start() -> Result<Standalone, Error> {
        Standalone::start_with(ServerOptions::default())
    }

    /// Like `start`, with these options (another program, extra flags, a log file).
    pub fn start_with(options: ServerOptions) -> Result<Standalone, Error> {
        Ok(Standalone {
            server: Server::start(options)?,
        })
    }

    /// The URL a client connects with: `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The server, for its port, pid and signals.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// The server, to kill, restart or stop it.
    pub fn server_mut(&mut self) -> &mut Server {
        &mut self.server
    }
}
