//! `Server`: one `redis-server` process on a loopback port, and the controls a test needs over
//! it: kill, restart empty, pause, resume, stop. It speaks no Redis protocol beyond PING (the
//! client for the rest is `resp`).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, Error, TlsOptions};

/// The environment variable that names the server program in place of `redis-server`, such as
/// `valkey-server` or a path to it.
pub const SERVER_VARIABLE: &str = "SSEGW_REDIS_SERVER";

/// How a `Server` is started. `ServerOptions::default()` is a quiet `redis-server` (or the
/// program `SSEGW_REDIS_SERVER` names) that has 10 seconds to answer.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The program: `redis-server`, or `valkey-server`, which takes the same flags.
    pub binary: String,
    /// A configuration file, given as the first argument, before the flags: a sentinel's,
    /// which the sentinel rewrites as it learns about the group.
    pub config: Option<PathBuf>,
    /// Flags after the standard ones (`--port P --bind 127.0.0.1 --save "" --appendonly no`).
    pub args: Vec<String>,
    /// Where the server's stdout and stderr go: this file, created afresh at start and
    /// appended to on restart. When `None`, stdout (the server's log) is discarded and stderr
    /// passed through, so that a start-up error still shows.
    pub log: Option<PathBuf>,
    /// SIGKILL the server when the thread that started it ends (`die_with_parent`): for a
    /// harness that may itself be killed. Off by default, since a test's server may outlive
    /// the thread that started it.
    pub die_with_parent: bool,
    /// Longest wait for the server to answer PING after a start or restart.
    pub ready_timeout: Duration,
    /// Speak TLS only, with these certificates: the port is a `--tls-port`, and there is no
    /// plain-text port. (ACL users, such as `--user default off`, go in `args`: a server that
    /// answers PING with `NOAUTH` counts as up.)
    pub tls: Option<TlsOptions>,
}

impl Default for ServerOptions {
    /// The defaults, with the program from the environment (`from_lookup`).
    fn default() -> ServerOptions {
        ServerOptions::from_lookup(|name| std::env::var(name).ok())
    }
}

impl ServerOptions {
    /// The default options, with `binary` from `lookup(SERVER_VARIABLE)` when it is set and
    /// not empty, and `redis-server` otherwise.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> ServerOptions {
        ServerOptions {
            binary: lookup(SERVER_VARIABLE)
                .filter(|binary| !binary.is_empty())
                .unwrap_or_else(|| "redis-server".into()),
            config: None,
            args: Vec::new(),
            log: None,
            die_with_parent: false,
            ready_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// Longest wait for one PING while waiting for a server to come up.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// A server process on a port of its own, with no persistence: a restart starts it empty.
/// Killed on drop.
pub struct Server {
    options: ServerOptions,
    port: u16,
    /// The pid of the running process, or of the last one.
    pid: u32,
    /// The running process; `None` once it is killed, stopped or seen to have exited, so that
    /// no signal goes to a pid the system may have given to another process.
    child: Option<Child>,
}

impl Server {
    /// Starts a server on a free port and waits until it answers PING.
    pub(crate) fn start(options: ServerOptions) -> Result<Server, Error> {
        Server::start_on(options, free_port().map_err(Error::Port)?)
    }

    /// Starts a server on `port`, which the caller chose (a cluster node needs `port + 10000`
    /// free as well), and waits until it answers PING.
    pub(crate) fn start_on(options: ServerOptions, port: u16) -> Result<Server, Error> {
        let mut server = Server {
            options,
            port,
            pid: 0,
            child: None,
        };
        server.spawn(true)?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The pid of the running process (after a kill, of the last one).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the server answers PING within `timeout` (which must not be zero), with PONG
    /// or, where ACL users are required, NOAUTH. A paused server accepts the connection but
    /// does not answer. A TLS server is asked through `redis-cli --tls`.
    pub fn ping(&self, timeout: Duration) -> bool {
        if let Some(tls) = &self.options.tls {
            return self.ping_tls(tls, timeout);
        }
        let answer = || -> std::io::Result<bool> {
            let mut stream = TcpStream::connect_timeout(&self.addr(), timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            stream.write_all(b"PING\r\n")?;
            let mut answer = [0u8; 7];
            stream.read_exact(&mut answer)?;
            Ok(&answer == b"+PONG\r\n" || &answer == b"-NOAUTH")
        };
        answer().unwrap_or(false)
    }

    fn ping_tls(&self, tls: &TlsOptions, timeout: Duration) -> bool {
        let authority = &tls.authority;
        let mut command = Command::new("redis-cli");
        command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "--tls",
                "--cacert",
            ])
            .arg(&authority.ca);
        if tls.require_client_cert {
            command
                .arg("--cert")
                .arg(&authority.client_cert)
                .arg("--key")
                .arg(&authority.client_key);
        }
        let child = command
            .arg("PING")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            return false;
        };
        // redis-cli 7.0 has no timeout of its own: a paused server would hold it forever.
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                let mut text = String::new();
                if let Some(mut out) = child.stdout.take() {
                    let _ = out.read_to_string(&mut text);
                }
                return text.starts_with("PONG") || text.starts_with("NOAUTH");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Kills the server (SIGKILL): every connection to it drops at once. Does nothing when it
    /// is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts it again, empty, on the same port; waits until it answers.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        self.spawn(false)
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) -> Result<(), Error> {
        self.signal(libc::SIGSTOP)
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) -> Result<(), Error> {
        self.signal(libc::SIGCONT)
    }

    /// Asks the server to shut down (SIGTERM) and kills it (SIGKILL) if it has not exited
    /// after `grace`. Does nothing when it is not running.
    pub fn stop(&mut self, grace: Duration) {
        if self.signal(libc::SIGTERM).is_err() {
            self.kill();
            return;
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Starts the process on `self.port` (its log created afresh when `fresh_log`, appended to
    /// otherwise) and waits until it answers PING.
    fn spawn(&mut self, fresh_log: bool) -> Result<(), Error> {
        let options = &self.options;
        let mut command = Command::new(&options.binary);
        if let Some(config) = &options.config {
            command.arg(config);
        }
        match &options.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some(tls) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&tls.authority.server_cert)
                .arg("--tls-key-file")
                .arg(&tls.authority.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.authority.ca)
                .args([
                    "--tls-auth-clients",
                    if tls.require_client_cert { "yes" } else { "no" },
                ]),
        };
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&options.args)
            .stdin(Stdio::null());
        match &options.log {
            Some(path) => {
                let log = if fresh_log {
                    File::create(path)
                } else {
                    File::options().create(true).append(true).open(path)
                };
                let log = log
                    .and_then(|log| Ok((log.try_clone()?, log)))
                    .map_err(|cause| Error::Log {
                        path: path.clone(),
                        cause,
                    })?;
                command.stdout(log.0).stderr(log.1);
            }
            None => {
                command.stdout(Stdio::null());
            }
        }
        if options.die_with_parent {
            die_with_parent(&mut command, libc::SIGKILL);
        }
        let child = command.spawn().map_err(|cause| Error::Spawn {
            binary: options.binary.clone(),
            cause,
        })?;
        self.pid = child.id();
        self.child = Some(child);
        self.wait_ready()
    }

    /// Polls PING until the server answers; fails at once if it exits, and after
    /// `ready_timeout` if it never answers.
    fn wait_ready(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + self.options.ready_timeout;
        loop {
            if self.ping(PING_TIMEOUT) {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(Error::Exited {
                    binary: self.options.binary.clone(),
                    status,
                    log: self.options.log.clone(),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::NoAnswer {
                    binary: self.options.binary.clone(),
                    port: self.port,
                    within: self.options.ready_timeout,
                    log: self.options.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: libc::c_int) -> Result<(), Error> {
        let Some(child) = &self.child else {
            return Err(Error::NotRunning {
                binary: self.options.binary.clone(),
                port: self.port,
            });
        };
        // SAFETY: signalling our own child, which is not reaped yet, so its pid is still its.
        if unsafe { libc::kill(child.id() as libc::pid_t, signal) } != 0 {
            return Err(Error::Signal {
                binary: self.options.binary.clone(),
                pid: child.id(),
                cause: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asks the kernel to send `signal` (SIGKILL, unless the child must clean up after itself) to
/// the child when the harness dies, so nothing is left running even if the harness is killed
/// itself. (Tied to the spawning thread: the child gets the signal when the thread that
/// spawned it ends.)
pub fn die_with_parent(command: &mut Command, signal: libc::c_int) {
    // SAFETY: prctl is async-signal-safe, as required between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_comes_from_the_environment_when_set() {
        let check = |value: Option<&str>, expected: &str| {
            let options = ServerOptions::from_lookup(|name| {
                assert_eq!(name, "SSEGW_REDIS_SERVER");
                value.map(String::from)
            });
            assert_eq!(options.binary, expected, "{value:?}");
        };
        check(None, "redis-server");
        check(Some(""), "redis-server");
        check(Some("valkey-server"), "valkey-server");
        check(
            Some("/opt/valkey/bin/valkey-server"),
            "/opt/valkey/bin/valkey-server",
        );
    }
}
