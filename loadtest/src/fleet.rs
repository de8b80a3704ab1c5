//! `--spawn`: a local `redis-server` on a free port (the testkit's `Standalone`), or a local
//! Redis Cluster (`--redis-cluster P`, the testkit's `Cluster`), and replicas of the target (gateways or `ssegw-baseline`s from the built binaries, or nginx with nchan
//! from a generated configuration), started, killed on request and always torn down: on drop,
//! on Ctrl-C (the orchestrator drops the fleet) and, through `PR_SET_PDEATHSIG`, even when the
//! harness itself is killed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use ssegw_testkit::{free_port, Cluster, ClusterOptions, ServerOptions, Standalone};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::config::{Servers, SpawnedRedis};
use crate::procstat;

/// Longest wait for Redis to answer and for a replica's `/readyz` to say 200.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a cluster node may be silent before the others call it failing: Redis's default.
/// The testkit's one second suits tests that kill nodes; a saturated two-core machine can
/// leave a node unscheduled for that long, and a fleet kills none.
const CLUSTER_NODE_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Fleet {
    pub redis: Redis,
    pub replicas: Vec<Proc>,
    /// Where the replicas and the publisher find `redis`.
    pub redis_addr: RedisAddr,
    /// Where each process's output goes, named after it.
    pub log_dir: PathBuf,
}

/// The fleet's Redis.
pub enum Redis {
    Standalone(Standalone),
    Cluster(Cluster),
}

/// Where a Redis is, as a gateway and the publisher are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisAddr {
    /// `redis://HOST:PORT`: one server (`--redis-url`).
    Url(String),
    /// "HOST:PORT" of every node of a cluster (`--redis-cluster`).
    Cluster(Vec<String>),
}

impl Redis {
    /// Each Redis process, named as the report names it: `redis`, or `redis-0`, `redis-1`, …
    /// for a cluster's nodes (its primaries first), with its pid.
    pub fn processes(&self) -> Vec<(String, u32)> {
        match self {
            Redis::Standalone(redis) => vec![("redis".into(), redis.server().pid())],
            Redis::Cluster(cluster) => cluster
                .nodes()
                .iter()
                .enumerate()
                .map(|(i, node)| (format!("redis-{i}"), node.pid()))
                .collect(),
        }
    }

    fn stop(&mut self, grace: Duration) {
        match self {
            Redis::Standalone(redis) => redis.server_mut().stop(grace),
            Redis::Cluster(cluster) => {
                for node in cluster.nodes_mut() {
                    node.stop(grace);
                }
            }
        }
    }
}

/// A replica of the fleet and what was seen of it.
pub struct Proc {
    pub name: String,
    /// Server base URL.
    pub url: String,
    pub pid: u32,
    /// The process serves through children of its own (nginx's master and its workers):
    /// memory and CPU are sampled over all of them, and they are killed with it.
    pub with_children: bool,
    child: Option<Child>,
}

impl Proc {
    /// Starts `command`; `with_children` as in `Proc`.
    fn spawn(
        name: String,
        url: String,
        mut command: Command,
        log_dir: &Path,
        with_children: bool,
    ) -> anyhow::Result<Proc> {
        let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // nginx's master stops its workers on SIGTERM; SIGKILLed, it would leave them running.
        die_with_parent(
            &mut command,
            if with_children {
                libc::SIGTERM
            } else {
                libc::SIGKILL
            },
        );
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        Ok(Proc {
            name,
            url,
            pid: child.id(),
            with_children,
            child: Some(child),
        })
    }

    /// SIGKILL to the process's own children first (they would outlive it), then to it.
    fn kill_now(child: &mut Child, with_children: bool) {
        if with_children {
            for pid in procstat::children(child.id()) {
                // SAFETY: signalling a process of the fleet's own tree.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL, the way a replica crashes.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            Proc::kill_now(&mut child, self.with_children);
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
        Proc::kill_now(&mut child, self.with_children);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub use ssegw_testkit::die_with_parent;

impl Fleet {
    /// Starts Redis (`redis`) and `replicas` servers, and waits until every replica is ready.
    pub async fn start(
        replicas: usize,
        servers: &Servers,
        redis: SpawnedRedis,
        log_dir: PathBuf,
    ) -> anyhow::Result<Fleet> {
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("cannot create {}", log_dir.display()))?;
        // The actix baseline does not use Redis; starting it anyway keeps one fleet shape.
        // Started and awaited on this thread, not in `spawn_blocking`: the servers die with
        // the thread that started them, and nothing else runs yet.
        let server = ServerOptions {
            log: Some(log_dir.join("redis.log")),
            die_with_parent: true,
            ready_timeout: START_TIMEOUT,
            ..ServerOptions::default()
        };
        let needed = |e: ssegw_testkit::Error| match e {
            e @ ssegw_testkit::Error::Spawn { .. } => anyhow::Error::new(e)
                .context("redis-server is needed for --spawn (apt-get install redis-server)"),
            e => e.into(),
        };
        let (redis, redis_addr) = match redis {
            SpawnedRedis::Standalone => {
                let redis = Standalone::start_with(server).map_err(needed)?;
                let url = redis.url();
                (Redis::Standalone(redis), RedisAddr::Url(url))
            }
            SpawnedRedis::Cluster {
                primaries,
                replicas_per_primary,
            } => {
                // The nodes log into the cluster's own directory, removed with it.
                let cluster = Cluster::start(ClusterOptions {
                    primaries,
                    replicas_per_primary,
                    node_timeout: CLUSTER_NODE_TIMEOUT,
                    server,
                    ..ClusterOptions::default()
                })
                .map_err(needed)?;
                let seeds = cluster.seeds();
                (Redis::Cluster(cluster), RedisAddr::Cluster(seeds))
            }
        };
        let mut fleet = Fleet {
            redis,
            redis_addr,
            replicas: Vec::new(),
            log_dir,
        };
        for i in 0..replicas {
            let name = format!("replica-{i}");
            let listen: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
            let command = fleet.replica_command(servers, &name, listen)?;
            let url = format!("http://{listen}");
            let with_children = matches!(servers, Servers::Nchan { .. });
            let proc = Proc::spawn(name, url, command, &fleet.log_dir, with_children)?;
            fleet.replicas.push(proc);
        }
        for i in 0..fleet.replicas.len() {
            fleet.wait_ready(i).await?;
        }
        Ok(fleet)
    }

    /// The command that starts replica `name` listening on `listen`.
    fn replica_command(
        &self,
        servers: &Servers,
        name: &str,
        listen: SocketAddr,
    ) -> anyhow::Result<Command> {
        let log_level = std::env::var("SSEGW_LOG").unwrap_or_else(|_| "warn".into());
        Ok(match servers {
            Servers::Gateway { bin, args } => {
                let mut command = Command::new(bin);
                command.args(["--listen", &listen.to_string()]);
                match &self.redis_addr {
                    RedisAddr::Url(url) => command.args(["--redis-url", url]),
                    RedisAddr::Cluster(seeds) => {
                        command.args(["--redis-cluster", &seeds.join(",")])
                    }
                };
                command
                    .args(args)
                    // The harness's clients carry no tokens. Environment, not flags, so that a
                    // run measuring authenticated streams can override it in --gateway-args.
                    .env("SSEGW_ANONYMOUS_SUBSCRIBE", "*")
                    .env("SSEGW_ANONYMOUS_PUBLISH", "*")
                    .env("SSEGW_LOG", log_level);
                command
            }
            Servers::Actix { bin, args } => {
                let mut command = Command::new(bin);
                command.args(["--listen", &listen.to_string()]).args(args);
                command
            }
            Servers::Reference { bin, args } => {
                // It listens on 127.0.0.1, as every spawned replica does.
                let mut command = Command::new(bin);
                command.arg(listen.port().to_string()).args(args);
                command
            }
            Servers::Nchan { nginx, module } => {
                let RedisAddr::Url(redis_url) = &self.redis_addr else {
                    bail!("nchan is measured against one redis-server, not a cluster");
                };
                // nginx's own files (configuration, error log, pid, temporary bodies) stay in
                // the replica's directory; nothing under /etc/nginx or /var is read or written.
                let dir = self.log_dir.join(name);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let files = hard_open_file_limit().min(NGINX_MAX_FILES);
                let conf = nginx_conf(&NginxConf {
                    dir: &dir,
                    module,
                    listen,
                    redis_url,
                    files,
                });
                let conf_path = dir.join("nginx.conf");
                std::fs::write(&conf_path, conf)
                    .with_context(|| format!("cannot write {}", conf_path.display()))?;
                let mut command = Command::new(nginx);
                command
                    .arg("-p")
                    .arg(&dir)
                    .arg("-e")
                    .arg(dir.join("error.log"))
                    .arg("-c")
                    .arg(&conf_path)
                    .args(["-g", "daemon off;"]);
                command
            }
        })
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

/// Open files (and so connections) of an nginx worker at most; fewer when the hard limit is
/// lower, since an unprivileged master cannot raise it.
const NGINX_MAX_FILES: u64 = 40_000;

fn hard_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_max
    } else {
        1024
    }
}

/// What the generated nginx configuration depends on.
pub struct NginxConf<'a> {
    /// nginx's prefix: its error log, pid file and temporary files go here.
    pub dir: &'a Path,
    /// `ngx_nchan_module.so`.
    pub module: &'a Path,
    pub listen: SocketAddr,
    pub redis_url: &'a str,
    /// `worker_rlimit_nofile` and `worker_connections`.
    pub files: u64,
}

/// An nginx configuration serving nchan alone: one worker (its best setting on two cores),
/// channels stored in Redis, `/sub/NAME` an EventSource subscriber and `/pub/NAME` a publisher
/// of channel NAME, `/readyz` 200. Channel names may hold dots (the harness's topics do).
/// Nothing is buffered: nchan writes each message to its subscribers as it comes, with no
/// gzip or proxy between.
pub fn nginx_conf(c: &NginxConf<'_>) -> String {
    let dir = c.dir.display();
    format!(
        r#"# Generated by ssegw-loadtest for --target nchan.
load_module {module};
worker_processes 1;
worker_rlimit_nofile {files};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
lock_file {dir}/nginx.lock;
events {{
    worker_connections {files};
}}
http {{
    access_log off;
    gzip off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream redis_store {{
        nchan_redis_server {redis};
    }}
    server {{
        listen {listen} backlog=4096;
        location = /readyz {{
            return 200;
        }}
        location ~ /sub/([\w.]+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_redis_pass redis_store;
        }}
        location ~ /pub/([\w.]+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            nchan_redis_pass redis_store;
        }}
    }}
}}
"#,
        module = c.module.display(),
        files = c.files,
        redis = c.redis_url,
        listen = c.listen,
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_conf_keeps_everything_in_its_directory() {
        let conf = nginx_conf(&NginxConf {
            dir: Path::new("/tmp/run/replica-0"),
            module: Path::new("/usr/lib/nginx/modules/ngx_nchan_module.so"),
            listen: ([127, 0, 0, 1], 8099).into(),
            redis_url: "redis://127.0.0.1:6400",
            files: 20_000,
        });
        for line in [
            "load_module /usr/lib/nginx/modules/ngx_nchan_module.so;",
            "worker_processes 1;",
            "worker_rlimit_nofile 20000;",
            "worker_connections 20000;",
            "pid /tmp/run/replica-0/nginx.pid;",
            "error_log /tmp/run/replica-0/error.log warn;",
            "client_body_temp_path /tmp/run/replica-0/client_body;",
            "nchan_redis_server redis://127.0.0.1:6400;",
            "listen 127.0.0.1:8099 backlog=4096;",
            r"location ~ /sub/([\w.]+)$ {",
            "nchan_subscriber eventsource;",
            r"location ~ /pub/([\w.]+)$ {",
            "nchan_publisher;",
            "location = /readyz {",
        ] {
            assert!(
                conf.lines().any(|l| l.trim() == line),
                "missing {line:?} in\n{conf}"
            );
        }
        assert_eq!(conf.matches("nchan_redis_pass redis_store;").count(), 2);
        assert!(
            !conf.contains("/etc/nginx") && !conf.contains("/var/"),
            "{conf}"
        );
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }
}
