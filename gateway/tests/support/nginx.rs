//! `deploy/nginx.conf`, the balancer of `docker-compose.yml`, run by the real nginx in front of
//! replica processes, with only its listen port and replica addresses replaced by loopback
//! ones; and `Fleet`, Redis with the compose file's replicas behind it. Used by `balancer.rs`
//! and by the browser tests, whose pages reach a fleet through one origin.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{GatewayProcess, RedisServer, Replica};

/// The configuration that `docker-compose.yml` mounts into its `lb` service.
const NGINX_CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nginx.conf");
/// The replicas named in it, in order (compose services `gateway-1` ...).
pub const REPLICAS: usize = 3;

/// `deploy/nginx.conf` with `listen 8080` and each `gateway-N:8080` replaced by loopback
/// addresses: nothing else changes. Each of them must occur exactly once, so that the file
/// cannot drift away from what this test runs.
fn balancer_conf(listen: SocketAddr, replicas: &[SocketAddr]) -> String {
    let mut conf = std::fs::read_to_string(NGINX_CONF)
        .unwrap_or_else(|e| panic!("cannot read {NGINX_CONF}: {e}"));
    let mut replace = |from: &str, to: &str| {
        let found = conf.matches(from).count();
        assert_eq!(found, 1, "{NGINX_CONF} must name `{from}` exactly once");
        conf = conf.replace(from, to);
    };
    replace("listen 8080;", &format!("listen {listen};"));
    for (i, replica) in replicas.iter().enumerate() {
        replace(
            &format!("server gateway-{}:8080", i + 1),
            &format!("server {replica}"),
        );
    }
    let more = conf
        .match_indices("gateway-")
        .any(|(at, m)| conf[at + m.len()..].starts_with(|c: char| c.is_ascii_digit()));
    assert!(
        !more,
        "{NGINX_CONF} names more replicas than the {} this test starts",
        replicas.len()
    );
    conf
}

/// The nginx binary: on PATH, else where Debian installs it.
fn nginx_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("nginx"));
    on_path
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file())
        .expect("nginx is required for the balancer test (apt-get install nginx)")
}

/// nginx running `deploy/nginx.conf` unprivileged: its prefix (pid file, temporary files) is a
/// directory of its own, as the tmpfs is in compose. Stopped on drop.
pub struct Nginx {
    pub addr: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl Nginx {
    pub fn start(replicas: &[SocketAddr]) -> Nginx {
        let addr = SocketAddr::from(([127, 0, 0, 1], super::free_port()));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "balancer-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, balancer_conf(addr, replicas)).unwrap();
        let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let mut prefix = dir.clone().into_os_string();
        prefix.push("/");
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(&prefix)
            .args(["-e", "stderr", "-c"])
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx { addr, dir, child };
        let deadline = Instant::now() + super::WAIT;
        while super::http_status(addr, "GET", "/healthz") != Some(200) {
            if let Some(status) = nginx.child.try_wait().unwrap() {
                panic!("nginx exited with {status}: {}", nginx.log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx not answering: {}",
                nginx.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }
}

impl Replica for Nginx {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would leave them running). Not
        // `super::signal`, which panics if nginx is gone already: a panic while a failed
        // test unwinds would abort it and leave the replicas and Redis running.
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Redis, the replicas of the compose file and nginx in front of them.
pub struct Fleet {
    // Dropped in this order: nginx, the replicas, then Redis (so no replica sees Redis go).
    pub nginx: Nginx,
    pub replicas: Vec<GatewayProcess>,
    pub redis: RedisServer,
}

impl Fleet {
    /// Redis, `REPLICAS` replica processes started with `flags`, and nginx in front.
    pub fn start(flags: &[&str]) -> Fleet {
        let redis = RedisServer::start();
        let replicas: Vec<GatewayProcess> = (0..REPLICAS)
            .map(|_| GatewayProcess::start(&redis.url(), flags))
            .collect();
        let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
        let nginx = Nginx::start(&addrs);
        Fleet {
            nginx,
            replicas,
            redis,
        }
    }

    /// Open SSE streams on each replica, by its `/status` (none on a replica that is gone).
    pub fn connections(&self) -> Vec<u64> {
        self.counter("connections")
    }

    /// A `/status` counter of each replica (0 for a replica that is gone).
    pub fn counter(&self, name: &str) -> Vec<u64> {
        self.replicas
            .iter()
            .map(|r| {
                if std::net::TcpStream::connect(r.addr).is_err() {
                    return 0;
                }
                let (status, body) = super::get_json(r.addr, "/status");
                assert_eq!(status, 200);
                body[name]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{name} in /status"))
            })
            .collect()
    }

    /// Waits until the replicas hold `expected` streams in all; returns them per replica.
    pub fn wait_connections(&self, expected: u64) -> Vec<u64> {
        super::wait_until(&format!("{expected} streams on the replicas"), || {
            self.connections().iter().sum::<u64>() == expected
        });
        self.connections()
    }
}
