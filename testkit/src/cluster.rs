//! `Cluster`: a Redis Cluster of primaries and their replicas, each a `Server` with a bus port
//! of its own, formed by hand (`CLUSTER ADDSLOTSRANGE`, `MEET`, `REPLICATE`; no redis-cli), and
//! the controls a test needs: a failover, a slot migration, a new node, and waits until every
//! live node agrees again. It routes no commands: `command` goes to the node it names.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{free_port, Connection, Error, Reply, Server, ServerOptions, COMMAND_TIMEOUT};

/// How many hash slots a cluster has: every key maps to one of `0..SLOTS` (`slot_of`).
pub const SLOTS: u16 = 16384;

/// How a `Cluster` is started. `ClusterOptions::default()` is three primaries with one replica
/// each, whose nodes call a silent node failing after one second.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The nodes that own slots at the start, in equal contiguous ranges of `0..SLOTS`.
    pub primaries: usize,
    /// Replicas of each primary (`CLUSTER REPLICATE`); with none, a killed primary's slots
    /// are served by nobody.
    pub replicas_per_primary: usize,
    /// `cluster-node-timeout`: how long a node may be silent before the others call it
    /// failing; a replica of a killed primary is promoted a second or two after that.
    pub node_timeout: Duration,
    /// `cluster-require-full-coverage`: when true (Redis's default), a node refuses every key
    /// while any slot is served by nobody; when false, only the keys of those slots.
    pub require_full_coverage: bool,
    /// Every node requires this password (`requirepass`) and replicates with it
    /// (`masterauth`); `migrate_slot` gives it to `MIGRATE`. One word.
    pub password: Option<String>,
    /// The program, the per-start `ready_timeout`, `die_with_parent`, `args` for every node
    /// (ACL users, say) and `tls`: with it, every node speaks TLS only, to clients, on the
    /// cluster bus (`tls-cluster`) and to its primary (`tls-replication`), presenting the
    /// authority's server certificate as a client too; the cluster's own `command` speaks TLS.
    /// (Valkey's wheel has no TLS: set `binary` to `redis-server`.) `config` and `log` are the
    /// cluster's own (each node logs into the cluster's directory).
    pub server: ServerOptions,
    /// Longest wait for the cluster to settle: at start-up, and after each control.
    pub settle_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            primaries: 3,
            replicas_per_primary: 1,
            node_timeout: Duration::from_millis(1000),
            require_full_coverage: true,
            password: None,
            server: ServerOptions::default(),
            settle_timeout: Duration::from_secs(60),
        }
    }
}

/// Longest wait for one answer while the cluster is polled: short, so that a paused node does
/// not hold up a poll for long.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How many keys one `MIGRATE` of `migrate_slot` moves, and how long it may take.
const MIGRATE_BATCH: usize = 100;
const MIGRATE_TIMEOUT_MS: &str = "5000";
/// Attempts at starting a node on ports that were free a moment ago, in case another process
/// took one meanwhile.
const START_ATTEMPTS: usize = 3;

/// The primaries, their replicas and the nodes added since, each a process on a free port
/// with a free bus port, with their cluster configuration files and logs in a directory of the
/// cluster's own. Every process is killed on drop and the directory removed (kept, and named
/// on stderr, when a test panics).
///
/// A node restarted by a test (`Server::restart`) starts without data but with its
/// `nodes-PORT.conf`, so it rejoins the cluster under its old node ID.
pub struct Cluster {
    options: ClusterOptions,
    dir: PathBuf,
    /// The primaries as started, then their replicas, then the nodes `add_node` added. Which
    /// are primaries now, only the cluster says (`primaries()`).
    nodes: Vec<Server>,
    /// Each node's cluster bus port (`cluster-port`), by the index in `nodes`.
    bus_ports: Vec<u16>,
    /// Keep `dir` on drop: the cluster failed to start, and its logs say why.
    keep_dir: bool,
}

impl Cluster {
    /// Starts every node, gives the primaries their slots, introduces the nodes to each other,
    /// makes the replicas replicate, and waits until every node reports `cluster_state:ok`,
    /// all agree on who owns each slot and who replicates whom, and every replica's link to
    /// its primary is up. On failure the processes are killed but the directory, with each
    /// node's log and configuration, is kept; the error names it where it can.
    ///
    /// Panics unless there are between 1 and `SLOTS` primaries.
    pub fn start(options: ClusterOptions) -> Result<Cluster, Error> {
        assert!(
            (1..=usize::from(SLOTS)).contains(&options.primaries),
            "a cluster needs 1 to {SLOTS} primaries, not {}",
            options.primaries
        );
        static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ssegw-cluster-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|cause| Error::Write {
            path: dir.clone(),
            cause,
        })?;
        let mut cluster = Cluster {
            options,
            dir,
            nodes: Vec::new(),
            bus_ports: Vec::new(),
            keep_dir: false,
        };
        match cluster.bring_up() {
            Ok(()) => Ok(cluster),
            Err(error) => {
                cluster.keep_dir = true;
                Err(error)
            }
        }
    }

    fn bring_up(&mut self) -> Result<(), Error> {
        let primaries = self.options.primaries;
        let total = primaries * (1 + self.options.replicas_per_primary);
        for _ in 0..total {
            self.start_node()?;
        }
        let seeds = self.seeds();
        let slots = usize::from(SLOTS);
        for (index, primary) in seeds[..primaries].iter().enumerate() {
            let first = (index * slots / primaries).to_string();
            let last = ((index + 1) * slots / primaries - 1).to_string();
            self.expect_ok(primary, &["CLUSTER", "ADDSLOTSRANGE", &first, &last])?;
        }
        // Distinct epochs before the nodes meet, as redis-cli gives them: otherwise every node
        // starts at epoch 0, and the collisions are resolved one bump at a time after MEET.
        for (index, node) in seeds.iter().enumerate() {
            self.expect_ok(
                node,
                &["CLUSTER", "SET-CONFIG-EPOCH", &(index + 1).to_string()],
            )?;
        }
        let (first_port, first_bus) = (self.nodes[0].port(), self.bus_ports[0]);
        for node in &seeds[1..] {
            self.meet(node, first_port, first_bus)?;
        }
        let within = self.options.settle_timeout;
        self.settle("every node to know every other", within, |cluster| {
            for addr in &seeds {
                let entries = cluster
                    .connect_within(addr, POLL_TIMEOUT)
                    .and_then(|mut connection| cluster_nodes(&mut connection))
                    .map_err(|e| e.to_string())?;
                let known = entries.iter().filter(|entry| entry.is_known()).count();
                if known != total {
                    return Err(format!("{addr} knows {known} of {total} nodes"));
                }
            }
            Ok(())
        })?;
        let ids = seeds
            .iter()
            .map(|addr| self.node_id(addr))
            .collect::<Result<Vec<_>, _>>()?;
        for (index, replica) in seeds[primaries..].iter().enumerate() {
            let primary = &ids[index % primaries];
            self.expect_ok(replica, &["CLUSTER", "REPLICATE", primary])?;
        }
        self.settle("the cluster to form", within, |cluster| {
            let (view, live) = cluster.settled()?;
            if live != total {
                return Err(format!("{live} of {total} nodes answer"));
            }
            for (index, replica) in seeds[primaries..].iter().enumerate() {
                let primary = &seeds[index % primaries];
                if view.roles.get(replica) != Some(&Role::Replica(primary.clone())) {
                    return Err(format!(
                        "{replica} is {:?}, not a replica of {primary}",
                        view.roles.get(replica)
                    ));
                }
            }
            Ok(())
        })
    }

    /// Starts one node of the cluster on a free port, with a free bus port, and adds it to
    /// `nodes`; it knows no other node yet.
    fn start_node(&mut self) -> Result<(), Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port().map_err(Error::Port)?;
            let bus_port = loop {
                let bus_port = free_port().map_err(Error::Port)?;
                if bus_port != port {
                    break bus_port;
                }
            };
            match Server::start_on(self.node_options(port, bus_port), port) {
                Ok(server) => {
                    self.nodes.push(server);
                    self.bus_ports.push(bus_port);
                    return Ok(());
                }
                // Another process may have taken one of the ports since it was free.
                Err(Error::Exited { .. }) if attempt < START_ATTEMPTS => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// A node's options: cluster mode with its own bus port and configuration file, and no
    /// persistence of data.
    fn node_options(&self, port: u16, bus_port: u16) -> ServerOptions {
        let options = &self.options;
        let mut args: Vec<String> = vec![
            "--cluster-enabled".into(),
            "yes".into(),
            // The bus port is chosen like the port, free, rather than Redis's port + 10000,
            // which may be taken or beyond 65535.
            "--cluster-port".into(),
            bus_port.to_string(),
            "--cluster-config-file".into(),
            self.dir
                .join(format!("nodes-{port}.conf"))
                .display()
                .to_string(),
            "--cluster-node-timeout".into(),
            options.node_timeout.as_millis().to_string(),
            "--cluster-require-full-coverage".into(),
            yes_no(options.require_full_coverage).into(),
            // A replica may be promoted however long it was out of touch (a test may have paused
            // its primary): the default refuses after ten node timeouts without its primary.
            "--cluster-replica-validity-factor".into(),
            "0".into(),
            // Every node names itself by its address, never by what it learnt from a peer.
            "--cluster-announce-ip".into(),
            "127.0.0.1".into(),
            // A replica loading a full sync writes an RDB file: into the cluster's directory,
            // not the test's working directory.
            "--dir".into(),
            self.dir.display().to_string(),
            "--dbfilename".into(),
            format!("node-{port}.rdb"),
            // A full sync starts at once (the default waits 5 seconds for more replicas).
            "--repl-diskless-sync".into(),
            "yes".into(),
            "--repl-diskless-sync-delay".into(),
            "0".into(),
        ];
        if let Some(password) = &options.password {
            for flag in ["--requirepass", "--masterauth"] {
                args.extend([flag.to_string(), password.clone()]);
            }
        }
        if options.server.tls.is_some() {
            // The bus, replication and MIGRATE all go over TLS, to the nodes' TLS ports.
            for flag in ["--tls-cluster", "--tls-replication"] {
                args.extend([flag.to_string(), "yes".to_string()]);
            }
        }
        args.extend(options.server.args.iter().cloned());
        ServerOptions {
            config: None,
            args,
            log: Some(self.dir.join(format!("node-{port}.log"))),
            ..options.server.clone()
        }
    }

    /// `CLUSTER MEET` sent to `addr`, introducing it to the node on `port` and `bus_port`.
    fn meet(&self, addr: &str, port: u16, bus_port: u16) -> Result<(), Error> {
        self.expect_ok(
            addr,
            &[
                "CLUSTER",
                "MEET",
                "127.0.0.1",
                &port.to_string(),
                &bus_port.to_string(),
            ],
        )
    }

    /// Every node's address, "127.0.0.1:PORT", whatever its role and whether it runs: what a
    /// cluster client is configured with.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(addr_of).collect()
    }

    /// The nodes: the primaries as started, their replicas, then the added nodes.
    pub fn nodes(&self) -> &[Server] {
        &self.nodes
    }

    pub fn nodes_mut(&mut self) -> &mut [Server] {
        &mut self.nodes
    }

    /// The node at `addr` ("127.0.0.1:PORT"), to kill, pause or restart it.
    pub fn server_at(&mut self, addr: &str) -> Option<&mut Server> {
        self.nodes.iter_mut().find(|node| addr_of(node) == addr)
    }

    /// Where the nodes' configuration files and logs are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sends one command to a node, over TLS in a TLS cluster and authenticated when a
    /// password is set. A refusal (including `MOVED`) is `Ok(Reply::Error)`.
    pub fn command(&self, addr: &str, args: &[&str]) -> Result<Reply, Error> {
        self.connect(addr)?.command(args)
    }

    /// A connection to a node, for several commands in a row: over TLS in a TLS cluster, and
    /// authenticated when a password is set.
    pub fn connect(&self, addr: &str) -> Result<Connection, Error> {
        self.connect_within(addr, COMMAND_TIMEOUT)
    }

    fn connect_within(&self, addr: &str, timeout: Duration) -> Result<Connection, Error> {
        let mut connection = match &self.options.server.tls {
            None => Connection::open(addr, timeout)?,
            Some(tls) => Connection::open_tls(addr, timeout, tls)?,
        };
        if let Some(password) = &self.options.password {
            connection.auth(password)?;
        }
        Ok(connection)
    }

    /// The node's ID (`CLUSTER MYID`), which other nodes and `CLUSTER SETSLOT` know it by.
    pub fn node_id(&self, addr: &str) -> Result<String, Error> {
        let reply = self.command(addr, &["CLUSTER", "MYID"])?;
        reply.as_str().map(String::from).ok_or(Error::Refused {
            addr: addr.to_string(),
            command: "CLUSTER MYID".into(),
            reply: format!("{reply:?}"),
        })
    }

    /// The addresses of the primaries, sorted, as the first node that answers sees them: the
    /// nodes it flags `master` and does not consider failed, with or without slots.
    pub fn primaries(&self) -> Result<Vec<String>, Error> {
        let (_, entries) = self.any_view()?;
        let mut primaries: Vec<String> = entries
            .iter()
            .filter(|entry| entry.has("master") && entry.is_known())
            .map(|entry| entry.addr.clone())
            .collect();
        primaries.sort();
        Ok(primaries)
    }

    /// The address of the primary that owns `slot`, as the first node that answers sees it.
    pub fn owner_of_slot(&self, slot: u16) -> Result<String, Error> {
        let (addr, entries) = self.any_view()?;
        View::of(&entries)
            .owner(slot)
            .map(String::from)
            .ok_or_else(|| Error::Refused {
                addr,
                command: "CLUSTER NODES".into(),
                reply: format!("no owner of slot {slot}"),
            })
    }

    /// A replica of the primary at `primary_addr` that is not failed, as the first node that
    /// answers sees it.
    pub fn replica_of(&self, primary_addr: &str) -> Result<String, Error> {
        let (_, entries) = self.any_view()?;
        let primary_id = entries
            .iter()
            .find(|entry| entry.addr == primary_addr)
            .map(|entry| entry.id.clone());
        entries
            .iter()
            .find(|entry| entry.is_replica() && entry.is_known() && entry.master_id == primary_id)
            .map(|entry| entry.addr.clone())
            .ok_or_else(|| Error::NoReplica {
                primary: primary_addr.to_string(),
            })
    }

    /// Waits until the cluster has settled: every node that answers reports `cluster_state:ok`,
    /// all agree on who owns each slot and who replicates whom (leaving out the nodes they
    /// flag failed), and every replica's link to its primary is up.
    pub fn wait_until_settled(&self, timeout: Duration) -> Result<(), Error> {
        self.settle("the cluster to settle", timeout, |cluster| {
            cluster.settled().map(drop)
        })
    }

    /// Waits until a node names a primary other than `old` for `slot` (after a test killed or
    /// paused `old`), that node answers `ROLE` as a master, and the cluster has settled.
    /// Returns the new owner's address.
    pub fn wait_for_new_owner(
        &self,
        slot: u16,
        old: &str,
        timeout: Duration,
    ) -> Result<String, Error> {
        let goal = format!("a new owner of slot {slot} in place of {old}");
        self.settle(&goal, timeout, |cluster| {
            let (view, _) = cluster.settled()?;
            let owner = view
                .owner(slot)
                .ok_or_else(|| format!("nobody owns slot {slot}"))?;
            if owner == old {
                return Err(format!("{old} still owns slot {slot}"));
            }
            cluster.is_master(owner)?;
            Ok(owner.to_string())
        })
    }

    /// Waits until every node that answers flags the node at `addr` as failed (after a test
    /// killed or paused it) and the cluster has settled otherwise. With no replica to take its
    /// place, it keeps its slots, which nobody serves.
    pub fn wait_for_fail(&self, addr: &str, timeout: Duration) -> Result<(), Error> {
        let goal = format!("every node to flag {addr} failed");
        self.settle(&goal, timeout, |cluster| {
            let (view, _) = cluster.settled()?;
            // A failed node is left out of the roles that all agree on.
            if view.roles.contains_key(addr) {
                return Err(format!("the nodes do not flag {addr} failed yet"));
            }
            Ok(())
        })
    }

    /// Makes the replica at `replica_addr` its primary's primary (`CLUSTER FAILOVER`, the
    /// manual failover that loses no write), and waits until the cluster has settled with the
    /// old primary a replica of it.
    pub fn failover(&self, replica_addr: &str) -> Result<(), Error> {
        let old = self.primary_of(replica_addr)?;
        self.expect_ok(replica_addr, &["CLUSTER", "FAILOVER"])?;
        let goal = format!("{replica_addr} to take over from {old}");
        self.settle(&goal, self.options.settle_timeout, |cluster| {
            let (view, _) = cluster.settled()?;
            if view.roles.get(replica_addr) != Some(&Role::Primary) {
                return Err(format!("{replica_addr} is not a primary yet"));
            }
            let role = view.roles.get(&old);
            if role != Some(&Role::Replica(replica_addr.to_string())) {
                return Err(format!("the old primary {old} is {role:?}"));
            }
            cluster.is_master(replica_addr)
        })
    }

    /// The primary the replica at `replica_addr` replicates, as it sees itself.
    fn primary_of(&self, replica_addr: &str) -> Result<String, Error> {
        let entries = cluster_nodes(&mut self.connect(replica_addr)?)?;
        let master_id = entries
            .iter()
            .find(|entry| entry.has("myself"))
            .and_then(|entry| entry.master_id.clone());
        entries
            .iter()
            .find(|entry| Some(&entry.id) == master_id.as_ref())
            .map(|entry| entry.addr.clone())
            .ok_or_else(|| Error::Refused {
                addr: replica_addr.to_string(),
                command: "CLUSTER NODES".into(),
                reply: "no primary for the node itself".into(),
            })
    }

    /// Moves `slot`, with its keys, to the primary at `to` by the protocol redis-cli's
    /// resharding follows: the target imports, the source migrates, `MIGRATE` moves the keys
    /// in batches, then every primary is told the slot's new owner. Waits until the cluster
    /// has settled with `to` owning the slot. Keys must be UTF-8 (this client sends text).
    pub fn migrate_slot(&self, slot: u16, to: &str) -> Result<(), Error> {
        let from = self.owner_of_slot(slot)?;
        if from != to {
            self.move_slot(slot, &from, to)?;
        }
        let goal = format!("{to} to own slot {slot}");
        self.settle(&goal, self.options.settle_timeout, |cluster| {
            let (view, _) = cluster.settled()?;
            match view.owner(slot) {
                Some(owner) if owner == to => Ok(()),
                owner => Err(format!("slot {slot} is owned by {owner:?}")),
            }
        })
    }

    fn move_slot(&self, slot: u16, from: &str, to: &str) -> Result<(), Error> {
        let slot_text = slot.to_string();
        let from_id = self.node_id(from)?;
        let to_id = self.node_id(to)?;
        let setslot = |addr: &str, args: &[&str]| {
            let mut command = vec!["CLUSTER", "SETSLOT", &slot_text];
            command.extend_from_slice(args);
            self.expect_ok(addr, &command)
        };
        // The target first: once the source redirects with ASK, the target must accept.
        setslot(to, &["IMPORTING", &from_id])?;
        setslot(from, &["MIGRATING", &to_id])?;
        let (host, port) = to.rsplit_once(':').unwrap_or((to, ""));
        let mut source = self.connect(from)?;
        loop {
            let batch = MIGRATE_BATCH.to_string();
            let reply = source.command(&["CLUSTER", "GETKEYSINSLOT", &slot_text, &batch])?;
            let keys = reply
                .as_array()
                .and_then(|keys| keys.iter().map(Reply::as_str).collect::<Option<Vec<_>>>())
                .ok_or_else(|| Error::Refused {
                    addr: from.to_string(),
                    command: "CLUSTER GETKEYSINSLOT".into(),
                    reply: format!("{reply:?}"),
                })?;
            if keys.is_empty() {
                break;
            }
            // The target requires the password of MIGRATE's own connection too.
            let mut migrate = vec!["MIGRATE", host, port, "", "0", MIGRATE_TIMEOUT_MS];
            if let Some(password) = &self.options.password {
                migrate.extend(["AUTH", password]);
            }
            migrate.push("KEYS");
            migrate.extend(keys);
            match source.command(&migrate)? {
                Reply::Status(ok) if ok == "OK" || ok == "NOKEY" => {}
                reply => {
                    return Err(Error::Refused {
                        addr: from.to_string(),
                        command: "MIGRATE".into(),
                        reply: format!("{reply:?}"),
                    })
                }
            }
        }
        // The target first, so that it claims the slot with a new epoch before the source
        // lets go of it; then everyone else, who would learn it by gossip anyway, only later.
        setslot(to, &["NODE", &to_id])?;
        setslot(from, &["NODE", &to_id])?;
        for primary in self.primaries()? {
            if primary != from && primary != to {
                setslot(&primary, &["NODE", &to_id])?;
            }
        }
        Ok(())
    }

    /// Starts one more node with the cluster's options, introduces it to the cluster, and
    /// waits until the cluster has settled with it as a primary without slots (which
    /// `migrate_slot` can give it). Returns its address.
    pub fn add_node(&mut self) -> Result<String, Error> {
        self.start_node()?;
        let addr = addr_of(&self.nodes[self.nodes.len() - 1]);
        let (known, _) = self.any_view()?;
        let index = self
            .nodes
            .iter()
            .position(|node| addr_of(node) == known)
            .expect("a view comes from one of the nodes");
        self.meet(&addr, self.nodes[index].port(), self.bus_ports[index])?;
        let goal = format!("every node to know the new node {addr}");
        self.settle(&goal, self.options.settle_timeout, |cluster| {
            let (view, _) = cluster.settled()?;
            if view.roles.get(&addr) != Some(&Role::Primary) {
                return Err(format!(
                    "the nodes see {addr} as {:?}",
                    view.roles.get(&addr)
                ));
            }
            Ok(())
        })?;
        Ok(addr)
    }

    /// The first node that answers `CLUSTER NODES`, and what it says: a killed or paused node
    /// is skipped, as a client would skip it.
    fn any_view(&self) -> Result<(String, Vec<NodeEntry>), Error> {
        let mut last = None;
        for addr in self.seeds() {
            match self
                .connect_within(&addr, POLL_TIMEOUT)
                .and_then(|mut connection| cluster_nodes(&mut connection))
            {
                Ok(entries) => return Ok((addr, entries)),
                Err(error @ Error::Command { .. }) => last = Some(error),
                Err(error) => return Err(error),
            }
        }
        Err(last.expect("a cluster has at least one node"))
    }

    /// Whether the cluster has settled (see `wait_until_settled`); if so, what every node that
    /// answers agrees on and how many answered, and if not, what is still missing.
    fn settled(&self) -> Result<(View, usize), String> {
        let mut agreed: Option<(String, View)> = None;
        let mut live = 0;
        for addr in self.seeds() {
            let answer = self
                .connect_within(&addr, POLL_TIMEOUT)
                .and_then(|mut node| {
                    let info = text(&addr, node.command(&["CLUSTER", "INFO"])?, "CLUSTER INFO")?;
                    let entries = cluster_nodes(&mut node)?;
                    let replica = entries
                        .iter()
                        .any(|entry| entry.has("myself") && entry.is_replica());
                    let link = if replica {
                        let info = node.command(&["INFO", "replication"])?;
                        Some(text(&addr, info, "INFO")?)
                    } else {
                        None
                    };
                    Ok((info, entries, link))
                });
            let (info, entries, link) = match answer {
                Ok(answer) => answer,
                // A killed or paused node has no say.
                Err(Error::Command { .. }) => continue,
                Err(error) => return Err(error.to_string()),
            };
            live += 1;
            if !info.lines().any(|line| line == "cluster_state:ok") {
                return Err(format!("{addr} does not report cluster_state:ok"));
            }
            if let Some(link) = link {
                if !link.lines().any(|line| line == "master_link_status:up") {
                    return Err(format!("replica {addr} reports no master_link_status:up"));
                }
            }
            let view = View::of(&entries);
            match &agreed {
                None => agreed = Some((addr, view)),
                Some((first, agreed)) => {
                    if let Some(difference) = agreed.difference(&view) {
                        return Err(format!("{first} and {addr} disagree: {difference}"));
                    }
                }
            }
        }
        match agreed {
            Some((_, view)) => Ok((view, live)),
            None => Err("no node answers".into()),
        }
    }

    /// `Ok` when the node at `addr` answers `ROLE` as a master.
    fn is_master(&self, addr: &str) -> Result<(), String> {
        let reply = self
            .connect_within(addr, POLL_TIMEOUT)
            .and_then(|mut node| node.command(&["ROLE"]))
            .map_err(|e| e.to_string())?;
        let role = reply.as_array().and_then(|items| items.first());
        match role.and_then(Reply::as_str) {
            Some("master") => Ok(()),
            _ => Err(format!("{addr} answers ROLE {reply:?}")),
        }
    }

    /// Sends a command that must be answered `+OK`. Its first two words name it in an error
    /// (no command sent this way has a secret there).
    fn expect_ok(&self, addr: &str, args: &[&str]) -> Result<(), Error> {
        match self.command(addr, args)? {
            Reply::Status(ok) if ok == "OK" => Ok(()),
            reply => Err(Error::Refused {
                addr: addr.to_string(),
                command: args[..args.len().min(2)].join(" "),
                reply: format!("{reply:?}"),
            }),
        }
    }

    /// Polls `check` until it returns `Ok`, or fails after `within` with the last thing it
    /// said was missing.
    fn settle<T>(
        &self,
        goal: &str,
        within: Duration,
        mut check: impl FnMut(&Cluster) -> Result<T, String>,
    ) -> Result<T, Error> {
        crate::poll_until(goal, within, POLL_INTERVAL, &self.dir, || check(self))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for server in &mut self.nodes {
            server.kill();
        }
        if self.keep_dir || std::thread::panicking() {
            eprintln!(
                "ssegw-testkit: the cluster's logs are kept in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The hash slot of `key`, as a cluster node computes it (`CLUSTER KEYSLOT`): CRC16 (XMODEM)
/// of the key modulo `SLOTS`, or of its hash tag, the text between the first `{` and the first
/// `}` after it when that is not empty, so that `{user1}.a` and `{user1}.b` share a slot.
pub fn slot_of(key: &str) -> u16 {
    let key = key.as_bytes();
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = key[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS
}

/// CRC16 with the polynomial 0x1021 and no initial or final XOR (XMODEM): what Redis Cluster
/// hashes keys with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// One line of `CLUSTER NODES`: a node as the node asked sees it.
#[derive(Debug)]
struct NodeEntry {
    id: String,
    /// "127.0.0.1:PORT": the port clients use (the TLS port in a TLS cluster).
    addr: String,
    /// `myself`, `master`, `slave`, `fail?` (suspected), `fail`, `handshake`, `noaddr`, …
    flags: Vec<String>,
    /// The primary's ID, for a replica.
    master_id: Option<String>,
    /// The ranges of slots it owns, inclusive; the slots being imported or migrated (shown
    /// in brackets) are left out.
    slots: Vec<(u16, u16)>,
}

impl NodeEntry {
    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// Redis says `slave`; a later server may say `replica`.
    fn is_replica(&self) -> bool {
        self.has("slave") || self.has("replica")
    }

    /// A node the asked node has met and does not consider failed.
    fn is_known(&self) -> bool {
        !self.has("fail") && !self.has("handshake") && !self.has("noaddr")
    }

    /// Parses `<id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent> <pong-recv>
    /// <config-epoch> <link-state> <slot>…`.
    fn parse(line: &str) -> Option<NodeEntry> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return None;
        }
        let (addr, _bus) = fields[1].split_once('@')?;
        let slots = fields[8..]
            .iter()
            .filter(|slot| !slot.starts_with('['))
            .map(|slot| match slot.split_once('-') {
                Some((first, last)) => Some((first.parse().ok()?, last.parse().ok()?)),
                None => slot.parse().ok().map(|slot| (slot, slot)),
            })
            .collect::<Option<Vec<_>>>()?;
        Some(NodeEntry {
            id: fields[0].to_string(),
            addr: addr.to_string(),
            flags: fields[2].split(',').map(String::from).collect(),
            master_id: (fields[3] != "-").then(|| fields[3].to_string()),
            slots,
        })
    }
}

/// `CLUSTER NODES` on `connection`, parsed.
fn cluster_nodes(connection: &mut Connection) -> Result<Vec<NodeEntry>, Error> {
    let reply = connection.command(&["CLUSTER", "NODES"])?;
    let refused = |reply: String| Error::Refused {
        addr: connection.addr().to_string(),
        command: "CLUSTER NODES".into(),
        reply,
    };
    let text = reply
        .as_str()
        .ok_or_else(|| refused(format!("{reply:?}")))?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| NodeEntry::parse(line).ok_or_else(|| refused(line.to_string())))
        .collect()
}

/// What a node is, in a `View`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Role {
    Primary,
    /// A replica of the primary at this address (or with this ID, if the node asked does not
    /// know its address).
    Replica(String),
}

/// What one node says about the cluster, in the terms all nodes must agree on once it has
/// settled.
#[derive(Debug, PartialEq, Eq)]
struct View {
    /// Ranges of slots, inclusive, in order, and the address of the primary that owns each.
    owners: Vec<(u16, u16, String)>,
    /// Every node the asked node knows and does not consider failed, by address.
    roles: BTreeMap<String, Role>,
}

impl View {
    fn of(entries: &[NodeEntry]) -> View {
        let addr_of_id: HashMap<&str, &str> = entries
            .iter()
            .map(|entry| (entry.id.as_str(), entry.addr.as_str()))
            .collect();
        let mut ranges: Vec<(u16, u16, String)> = entries
            .iter()
            .filter(|entry| entry.has("master"))
            .flat_map(|entry| {
                let addr = &entry.addr;
                entry.slots.iter().map(|&(a, b)| (a, b, addr.clone()))
            })
            .collect();
        ranges.sort();
        let mut owners: Vec<(u16, u16, String)> = Vec::new();
        for (first, last, addr) in ranges {
            match owners.last_mut() {
                Some(previous) if previous.1 + 1 == first && previous.2 == addr => {
                    previous.1 = last;
                }
                _ => owners.push((first, last, addr)),
            }
        }
        let roles = entries
            .iter()
            .filter(|entry| entry.is_known())
            .map(|entry| {
                let role = match &entry.master_id {
                    None => Role::Primary,
                    Some(id) => Role::Replica(
                        addr_of_id
                            .get(id.as_str())
                            .copied()
                            .unwrap_or(id)
                            .to_string(),
                    ),
                };
                (entry.addr.clone(), role)
            })
            .collect();
        View { owners, roles }
    }

    fn owner(&self, slot: u16) -> Option<&str> {
        self.owners
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, addr)| addr.as_str())
    }

    /// The first thing `other` says otherwise, if anything.
    fn difference(&self, other: &View) -> Option<String> {
        if self.owners != other.owners {
            let slot = (0..SLOTS).find(|&slot| self.owner(slot) != other.owner(slot))?;
            return Some(format!(
                "slot {slot} is owned by {:?} or by {:?}",
                self.owner(slot),
                other.owner(slot)
            ));
        }
        let addrs = self.roles.keys().chain(other.roles.keys());
        addrs
            .into_iter()
            .find(|addr| self.roles.get(*addr) != other.roles.get(*addr))
            .map(|addr| {
                format!(
                    "{addr} is {:?} or {:?}",
                    self.roles.get(addr),
                    other.roles.get(addr)
                )
            })
    }
}

/// A reply's text (a status or a bulk string), or a refusal naming `command`.
fn text(addr: &str, reply: Reply, command: &str) -> Result<String, Error> {
    match reply.as_str() {
        Some(text) => Ok(text.to_string()),
        None => Err(Error::Refused {
            addr: addr.to_string(),
            command: command.into(),
            reply: format!("{reply:?}"),
        }),
    }
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

fn addr_of(server: &Server) -> String {
    format!("127.0.0.1:{}", server.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_for_known_keys() {
        let check = |key: &str, expected: u16| assert_eq!(slot_of(key), expected, "{key:?}");
        check("foo", 12182);
        check("bar", 5061);
        check("hello", 866);
        check("", 0);
        // The hash tag alone is hashed; an empty tag, or a `{` without `}`, is not a tag.
        check("{user1000}.following", slot_of("user1000"));
        check("{user1000}.followers", slot_of("user1000"));
        check("foo{}{bar}", crc16(b"foo{}{bar}") % SLOTS);
        check("foo{{bar}}zap", slot_of("{bar"));
        check("foo{bar}{zap}", slot_of("bar"));
        check("{foo", crc16(b"{foo") % SLOTS);
        // The standard check value of CRC16/XMODEM.
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn parses_cluster_nodes_lines() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host replica e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922 16383
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master,fail - 0 1426238318243 3 disconnected 10923-16382
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 connected
";
        let entries: Vec<NodeEntry> = text.lines().map(|l| NodeEntry::parse(l).unwrap()).collect();
        assert_eq!(entries[0].addr, "127.0.0.1:30004");
        assert!(entries[0].is_replica());
        assert_eq!(entries[1].slots, vec![(0, 5460)]);
        assert!(entries[1].has("myself") && entries[1].has("master"));
        assert_eq!(entries[2].slots, vec![(5461, 10922), (16383, 16383)]);
        assert!(!entries[3].is_known());
        let view = View::of(&entries);
        assert_eq!(view.owner(0), Some("127.0.0.1:30001"));
        assert_eq!(view.owner(5461), Some("127.0.0.1:30002"));
        // A failed primary keeps its slots until another node claims them.
        assert_eq!(view.owner(16382), Some("127.0.0.1:30003"));
        assert_eq!(view.owner(16383), Some("127.0.0.1:30002"));
        assert_eq!(
            view.roles.get("127.0.0.1:30005"),
            Some(&Role::Replica("127.0.0.1:30002".into()))
        );
        assert_eq!(
            view.roles.get("127.0.0.1:30004"),
            Some(&Role::Replica("127.0.0.1:30001".into()))
        );
        assert!(!view.roles.contains_key("127.0.0.1:30003"));
        assert_eq!(NodeEntry::parse("not a line").map(|e| e.id), None);
    }

    #[test]
    fn views_name_their_first_difference() {
        let view = |owner: &str| View {
            owners: vec![(0, 99, "a".into()), (100, SLOTS - 1, owner.into())],
            roles: BTreeMap::from([("a".to_string(), Role::Primary)]),
        };
        assert_eq!(view("b").difference(&view("b")), None);
        assert_eq!(
            view("b").difference(&view("c")).as_deref(),
            Some("slot 100 is owned by Some(\"b\") or by Some(\"c\")")
        );
    }
}
