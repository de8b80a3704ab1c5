//! Redis topologies a test or the load tester runs against, each owning its `Server`s: a
//! `Standalone` server, and a `Sentinel` group (a master, replicas and the sentinels watching
//! them), in plain text or entirely over TLS. `Cluster` is beside them, in `cluster.rs`, built
//! from the same `Server` and `ServerOptions`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{Connection, Error, Reply, Server, ServerOptions, COMMAND_TIMEOUT};

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

/// How a `Sentinel` group is started. `SentinelOptions::default()` is a master, one replica
/// and three sentinels (quorum 2) that call a silent master down after one second.
#[derive(Clone, Debug)]
pub struct SentinelOptions {
    /// The name the sentinels monitor the master under (`SENTINEL get-master-addr-by-name`).
    pub master_name: String,
    /// Data nodes besides the master, each a `--replicaof` it.
    pub replicas: usize,
    pub sentinels: usize,
    /// How many sentinels must agree that the master is down before a failover.
    pub quorum: usize,
    /// `sentinel down-after-milliseconds`: how long a node may be silent before a sentinel
    /// calls it down.
    pub down_after: Duration,
    /// `sentinel failover-timeout`: how long a failover may take, and (twice this) how long a
    /// sentinel waits before it tries the same master again.
    pub failover_timeout: Duration,
    /// The data nodes require this password (`requirepass`) and use it with each other
    /// (`masterauth`); the sentinels are given it (`sentinel auth-pass`). One word.
    pub password: Option<String>,
    /// The sentinels require this password of clients and of each other (`requirepass` on the
    /// sentinels). One word.
    pub sentinel_password: Option<String>,
    /// The program, the per-start `ready_timeout`, `die_with_parent`, `args` for the data
    /// nodes (ACL users, say), and `tls`: with it, every data node and every sentinel speaks TLS
    /// only, the nodes to each other (`tls-replication`) and the sentinels to the nodes and to
    /// each other, each presenting the authority's server certificate as a client too; the
    /// group's own `command` speaks TLS to them. (Valkey's wheel has no TLS: set `binary` to
    /// `redis-server`.) `config` and `log` are the group's own (each process logs into the
    /// group's directory).
    pub server: ServerOptions,
    /// Shortens the sentinels' own periods with `SENTINEL DEBUG` as each starts: INFO from
    /// each node every second (not 10), hello messages every half second (not 2), so the old
    /// master of a forced failover is made a replica after about 3 seconds (not 10 to 20),
    /// and a TILT (after the process stalled for 2 seconds, on a busy machine) lasts 5
    /// seconds (not 30). On by default; a sentinel restarted by a test has the production
    /// periods again.
    pub quick_periods: bool,
    /// Longest wait for the group to settle: at start-up (replicas linked, sentinels aware of
    /// each other), and after `failover()`.
    pub settle_timeout: Duration,
}

impl Default for SentinelOptions {
    fn default() -> SentinelOptions {
        SentinelOptions {
            master_name: "ssegw".into(),
            replicas: 1,
            sentinels: 3,
            quorum: 2,
            down_after: Duration::from_secs(1),
            failover_timeout: Duration::from_secs(10),
            password: None,
            sentinel_password: None,
            server: ServerOptions::default(),
            quick_periods: true,
            settle_timeout: Duration::from_secs(60),
        }
    }
}

/// Longest wait for one answer while the group is polled: short, so that a paused process
/// does not hold up a poll for long.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A master, its replicas and the sentinels that watch them, each a process on a free port,
/// with their configuration files and logs in a directory of the group's own. Every process is
/// killed on drop and the directory removed (kept, and named on stderr, when a test panics).
pub struct Sentinel {
    options: SentinelOptions,
    dir: PathBuf,
    /// The data nodes: the first master first, then the replicas in order of start. Which one
    /// is the master now, only a sentinel says (`master()`).
    nodes: Vec<Server>,
    sentinels: Vec<Server>,
    /// Keep `dir` on drop: the group failed to start, and its logs say why.
    keep_dir: bool,
}

impl Sentinel {
    /// Starts the master, then the replicas, waits until every replica's link to the master
    /// is up, then starts the sentinels and waits until each knows the master, every replica
    /// and every other sentinel. On failure the processes are killed but the directory, with
    /// each process's log, is kept; the error names it where it can.
    ///
    /// Panics unless there is at least one sentinel and the quorum is between 1 and their
    /// number.
    pub fn start(options: SentinelOptions) -> Result<Sentinel, Error> {
        assert!(
            (1..=options.sentinels).contains(&options.quorum),
            "a Sentinel group needs a quorum of 1 to {} sentinels, not {}",
            options.sentinels,
            options.quorum
        );
        static GROUPS: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ssegw-sentinel-{}-{}",
            std::process::id(),
            GROUPS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|cause| Error::Write {
            path: dir.clone(),
            cause,
        })?;
        let mut group = Sentinel {
            options,
            dir,
            nodes: Vec::new(),
            sentinels: Vec::new(),
            keep_dir: false,
        };
        match group.bring_up() {
            Ok(()) => Ok(group),
            Err(error) => {
                group.keep_dir = true;
                Err(error)
            }
        }
    }

    fn bring_up(&mut self) -> Result<(), Error> {
        let master = self.start_node(None)?;
        let master_port = master.port();
        self.nodes.push(master);
        for _ in 0..self.options.replicas {
            let replica = self.start_node(Some(master_port))?;
            self.nodes.push(replica);
        }
        let within = self.options.settle_timeout;
        self.settle("every replica's link to the master", within, |group| {
            for replica in &group.nodes[1..] {
                let addr = addr_of(replica);
                let info = group.text(&addr, &["INFO", "replication"])?;
                if !info.lines().any(|line| line == "master_link_status:up") {
                    return Err(format!("replica {addr} reports no master_link_status:up"));
                }
            }
            Ok(())
        })?;
        for index in 0..self.options.sentinels {
            let sentinel = self.start_sentinel(index, master_port)?;
            self.sentinels.push(sentinel);
            if self.options.quick_periods {
                self.quicken(&addr_of(&self.sentinels[index]))?;
            }
        }
        let master_addr = addr_of(&self.nodes[0]);
        self.settle(
            "every sentinel to know the master, its replicas and the other sentinels",
            within,
            |group| {
                let name = group.options.master_name.as_str();
                for sentinel in group.sentinel_addrs() {
                    let reply = group
                        .command(&sentinel, &["SENTINEL", "MASTER", name])
                        .map_err(|e| e.to_string())?;
                    let field = |field: &str| reply.field(field).unwrap_or("(none)").to_string();
                    let known = format!("{}:{}", field("ip"), field("port"));
                    if known != master_addr {
                        return Err(format!("sentinel {sentinel} names {known} as the master"));
                    }
                    if field("flags") != "master" {
                        return Err(format!(
                            "sentinel {sentinel} sees the master as {}",
                            field("flags")
                        ));
                    }
                    let replicas = group.options.replicas.to_string();
                    if field("num-slaves") != replicas {
                        return Err(format!(
                            "sentinel {sentinel} knows {} of {replicas} replicas",
                            field("num-slaves")
                        ));
                    }
                    let others = (group.options.sentinels - 1).to_string();
                    if field("num-other-sentinels") != others {
                        return Err(format!(
                            "sentinel {sentinel} knows {} of {others} other sentinels",
                            field("num-other-sentinels")
                        ));
                    }
                }
                Ok(())
            },
        )
    }

    /// A data node: the master when `master_port` is `None`, else a replica of it.
    fn start_node(&self, master_port: Option<u16>) -> Result<Server, Error> {
        let index = self.nodes.len();
        let mut args: Vec<String> = vec![
            // A replica loading a full sync, or a restarted node, writes an RDB file: into the
            // group's directory, not the test's working directory.
            "--dir".into(),
            self.dir.display().to_string(),
            "--dbfilename".into(),
            format!("node-{index}.rdb"),
            // A full sync starts at once (the default waits 5 seconds for more replicas).
            "--repl-diskless-sync".into(),
            "yes".into(),
            "--repl-diskless-sync-delay".into(),
            "0".into(),
        ];
        if let Some(password) = &self.options.password {
            for flag in ["--requirepass", "--masterauth"] {
                args.extend([flag.to_string(), password.clone()]);
            }
        }
        if let Some(port) = master_port {
            args.extend([
                "--replicaof".to_string(),
                "127.0.0.1".to_string(),
                port.to_string(),
            ]);
        }
        if self.options.server.tls.is_some() {
            // A replica reaches its master over TLS, announcing its TLS port.
            args.extend(["--tls-replication".to_string(), "yes".to_string()]);
        }
        args.extend(self.options.server.args.iter().cloned());
        Server::start(ServerOptions {
            config: None,
            args,
            log: Some(self.dir.join(format!("node-{index}.log"))),
            ..self.options.server.clone()
        })
    }

    /// A sentinel, from a configuration file of its own (which it rewrites as it learns the
    /// group), watching the master on `master_port`.
    fn start_sentinel(&self, index: usize, master_port: u16) -> Result<Server, Error> {
        let options = &self.options;
        let name = &options.master_name;
        // Addresses, never names: everything is on 127.0.0.1, and a sentinel that resolved
        // names could report one that a client cannot use.
        let mut config = format!(
            "sentinel resolve-hostnames no\n\
             sentinel announce-hostnames no\n\
             sentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n\
             sentinel down-after-milliseconds {name} {down_after}\n\
             sentinel failover-timeout {name} {failover_timeout}\n\
             sentinel parallel-syncs {name} 1\n",
            quorum = options.quorum,
            down_after = options.down_after.as_millis(),
            failover_timeout = options.failover_timeout.as_millis(),
        );
        if let Some(password) = &options.password {
            config.push_str(&format!("sentinel auth-pass {name} {password}\n"));
        }
        if let Some(password) = &options.sentinel_password {
            // A sentinel also gives its own password to the other sentinels.
            config.push_str(&format!("requirepass {password}\n"));
        }
        let path = self.dir.join(format!("sentinel-{index}.conf"));
        std::fs::write(&path, config).map_err(|cause| Error::Write {
            path: path.clone(),
            cause,
        })?;
        let mut args = vec!["--sentinel".to_string()];
        if options.server.tls.is_some() {
            // A sentinel reaches the nodes and the other sentinels over TLS, and announces its
            // TLS port to the others.
            args.extend(["--tls-replication".to_string(), "yes".to_string()]);
        }
        Server::start(ServerOptions {
            config: Some(path),
            args,
            log: Some(self.dir.join(format!("sentinel-{index}.log"))),
            ..options.server.clone()
        })
    }

    /// `quick_periods` for one sentinel.
    fn quicken(&self, sentinel: &str) -> Result<(), Error> {
        let periods = [
            ("info-period", "1000"),
            ("publish-period", "500"),
            ("tilt-period", "5000"),
        ];
        let mut args = vec!["SENTINEL", "DEBUG"];
        args.extend(periods.iter().flat_map(|(name, value)| [*name, *value]));
        match self.command(sentinel, &args)? {
            Reply::Status(ok) if ok == "OK" => Ok(()),
            reply => Err(Error::Refused {
                addr: sentinel.to_string(),
                command: "SENTINEL DEBUG".into(),
                reply: format!("{reply:?}"),
            }),
        }
    }

    /// The name the sentinels monitor the master under.
    pub fn master_name(&self) -> &str {
        &self.options.master_name
    }

    /// The sentinels' addresses, "127.0.0.1:PORT": what a client is configured with.
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels.iter().map(addr_of).collect()
    }

    /// Where the processes' configuration files and logs are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The master's address as the first sentinel that answers names it
    /// (`SENTINEL get-master-addr-by-name`).
    pub fn master_addr(&self) -> Result<String, Error> {
        Ok(self.named_master()?.1)
    }

    /// The data node a sentinel names as the master.
    pub fn master(&self) -> Result<&Server, Error> {
        let index = self.master_index()?;
        Ok(&self.nodes[index])
    }

    /// The master, to kill, pause or stop it.
    pub fn master_mut(&mut self) -> Result<&mut Server, Error> {
        let index = self.master_index()?;
        Ok(&mut self.nodes[index])
    }

    fn master_index(&self) -> Result<usize, Error> {
        let (sentinel, master) = self.named_master()?;
        self.nodes
            .iter()
            .position(|node| addr_of(node) == master)
            .ok_or(Error::UnknownMaster { sentinel, master })
    }

    /// The first sentinel that answers, and the master it names.
    fn named_master(&self) -> Result<(String, String), Error> {
        self.first_sentinel(|sentinel| self.ask_master(sentinel, COMMAND_TIMEOUT))
    }

    /// `ask` of each sentinel in turn until one answers: a killed or paused sentinel is
    /// skipped, as a client would skip it.
    fn first_sentinel<T>(
        &self,
        ask: impl Fn(&str) -> Result<T, Error>,
    ) -> Result<(String, T), Error> {
        let mut last = None;
        for sentinel in self.sentinel_addrs() {
            match ask(&sentinel) {
                Ok(answer) => return Ok((sentinel, answer)),
                Err(error @ Error::Command { .. }) => last = Some(error),
                Err(error) => return Err(error),
            }
        }
        Err(last.expect("a group has at least one sentinel"))
    }

    /// The data nodes: the first master, then the replicas, whatever their roles are now.
    pub fn servers(&self) -> &[Server] {
        &self.nodes
    }

    pub fn servers_mut(&mut self) -> &mut [Server] {
        &mut self.nodes
    }

    pub fn sentinels(&self) -> &[Server] {
        &self.sentinels
    }

    pub fn sentinels_mut(&mut self) -> &mut [Server] {
        &mut self.sentinels
    }

    /// Sends one command to any process of the group, authenticated with the password its
    /// kind requires, if any. A refusal is `Ok(Reply::Error)`.
    pub fn command(&self, addr: &str, args: &[&str]) -> Result<Reply, Error> {
        self.command_within(addr, args, COMMAND_TIMEOUT)
    }

    /// A connection to any process of the group, for several commands in a row: over TLS in a
    /// TLS group, and authenticated with the password its kind requires, if any.
    pub fn connect(&self, addr: &str) -> Result<Connection, Error> {
        self.connect_within(addr, COMMAND_TIMEOUT)
    }

    fn command_within(&self, addr: &str, args: &[&str], timeout: Duration) -> Result<Reply, Error> {
        self.connect_within(addr, timeout)?.command(args)
    }

    fn connect_within(&self, addr: &str, timeout: Duration) -> Result<Connection, Error> {
        let mut connection = match &self.options.server.tls {
            None => Connection::open(addr, timeout)?,
            Some(tls) => Connection::open_tls(addr, timeout, tls)?,
        };
        let password = if self.sentinel_addrs().iter().any(|s| s == addr) {
            &self.options.sentinel_password
        } else {
            &self.options.password
        };
        if let Some(password) = password {
            connection.auth(password)?;
        }
        Ok(connection)
    }

    /// Forces a failover (`SENTINEL FAILOVER`) and waits until every sentinel that answers
    /// names a new master, that node answers `ROLE` as a master, and the old master is a
    /// replica of it with its link up. Returns the new master's address.
    pub fn failover(&self) -> Result<String, Error> {
        let old = self.master_addr()?;
        let name = self.options.master_name.as_str();
        let (sentinel, reply) = self
            .first_sentinel(|sentinel| self.command(sentinel, &["SENTINEL", "FAILOVER", name]))?;
        if reply != Reply::Status("OK".into()) {
            return Err(Error::Refused {
                addr: sentinel,
                command: "SENTINEL FAILOVER".into(),
                reply: format!("{reply:?}"),
            });
        }
        let goal = format!("a failover away from {old}");
        self.settle(&goal, self.options.settle_timeout, |group| {
            let new = group.new_master(&old)?;
            let role = group.role(&old)?;
            let port = new.rsplit(':').next().unwrap_or_default();
            if role.first().map(String::as_str) != Some("slave")
                || role.get(2).map(String::as_str) != Some(port)
                || role.get(3).map(String::as_str) != Some("connected")
            {
                return Err(format!(
                    "{new} is the master, but the old master {old} answers ROLE {role:?}"
                ));
            }
            Ok(new)
        })
    }

    /// Waits until every sentinel that answers names a master other than `old` (after a test
    /// killed or paused it) and that node answers `ROLE` as a master. Returns its address.
    pub fn wait_for_new_master(&self, old: &str, timeout: Duration) -> Result<String, Error> {
        let goal = format!("a new master in place of {old}");
        self.settle(&goal, timeout, |group| group.new_master(old))
    }

    /// The master every answering sentinel names, when it is not `old` and answers `ROLE` as
    /// a master.
    fn new_master(&self, old: &str) -> Result<String, String> {
        let mut named = Vec::new();
        for sentinel in self.sentinel_addrs() {
            match self.ask_master(&sentinel, POLL_TIMEOUT) {
                Ok(addr) => named.push((sentinel, addr)),
                // A killed or paused sentinel has no say.
                Err(Error::Command { .. }) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
        let Some((_, new)) = named.first() else {
            return Err("no sentinel answers".into());
        };
        if let Some((sentinel, other)) = named.iter().find(|(_, addr)| addr != new) {
            return Err(format!(
                "sentinels disagree: {} names {new}, {sentinel} names {other}",
                named[0].0
            ));
        }
        if new == old {
            return Err(format!("the sentinels still name {old}"));
        }
        let role = self.role(new)?;
        if role.first().map(String::as_str) != Some("master") {
            return Err(format!(
                "the sentinels name {new}, which answers ROLE {role:?}"
            ));
        }
        Ok(new.clone())
    }

    fn ask_master(&self, sentinel: &str, timeout: Duration) -> Result<String, Error> {
        let name = self.options.master_name.as_str();
        let reply = self.command_within(
            sentinel,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", name],
            timeout,
        )?;
        match reply.as_array() {
            Some([ip, port]) if ip.as_str().is_some() && port.as_str().is_some() => Ok(format!(
                "{}:{}",
                ip.as_str().unwrap_or_default(),
                port.as_str().unwrap_or_default()
            )),
            _ => Err(Error::Refused {
                addr: sentinel.to_string(),
                command: "SENTINEL GET-MASTER-ADDR-BY-NAME".into(),
                reply: format!("{reply:?}"),
            }),
        }
    }

    /// A data node's `ROLE` reply, as text: `["master", offset, …]` or `["slave", ip, port,
    /// state, offset]`.
    fn role(&self, addr: &str) -> Result<Vec<String>, String> {
        let reply = self
            .command_within(addr, &["ROLE"], POLL_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let items = reply
            .as_array()
            .ok_or_else(|| format!("ROLE to {addr} was answered {reply:?}"))?;
        Ok(items
            .iter()
            .map(|item| match item {
                Reply::Integer(n) => n.to_string(),
                other => other.as_str().unwrap_or("?").to_string(),
            })
            .collect())
    }

    /// A command's reply as text (a status or a bulk string), or why there is none.
    fn text(&self, addr: &str, args: &[&str]) -> Result<String, String> {
        let reply = self
            .command_within(addr, args, POLL_TIMEOUT)
            .map_err(|e| e.to_string())?;
        reply
            .as_str()
            .map(String::from)
            .ok_or_else(|| format!("{} to {addr} was answered {reply:?}", args[0]))
    }

    /// Polls `check` until it returns `Ok`, or fails after `within` with the last thing it
    /// said was missing.
    fn settle<T>(
        &self,
        goal: &str,
        within: Duration,
        mut check: impl FnMut(&Sentinel) -> Result<T, String>,
    ) -> Result<T, Error> {
        crate::poll_until(goal, within, POLL_INTERVAL, &self.dir, || check(self))
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        // The sentinels first, so that none reacts to the data nodes going away.
        for server in self.sentinels.iter_mut().chain(self.nodes.iter_mut()) {
            server.kill();
        }
        if self.keep_dir || std::thread::panicking() {
            eprintln!(
                "ssegw-testkit: the Sentinel group's logs are kept in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn addr_of(server: &Server) -> String {
    format!("127.0.0.1:{}", server.port())
}
