//! Configuration: command-line flags with `SSEGW_*` environment equivalents, parsed and
//! checked once at start-up into typed structs that are passed explicitly. Bad config is an
//! error here, before any port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand};
use ssegw_protocol::retention::Limits;
use ssegw_protocol::{Scope, TopicPattern};

mod mercure;
mod redis;

pub use self::mercure::{MercureArgs, MercureConfig};
pub use self::redis::{
    ClusterTarget, Durability, RedisArgs, RedisTarget, SentinelTarget, TlsMode, Topology,
};
use crate::auth::{AuthConfig, VerifyingKey};
pub use crate::bus::presence::PresenceConfig;
use crate::telemetry::TelemetryConfig;

#[derive(Parser, Debug)]
#[command(
    name = "sse-gateway",
    version,
    about = "Distributed Server-Sent Events gateway backed by Redis",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Publish one event, through Redis when one is configured (--redis-url, --redis-sentinels
    /// or --redis-cluster), else through a gateway's HTTP API.
    Publish(Box<PublishArgs>),
    /// Print the Redis Lua code: the function library, or with --eval the plain EVAL script.
    Script(ScriptArgs),
    /// Show or change the fleet's retention table in Redis: per namespace (a topic prefix),
    /// the events kept, how long a topic lives without a publish, and the largest event.
    Namespace(Box<NamespaceArgs>),
}

#[derive(Args, Debug)]
pub struct NamespaceArgs {
    #[command(subcommand)]
    pub action: NamespaceAction,
}

/// Where the fleet's table is.
#[derive(Args, Debug)]
pub struct NamespaceTarget {
    /// The fleet's Redis (--redis-url, --redis-sentinels or --redis-cluster, and the other
    /// --redis-* settings).
    #[command(flatten)]
    pub redis: RedisArgs,
    #[arg(long, env = "SSEGW_REDIS_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,
}

#[derive(Subcommand, Debug)]
pub enum NamespaceAction {
    /// Print the table: the default, then each namespace (JSON).
    List(NamespaceTarget),
    /// Set the limits of a namespace (a topic prefix such as `chat.`), or with --default those
    /// of every topic outside the namespaces. Limits not given keep their current value (for
    /// a new namespace: the default's). Applies to the next publish, on every replica.
    Set(NamespaceSet),
    /// Remove a namespace: its topics fall back to a shorter prefix or the default.
    Unset {
        /// The namespace's prefix.
        prefix: String,
        #[command(flatten)]
        target: NamespaceTarget,
    },
}

#[derive(Args, Debug)]
pub struct NamespaceSet {
    /// The namespace's prefix (a topic's longest matching prefix decides its limits).
    #[arg(required_unless_present = "default", conflicts_with = "default")]
    pub prefix: Option<String>,
    /// Set the default instead of a namespace.
    #[arg(long)]
    pub default: bool,
    /// Events kept per topic.
    #[arg(long)]
    pub max_len: Option<u64>,
    /// How long a topic's history lives without a publish.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Largest event data accepted, in bytes.
    #[arg(long)]
    pub max_event_bytes: Option<usize>,
    #[command(flatten)]
    pub target: NamespaceTarget,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SSEGW_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Install the gateway's function library in Redis at start-up (FUNCTION LOAD), and again
    /// when Redis lost it. `false` where the gateway's Redis user may not load functions: an
    /// administrator loads them once (`sse-gateway script | redis-cli -x FUNCTION LOAD
    /// REPLACE`), and a replica that finds them missing stays not ready and says so.
    #[arg(long, env = "SSEGW_REDIS_INSTALL_FUNCTIONS", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub redis_install_functions: bool,
    /// HTTP worker threads [default: number of CPUs].
    #[arg(long, env = "SSEGW_WORKERS")]
    pub workers: Option<usize>,
    /// Interval of keep-alive comments on idle streams.
    #[arg(long, env = "SSEGW_KEEPALIVE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub keepalive: Duration,
    /// Reconnection delay sent to clients in the `retry:` field.
    #[arg(long, env = "SSEGW_RETRY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry: Duration,
    /// Most topics one connection may subscribe to.
    #[arg(long, env = "SSEGW_MAX_TOPICS", default_value_t = 16)]
    pub max_topics: usize,
    /// Most SSE streams this replica holds; beyond it subscribers get 503 with Retry-After.
    /// Each stream is one open file: keep it below the process's `ulimit -n`.
    #[arg(long, env = "SSEGW_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// On SIGTERM, streams are closed at random instants spread over this window (so clients
    /// do not reconnect all at once) and the process exits before it ends. Keep it below the
    /// orchestrator's grace period (Kubernetes: terminationGracePeriodSeconds).
    #[arg(long, env = "SSEGW_DRAIN_WINDOW", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_window: Duration,
    /// How long data written to a client may stay unacknowledged before the connection is
    /// dropped (TCP_USER_TIMEOUT). With keep-alive writes, a vanished or stalled client is
    /// noticed within keep-alive + this.
    #[arg(long, env = "SSEGW_DEAD_PEER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub dead_peer_timeout: Duration,
    /// How often the replica sends itself a canary message through Redis pub/sub; it is
    /// ready only while canaries arrive within --redis-timeout.
    #[arg(long, env = "SSEGW_CANARY_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub canary_interval: Duration,
    /// Write coalescing (opt-in): a topic's events are held this long after the first of them
    /// and then written to each connection together, in one write. Trades up to this much
    /// latency for far fewer writes at high event rates; 0 (the default) writes each event at
    /// once. At most 1s.
    #[arg(long, env = "SSEGW_WRITE_COALESCE", default_value = "0ms", value_parser = humantime::parse_duration)]
    pub write_coalesce: Duration,
    /// Deliveries a connection may fall behind on one topic before it is closed as too slow
    /// (with --write-coalesce, a batch counts as one). A topic holds only the deliveries one
    /// of its subscribers has yet to write, so memory grows with a lagging client's backlog,
    /// up to this many, and shrinks back when it catches up.
    #[arg(long, env = "SSEGW_CLIENT_BUFFER", default_value_t = 128)]
    pub client_buffer: usize,
    /// How long an idempotency key (`Idempotency-Key` on `POST /publish`) is remembered: a
    /// publish repeated with the same key on the same topic within it returns the first id.
    #[arg(long, env = "SSEGW_IDEMPOTENCY_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idempotency_window: Duration,
    /// Most events in one batch publish (`POST /publish` with NDJSON).
    #[arg(long, env = "SSEGW_PUBLISH_BATCH_MAX", default_value_t = 1000)]
    pub publish_batch_max: usize,
    /// Redis connections for commands that need one to themselves: a publish that waits for
    /// --publish-replicas, the subscriber's backfills and canaries. Other publishes and history
    /// reads share one pipelined connection.
    #[arg(long, env = "SSEGW_REDIS_POOL_SIZE", default_value_t = 16)]
    pub redis_pool_size: usize,
    /// Longest wait for Redis (connect, pool checkout, command) before failing.
    #[arg(long, env = "SSEGW_REDIS_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,
    /// How often the replica writes its subscriber count per topic to Redis, for `GET
    /// /presence`; a report counts for three intervals, so a replica that dies drops out of the
    /// counts within three intervals. 0 turns presence off (no reports, no `/presence`).
    /// Between 100ms and 60s.
    #[arg(long, env = "SSEGW_PRESENCE_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub presence_interval: Duration,
    /// Serve the built-in pages: the demo at `/` and the live status page at `/status/page`
    /// with its event stream `/status/stream`. Turn them off where only the API should be
    /// reachable.
    #[arg(long, env = "SSEGW_PAGES", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub pages: bool,
    /// PEM file with the server's certificate chain: serve HTTPS instead of plain HTTP, with
    /// HTTP/2 for the clients that negotiate it (browsers do). Needs --tls-key.
    #[arg(long, env = "SSEGW_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "SSEGW_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Also accept HTTP/2 without TLS (h2c, with prior knowledge) on the plain listener, for
    /// services; HTTP/1.1 keeps working on the same port. Browsers speak HTTP/2 only over TLS.
    #[arg(long, env = "SSEGW_H2C", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub h2c: bool,
    #[command(flatten)]
    pub retention: RetentionArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub mercure: MercureArgs,
}

/// Who may subscribe and publish, and from which browser origins (docs/authorization.md).
#[derive(Args, Debug, Clone)]
pub struct AuthArgs {
    /// Topic patterns anyone may subscribe to without a token, comma-separated (`*` for all,
    /// `public.*` for a prefix). Empty (the default): every subscription needs a token.
    #[arg(long, env = "SSEGW_ANONYMOUS_SUBSCRIBE", value_delimiter = ',')]
    pub anonymous_subscribe: Vec<String>,
    /// Topic patterns anyone may publish to over HTTP without a token. Empty (the default):
    /// every HTTP publish needs a token. Publishing through Redis is guarded by Redis itself.
    #[arg(long, env = "SSEGW_ANONYMOUS_PUBLISH", value_delimiter = ',')]
    pub anonymous_publish: Vec<String>,
    /// HMAC secret for HS256/384/512 tokens, at least 32 bytes. Prefer the variable or
    /// --jwt-secret-file to the flag, which other local users can see.
    #[arg(long, env = "SSEGW_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Redacted>,
    /// File holding the HMAC secret (trailing line breaks are ignored).
    #[arg(long, env = "SSEGW_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<std::path::PathBuf>,
    /// PEM files with RSA (RS*, PS*) or EC (ES256, ES384) public keys, comma-separated; several
    /// keys allow a rotation.
    #[arg(long, env = "SSEGW_JWT_PUBLIC_KEY", value_delimiter = ',')]
    pub jwt_public_key: Vec<std::path::PathBuf>,
    /// A JWKS file (the JSON of an identity provider's `jwks_uri`); a token's `kid` picks its key.
    #[arg(long, env = "SSEGW_JWT_JWKS")]
    pub jwt_jwks: Option<std::path::PathBuf>,
    /// The algorithms accepted, comma-separated; a token naming any other is refused, whatever
    /// its signature.
    #[arg(
        long,
        env = "SSEGW_JWT_ALGORITHMS",
        value_delimiter = ',',
        default_value = "HS256,RS256,ES256"
    )]
    pub jwt_algorithms: Vec<String>,
    /// Accepted audiences (`aud`), comma-separated; when set, a token must name one of them.
    #[arg(long, env = "SSEGW_JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,
    /// Accepted issuers (`iss`), comma-separated; when set, a token must name one of them.
    #[arg(long, env = "SSEGW_JWT_ISSUER", value_delimiter = ',')]
    pub jwt_issuer: Vec<String>,
    /// Clock skew allowed when checking `exp` and `nbf`.
    #[arg(long, env = "SSEGW_JWT_LEEWAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub jwt_leeway: Duration,
    /// The claim that lists a token's topics: `{"<claim>": {"subscribe": [..], "publish": [..]}}`.
    #[arg(long, env = "SSEGW_JWT_CLAIM", default_value = "ssegw")]
    pub jwt_claim: String,
    /// Cookie a subscriber's token may come in (for `EventSource` with `withCredentials`);
    /// empty: no cookie source.
    #[arg(long, env = "SSEGW_AUTH_COOKIE", default_value = "ssegw_token")]
    pub auth_cookie: String,
    /// Whether a subscriber's token may come in the `access_token` query parameter. Convenient
    /// for browsers, but URLs end up in proxy and server logs: turn it off where they are kept.
    #[arg(long, env = "SSEGW_QUERY_TOKEN", default_value_t = true, action = clap::ArgAction::Set)]
    pub query_token: bool,
    /// Whether a stream ends when the token that opened it expires (after a `ssegw-expired`
    /// control event), so that a revoked user does not listen forever.
    #[arg(long, env = "SSEGW_CLOSE_ON_EXPIRY", default_value_t = true, action = clap::ArgAction::Set)]
    pub close_on_expiry: bool,
    /// Browser origins allowed to call the gateway (CORS), comma-separated, e.g.
    /// `https://app.example.com`; `*` allows any origin but without credentials. Empty (the
    /// default): no CORS headers, same-origin pages only.
    #[arg(long, env = "SSEGW_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Whether listed origins may send credentials (cookies, Authorization).
    #[arg(long, env = "SSEGW_CORS_CREDENTIALS", default_value_t = true, action = clap::ArgAction::Set)]
    pub cors_credentials: bool,
}

/// A secret setting (a key, a token): its `Debug` output hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redacted(..)")
    }
}

impl std::str::FromStr for Redacted {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Redacted, Self::Err> {
        Ok(Redacted(s.to_string()))
    }
}

/// The retention a replica seeds an empty Redis with (the first replica to find no function
/// library writes them there as the fleet's default); from then on Redis's table rules, and
/// `sse-gateway namespace` changes it. The embedded bus uses them as they are.
#[derive(Args, Debug, Clone)]
pub struct RetentionArgs {
    /// Events kept per topic for resumption (seeds an empty Redis; see `namespace`).
    #[arg(long, env = "SSEGW_HISTORY_MAX_LEN", default_value_t = 1000)]
    pub history_max_len: u64,
    /// A topic's history is dropped after this long without a publish (seeds an empty Redis).
    #[arg(long, env = "SSEGW_HISTORY_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub history_ttl: Duration,
    /// Largest event data accepted, in bytes (seeds an empty Redis).
    #[arg(long, env = "SSEGW_MAX_EVENT_BYTES", default_value_t = 65_536)]
    pub max_event_bytes: usize,
}

#[derive(Args, Debug, Clone)]
pub struct PublishArgs {
    #[arg(long)]
    pub topic: String,
    /// Event data (UTF-8 text; line breaks become separate `data:` lines on the wire).
    #[arg(long)]
    pub data: String,
    /// Optional SSE event type.
    #[arg(long)]
    pub event: Option<String>,
    /// Publish straight to this Redis (--redis-url and the other --redis-* settings).
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Gateway base URL, used when no Redis URL is given.
    #[arg(long, env = "SSEGW_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Bearer token for the gateway's `POST /publish` (a JWT whose claims grant the topic).
    #[arg(long, env = "SSEGW_TOKEN", hide_env_values = true)]
    pub token: Option<Redacted>,
    /// Makes the publish safe to repeat: the same key on the same topic within
    /// --idempotency-window returns the first publish's id and stores nothing new.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// How long an idempotency key is remembered.
    #[arg(long, env = "SSEGW_IDEMPOTENCY_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idempotency_window: Duration,
    #[arg(long, env = "SSEGW_REDIS_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ScriptArgs {
    /// Print the plain script for `EVAL <script> 1 <topic> <data> [<event>]`.
    #[arg(long)]
    pub eval: bool,
    /// Publish on sharded channels (SPUBLISH), as gateways started with --redis-cluster
    /// expect: for Redis Cluster.
    #[arg(long)]
    pub sharded: bool,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// Everything `run` needs, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub workers: usize,
    pub dead_peer_timeout: Duration,
    /// Whether the demo and status pages are served.
    pub pages: bool,
    pub transport: Transport,
    pub stream: StreamConfig,
    pub bus: BusConfig,
    pub publish: PublishConfig,
    pub auth: AuthConfig,
    /// The Mercure hub, with `--mercure true`.
    pub mercure: Option<MercureConfig>,
    pub cors: CorsConfig,
    /// Logs, and what goes to OTLP (from the standard `OTEL_*` variables).
    pub telemetry: TelemetryConfig,
}

/// Which browser origins may call the gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsConfig {
    /// No CORS headers: same-origin pages only.
    #[default]
    Off,
    /// Any origin, without credentials.
    AnyOrigin,
    /// These origins (`scheme://host[:port]`), with credentials when set.
    Origins {
        origins: Vec<String>,
        credentials: bool,
    },
}

/// How the listener speaks HTTP.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plain HTTP/1.1.
    Http1,
    /// Plain HTTP/1.1, and HTTP/2 with prior knowledge (h2c) on the same port (`--h2c`).
    Http1AndH2c,
    /// TLS, with HTTP/2 or HTTP/1.1 as the client negotiates by ALPN (`--tls-cert`).
    Tls(Arc<rustls::ServerConfig>),
}

/// How SSE streams behave.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub keepalive: Duration,
    pub retry: Duration,
    pub max_topics: usize,
    pub max_event_bytes: usize,
    pub max_connections: usize,
    /// How long a new connection waits for its topics to be subscribed before a 503.
    pub subscribe_timeout: Duration,
    pub drain_window: Duration,
    /// Zero: no write coalescing.
    pub write_coalesce: Duration,
}

impl StreamConfig {
    /// The part of the drain window over which streams are closed: all of it but a margin
    /// (a quarter, at most a second) in which the process exits.
    pub fn drain_spread(&self) -> Duration {
        self.drain_window - (self.drain_window / 4).min(Duration::from_secs(1))
    }
}

/// Which bus to use and how.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// `None`: the embedded bus.
    pub redis: Option<RedisTarget>,
    /// Load the function library when it is missing (`--redis-install-functions`).
    pub install_functions: bool,
    pub redis_pool_size: usize,
    pub redis_timeout: Duration,
    pub canary_interval: Duration,
    pub client_buffer: usize,
    /// The retention this replica seeds an empty Redis with; the embedded bus's retention.
    pub retention_seed: Limits,
    /// `--presence-interval`; `None`: presence is off.
    pub presence: Option<PresenceConfig>,
}

/// How publishes over HTTP are taken.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// How long an idempotency key is remembered (`--idempotency-window`).
    pub idempotency_window: Duration,
    /// Most events in one batch request (`--publish-batch-max`).
    pub batch_max: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

fn check(ok: bool, message: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError(message.to_string()))
    }
}

impl RetentionArgs {
    pub fn limits(&self) -> Result<Limits, ConfigError> {
        check(
            self.history_max_len >= 1,
            "--history-max-len (SSEGW_HISTORY_MAX_LEN) must be at least 1",
        )?;
        check(
            self.history_ttl >= Duration::from_secs(1),
            "--history-ttl (SSEGW_HISTORY_TTL) must be at least 1s",
        )?;
        check(
            (1..=16 << 20).contains(&self.max_event_bytes),
            "--max-event-bytes (SSEGW_MAX_EVENT_BYTES) must be between 1 and 16777216",
        )?;
        Ok(Limits {
            max_len: self.history_max_len,
            ttl_secs: self.history_ttl.as_secs(),
            max_data_bytes: self.max_event_bytes,
        })
    }
}

impl AuthArgs {
    /// Reads the key files and checks every setting.
    pub fn auth_config(&self) -> Result<AuthConfig, ConfigError> {
        let config = self.auth_settings()?;
        config.check().map_err(ConfigError)?;
        Ok(config)
    }

    /// The settings, without `AuthConfig::check` (which a replica serving the Mercure hub does
    /// not need to pass: its native API may allow nothing).
    fn auth_settings(&self) -> Result<AuthConfig, ConfigError> {
        let scope = |patterns: &[String], flag: &str| -> Result<Scope, ConfigError> {
            patterns
                .iter()
                .map(|p| p.trim())
                .filter(|p| !p.is_empty())
                .map(|p| {
                    TopicPattern::new(p).map_err(|e| ConfigError(format!("{flag}: {p:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Scope::new)
        };
        let read = |path: &std::path::Path, flag: &str| {
            std::fs::read(path).map_err(|e| ConfigError(format!("{flag} {}: {e}", path.display())))
        };
        let mut keys = Vec::new();
        if let Some(Redacted(secret)) = &self.jwt_secret {
            keys.push(
                VerifyingKey::secret(secret.as_bytes(), "--jwt-secret (SSEGW_JWT_SECRET)")
                    .map_err(ConfigError)?,
            );
        }
        if let Some(path) = &self.jwt_secret_file {
            let flag = "--jwt-secret-file (SSEGW_JWT_SECRET_FILE)";
            let mut secret = read(path, flag)?;
            while secret.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
                secret.pop();
            }
            keys.push(VerifyingKey::secret(&secret, flag).map_err(ConfigError)?);
        }
        for path in &self.jwt_public_key {
            let flag = "--jwt-public-key (SSEGW_JWT_PUBLIC_KEY)";
            let source = format!("{flag} {}", path.display());
            keys.push(VerifyingKey::public_pem(&read(path, flag)?, &source).map_err(ConfigError)?);
        }
        if let Some(path) = &self.jwt_jwks {
            let flag = "--jwt-jwks (SSEGW_JWT_JWKS)";
            let source = format!("{flag} {}", path.display());
            keys.extend(VerifyingKey::jwks(&read(path, flag)?, &source).map_err(ConfigError)?);
        }
        let algorithms = self
            .jwt_algorithms
            .iter()
            .map(|name| {
                name.trim().parse::<jsonwebtoken::Algorithm>().map_err(|_| {
                    ConfigError(format!(
                        "--jwt-algorithms (SSEGW_JWT_ALGORITHMS): unknown algorithm {name:?}"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        check(
            !algorithms.is_empty(),
            "--jwt-algorithms (SSEGW_JWT_ALGORITHMS) must name at least one algorithm",
        )?;
        check(
            self.jwt_leeway <= Duration::from_secs(300),
            "--jwt-leeway (SSEGW_JWT_LEEWAY) must be at most 5m",
        )?;
        check(
            !self.jwt_claim.is_empty(),
            "--jwt-claim (SSEGW_JWT_CLAIM) must not be empty",
        )?;
        let config = AuthConfig {
            keys,
            algorithms,
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
            leeway: self.jwt_leeway,
            claim: self.jwt_claim.clone(),
            anonymous_subscribe: scope(
                &self.anonymous_subscribe,
                "--anonymous-subscribe (SSEGW_ANONYMOUS_SUBSCRIBE)",
            )?,
            anonymous_publish: scope(
                &self.anonymous_publish,
                "--anonymous-publish (SSEGW_ANONYMOUS_PUBLISH)",
            )?,
            cookie: (!self.auth_cookie.is_empty()).then(|| self.auth_cookie.clone()),
            query_token: self.query_token,
            close_on_expiry: self.close_on_expiry,
        };
        Ok(config)
    }

    pub fn cors_config(&self) -> Result<CorsConfig, ConfigError> {
        let origins: Vec<String> = self
            .cors_origins
            .iter()
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty())
            .collect();
        if origins.is_empty() {
            return Ok(CorsConfig::Off);
        }
        if origins.iter().any(|o| o == "*") {
            check(
                origins.len() == 1,
                "--cors-origins (SSEGW_CORS_ORIGINS): '*' cannot be combined with listed origins",
            )?;
            return Ok(CorsConfig::AnyOrigin);
        }
        for origin in &origins {
            check(
                is_origin(origin),
                &format!(
                    "--cors-origins (SSEGW_CORS_ORIGINS): {origin:?} is not an origin such as \
                     https://app.example.com (scheme and host, an optional port, no path)"
                ),
            )?;
        }
        Ok(CorsConfig::Origins {
            origins,
            credentials: self.cors_credentials,
        })
    }
}

/// `scheme://host[:port]` as browsers send it in `Origin`: no path, query, user or spaces.
fn is_origin(text: &str) -> bool {
    let Some((scheme, authority)) = text.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !authority.is_empty()
        && !authority.ends_with(':')
        && authority
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

impl ServeArgs {
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let retention_seed = self.retention.limits()?;
        let redis = self.redis.target()?;
        let workers = match self.workers {
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };
        check(workers >= 1, "--workers (SSEGW_WORKERS) must be at least 1")?;
        check(
            self.keepalive >= Duration::from_millis(100),
            "--keepalive (SSEGW_KEEPALIVE) must be at least 100ms",
        )?;
        check(
            (1..=256).contains(&self.max_topics),
            "--max-topics (SSEGW_MAX_TOPICS) must be between 1 and 256",
        )?;
        check(
            self.client_buffer >= 16,
            "--client-buffer (SSEGW_CLIENT_BUFFER) must be at least 16",
        )?;
        check(
            self.redis_pool_size >= 2,
            "--redis-pool-size (SSEGW_REDIS_POOL_SIZE) must be at least 2",
        )?;
        check(
            self.idempotency_window >= Duration::from_secs(1),
            "--idempotency-window (SSEGW_IDEMPOTENCY_WINDOW) must be at least 1s",
        )?;
        check(
            (1..=100_000).contains(&self.publish_batch_max),
            "--publish-batch-max (SSEGW_PUBLISH_BATCH_MAX) must be between 1 and 100000",
        )?;
        check(
            self.redis_timeout >= Duration::from_millis(10),
            "--redis-timeout (SSEGW_REDIS_TIMEOUT) must be at least 10ms",
        )?;
        check(
            self.max_connections >= 1,
            "--max-connections (SSEGW_MAX_CONNECTIONS) must be at least 1",
        )?;
        check(
            self.dead_peer_timeout >= Duration::from_secs(1),
            "--dead-peer-timeout (SSEGW_DEAD_PEER_TIMEOUT) must be at least 1s",
        )?;
        check(
            self.canary_interval >= Duration::from_millis(10),
            "--canary-interval (SSEGW_CANARY_INTERVAL) must be at least 10ms",
        )?;
        check(
            self.write_coalesce <= Duration::from_secs(1),
            "--write-coalesce (SSEGW_WRITE_COALESCE) must be at most 1s",
        )?;
        check(
            self.presence_interval.is_zero()
                || (Duration::from_millis(100)..=Duration::from_secs(60))
                    .contains(&self.presence_interval),
            "--presence-interval (SSEGW_PRESENCE_INTERVAL) must be 0 (off) or between 100ms and 60s",
        )?;
        let transport = self.transport()?;
        let mercure = self.mercure.config(self.auth.jwt_leeway)?;
        let auth = match mercure {
            None => self.auth.auth_config()?,
            Some(_) => self.auth.auth_settings()?,
        };
        let cors = self.auth.cors_config()?;
        let telemetry =
            TelemetryConfig::from_lookup(|name| std::env::var(name).ok()).map_err(ConfigError)?;
        Ok(Config {
            listen: self.listen,
            workers,
            dead_peer_timeout: self.dead_peer_timeout,
            pages: self.pages,
            transport,
            stream: StreamConfig {
                keepalive: self.keepalive,
                retry: self.retry,
                max_topics: self.max_topics,
                max_event_bytes: retention_seed.max_data_bytes,
                max_connections: self.max_connections,
                subscribe_timeout: self.redis_timeout,
                drain_window: self.drain_window,
                write_coalesce: self.write_coalesce,
            },
            bus: BusConfig {
                redis,
                install_functions: self.redis_install_functions,
                redis_pool_size: self.redis_pool_size,
                redis_timeout: self.redis_timeout,
                canary_interval: self.canary_interval,
                client_buffer: self.client_buffer,
                retention_seed,
                presence: (!self.presence_interval.is_zero()).then_some(PresenceConfig {
                    interval: self.presence_interval,
                }),
            },
            publish: PublishConfig {
                idempotency_window: self.idempotency_window,
                batch_max: self.publish_batch_max,
            },
            auth,
            mercure,
            cors,
            telemetry,
        })
    }
}

impl ServeArgs {
    /// The TLS files are read and parsed here, so that a missing file or a bad PEM is a config
    /// error and not a failure after the port is bound.
    fn transport(&self) -> Result<Transport, ConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (None, None) if self.h2c => Ok(Transport::Http1AndH2c),
            (None, None) => Ok(Transport::Http1),
            (Some(_), None) | (None, Some(_)) => Err(ConfigError(
                "--tls-cert (SSEGW_TLS_CERT) and --tls-key (SSEGW_TLS_KEY) go together: give both \
                 or neither"
                    .into(),
            )),
            (Some(_), Some(_)) if self.h2c => Err(ConfigError(
                "--h2c (SSEGW_H2C) is for plain listeners; with --tls-cert (SSEGW_TLS_CERT), \
                 HTTP/2 is negotiated over TLS"
                    .into(),
            )),
            (Some(cert), Some(key)) => crate::http::tls::server_config(cert, key)
                .map(|tls| Transport::Tls(Arc::new(tls)))
                .map_err(|e| ConfigError(format!("--tls-cert/--tls-key (SSEGW_TLS_*): {e}"))),
        }
    }
}

impl Config {
    /// Parses serve flags as the binary does (`SSEGW_*` variables fill the flags not given),
    /// e.g. in tests: `Config::from_flags(["--redis-url", url])`.
    pub fn from_flags<I, S>(flags: I) -> Result<Config, anyhow::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Serve {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let args = std::iter::once("sse-gateway".into()).chain(flags.into_iter().map(Into::into));
        Ok(Serve::try_parse_from(args)?.serve.into_config()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Anonymous subscribing, so that a gateway without keys may start.
    const OPEN: &str = "--anonymous-subscribe=*";

    fn check_flags(flags: &[&str], expected_error: Option<&str>) {
        let with_access: Vec<&str> = if flags
            .iter()
            .any(|f| f.starts_with("--anonymous") || f.starts_with("--jwt"))
        {
            flags.to_vec()
        } else {
            [flags, &[OPEN]].concat()
        };
        match (Config::from_flags(&with_access), expected_error) {
            (Ok(_), None) => {}
            (Err(e), Some(part)) => {
                let text = e.to_string();
                assert!(text.contains(part), "{flags:?}: {text:?} lacks {part:?}");
            }
            (result, _) => panic!("{flags:?}: unexpected {result:?}"),
        }
    }

    #[test]
    fn validates_flags() {
        check_flags(&[], None);
        check_flags(
            &[
                "--redis-url",
                "redis://127.0.0.1:6379/0",
                "--keepalive",
                "500ms",
            ],
            None,
        );
        check_flags(&["--redis-url", "http://x"], Some("SSEGW_REDIS_URL"));
        check_flags(&["--keepalive", "1ms"], Some("SSEGW_KEEPALIVE"));
        check_flags(&["--write-coalesce", "2s"], Some("SSEGW_WRITE_COALESCE"));
        check_flags(&["--keepalive", "soon"], Some("--keepalive"));
        check_flags(&["--max-topics", "0"], Some("SSEGW_MAX_TOPICS"));
        check_flags(&["--history-max-len", "0"], Some("SSEGW_HISTORY_MAX_LEN"));
        check_flags(&["--listen", "nowhere"], Some("--listen"));
        check_flags(&["--client-buffer", "1"], Some("SSEGW_CLIENT_BUFFER"));
        check_flags(&["--max-connections", "0"], Some("SSEGW_MAX_CONNECTIONS"));
        check_flags(
            &["--dead-peer-timeout", "10ms"],
            Some("SSEGW_DEAD_PEER_TIMEOUT"),
        );
        check_flags(&["--canary-interval", "0s"], Some("SSEGW_CANARY_INTERVAL"));
        check_flags(&["--pages", "maybe"], Some("--pages"));
        check_flags(&["--h2c", "yes"], None);
        check_flags(&["--presence-interval", "0"], None);
        check_flags(&["--presence-interval", "250ms"], None);
        check_flags(
            &["--presence-interval", "50ms"],
            Some("SSEGW_PRESENCE_INTERVAL"),
        );
        check_flags(
            &["--presence-interval", "2m"],
            Some("SSEGW_PRESENCE_INTERVAL"),
        );
        check_flags(
            &["--presence-interval", "often"],
            Some("--presence-interval"),
        );
    }

    #[test]
    fn pages_are_on_unless_turned_off() {
        let pages = |flags: &[&str]| Config::from_flags([flags, &[OPEN]].concat()).unwrap().pages;
        assert!(pages(&[]));
        assert!(pages(&["--pages", "true"]));
        assert!(!pages(&["--pages", "false"]));
        assert!(!pages(&["--pages", "off"]));
        assert!(!pages(&["--pages=0"]));
    }

    /// A directory of its own under the system's temporary directory, removed on drop.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("ssegw-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn file(&self, name: &str, contents: &str) -> String {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path.to_str().unwrap().to_string()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn tls_files_are_checked_at_start_up() {
        let scratch = Scratch::new("tls-config");
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = scratch.file("cert.pem", &certified.cert.pem());
        let key = scratch.file("key.pem", &certified.key_pair.serialize_pem());
        let junk = scratch.file("junk.pem", "not a PEM file\n");
        let missing = scratch.0.join("missing.pem");
        let missing = missing.to_str().unwrap();

        let transport =
            |flags: &[&str]| Config::from_flags([flags, &[OPEN]].concat()).map(|c| c.transport);
        assert!(matches!(transport(&[]), Ok(Transport::Http1)));
        assert!(matches!(
            transport(&["--h2c", "true"]),
            Ok(Transport::Http1AndH2c)
        ));
        match transport(&["--tls-cert", &cert, "--tls-key", &key]) {
            Ok(Transport::Tls(_)) => {}
            other => panic!("a valid certificate and key: {other:?}"),
        }
        check_flags(&["--tls-cert", &cert], Some("SSEGW_TLS_KEY"));
        check_flags(&["--tls-key", &key], Some("SSEGW_TLS_CERT"));
        check_flags(
            &["--tls-cert", &cert, "--tls-key", &key, "--h2c", "true"],
            Some("SSEGW_H2C"),
        );
        check_flags(
            &["--tls-cert", missing, "--tls-key", &key],
            Some("cannot read certificates from"),
        );
        check_flags(
            &["--tls-cert", &junk, "--tls-key", &key],
            Some("no certificate found"),
        );
        check_flags(
            &["--tls-cert", &cert, "--tls-key", &junk],
            Some("cannot read a private key"),
        );
        // The certificate as its own key: a PEM, but not a key.
        check_flags(
            &["--tls-cert", &cert, "--tls-key", &cert],
            Some("cannot read a private key"),
        );
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let other = scratch.file("other-key.pem", &other);
        check_flags(
            &["--tls-cert", &cert, "--tls-key", &other],
            Some("do not make a usable certificate and key"),
        );
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::from_flags([OPEN]).unwrap();
        assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.stream.keepalive, Duration::from_secs(15));
        assert_eq!(config.stream.retry, Duration::from_secs(2));
        assert_eq!(config.stream.max_topics, 16);
        assert_eq!(config.stream.max_connections, 10_000);
        assert_eq!(config.stream.drain_window, Duration::from_secs(10));
        assert_eq!(config.stream.drain_spread(), Duration::from_secs(9));
        assert_eq!(config.stream.write_coalesce, Duration::ZERO);
        assert_eq!(config.bus.client_buffer, 128);
        assert_eq!(config.bus.canary_interval, Duration::from_secs(1));
        let presence = config.bus.presence.unwrap();
        assert_eq!(presence.interval, Duration::from_secs(2));
        assert_eq!(presence.expiry(), Duration::from_secs(6));
        let off = Config::from_flags([OPEN, "--presence-interval=0"]).unwrap();
        assert!(off.bus.presence.is_none());
        assert_eq!(config.bus.retention_seed, Limits::default());
        assert_eq!(config.publish.idempotency_window, Duration::from_secs(300));
        assert_eq!(config.publish.batch_max, 1000);
        assert!(config.bus.redis.is_none());
        assert!(config.pages);
        assert!(matches!(config.transport, Transport::Http1));
        assert_eq!(config.cors, CorsConfig::Off);
        let auth = config.auth;
        assert!(auth.keys.is_empty() && auth.anonymous_publish.is_empty());
        assert_eq!(auth.leeway, Duration::from_secs(5));
        assert_eq!(auth.claim, "ssegw");
        assert_eq!(auth.cookie.as_deref(), Some("ssegw_token"));
        assert!(auth.query_token && auth.close_on_expiry);
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let secret = "0123456789abcdef0123456789abcdef-do-not-print";
        let args = Cli::try_parse_from(["sse-gateway", "--jwt-secret", secret]).unwrap();
        assert!(!format!("{args:?}").contains(secret));
        let config = Config::from_flags(["--jwt-secret", secret]).unwrap();
        assert!(!format!("{config:?}").contains(secret));
    }

    #[test]
    fn validates_auth_and_cors_flags() {
        let scratch = Scratch::new("auth-config");
        let garbage = scratch.file("garbage.pem", "not a key");
        let secret = "0123456789abcdef0123456789abcdef";
        check_flags(&["--anonymous-subscribe", "orders.*,public"], None);
        check_flags(&["--jwt-secret", secret], None);
        check_flags(&[], None);
        // Nothing at all allowed: refused, with the way out named.
        check_flags(
            &["--anonymous-subscribe", ""],
            Some("--anonymous-subscribe '*'"),
        );
        check_flags(
            &["--anonymous-publish", "orders.*.x"],
            Some("SSEGW_ANONYMOUS_PUBLISH"),
        );
        check_flags(&["--jwt-secret", "short"], Some("at least 32 bytes"));
        check_flags(
            &["--jwt-secret", secret, "--jwt-algorithms", "RS256"],
            Some("uses this key"),
        );
        check_flags(
            &["--jwt-secret", secret, "--jwt-algorithms", "none"],
            Some("unknown algorithm \"none\""),
        );
        check_flags(
            &["--jwt-public-key", &garbage],
            Some("not an RSA or EC public key"),
        );
        check_flags(
            &["--jwt-jwks", "/nonexistent/jwks.json"],
            Some("SSEGW_JWT_JWKS"),
        );
        check_flags(&["--jwt-jwks", &garbage], Some("not a JWKS"));
        check_flags(
            &[
                "--cors-origins",
                "https://app.example.com,http://localhost:3000",
            ],
            None,
        );
        check_flags(&["--cors-origins", "*"], None);
        check_flags(
            &["--cors-origins", "*,https://a.example"],
            Some("cannot be combined"),
        );
        check_flags(
            &["--cors-origins", "https://a.example/path"],
            Some("SSEGW_CORS_ORIGINS"),
        );
        check_flags(&["--cors-origins", "a.example"], Some("SSEGW_CORS_ORIGINS"));
    }
}
