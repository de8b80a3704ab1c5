//! `--spawn`: a local `redis-server` on a free port and gateway replicas from the built binary,
//! started, killed on request and always torn down: on drop, on Ctrl-C (the orchestrator drops
//! the fleet) and, through `PR_SET_PDEATHSIG`, even when the harness itself is killed.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Longest wait for Redis to answer and for a replica's `/readyz` to say 200.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Fleet {
    pub redis: Proc,
    pub replicas: Vec<Proc>,
    pub redis_url: String,
    /// Where each process's output goes, named after it.
    pub log_dir: PathBuf,
}

/// A child process of the fleet and what was seen of it.
pub struct Proc {
    pub name: String,
    /// Gateway base URL (replicas) or Redis URL.
    pub url: String,
    pub pid: u32,
    child: Option<Child>,
}

impl Proc {
    fn spawn(
        name: String,
        url: String,
        mut command: Command,
        log_dir: &Path,
    ) -> anyhow::Result<Proc> {
        let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        Ok(Proc {
            name,
            url,
            pid: child.id(),
            child: Some(child),
        })
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL, the way a replica crashes.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child, whose pid is not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Asks the kernel to SIGKILL the child when the harness dies, so nothing is left running
/// even if the harness is killed itself. (Tied to the spawning thread: the fleet is started
/// from the main task, which runs on the main thread.)
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe, as required between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Fleet {
    /// Starts Redis and `replicas` gateways (`gateway_bin` with `extra_args`), and waits until
    /// every replica is ready.
    pub async fn start(
        replicas: usize,
        gateway_bin: &Path,
        extra_args: &[String],
        log_dir: PathBuf,
    ) -> anyhow::Result<Fleet> {
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("cannot create {}", log_dir.display()))?;
        let port = free_port()?;
        let redis_url = format!("redis://127.0.0.1:{port}");
        let mut command = Command::new("redis-server");
        command.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        let redis = Proc::spawn("redis".into(), redis_url.clone(), command, &log_dir)
            .context("redis-server is needed for --spawn (apt-get install redis-server)")?;
        let mut fleet = Fleet {
            redis,
            replicas: Vec::new(),
            redis_url,
            log_dir,
        };
        fleet.wait_redis(port).await?;
        for i in 0..replicas {
            let listen: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
            let mut command = Command::new(gateway_bin);
            command
                .args([
                    "--listen",
                    &listen.to_string(),
                    "--redis-url",
                    &fleet.redis_url,
                ])
                .args(extra_args)
                .env(
                    "SSEGW_LOG",
                    std::env::var("SSEGW_LOG").unwrap_or_else(|_| "warn".into()),
                );
            let proc = Proc::spawn(
                format!("replica-{i}"),
                format!("http://{listen}"),
                command,
                &fleet.log_dir,
            )?;
            fleet.replicas.push(proc);
        }
        for i in 0..fleet.replicas.len() {
            fleet.wait_ready(i).await?;
        }
        Ok(fleet)
    }

    async fn wait_redis(&mut self, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let mut answer = [0u8; 7];
                if stream.write_all(b"PING\r\n").await.is_ok()
                    && stream.read_exact(&mut answer).await.is_ok()
                    && &answer == b"+PONG\r\n"
                {
                    return Ok(());
                }
            }
            if let Some(status) = self.redis.exited() {
                bail!(
                    "redis-server exited ({status}); see {}",
                    self.log_dir.join("redis.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_ready(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = self.replicas[i]
            .url
            .trim_start_matches("http://")
            .to_string();
        loop {
            if readyz(&addr).await == Some(200) {
                return Ok(());
            }
            let proc = &mut self.replicas[i];
            if let Some(status) = proc.exited() {
                bail!(
                    "{} exited ({status}); see {}",
                    proc.name,
                    self.log_dir.join(format!("{}.log", proc.name)).display()
                );
            }
            if Instant::now() > deadline {
                bail!("{} not ready within {START_TIMEOUT:?}", proc.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.url.clone()).collect()
    }

    /// Stops everything: replicas first (SIGTERM, a short grace), then Redis; the logs go
    /// too. (Dropped instead, on a failed or interrupted run, the fleet leaves its logs.)
    pub fn stop(mut self) {
        for replica in &mut self.replicas {
            replica.stop(Duration::from_secs(3));
        }
        self.redis.stop(Duration::from_secs(3));
        let _ = std::fs::remove_dir_all(&self.log_dir);
    }
}

/// Status of `GET /readyz`, over a plain connection.
async fn readyz(addr: &str) -> Option<u16> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}
