//! How to reach Redis: the URL, the credentials and TLS, as flags shared by `serve` and
//! `publish` (`RedisArgs`), checked once at start-up into a `RedisTarget`. Files are read and
//! certificates parsed here, so a setting that can never work exits 2 before any port is bound.
//! Secrets never leave this module in text: `RedisTarget`'s `Debug` and `address` show none.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args};
use redis::{ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, TlsCertificates};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{check, ConfigError, Redacted};

/// The Redis connection flags of `serve` and `publish`.
#[derive(Args, Debug, Clone)]
pub struct RedisArgs {
    /// Redis URL: redis://[user:password@]host:port[/db], or rediss://... for TLS. Without it
    /// (and without --redis-sentinels or --redis-cluster) the gateway runs as a single node
    /// with an embedded in-memory bus and history (and `publish` goes through --url).
    #[arg(long, env = "SSEGW_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Redacted>,
    /// Sentinels watching the Redis primary, comma-separated host:port: the gateway follows
    /// the primary they name through failovers. Instead of --redis-url; needs
    /// --redis-master-name.
    #[arg(long, env = "SSEGW_REDIS_SENTINELS", value_delimiter = ',')]
    pub redis_sentinels: Vec<String>,
    /// Redis Cluster nodes to start from, comma-separated host:port (any few of them: the
    /// rest are discovered). Live delivery uses sharded pub/sub, so Redis 7.0 or later.
    /// Instead of --redis-url and --redis-sentinels.
    #[arg(long, env = "SSEGW_REDIS_CLUSTER", value_delimiter = ',')]
    pub redis_cluster: Vec<String>,
    /// The name the sentinels monitor the primary under (`sentinel monitor <name> ...`).
    #[arg(long, env = "SSEGW_REDIS_MASTER_NAME")]
    pub redis_master_name: Option<String>,
    /// Speak TLS to the sentinels and the Redis nodes they name (with --redis-sentinels), or
    /// to the cluster's nodes (with --redis-cluster); a --redis-url says it with rediss://.
    #[arg(long, env = "SSEGW_REDIS_TLS", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub redis_tls: bool,
    /// Redis ACL user, instead of one in the URL.
    #[arg(long, env = "SSEGW_REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// File holding the Redis password (trailing line breaks are ignored), instead of one in
    /// the URL.
    #[arg(long, env = "SSEGW_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// The sentinels' own ACL user, where they require one (with --redis-sentinels).
    #[arg(long, env = "SSEGW_REDIS_SENTINEL_USERNAME")]
    pub redis_sentinel_username: Option<String>,
    /// File holding the sentinels' own password, where they require one (with
    /// --redis-sentinels).
    #[arg(long, env = "SSEGW_REDIS_SENTINEL_PASSWORD_FILE")]
    pub redis_sentinel_password_file: Option<PathBuf>,
    /// PEM file with the certificates that may sign the Redis server's certificate (rediss://
    /// or --redis-tls only). Without it, the system's roots are trusted.
    #[arg(long, env = "SSEGW_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM file with a client certificate chain for mutual TLS with Redis (rediss:// or
    /// --redis-tls only). Needs --redis-client-key.
    #[arg(long, env = "SSEGW_REDIS_CLIENT_CERT")]
    pub redis_client_cert: Option<PathBuf>,
    /// PEM file with the private key of --redis-client-cert.
    #[arg(long, env = "SSEGW_REDIS_CLIENT_KEY")]
    pub redis_client_key: Option<PathBuf>,
    /// Accept any certificate from Redis, unverified (rediss:// or --redis-tls only). For a
    /// test bench, never for production: anyone on the path can read and change every event.
    /// Logged as a warning at start-up.
    #[arg(long, env = "SSEGW_REDIS_TLS_SKIP_VERIFY", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub redis_tls_skip_verify: bool,
    /// Answer a publish (HTTP and `publish`) only once this many Redis replicas have the
    /// event (WAIT), so that a failover cannot lose it; past --publish-replicas-timeout the
    /// answer is a 503 that says the event may or may not be stored. 0: on the primary's word.
    #[arg(long, env = "SSEGW_PUBLISH_REPLICAS", default_value_t = 0)]
    pub publish_replicas: u32,
    /// Longest wait for --publish-replicas.
    #[arg(long, env = "SSEGW_PUBLISH_REPLICAS_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub publish_replicas_timeout: Duration,
}

/// How many replicas must have an event before a publish is answered, and how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    pub replicas: u32,
    pub timeout: Duration,
}

/// A checked Redis topology with its credentials and TLS settings.
#[derive(Clone)]
pub struct RedisTarget {
    topology: Topology,
    /// `--publish-replicas`, when above 0.
    durability: Option<Durability>,
    /// Where Redis is, with no credentials: what logs and errors name.
    address: String,
    tls: Option<TlsMode>,
}

/// How the gateway finds the Redis primary.
#[derive(Clone)]
pub enum Topology {
    /// One address (`--redis-url`), whatever stands behind it.
    Standalone(redis::ConnectionInfo),
    /// Whichever node the sentinels name as the primary (`--redis-sentinels`).
    Sentinel(SentinelTarget),
    /// The primaries of a Redis Cluster, found from these nodes (`--redis-cluster`).
    Cluster(ClusterTarget),
}

/// The nodes a cluster is found from, and how to reach any node of it.
#[derive(Clone)]
pub struct ClusterTarget {
    /// One per node given, with the credentials and TLS.
    pub seeds: Vec<redis::ConnectionInfo>,
    /// `host:port` of each node given, in the same order, for logs.
    pub seed_addresses: Vec<String>,
    /// The nodes' credentials.
    node_settings: redis::RedisConnectionInfo,
    node_tls: Option<Tls>,
}

impl ClusterTarget {
    /// How to connect to the node at `host:port` (one the cluster named).
    pub fn node(&self, host: &str, port: u16) -> redis::RedisResult<redis::ConnectionInfo> {
        connection_info(host, port, &self.node_settings, self.node_tls.as_ref())
    }

    /// `Some(insecure)` when the nodes speak TLS; the CA and client certificate, when given.
    pub fn tls(&self) -> Option<(bool, Option<TlsCertificates>)> {
        self.node_tls
            .as_ref()
            .map(|tls| (tls.insecure, tls.certificates.clone()))
    }
}

/// The sentinels, the name of the primary they watch, and how to reach the nodes they name.
#[derive(Clone)]
pub struct SentinelTarget {
    pub master_name: String,
    /// One per sentinel, with the sentinels' credentials and TLS.
    pub sentinels: Vec<redis::ConnectionInfo>,
    /// `host:port` of each sentinel, in the same order, for logs.
    pub sentinel_addresses: Vec<String>,
    /// The data nodes' credentials and database.
    node_settings: redis::RedisConnectionInfo,
    node_tls: Option<Tls>,
}

impl SentinelTarget {
    /// How to connect to the data node at `host:port` (one the sentinels named).
    pub fn node(&self, host: &str, port: u16) -> redis::RedisResult<redis::ConnectionInfo> {
        connection_info(host, port, &self.node_settings, self.node_tls.as_ref())
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Verified,
    /// `--redis-tls-skip-verify`.
    Unverified,
}

/// TLS settings for every connection of a topology.
#[derive(Clone)]
struct Tls {
    insecure: bool,
    /// The CA and the client certificate, when given.
    certificates: Option<TlsCertificates>,
}

/// The connection info for `host:port` with these settings, over TLS when `tls` is given.
fn connection_info(
    host: &str,
    port: u16,
    settings: &redis::RedisConnectionInfo,
    tls: Option<&Tls>,
) -> redis::RedisResult<redis::ConnectionInfo> {
    let addr = match tls {
        None => ConnectionAddr::Tcp(host.to_string(), port),
        Some(tls) => ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: tls.insecure,
            tls_params: None,
        },
    };
    let info = addr
        .into_connection_info()?
        .set_redis_settings(settings.clone());
    match tls.and_then(|t| t.certificates.clone()) {
        Some(certificates) => Ok(redis::Client::build_with_tls(info, certificates)?
            .get_connection_info()
            .clone()),
        None => Ok(info),
    }
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings = match &self.topology {
            Topology::Standalone(info) => info.redis_settings(),
            Topology::Sentinel(sentinel) => &sentinel.node_settings,
            Topology::Cluster(cluster) => &cluster.node_settings,
        };
        f.debug_struct("RedisTarget")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("username", &settings.username().is_some())
            .field("password", &settings.password().is_some())
            .finish()
    }
}

impl RedisTarget {
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Where Redis is, never with credentials: `host:port`, or the master name and the
    /// sentinels.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn tls(&self) -> Option<TlsMode> {
        self.tls
    }

    pub fn durability(&self) -> Option<Durability> {
        self.durability
    }
}

impl RedisArgs {
    /// The Redis to use, or `None` without --redis-url and --redis-sentinels. Reads the
    /// password and certificate files.
    pub fn target(&self) -> Result<Option<RedisTarget>, ConfigError> {
        let sentinels = !self.redis_sentinels.is_empty();
        let cluster = !self.redis_cluster.is_empty();
        let given: Vec<&str> = [
            ("--redis-url (SSEGW_REDIS_URL)", self.redis_url.is_some()),
            ("--redis-sentinels (SSEGW_REDIS_SENTINELS)", sentinels),
            ("--redis-cluster (SSEGW_REDIS_CLUSTER)", cluster),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect();
        if given.len() > 1 {
            return Err(ConfigError(format!(
                "{} are different ways to find Redis: give one of them",
                given.join(" and ")
            )));
        }
        if given.is_empty() {
            let settings = [
                ("--redis-username", self.redis_username.is_some()),
                ("--redis-password-file", self.redis_password_file.is_some()),
                ("--redis-ca-file", self.redis_ca_file.is_some()),
                ("--redis-client-cert", self.redis_client_cert.is_some()),
                ("--redis-client-key", self.redis_client_key.is_some()),
                ("--redis-tls-skip-verify", self.redis_tls_skip_verify),
                ("--redis-tls", self.redis_tls),
                ("--publish-replicas", self.publish_replicas > 0),
                ("--redis-master-name", self.redis_master_name.is_some()),
                (
                    "--redis-sentinel-username",
                    self.redis_sentinel_username.is_some(),
                ),
                (
                    "--redis-sentinel-password-file",
                    self.redis_sentinel_password_file.is_some(),
                ),
            ];
            return match settings.iter().find(|(_, set)| *set) {
                Some((flag, _)) => Err(ConfigError(format!(
                    "{flag} is a setting of the Redis connection: give --redis-url \
                     (SSEGW_REDIS_URL), --redis-sentinels (SSEGW_REDIS_SENTINELS) or \
                     --redis-cluster (SSEGW_REDIS_CLUSTER) too"
                ))),
                None => Ok(None),
            };
        }
        let url = self.redis_url.as_ref().map(|Redacted(url)| url);
        let sentinel_only = [
            ("--redis-master-name", self.redis_master_name.is_some()),
            (
                "--redis-sentinel-username",
                self.redis_sentinel_username.is_some(),
            ),
            (
                "--redis-sentinel-password-file",
                self.redis_sentinel_password_file.is_some(),
            ),
        ];
        if !sentinels {
            if let Some((flag, _)) = sentinel_only.iter().find(|(_, set)| *set) {
                return Err(ConfigError(format!(
                    "{flag} is a setting of --redis-sentinels (SSEGW_REDIS_SENTINELS)"
                )));
            }
        }
        if url.is_some() && self.redis_tls {
            return Err(ConfigError(
                "--redis-tls is a setting of --redis-sentinels and --redis-cluster; with \
                 --redis-url (SSEGW_REDIS_URL) the URL says it (rediss:// for TLS)"
                    .into(),
            ));
        }
        // The parser's message never repeats the URL, which may hold a password.
        let url_info = url
            .map(|url| {
                url.as_str().into_connection_info().map_err(|e| {
                    ConfigError(format!(
                        "--redis-url (SSEGW_REDIS_URL) is not a Redis URL \
                         (redis://[user:password@]host:port[/db] or rediss://...): {}",
                        e.detail().unwrap_or("it does not parse")
                    ))
                })
            })
            .transpose()?;
        let mut settings = url_info
            .as_ref()
            .map_or_else(Default::default, |info| info.redis_settings().clone());
        settings = credentials(
            settings,
            self.redis_username.as_deref(),
            self.redis_password_file.as_deref(),
            (
                "--redis-username (SSEGW_REDIS_USERNAME)",
                "--redis-password-file (SSEGW_REDIS_PASSWORD_FILE)",
            ),
        )?;
        let tls = match &url_info {
            Some(info) => match info.addr() {
                ConnectionAddr::TcpTls { insecure, .. } => {
                    check(
                        !insecure,
                        "--redis-url (SSEGW_REDIS_URL): skipping certificate verification takes \
                         the explicit flag --redis-tls-skip-verify, not #insecure in the URL",
                    )?;
                    true
                }
                _ => false,
            },
            None => self.redis_tls,
        };
        let tls = if tls {
            let certificates = self.tls_certificates()?;
            let given = certificates.root_cert.is_some() || certificates.client_tls.is_some();
            Some(Tls {
                insecure: self.redis_tls_skip_verify,
                certificates: given.then_some(certificates),
            })
        } else {
            let tls_flags = [
                ("--redis-ca-file", self.redis_ca_file.is_some()),
                ("--redis-client-cert", self.redis_client_cert.is_some()),
                ("--redis-client-key", self.redis_client_key.is_some()),
                ("--redis-tls-skip-verify", self.redis_tls_skip_verify),
            ];
            if let Some((flag, _)) = tls_flags.iter().find(|(_, set)| *set) {
                return Err(ConfigError(format!(
                    "{flag} is a TLS setting, and the connection is not TLS: a rediss:// \
                     --redis-url, or --redis-tls with --redis-sentinels or --redis-cluster"
                )));
            }
            None
        };
        let mode = tls.as_ref().map(|t| match t.insecure {
            true => TlsMode::Unverified,
            false => TlsMode::Verified,
        });
        let (topology, address) =
            match url_info {
                Some(info) => {
                    let (host, port) =
                        match info.addr() {
                            ConnectionAddr::Tcp(host, port)
                            | ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port),
                            ConnectionAddr::Unix(path) => {
                                check(
                            tls.is_none(),
                            "the --redis-* TLS settings need a rediss:// URL, not a Unix socket",
                        )?;
                                let info = info.clone().set_redis_settings(settings);
                                return Ok(Some(RedisTarget {
                                    address: path.display().to_string(),
                                    topology: Topology::Standalone(info),
                                    durability: self.durability()?,
                                    tls: None,
                                }));
                            }
                            _ => return Err(ConfigError(
                                "--redis-url (SSEGW_REDIS_URL): a kind of address this build does \
                             not support"
                                    .into(),
                            )),
                        };
                    let info = connection_info(&host, port, &settings, tls.as_ref())
                        .map_err(certificates_error)?;
                    (Topology::Standalone(info), format!("{host}:{port}"))
                }
                None if cluster => {
                    let (seeds, seed_addresses) = addresses(
                        &self.redis_cluster,
                        "--redis-cluster (SSEGW_REDIS_CLUSTER)",
                        &settings,
                        tls.as_ref(),
                    )?;
                    let address = format!("cluster via {}", seed_addresses.join(","));
                    let target = ClusterTarget {
                        seeds,
                        seed_addresses,
                        node_settings: settings,
                        node_tls: tls,
                    };
                    (Topology::Cluster(target), address)
                }
                None => {
                    let master_name = self.redis_master_name.clone().ok_or_else(|| {
                        ConfigError(
                            "--redis-sentinels (SSEGW_REDIS_SENTINELS) needs --redis-master-name \
                         (SSEGW_REDIS_MASTER_NAME): the name the sentinels monitor the primary \
                         under"
                                .into(),
                        )
                    })?;
                    check(
                        !master_name.is_empty(),
                        "--redis-master-name (SSEGW_REDIS_MASTER_NAME) is empty",
                    )?;
                    let sentinel_settings = credentials(
                        Default::default(),
                        self.redis_sentinel_username.as_deref(),
                        self.redis_sentinel_password_file.as_deref(),
                        (
                            "--redis-sentinel-username (SSEGW_REDIS_SENTINEL_USERNAME)",
                            "--redis-sentinel-password-file (SSEGW_REDIS_SENTINEL_PASSWORD_FILE)",
                        ),
                    )?;
                    let (sentinels, sentinel_addresses) = addresses(
                        &self.redis_sentinels,
                        "--redis-sentinels (SSEGW_REDIS_SENTINELS)",
                        &sentinel_settings,
                        tls.as_ref(),
                    )?;
                    let address = format!(
                        "master {master_name} via sentinels {}",
                        sentinel_addresses.join(",")
                    );
                    let target = SentinelTarget {
                        master_name,
                        sentinels,
                        sentinel_addresses,
                        node_settings: settings,
                        node_tls: tls,
                    };
                    (Topology::Sentinel(target), address)
                }
            };
        Ok(Some(RedisTarget {
            topology,
            address,
            durability: self.durability()?,
            tls: mode,
        }))
    }

    fn durability(&self) -> Result<Option<Durability>, ConfigError> {
        if self.publish_replicas == 0 {
            return Ok(None);
        }
        check(
            self.publish_replicas_timeout >= Duration::from_millis(1),
            "--publish-replicas-timeout (SSEGW_PUBLISH_REPLICAS_TIMEOUT) must be at least 1ms",
        )?;
        Ok(Some(Durability {
            replicas: self.publish_replicas,
            timeout: self.publish_replicas_timeout,
        }))
    }

    /// The CA and client certificate files, read and parsed.
    fn tls_certificates(&self) -> Result<TlsCertificates, ConfigError> {
        let root_cert = match &self.redis_ca_file {
            None => None,
            Some(path) => {
                let flag = "--redis-ca-file (SSEGW_REDIS_CA_FILE)";
                let pem = read(path, flag)?;
                let certs = certificates(&pem)
                    .map_err(|e| ConfigError(format!("{flag} {}: {e}", path.display())))?;
                check(
                    certs > 0,
                    &format!("{flag} {}: no PEM certificate in it", path.display()),
                )?;
                Some(pem)
            }
        };
        let client_tls = match (&self.redis_client_cert, &self.redis_client_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let flag = "--redis-client-cert (SSEGW_REDIS_CLIENT_CERT)";
                let client_cert = read(cert, flag)?;
                match certificates(&client_cert) {
                    Ok(n) if n > 0 => {}
                    Ok(_) => {
                        return Err(ConfigError(format!(
                            "{flag} {}: no PEM certificate in it",
                            cert.display()
                        )))
                    }
                    Err(e) => return Err(ConfigError(format!("{flag} {}: {e}", cert.display()))),
                }
                let flag = "--redis-client-key (SSEGW_REDIS_CLIENT_KEY)";
                let client_key = read(key, flag)?;
                PrivateKeyDer::from_pem_slice(&client_key).map_err(|_| {
                    ConfigError(format!(
                        "{flag} {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it",
                        key.display()
                    ))
                })?;
                Some(ClientTlsConfig {
                    client_cert,
                    client_key,
                })
            }
            _ => {
                return Err(ConfigError(
                    "--redis-client-cert (SSEGW_REDIS_CLIENT_CERT) and --redis-client-key \
                     (SSEGW_REDIS_CLIENT_KEY) go together: give both or neither"
                        .into(),
                ))
            }
        };
        Ok(TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// `settings` with the user and password of these flags, when given; a user needs a
/// password.
fn credentials(
    mut settings: redis::RedisConnectionInfo,
    username: Option<&str>,
    password_file: Option<&Path>,
    (user_flag, password_flag): (&str, &str),
) -> Result<redis::RedisConnectionInfo, ConfigError> {
    if let Some(user) = username {
        check(!user.is_empty(), &format!("{user_flag} is empty"))?;
        settings = settings.set_username(user);
    }
    if let Some(path) = password_file {
        let text = read(path, password_flag)?;
        let password = String::from_utf8(text)
            .map_err(|_| {
                ConfigError(format!(
                    "{password_flag} {}: not UTF-8 text",
                    path.display()
                ))
            })?
            .trim_end_matches(['\r', '\n'])
            .to_string();
        check(
            !password.is_empty(),
            &format!("{password_flag} {} is empty", path.display()),
        )?;
        settings = settings.set_password(password);
    }
    check(
        settings.username().is_none() || settings.password().is_some(),
        &format!("a Redis user needs a password: in the URL or in {password_flag}"),
    )?;
    Ok(settings)
}

/// How to connect to each `host:port` of a list flag, and the addresses as logs name them.
fn addresses(
    list: &[String],
    flag: &str,
    settings: &redis::RedisConnectionInfo,
    tls: Option<&Tls>,
) -> Result<(Vec<redis::ConnectionInfo>, Vec<String>), ConfigError> {
    let mut infos = Vec::new();
    let mut names = Vec::new();
    for address in list {
        let (host, port) = host_port(address)
            .ok_or_else(|| ConfigError(format!("{flag}: {address:?} is not host:port")))?;
        let info = connection_info(&host, port, settings, tls).map_err(certificates_error)?;
        infos.push(info);
        names.push(format!("{host}:{port}"));
    }
    Ok((infos, names))
}

/// The certificate files could not be used for a connection.
fn certificates_error(e: redis::RedisError) -> ConfigError {
    ConfigError(format!(
        "--redis-ca-file/--redis-client-cert/--redis-client-key: {}",
        e.detail().unwrap_or("the certificates are not usable")
    ))
}

/// `host:port` or `[v6]:port`.
fn host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.trim().rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = port.parse().ok()?;
    (!host.is_empty() && !host.contains('/')).then(|| (host.to_string(), port))
}

/// How many PEM certificates `pem` holds; an error for a malformed one.
fn certificates(pem: &[u8]) -> Result<usize, String> {
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| format!("not a PEM certificate: {e:?}"))?;
        count += 1;
    }
    Ok(count)
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError(format!("{flag} {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn target(flags: &[&str]) -> Result<Option<RedisTarget>, String> {
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            redis: RedisArgs,
        }
        let args = std::iter::once("test").chain(flags.iter().copied());
        let flags = Flags::try_parse_from(args).map_err(|e| e.to_string())?;
        flags.redis.target().map_err(|e| e.to_string())
    }

    fn standalone(target: &RedisTarget) -> &redis::ConnectionInfo {
        match target.topology() {
            Topology::Standalone(info) => info,
            Topology::Sentinel(_) | Topology::Cluster(_) => panic!("not a standalone target"),
        }
    }

    #[test]
    fn sentinels_name_the_primary_and_their_settings_are_their_own() {
        let sentinel = target(&[
            "--redis-sentinels",
            "10.0.0.1:26379,[::1]:26380",
            "--redis-master-name",
            "primary",
            "--redis-username",
            "gateway",
            "--redis-url-never",
        ]);
        assert!(sentinel.is_err());
        let dir =
            std::env::temp_dir().join(format!("ssegw-sentinel-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "node-pw\n").unwrap();
        let found = target(&[
            "--redis-sentinels",
            "10.0.0.1:26379,[::1]:26380",
            "--redis-master-name",
            "primary",
            "--redis-username",
            "gateway",
            "--redis-password-file",
            file.to_str().unwrap(),
        ])
        .unwrap()
        .unwrap();
        let Topology::Sentinel(sentinel) = found.topology() else {
            panic!("not a sentinel target");
        };
        assert_eq!(sentinel.master_name, "primary");
        assert_eq!(sentinel.sentinel_addresses, ["10.0.0.1:26379", "::1:26380"]);
        // The node credentials go to the data nodes, not to the sentinels.
        assert_eq!(sentinel.sentinels[0].redis_settings().password(), None);
        let node = sentinel.node("10.0.0.9", 6380).unwrap();
        assert_eq!(node.redis_settings().password(), Some("node-pw"));
        assert!(matches!(node.addr(), ConnectionAddr::Tcp(host, 6380) if host == "10.0.0.9"));
        assert!(!format!("{found:?}").contains("node-pw"));
        assert_eq!(
            found.address(),
            "master primary via sentinels 10.0.0.1:26379,::1:26380"
        );
        std::fs::remove_dir_all(&dir).unwrap();

        for (flags, expected) in [
            (
                &["--redis-sentinels", "a:1"][..],
                "needs --redis-master-name",
            ),
            (
                &[
                    "--redis-sentinels",
                    "a:1",
                    "--redis-url",
                    "redis://b:2",
                    "--redis-master-name",
                    "m",
                ],
                "give one of them",
            ),
            (
                &["--redis-url", "redis://b:2", "--redis-master-name", "m"],
                "setting of --redis-sentinels",
            ),
            (
                &["--redis-sentinels", "nope", "--redis-master-name", "m"],
                "is not host:port",
            ),
            (&["--redis-master-name", "m"], "give --redis-url"),
            (&["--publish-replicas", "1"], "give --redis-url"),
        ] {
            let error = target(flags).unwrap_err();
            assert!(error.contains(expected), "{flags:?}: {error}");
        }
    }

    #[test]
    fn a_cluster_is_found_from_its_seeds_with_one_set_of_credentials() {
        let dir = std::env::temp_dir().join(format!("ssegw-cluster-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "cluster-pw\n").unwrap();
        let found = target(&[
            "--redis-cluster",
            "10.0.0.1:7000,10.0.0.2:7001",
            "--redis-username",
            "gateway",
            "--redis-password-file",
            file.to_str().unwrap(),
            "--redis-tls",
            "true",
            "--publish-replicas",
            "1",
        ])
        .unwrap()
        .unwrap();
        let Topology::Cluster(cluster) = found.topology() else {
            panic!("not a cluster target");
        };
        assert_eq!(cluster.seed_addresses, ["10.0.0.1:7000", "10.0.0.2:7001"]);
        for seed in &cluster.seeds {
            assert_eq!(seed.redis_settings().password(), Some("cluster-pw"));
            assert!(matches!(
                seed.addr(),
                ConnectionAddr::TcpTls {
                    insecure: false,
                    ..
                }
            ));
        }
        let node = cluster.node("10.0.0.9", 7005).unwrap();
        assert_eq!(node.redis_settings().username(), Some("gateway"));
        assert!(matches!(cluster.tls(), Some((false, None))));
        assert_eq!(found.address(), "cluster via 10.0.0.1:7000,10.0.0.2:7001");
        assert_eq!(found.durability().unwrap().replicas, 1);
        assert!(!format!("{found:?}").contains("cluster-pw"));
        std::fs::remove_dir_all(&dir).unwrap();

        for (flags, expected) in [
            (
                &["--redis-cluster", "a:1", "--redis-url", "redis://b:2"][..],
                "give one of them",
            ),
            (
                &["--redis-cluster", "a:1", "--redis-sentinels", "b:2"],
                "give one of them",
            ),
            (&["--redis-cluster", "a:1,nope"], "is not host:port"),
            (
                &["--redis-cluster", "a:1", "--redis-master-name", "m"],
                "setting of --redis-sentinels",
            ),
            (&["--redis-tls", "true"], "--redis-cluster"),
            (
                &["--redis-cluster", "a:1", "--redis-ca-file", "/x"],
                "the connection is not TLS",
            ),
        ] {
            let error = target(flags).unwrap_err();
            assert!(error.contains(expected), "{flags:?}: {error}");
        }
    }

    #[test]
    fn credentials_come_from_the_url_or_the_flags_and_never_show() {
        let dir = std::env::temp_dir().join(format!("ssegw-redis-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "fl4g-pw\r\n").unwrap();

        let from_url = target(&["--redis-url", "redis://alice:url-pw@10.0.0.1:6380/2"])
            .unwrap()
            .unwrap();
        let settings = standalone(&from_url).redis_settings();
        assert_eq!(
            (settings.username(), settings.password(), settings.db()),
            (Some("alice"), Some("url-pw"), 2)
        );
        assert_eq!(
            (from_url.address(), from_url.tls()),
            ("10.0.0.1:6380", None)
        );

        let from_flags = target(&[
            "--redis-url",
            "redis://:url-pw@10.0.0.1:6380",
            "--redis-username",
            "gateway",
            "--redis-password-file",
            file.to_str().unwrap(),
        ])
        .unwrap()
        .unwrap();
        let settings = standalone(&from_flags).redis_settings();
        assert_eq!(
            (settings.username(), settings.password()),
            (Some("gateway"), Some("fl4g-pw"))
        );
        for shown in [format!("{from_url:?}"), format!("{from_flags:?}")] {
            assert!(!shown.contains("pw"), "{shown}");
            assert!(shown.contains("10.0.0.1:6380"), "{shown}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_is_verified_unless_the_flag_says_otherwise() {
        let verified = target(&["--redis-url", "rediss://redis.example:6380"]).unwrap();
        assert_eq!(verified.unwrap().tls(), Some(TlsMode::Verified));
        let unverified = target(&[
            "--redis-url",
            "rediss://redis.example:6380",
            "--redis-tls-skip-verify",
            "true",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(unverified.tls(), Some(TlsMode::Unverified));
        assert!(matches!(
            standalone(&unverified).addr(),
            ConnectionAddr::TcpTls { insecure: true, .. }
        ));
        assert!(target(&[]).unwrap().is_none());
    }
}
