//! TLS to PostgreSQL, and when it is required. A database URL that reaches a server over
//! the network (not a local socket, not loopback) must say `sslmode=verify-full` and
//! name the CA that signed the server's certificate (`sslrootcert=PATH`, as libpq
//! spells them): the controller's state, enrollment included, crosses that network.
//! The certificate is checked against that CA and the URL's host name or address, with
//! rustls (`sslmode=require`, which libpq does not check, is checked the same here).

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Result, bail};
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How a URL asks for TLS, taken out of it (the `postgres` crate knows neither
/// `verify-full` nor `sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The URL without this module's options, for `postgres::Config`.
    pub url: String,
    /// `sslmode=verify-full` or `require`.
    pub tls: bool,
    /// `sslmode=disable`, `prefer` or none.
    pub mode: String,
    pub root_cert: Option<PathBuf>,
}

/// Splits `sslmode` and `sslrootcert` off a `postgres://` URL.
pub fn wanted(url: &str) -> Wanted {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (mut mode, mut root_cert, mut rest) = (String::new(), None, vec![]);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", v)) => mode = v.to_owned(),
            Some(("sslrootcert", v)) => {
                root_cert = Some(PathBuf::from(percent_encoding::percent_decode_str(v).decode_utf8_lossy().as_ref()))
            }
            _ => rest.push(pair),
        }
    }
    let tls = matches!(mode.as_str(), "verify-full" | "require");
    let mut url = base.to_owned();
    if !rest.is_empty() {
        url = format!("{url}?{}", rest.join("&"));
    }
    if !tls && !mode.is_empty() {
        url = format!("{url}{}sslmode={mode}", if rest.is_empty() { "?" } else { "&" });
    }
    Wanted { url, tls, mode, root_cert }
}

/// Refuses a server over the network without verified TLS. `hosts` are the URL's hosts
/// (a local socket's directory starts with `/`).
pub fn check(hosts: &[String], w: &Wanted) -> Result<()> {
    let remote: Vec<&String> = hosts
        .iter()
        .filter(|h| !h.starts_with('/') && *h != "localhost" && !h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()))
        .collect();
    if remote.is_empty() {
        return Ok(());
    }
    if !w.tls {
        bail!(
            "the PostgreSQL server {} is reached over the network, and the URL does not ask for TLS \
             (sslmode={}): add ?sslmode=verify-full&sslrootcert=/path/to/the-servers-ca.pem, or reach it \
             through a local socket or loopback",
            remote.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            if w.mode.is_empty() { "unset" } else { &w.mode }
        );
    }
    if w.root_cert.is_none() {
        bail!("sslmode={} needs sslrootcert=PATH: the CA that signed the PostgreSQL server's certificate", w.mode);
    }
    Ok(())
}

/// A `postgres` TLS connector over rustls, checking the server against one CA file.
#[derive(Debug, Clone)]
pub struct Connector(Arc<rustls::ClientConfig>);

impl Connector {
    pub fn new(ca: &std::path::Path) -> Result<Connector> {
        Ok(Connector(Arc::new(thymis_tls_pin::ca_client_config(ca).map_err(anyhow::Error::msg)?)))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for Connector {
    type Stream = Stream<S>;
    type TlsConnect = ConnectOne;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<ConnectOne, Self::Error> {
        Ok(ConnectOne { config: self.0.clone(), name: ServerName::try_from(domain.to_owned())? })
    }
}

#[derive(Debug)]
pub struct ConnectOne {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for ConnectOne {
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await?;
            Ok(Stream(tls))
        })
    }
}

#[derive(Debug)]
pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_servers_need_verified_tls_and_local_ones_do_not() {
        let w = wanted(
            "postgres://thymis@db.example/thymis?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        );
        assert!(w.tls);
        assert_eq!(w.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(w.url, "postgres://thymis@db.example/thymis?application_name=x");
        assert!(check(&["db.example".into()], &w).is_ok());
        let plain = wanted("postgres://thymis@db.example/thymis");
        let err = check(&["db.example".into()], &plain).expect_err("remote without TLS").to_string();
        assert!(err.contains("sslmode=verify-full") && err.contains("db.example"), "{err}");
        let prefer = wanted("postgres://thymis@10.0.0.5/thymis?sslmode=prefer");
        assert_eq!(prefer.url, "postgres://thymis@10.0.0.5/thymis?sslmode=prefer");
        assert!(check(&["10.0.0.5".into()], &prefer).is_err(), "prefer can fall back to plain");
        let no_ca = wanted("postgres://thymis@db.example/thymis?sslmode=require");
        assert!(check(&["db.example".into()], &no_ca).expect_err("no CA").to_string().contains("sslrootcert"));
        for local in ["/run/postgresql", "127.0.0.1", "::1", "localhost"] {
            assert!(check(&[local.into()], &plain).is_ok(), "{local}");
        }
    }
}
