//! `mesh-runtime`: serve one mesh service from a bundle.
//!
//! Run with:
//!     mesh-runtime serve --bundle DIR --listen 127.0.0.1:8080 [--handover] [--ready-file FILE]
//!     mesh-runtime check --bundle DIR [--offline]
//!     mesh-runtime freeze --bundle DIR

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use mesh_runtime::auth::KeyRing;
use mesh_runtime::config::Bundle;
use mesh_runtime::service::{LoadOptions, Service};
use mesh_runtime::tls::TlsListener;
use mesh_runtime::{AppState, app, log};

/// mimalloc: a request allocates and frees many small buffers, on several
/// threads (issue 13: glibc's malloc took about an eighth of a prediction's CPU).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Take the address over from the runtime serving on it, refusing
        /// no connection: bind it with SO_REUSEPORT (as every runtime started
        /// with --handover does), accept only once loaded (no `/healthz`
        /// before), then have the kernel send new connections here. The
        /// old runtime can then be stopped (SIGTERM): it drains what it has.
        #[arg(long)]
        handover: bool,
        /// Write this file (holding the pid) once ready and accepting.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Run every query dataset in mode `bundle` once and write its rows into
    /// the bundle as a CSV file (the bundle is rewritten in place).
    Freeze {
        /// Bundle folder (holding `service.json`).
        #[arg(long)]
        bundle: PathBuf,
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
            handover,
            ready_file,
        } => runtime.block_on(serve(
            bundle,
            listen,
            Duration::from_secs(shutdown_timeout),
            Takeover {
                handover,
                ready_file,
            },
        )),
        Command::Check { bundle, offline } => runtime.block_on(check(bundle, offline)),
        Command::Freeze { bundle } => runtime.block_on(async {
            for line in mesh_runtime::freeze::freeze(&bundle).await? {
                println!("{line}");
            }
            Ok(())
        }),
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
        KeyRing::open(&bundle).map_err(|e| e.to_string())?;
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

/// How `serve` comes to its address (see `Command::Serve`).
struct Takeover {
    handover: bool,
    ready_file: Option<PathBuf>,
}

async fn serve(
    dir: PathBuf,
    listen: SocketAddr,
    shutdown_timeout: Duration,
    takeover: Takeover,
) -> Result<(), String> {
    let started = Instant::now();
    let bundle = Bundle::open(&dir).map_err(|e| e.to_string())?;
    let keys = KeyRing::open(&bundle).map_err(|e| e.to_string())?;
    log::info(format_args!(
        "bundle {}: service `{}`, {} endpoints, {} api keys and verifiers, read in {:.1} ms",
        dir.display(),
        bundle.config.service,
        bundle.config.endpoints.len(),
        keys.current().count(),
        started.elapsed().as_secs_f64() * 1e3
    ));
    let state = AppState::new(&bundle.config, keys);
    let tls = match &bundle.config.tls {
        Some(files) => Some(
            mesh_runtime::tls::server_config(&bundle.path(&files.cert), &bundle.path(&files.key))
                .map_err(|e| format!("cannot serve HTTPS: {e}"))?,
        ),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    if takeover.handover {
        return serve_handover(
            bundle,
            listen,
            shutdown_timeout,
            state,
            started,
            takeover,
            tls,
        )
        .await;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    log::info(format_args!(
        "listening on {scheme}://{local} (not ready yet)"
    ));

    let router = app(state.clone());
    let mut server = tokio::spawn(run(listener, tls, router, shutdown_timeout));

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
            release_freed_memory();
            log::info(format_args!(
                "ready in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            ));
            write_ready_file(takeover.ready_file.as_deref());
        }
        Err(e) => {
            server.abort();
            return Err(format!("cannot load the service: {e}"));
        }
    }
    let result = server.await.map_err(|e| e.to_string())?;
    state.flush_logs();
    log::info(format_args!("stopped"));
    result.map_err(|e| e.to_string())
}

/// Serves `router` on `listener` until a signal, over TLS when `tls` is set.
async fn run(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    shutdown_timeout: Duration,
) -> std::io::Result<()> {
    match tls {
        Some(config) => {
            axum::serve(TlsListener::new(listener, config)?, router)
                .with_graceful_shutdown(shutdown_signal(shutdown_timeout))
                .await
        }
        None => serve_on_workers(listener, router, shutdown_timeout).await,
    }
}

/// Plain HTTP, served by worker threads (one per core) that each run a
/// current-thread runtime: connections are accepted here and handed to the
/// workers in turn, and a worker serves each of its connections whole. A request, the
/// upstream calls it makes on its own task (see `mesh_runtime::h1`) and its
/// answer stay on one thread: no wake-up crosses threads, where the
/// multi-thread runtime's work stealing moved a request between its
/// workers (about a fifth of a prediction's CPU, issue 13). Background work
/// (dataset refreshes, the split file) stays on the main runtime.
async fn serve_on_workers(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown_timeout: Duration,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::watch::channel(());
    // Every worker holds a sender: `recv` answers `None` once all are done.
    let (done, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    let mut workers = Vec::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for i in 0..cores {
        let (hand, handed) = tokio::sync::mpsc::unbounded_channel();
        let (router, mut stopped, done) = (router.clone(), stopped.clone(), done.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || {
                let listener = Handed { local, handed };
                let stop = async move {
                    let _ = stopped.changed().await;
                };
                let _ = runtime.block_on(async move {
                    axum::serve(listener, router)
                        .with_graceful_shutdown(stop)
                        .await
                });
                drop(done);
            })?;
        workers.push(hand);
    }
    drop(done);
    let signal = shutdown_signal(shutdown_timeout);
    tokio::pin!(signal);
    for next in (0..workers.len()).cycle() {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut signal => break,
        };
        let stream = match accepted.and_then(|(tcp, _)| {
            let _ = tcp.set_nodelay(true);
            tcp.into_std()
        }) {
            Ok(stream) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(_) => {
                // Out of descriptors and the like: back off, as axum does.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = workers[next].send(stream);
    }
    drop(listener);
    let _ = stop.send(());
    drop(workers);
    let _ = all_done.recv().await;
    Ok(())
}

/// An error of one connection (accepting goes on at once).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    )
}

/// A worker's connections, handed to it by the accepting task.
struct Handed {
    local: SocketAddr,
    handed: tokio::sync::mpsc::UnboundedReceiver<std::net::TcpStream>,
}

impl axum::serve::Listener for Handed {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(stream) = self.handed.recv().await else {
                // Accepting ended: the worker is stopping.
                return std::future::pending().await;
            };
            // Registered with this worker's runtime.
            if let Ok(tcp) = tokio::net::TcpStream::from_std(stream)
                && let Ok(peer) = tcp.peer_addr()
            {
                return (tcp, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// `serve --handover`: the address is bound at once (SO_REUSEPORT, so it
/// may be shared with the runtime serving now, and a program holding it
/// otherwise is found before loading), but listened on only once loaded;
/// then new connections are steered here and the old runtime, stopped,
/// has only its in-flight requests to finish.
async fn serve_handover(
    bundle: Bundle,
    listen: SocketAddr,
    shutdown_timeout: Duration,
    state: AppState,
    started: Instant,
    takeover: Takeover,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<(), String> {
    let bind = |reuseaddr: bool| {
        let s = if listen.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }?;
        s.set_reuseaddr(reuseaddr)?;
        s.set_reuseport(true)?;
        s.bind(listen)?;
        Ok::<_, std::io::Error>(s)
    };
    let socket = bind(true).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    // A socket that is bound but not listening, with SO_REUSEADDR, is not in
    // the way of a program probing the address the usual way (binding it
    // with SO_REUSEADDR): while loading, a second one bound with
    // SO_REUSEPORT alone is, so the address shows as taken.
    let guard = bind(false).ok();
    log::info(format_args!(
        "bound {listen} (shared); accepting once ready"
    ));
    let loaded = tokio::select! {
        loaded = Service::load(&bundle, LoadOptions::default()) => loaded,
        () = shutdown_signal(shutdown_timeout) => {
            log::info(format_args!("stopped before the service was ready"));
            return Ok(());
        }
    };
    state.set_ready(loaded.map_err(|e| format!("cannot load the service: {e}"))?);
    let listener = socket
        .listen(1024)
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    drop(guard);
    if let Err(e) = steer_here(&listener) {
        log::warn(format_args!(
            "cannot steer new connections to this process ({e}): the runtime it replaces may reset a few while it stops"
        ));
    }
    log::info(format_args!(
        "ready in {:.1} ms, listening on {}://{listen}",
        started.elapsed().as_secs_f64() * 1e3,
        if tls.is_some() { "https" } else { "http" }
    ));
    write_ready_file(takeover.ready_file.as_deref());
    let result = run(listener, tls, app(state.clone()), shutdown_timeout).await;
    state.flush_logs();
    log::info(format_args!("stopped"));
    result.map_err(|e| e.to_string())
}

/// Sends every new connection to the address to the socket that joined its
/// SO_REUSEPORT group last, i.e. this one, while the runtime it replaces is
/// still in the group: a classic BPF program on the group that returns
/// index 1 (a group holds the old runtime's socket at 0, and this one at 1;
/// with one socket, the index is out of range and the kernel picks as usual).
/// The old runtime then accepts what is queued for it and nothing more, so
/// closing its socket resets no connection.
#[cfg(target_os = "linux")]
fn steer_here(listener: &tokio::net::TcpListener) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 1,
    }];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` and the program it points to outlive the call, and the
    // length passed is that of `sock_fprog`; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn steer_here(_listener: &tokio::net::TcpListener) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Gives the system back the memory freed so far. Loading datasets frees
/// its buffers (CSV records, columns that grew) on the loading threads, which
/// then go quiet; mimalloc would keep those pages: 23 MiB over 2 x 1,000,000
/// rows (`scripts/bench-runtime`).
fn release_freed_memory() {
    // SAFETY: `mi_collect` takes no pointer; any thread may call it.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

fn write_ready_file(path: Option<&std::path::Path>) {
    if let Some(path) = path
        && let Err(e) = std::fs::write(path, format!("{}\n", std::process::id()))
    {
        log::warn(format_args!("cannot write {}: {e}", path.display()));
    }
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
