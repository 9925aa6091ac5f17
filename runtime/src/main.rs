//! `mesh-runtime`: serve one mesh service from a bundle.
//!
//! Run with:
//!     mesh-runtime serve --bundle DIR --listen 127.0.0.1:8080
//!     mesh-runtime check --bundle DIR [--offline]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use clap::{Parser, Subcommand};
use mesh_runtime::config::Bundle;
use mesh_runtime::service::{LoadOptions, Service};
use mesh_runtime::{AppState, app, log};

#[derive(Parser)]
#[command(
    name = "mesh-runtime",
    version,
    about = "Serve a mesh service bundle over HTTP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the bundle. `/healthz` answers at once; `/readyz` once loaded.
    Serve {
        /// Bundle folder (holding `service.json`).
        #[arg(long, env = "MESH_BUNDLE")]
        bundle: PathBuf,
        /// Address to listen on.
        #[arg(long, env = "MESH_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Seconds to wait for in-flight requests after SIGTERM/SIGINT.
        #[arg(long, default_value_t = 30)]
        shutdown_timeout: u64,
    },
    /// Load and validate the bundle (models, datasets, connections), then exit.
    Check {
        /// Bundle folder (holding `service.json`).
        #[arg(long)]
        bundle: PathBuf,
        /// Do not connect to databases nor resolve connection secrets.
        #[arg(long)]
        offline: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve {
            bundle,
            listen,
            shutdown_timeout,
        } => runtime.block_on(serve(bundle, listen, Duration::from_secs(shutdown_timeout))),
        Command::Check { bundle, offline } => runtime.block_on(check(bundle, offline)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            log::error(format_args!("{message}"));
            ExitCode::FAILURE
        }
    }
}

async fn check(dir: PathBuf, offline: bool) -> Result<(), String> {
    let bundle = Bundle::open(&dir).map_err(|e| e.to_string())?;
    if !offline {
        for key in &bundle.config.api_keys {
            bundle.resolve(key).map_err(|e| e.to_string())?;
        }
    }
    let service = Service::load(&bundle, LoadOptions { connect: !offline })
        .await
        .map_err(|e| e.to_string())?;
    let mut names: Vec<&String> = service.endpoints.keys().collect();
    names.sort();
    println!(
        "ok: service `{}` with endpoints {}",
        service.name,
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn serve(dir: PathBuf, listen: SocketAddr, shutdown_timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    let bundle = Bundle::open(&dir).map_err(|e| e.to_string())?;
    let mut api_keys = Vec::new();
    for key in &bundle.config.api_keys {
        api_keys.push(bundle.resolve(key).map_err(|e| e.to_string())?);
    }
    log::info(format_args!(
        "bundle {}: service `{}`, {} endpoints, {} api keys, read in {:.1} ms",
        dir.display(),
        bundle.config.service,
        bundle.config.endpoints.len(),
        api_keys.len(),
        started.elapsed().as_secs_f64() * 1e3
    ));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    log::info(format_args!("listening on http://{local} (not ready yet)"));

    let state = AppState::new(&bundle.config, api_keys);
    let router = app(state.clone());
    let mut server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal(shutdown_timeout))
            .await
    });

    let loaded = tokio::select! {
        loaded = Service::load(&bundle, LoadOptions::default()) => loaded,
        stopped = &mut server => {
            log::info(format_args!("stopped before the service was ready"));
            return stopped.map_err(|e| e.to_string())?.map_err(|e| e.to_string());
        }
    };
    match loaded {
        Ok(service) => {
            state.set_ready(service);
            log::info(format_args!(
                "ready in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            ));
        }
        Err(e) => {
            server.abort();
            return Err(format!("cannot load the service: {e}"));
        }
    }
    let result = server.await.map_err(|e| e.to_string())?;
    log::info(format_args!("stopped"));
    result.map_err(|e| e.to_string())
}

/// Resolves on SIGTERM or SIGINT; then in-flight requests finish, up to
/// `timeout`, after which the process exits anyway.
async fn shutdown_signal(timeout: Duration) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    let which = tokio::select! {
        _ = interrupt => "SIGINT",
        _ = terminate => "SIGTERM",
    };
    log::info(format_args!(
        "{which}: finishing in-flight requests (at most {} s)",
        timeout.as_secs()
    ));
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        log::warn(format_args!(
            "shutdown timeout: exiting with requests in flight"
        ));
        std::process::exit(1);
    });
}
