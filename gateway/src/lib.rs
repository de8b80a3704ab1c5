//! sse-gateway: a distributed Server-Sent Events gateway backed by Redis. `run` serves one
//! replica on a bound listener until the shutdown token is cancelled; `main.rs` and the tests
//! both go through it.

pub mod bus;
pub mod config;
pub mod http;
pub mod hub;
pub mod publisher;
pub mod sse;

use std::sync::Arc;

use actix_web::{web, App, HttpServer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::config::Config;
use crate::http::AppState;
use crate::hub::Hub;

/// Serves one gateway replica on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: std::net::TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (interest_tx, interest_rx) = mpsc::unbounded_channel();
    let hub = Arc::new(Hub::new(config.bus.client_buffer, interest_tx));
    let bus = Arc::new(Bus::start(
        &config.bus,
        hub.clone(),
        interest_rx,
        shutdown.clone(),
    )?);
    match bus.as_ref() {
        Bus::Memory(_) => tracing::warn!(
            "no Redis configured (--redis-url / SSEGW_REDIS_URL): running as a single node on an \
             embedded in-memory bus; history is lost on restart and not shared with other replicas"
        ),
        Bus::Redis(_) => tracing::info!("using Redis"),
    }
    tracing::info!(address = %listener.local_addr()?, workers = config.workers, "listening");

    // Built once here: the factory below runs once per worker.
    let state = web::Data::new(AppState {
        hub,
        bus,
        stream: Arc::new(config.stream.clone()),
        shutdown: shutdown.clone(),
    });
    let max_event_bytes = config.stream.max_event_bytes;
    let server = HttpServer::new(move || {
        // No compression middleware: it would hold SSE frames back.
        App::new()
            .app_data(state.clone())
            .configure(|cfg| http::routes(cfg, max_event_bytes))
    })
    .workers(config.workers)
    // A client's FIN ends its stream instead of leaving a half-open connection behind.
    .h1_allow_half_closed(false)
    .disable_signals()
    .shutdown_timeout(5)
    .listen(listener)?
    .run();
    let handle = server.handle();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        handle.stop(true).await;
    });
    server.await?;
    shutdown.cancel();
    Ok(())
}
