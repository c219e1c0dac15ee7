//! The accept loop of the controller's one listener (API, web UI and agents), plain or
//! over TLS: HTTP/1.1 per connection, each request carrying its peer's address (the
//! per-peer limits of the agent socket need it), and a client that does not send a
//! complete request header in time is dropped (one that trickles bytes would otherwise
//! hold its connection for as long as it likes), and each connection's reads can be
//! capped ([`ReadCap`], in the request's extensions: the agent socket arms it until the
//! handshake is done).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustix::process::{Resource, getrlimit, setrlimit};
use tracing::{debug, info, warn};

use crate::read_cap::{Capped, ReadCap};
use crate::tls::Tls;

/// Time for a client to send a request's header (and for the TLS handshake).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's read buffer: a request's header, and what a client sends after it before a
/// WebSocket upgrade takes over (read before any cap is armed).
const MAX_READ_BUFFER: usize = 64 << 10;

/// Descriptors kept for everything but connections (database, NAR files, git, logs).
const RESERVED_FILES: usize = 512;

/// Raises the soft open-file limit to the hard one (systemd starts services with 1024,
/// which a fleet's connections alone exceed), and returns how many connections may be
/// open at once: `wanted`, within what that limit leaves.
pub fn connection_limit(wanted: usize) -> usize {
    let mut l = getrlimit(Resource::Nofile);
    if l.maximum.is_some_and(|max| l.current.is_some_and(|cur| cur < max)) {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            warn!("raising the open-file limit: {e}");
        }
    }
    // None: unlimited.
    let files = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX / 2);
    let limit = wanted.min(usize::try_from(files).unwrap_or(usize::MAX).saturating_sub(RESERVED_FILES)).max(16);
    info!(open_files = files, max_connections = limit, "connection limit");
    limit
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Tls>,
    app: axum::Router,
    max_connections: usize,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    tokio::pin!(stop);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut accept_errors = AcceptErrors::default();
    loop {
        // At the limit, new connections wait in the listen queue until one ends.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s?,
            () = &mut stop => return Ok(()),
        };
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors, a connection reset before accept: go on.
                Err(e) => {
                    accept_errors.note(&e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => return Ok(()),
        };
        let (tls, app) = (tls.clone(), app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let app = TowerToHyperService::new(app);
            let cap = ReadCap::default();
            let for_requests = cap.clone();
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(for_requests.clone());
                hyper::service::Service::call(&app, req)
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(MAX_READ_BUFFER);
            let served = match tls {
                None => http.serve_connection(TokioIo::new(Capped { inner: tcp, cap }), service).with_upgrades().await,
                Some(tls) => match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        http.serve_connection(TokioIo::new(Capped { inner: stream, cap }), service)
                            .with_upgrades()
                            .await
                    }
                    Ok(Err(e)) => {
                        debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                },
            };
            if let Err(e) = served {
                debug!(%peer, "connection: {e}");
            }
        });
    }
}

/// Accept errors are logged at warn (they mean clients are refused), at most one line
/// every ten seconds, with how many came since.
#[derive(Default)]
struct AcceptErrors {
    last: Option<Instant>,
    since: u64,
}

impl AcceptErrors {
    fn note(&mut self, e: &std::io::Error) {
        self.since += 1;
        if self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            warn!(errors = self.since, "accepting connections fails: {e}");
            self.last = Some(Instant::now());
            self.since = 0;
        }
    }
}
