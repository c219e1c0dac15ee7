//! The accept loop of the controller's one listener (API, web UI and agents), plain or
//! over TLS: HTTP/1.1 per connection, each request carrying its peer's address (the
//! per-peer limits of the agent socket need it), and a client that does not send a
//! complete request header in time is dropped (one that trickles bytes would otherwise
//! hold its connection for as long as it likes), and each connection's reads can be
//! capped ([`ReadCap`], in the request's extensions: the agent socket arms it until the
//! handshake is done).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tracing::debug;

use crate::read_cap::{Capped, ReadCap};
use crate::tls::Tls;

/// Time for a client to send a request's header (and for the TLS handshake).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's read buffer: a request's header, and what a client sends after it before a
/// WebSocket upgrade takes over (read before any cap is armed).
const MAX_READ_BUFFER: usize = 64 << 10;

pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Tls>,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    tokio::pin!(stop);
    loop {
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors, a connection reset before accept: go on.
                Err(e) => {
                    debug!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => return Ok(()),
        };
        let (tls, app) = (tls.clone(), app.clone());
        tokio::spawn(async move {
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
