//! sse-gateway: a distributed Server-Sent Events gateway backed by Redis. `run` serves one
//! replica on a bound listener until the shutdown token is cancelled; `main.rs` and the tests
//! both go through it. The modules, by concept: `config` and `auth` (what is allowed), `bus`
//! (Redis or the embedded bus), `fanout` (from the bus to every local client), `http` (the
//! API, pages, handoff and TLS), `telemetry` (logs, traces, metrics and the counters), and
//! `publisher` (the `publish` command). ARCHITECTURE.md has the map.

pub mod auth;
pub mod bus;
pub mod config;
pub mod fanout;
pub mod http;
pub mod mercure;
pub mod publisher;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::auth::Auth;
use crate::bus::Bus;
use crate::config::{Config, CorsConfig, Transport};
use crate::fanout::hub::{Hub, Observer};
use crate::http::AppState;
use crate::telemetry::stats::Stats;
use crate::telemetry::Metrics;

/// Serves one gateway replica on `listener` until `shutdown` is cancelled, then drains: the
/// replica turns not-ready, stops accepting, closes its streams spread over the drain window,
/// and returns before the window ends (with Mercure's active subscriptions, up to
/// `LEAVE_TIMEOUT` after it, to leave their registry).
pub async fn run(
    listener: std::net::TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // The bus outlives the drain: draining streams keep delivering until their close.
    let stop = CancellationToken::new();
    let _stop_bus_on_return = stop.clone().drop_guard();
    // Counters first: the hub, the bus and the streams all report into them.
    let metrics = Arc::new(Metrics::new(&config.telemetry).map_err(anyhow::Error::msg)?);
    let stats = Arc::new(Stats::new(&metrics.meter()));
    metrics.observe(&stats);
    let (interest_tx, interest_rx) = mpsc::unbounded_channel();
    let hub = Arc::new(
        Hub::new(
            config.bus.client_buffer,
            interest_tx,
            config.stream.write_coalesce,
        )
        .observed_by(Observer {
            stats: stats.clone(),
            trace_deliveries: config.telemetry.traces,
        }),
    );
    let _stop_timers_on_return = AbortOnDropHandle::new(tokio::spawn(
        hub.clone().run_timers(config.stream.keepalive),
    ));
    // Names this replica in Redis (its canary channel, its presence reports) and in `/status`.
    let replica = uuid::Uuid::new_v4();
    let bus = Arc::new(Bus::start(
        &config.bus,
        replica,
        hub.clone(),
        interest_rx,
        stop.clone(),
    )?);
    match bus.as_ref() {
        Bus::Memory(_) => tracing::warn!(
            "no Redis configured (--redis-url / SSEGW_REDIS_URL): running as a single node on an \
             embedded in-memory bus; history is lost on restart and not shared with other replicas"
        ),
        Bus::Redis(_) => {
            let target = config.bus.redis.as_ref().expect("a Redis bus has a target");
            tracing::info!(address = target.address(), tls = ?target.tls(), "using Redis");
            if target.tls() == Some(config::TlsMode::Unverified) {
                tracing::warn!(
                    address = target.address(),
                    "--redis-tls-skip-verify: the Redis server's certificate is NOT verified; \
                     anyone on the network path can read and change every event"
                );
            }
        }
    }
    let protocols = match &config.transport {
        Transport::Http1 => "http/1.1",
        Transport::Http1AndH2c => "http/1.1, h2c",
        Transport::Tls(_) => "https: h2, http/1.1",
    };
    tracing::info!(
        address = %listener.local_addr()?,
        workers = config.workers,
        protocols,
        pages = config.pages,
        "listening"
    );

    let mercure = config.mercure.clone().map(|c| {
        let subscriptions = c.subscriptions.then(|| {
            // Replicas beat as often as they report presence.
            let interval = config
                .bus
                .presence
                .map_or(Duration::from_secs(2), |p| p.interval);
            mercure::subscriptions::Registry::start(
                replica,
                mercure::log_topic(),
                bus.clone(),
                interval,
                stop.clone(),
            )
        });
        Arc::new(mercure::Mercure::new(c, subscriptions))
    });
    // Built once here: the factory below runs once per worker.
    let state = web::Data::new(AppState {
        replica,
        hub: hub.clone(),
        bus: bus.clone(),
        presence: config.bus.presence,
        stream: Arc::new(config.stream.clone()),
        publish: Arc::new(config.publish.clone()),
        stats: stats.clone(),
        auth: Arc::new(Auth::new(config.auth.clone())),
        drain: shutdown.clone(),
        status_streams: Arc::new(tokio::sync::Semaphore::new(http::pages::MAX_STATUS_STREAMS)),
        metrics,
        mercure: mercure.clone(),
    });
    let serve_mercure = config.mercure.is_some();
    let cors = config.cors.clone();
    let pages = config.pages;
    let dead_peer_timeout = config.dead_peer_timeout;
    let app = move || {
        // No compression middleware: it would hold SSE frames back.
        App::new()
            .wrap(actix_web::middleware::Condition::new(
                cors != CorsConfig::Off,
                cors_middleware(&cors),
            ))
            .wrap(actix_web::middleware::from_fn(
                no_credentials_without_origin,
            ))
            .app_data(state.clone())
            .configure(|cfg| http::routes(cfg, pages, serve_mercure))
    };
    let tune = move |tcp: &actix_web::rt::net::TcpStream| tune_socket(tcp, dead_peer_timeout);
    // A connection's pipelined publishes run together only where their order is kept: with
    // --publish-replicas each publish waits for a Redis connection of its own.
    let pipelined = match config.bus.redis.as_ref().and_then(|r| r.durability()) {
        Some(_) => 1,
        None => http::pipeline::MAX_IN_FLIGHT,
    };
    // Workers still serving connections when the drain window is over are stopped.
    let shutdown_timeout = config.stream.drain_window.as_secs().max(1);
    let server = match config.transport {
        // actix offers h2 first, then http/1.1, by ALPN.
        Transport::Tls(tls) => HttpServer::new(app)
            .on_connect(move |connection, _| {
                if let Some(tcp) = http::tls::tcp_socket(connection) {
                    tune(tcp);
                }
            })
            .workers(config.workers)
            // A client's FIN ends its stream instead of leaving a half-open connection behind.
            .h1_allow_half_closed(false)
            .disable_signals()
            .shutdown_timeout(shutdown_timeout)
            .listen_rustls_0_23(listener, (*tls).clone())?
            .run(),
        // Plain HTTP/1 event streams leave actix-http once their head is out (see `handoff`).
        plain => http::handoff::listen(
            actix_web::dev::Server::build()
                .workers(config.workers)
                .disable_signals()
                .shutdown_timeout(shutdown_timeout),
            listener,
            matches!(plain, Transport::Http1AndH2c),
            pipelined,
            tune,
            app,
        )?
        .run(),
    };
    let handle = server.handle();
    let drain_window = config.stream.drain_window;
    let draining = shutdown.clone();
    let drain_stats = stats.clone();
    tokio::spawn(async move {
        draining.cancelled().await;
        tracing::info!(streams = drain_stats.open(), window = ?drain_window, "draining");
        // Every stream picks its closing instant when the marker reaches it.
        hub.drain();
        // Closes the listening socket at once, so new connections are refused and go to other
        // replicas; the workers go on serving the open streams, which close themselves at
        // their own instants within the drain spread.
        handle.stop(true).await;
    });
    // Workers notice that their last connection closed only once a second; the process leaves
    // before the window ends, whatever is still open.
    let window_over = async {
        shutdown.cancelled().await;
        tokio::time::sleep(drain_window.saturating_sub(EXIT_MARGIN)).await;
    };
    tokio::select! {
        result = server => result?,
        _ = window_over => tracing::info!(left = stats.open(), "drain window over"),
    }
    // The streams are closed: the clients count wherever they resume, not here as well.
    if let Some(registry) = mercure.as_ref().and_then(|m| m.subscriptions.as_ref()) {
        registry.leave(LEAVE_TIMEOUT).await;
    }
    bus.withdraw_presence().await;
    Ok(())
}

/// Options of every accepted TCP socket.
fn tune_socket(tcp: &actix_web::rt::net::TcpStream, dead_peer_timeout: Duration) {
    let socket = socket2::SockRef::from(tcp);
    // Written data that stays unacknowledged this long (a vanished or stalled client) ends the
    // connection.
    let _ = socket.set_tcp_user_timeout(Some(dead_peer_timeout));
    // Each event leaves at once: Nagle would hold a frame back until the client acknowledged
    // the previous one (up to its delayed-ACK timeout, 40 ms on Linux).
    let _ = socket.set_tcp_nodelay(true);
}

/// How long a stopping replica waits to end its Mercure subscriptions in Redis; other
/// replicas end them once it counts as dead otherwise.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long before the end of the drain window `run` returns.
const EXIT_MARGIN: Duration = Duration::from_millis(50);

/// The CORS policy: the configured origins, the methods and headers the routes use, and a
/// preflight cached for an hour. A request from another origin is served without CORS headers
/// (the browser then withholds the response from the page); a preflight from one is refused.
fn cors_middleware(config: &CorsConfig) -> actix_cors::Cors {
    use actix_web::http::header;
    let cors = actix_cors::Cors::default()
        .allowed_methods(["GET", "POST"])
        .allowed_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("last-event-id"),
            header::HeaderName::from_static("traceparent"),
            header::HeaderName::from_static("tracestate"),
            // Sent by EventSource polyfills (the Mercure JavaScript examples use them).
            header::CACHE_CONTROL,
        ])
        .max_age(3600);
    match config {
        CorsConfig::Off => cors,
        CorsConfig::AnyOrigin => cors.allow_any_origin().send_wildcard(),
        CorsConfig::Origins {
            origins,
            credentials,
        } => {
            let cors = origins
                .iter()
                .fold(cors, |cors, origin| cors.allowed_origin(origin));
            if *credentials {
                cors.supports_credentials()
            } else {
                cors
            }
        }
    }
}

/// actix-cors marks every response of a credentialed policy with
/// `Access-Control-Allow-Credentials`, even one to an origin it does not allow; such a response
/// must carry no CORS headers at all.
async fn no_credentials_without_origin(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    use actix_web::http::header;
    let mut response = next.call(req).await?;
    let headers = response.headers_mut();
    if !headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        headers.remove(header::ACCESS_CONTROL_ALLOW_CREDENTIALS);
    }
    Ok(response)
}
