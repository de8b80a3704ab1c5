//! The `sse-gateway` binary: parses the command line, sets up logging and trace export
//! (`telemetry::init_process`) and hands over to the library (`run` for `serve`,
//! `publisher::publish` for `publish`, `publisher::namespace` for `namespace`).

use std::process::ExitCode;

use clap::Parser;
use sse_gateway::config::{Cli, Command, ServeArgs};
use sse_gateway::telemetry::{self, TelemetryConfig};
use ssegw_protocol::retention::Retention;
use ssegw_protocol::script::{self, ScriptSettings};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = TelemetryConfig::from_lookup(|name| std::env::var(name).ok())
        .and_then(|config| telemetry::init_process(&config));
    // Flushes pending spans when main returns.
    let _telemetry = match telemetry {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("sse-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve(Box::new(cli.serve))) {
        Command::Serve(args) => serve(*args),
        Command::Publish(args) => {
            // awc needs an actix system (a local task set) to run its connection pool.
            match actix_web::rt::System::new().block_on(sse_gateway::publisher::publish(*args)) {
                Ok(id) => {
                    println!("{id}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sse-gateway publish: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Namespace(args) => {
            match actix_web::rt::System::new().block_on(sse_gateway::publisher::namespace(*args)) {
                Ok(table) => {
                    println!("{table:#}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sse-gateway namespace: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Script(args) => {
            match args.retention.limits().map(|limits| ScriptSettings {
                retention: Retention::new(limits, 0),
                sharded: args.sharded,
            }) {
                Ok(settings) if args.eval => {
                    print!("{}", script::publish_eval_script(&settings));
                    ExitCode::SUCCESS
                }
                Ok(settings) => {
                    print!("{}", script::function_library(&settings));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sse-gateway: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match args.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sse-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    // Each stream is an open file. Containers often start with a soft limit of 1,024 under a
    // far higher hard one: take all of it.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(files) if (files as usize) < config.stream.max_connections + 64 => tracing::warn!(
            files,
            max_connections = config.stream.max_connections,
            "the open-file limit is below --max-connections; raise the hard limit (ulimit -Hn)"
        ),
        Ok(files) => tracing::info!(files, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
    let listener = match listen(config.listen) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("sse-gateway: cannot listen on {}: {e}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sse-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        sse_gateway::run(listener, config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            ExitCode::FAILURE
        }
    }
}

/// Binds the listening socket with a deep accept queue: std's `bind` asks for 128, which drops
/// connections (their SYNs, retried a second later) when hundreds of clients reconnect at once.
fn listen(address: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    // The kernel caps it at net.core.somaxconn.
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
