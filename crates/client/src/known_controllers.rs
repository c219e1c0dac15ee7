//! Which controllers `thymisctl` trusts: each https:// controller's certificate is pinned
//! by its sha256 in `known-controllers` (like ssh's `known_hosts`), from the first use or
//! from `thymisctl login URL --fingerprint SHA256`; a controller that later presents
//! another certificate is refused until the admin logs in again on purpose.
//!
//! Files live in `$THYMIS_CONFIG_DIR`, else `$XDG_CONFIG_HOME/thymis`, else
//! `~/.config/thymis`: `known-controllers` (lines `ORIGIN SHA256`) and `controller` (the
//! URL of the last login, used when no `--controller` is given).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use thymis_tls_pin::{Fingerprint, Pinned};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, Transport, TransportAdapter,
};

/// Where a client without `--controller` goes when nobody logged in.
pub const DEFAULT_CONTROLLER: &str = "https://127.0.0.1:8443";

pub fn config_dir() -> Result<PathBuf> {
    let var = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("THYMIS_CONFIG_DIR") {
        return Ok(d);
    }
    if let Some(d) = var("XDG_CONFIG_HOME") {
        return Ok(d.join("thymis"));
    }
    let home = var("HOME").context("no HOME, XDG_CONFIG_HOME or THYMIS_CONFIG_DIR for thymisctl's pins")?;
    Ok(home.join(".config/thymis"))
}

/// `https://host:port` of a URL: what a pin belongs to.
pub fn origin(url: &str) -> Result<String> {
    let rest = url.strip_prefix("https://").with_context(|| format!("{url} is not an https:// URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default().to_ascii_lowercase();
    if authority.is_empty() || authority.contains('@') {
        bail!("{url}: no host, or user info in the URL");
    }
    let has_port = authority.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
    Ok(if has_port { format!("https://{authority}") } else { format!("https://{authority}:443") })
}

/// The pins, read from and written to `known-controllers`.
#[derive(Debug)]
pub struct KnownControllers {
    file: PathBuf,
    entries: Vec<(String, Fingerprint)>,
}

impl KnownControllers {
    pub fn load(dir: &Path) -> Result<Self> {
        let file = dir.join("known-controllers");
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parsed = line.split_once(' ').and_then(|(o, f)| Some((o.to_owned(), f.trim().parse().ok()?)));
            let entry = parsed.with_context(|| format!("{}:{}: expected `ORIGIN SHA256`", file.display(), i + 1))?;
            entries.push(entry);
        }
        Ok(KnownControllers { file, entries })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn get(&self, origin: &str) -> Option<Fingerprint> {
        self.entries.iter().find(|(o, _)| o == origin).map(|(_, f)| *f)
    }

    /// Pins `origin` to `fingerprint` (replacing its pin) and saves, through a rename.
    pub fn pin(&mut self, origin: &str, fingerprint: Fingerprint) -> Result<()> {
        self.entries.retain(|(o, _)| o != origin);
        self.entries.push((origin.to_owned(), fingerprint));
        let mut text = String::from("# Controllers thymisctl trusts: ORIGIN SHA256-OF-CERTIFICATE\n");
        for (o, f) in &self.entries {
            text.push_str(&format!("{o} {f}\n"));
        }
        write_private(&self.file, text.as_bytes())
    }
}

/// The URL of the last `thymisctl login`, if any.
pub fn logged_in_controller(dir: &Path) -> Option<String> {
    let url = std::fs::read_to_string(dir.join("controller")).ok()?;
    Some(url.trim().to_owned()).filter(|u| !u.is_empty())
}

pub fn remember_controller(dir: &Path, url: &str) -> Result<()> {
    write_private(&dir.join("controller"), format!("{url}\n").as_bytes())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().context("no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The certificate an https:// controller presents (its handshake signature checked),
/// for a first use, a login, or naming what a refused controller showed.
pub fn presented_certificate(url: &str) -> Result<Fingerprint> {
    let origin = origin(url)?;
    let authority = origin.trim_start_matches("https://");
    let host = authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority);
    let verifier = Pinned::new(None, "no pin");
    let config = Arc::new(verifier.client_config()?);
    let name = server_name(host)?;
    let mut conn = rustls::ClientConnection::new(config, name)?;
    let mut tcp = std::net::TcpStream::connect(authority).with_context(|| format!("connecting to {authority}"))?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    tcp.set_write_timeout(Some(std::time::Duration::from_secs(20)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).with_context(|| format!("TLS handshake with {authority}"))?;
    }
    verifier.seen().with_context(|| format!("{authority} presented no certificate"))
}

fn server_name(host: &str) -> Result<rustls::pki_types::ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(host.to_owned()).with_context(|| format!("{host} is not a host name"))
}

/// ureq's TLS layer for a pinned controller: rustls with the pin as its only trust.
#[derive(Debug)]
pub struct PinnedTls {
    config: Arc<rustls::ClientConfig>,
}

impl PinnedTls {
    pub fn new(verifier: &Arc<Pinned>) -> Result<Self> {
        Ok(PinnedTls { config: Arc::new(verifier.client_config()?) })
    }
}

impl<In: Transport> Connector<In> for PinnedTls {
    type Out = Either<In, PinnedTransport>;

    fn connect(&self, details: &ConnectionDetails, chained: Option<In>) -> Result<Option<Self::Out>, ureq::Error> {
        let Some(transport) = chained else { return Ok(None) };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        let host = details.uri.host().unwrap_or_default();
        let name = server_name(host).map_err(|_| ureq::Error::Tls("the controller's host is not a valid name"))?;
        let mut conn = rustls::ClientConnection::new(self.config.clone(), name)?;
        let mut sock = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        sock.set_timeout(details.timeout);
        conn.complete_io(&mut sock)?;
        let buffers = LazyBuffers::new(details.config.input_buffer_size(), details.config.output_buffer_size());
        Ok(Some(Either::B(PinnedTransport { buffers, stream: rustls::StreamOwned { conn, sock } })))
    }
}

pub struct PinnedTransport {
    buffers: LazyBuffers,
    stream: rustls::StreamOwned<rustls::ClientConnection, TransportAdapter>,
}

impl std::fmt::Debug for PinnedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PinnedTransport")
    }
}

impl Transport for PinnedTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.stream.get_mut().set_timeout(timeout);
        let output = &self.buffers.output()[..amount];
        self.stream.write_all(output)?;
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        use std::io::Read;
        self.stream.get_mut().set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let amount = self.stream.read(input)?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_name_scheme_host_and_port() {
        assert_eq!(origin("https://Ctl.Example:8443/x").expect("test"), "https://ctl.example:8443");
        assert_eq!(origin("https://ctl.example").expect("test"), "https://ctl.example:443");
        assert_eq!(origin("https://[::1]:8443").expect("test"), "https://[::1]:8443");
        assert_eq!(origin("https://[::1]").expect("test"), "https://[::1]:443");
        assert!(origin("http://ctl.example").is_err());
        assert!(origin("https://user@ctl.example").is_err());
    }

    #[test]
    fn pins_survive_a_reload_and_a_bad_line_is_named() {
        let dir = std::env::temp_dir().join(format!("thymisctl-pins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a: Fingerprint = "ab".repeat(32).parse().expect("test");
        let b: Fingerprint = "cd".repeat(32).parse().expect("test");
        let mut k = KnownControllers::load(&dir).expect("test");
        k.pin("https://x:1", a).expect("test");
        k.pin("https://y:2", a).expect("test");
        k.pin("https://x:1", b).expect("test");
        let k = KnownControllers::load(&dir).expect("test");
        assert_eq!((k.get("https://x:1"), k.get("https://y:2"), k.get("https://z:3")), (Some(b), Some(a), None));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(k.file()).expect("test").permissions().mode() & 0o777, 0o600);
        std::fs::write(k.file(), "https://x:1 nothex\n").expect("test");
        let err = KnownControllers::load(&dir).expect_err("a bad line").to_string();
        assert!(err.contains("known-controllers:1"), "{err}");
        std::fs::remove_dir_all(&dir).expect("test");
    }
}
