//! The controller's HTTP API (`/api/v1`, docs/controller.md) as a client sees it, in
//! the API's own types (`thymis_api`): thymisctl and the imager read and write it only
//! through this crate. An https:// controller is held to its pinned certificate (or a
//! CA); [`tasks`] follows a task's events and downloads its files.

pub mod known_controllers;
pub mod safe_text;
pub mod tasks;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use thymis_tls_pin::{Fingerprint, Pinned};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{Connector, TcpConnector};

use crate::known_controllers::{self as known, KnownControllers};
pub use tasks::{Progress, artifacts, check_artifact_name, follow};

/// How to reach the controller's API.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Controller URL [default: the one of the last `thymisctl login`, else
    /// https://127.0.0.1:8443].
    #[arg(long, env = "THYMIS_CONTROLLER", global = true, help_heading = "Connection and output")]
    pub controller: Option<String>,
    /// Admin token (or THYMIS_TOKEN; or --token-file).
    #[arg(long, env = "THYMIS_TOKEN", hide_env_values = true, global = true, help_heading = "Connection and output")]
    pub token: Option<String>,
    /// File holding the admin token (the controller writes STATE_DIR/admin-token).
    #[arg(long, env = "THYMIS_TOKEN_FILE", global = true, help_heading = "Connection and output")]
    pub token_file: Option<std::path::PathBuf>,
    /// Check an https:// controller's certificate and host name against this CA
    /// certificate (PEM) instead of pinning the certificate.
    #[arg(long, env = "THYMIS_CA_FILE", global = true, help_heading = "Connection and output")]
    pub ca_file: Option<std::path::PathBuf>,
    /// The sha256 of the controller's certificate (the controller logs it at start):
    /// expect exactly this one instead of the pinned one.
    #[arg(
        long,
        env = "THYMIS_CONTROLLER_SHA256",
        global = true,
        value_name = "SHA256",
        help_heading = "Connection and output"
    )]
    pub fingerprint: Option<String>,
}

impl Connection {
    /// The controller's URL, without a trailing slash.
    pub fn url(&self) -> Result<String> {
        let url = match &self.controller {
            Some(u) => u.clone(),
            None => known::logged_in_controller(&known::config_dir()?)
                .unwrap_or_else(|| known::DEFAULT_CONTROLLER.to_owned()),
        };
        if !url.starts_with("https://") && !url.starts_with("http://") {
            bail!("the controller URL {url} is neither https:// nor http://");
        }
        Ok(url.trim_end_matches('/').to_owned())
    }

    pub fn fingerprint(&self) -> Result<Option<Fingerprint>> {
        self.fingerprint.as_deref().map(|f| f.parse().context("--fingerprint")).transpose()
    }
}

/// The certificate an https:// controller must present: `--fingerprint`, else the pin
/// from an earlier use, else (the first use) the one it presents now, pinned from then on.
fn expected_certificate(conn: &Connection, url: &str) -> Result<Fingerprint> {
    if let Some(f) = conn.fingerprint()? {
        return Ok(f);
    }
    let origin = known::origin(url)?;
    let mut pins = KnownControllers::load(&known::config_dir()?)?;
    if let Some(f) = pins.get(&origin) {
        return Ok(f);
    }
    let shown = known::presented_certificate(url)?;
    pins.pin(&origin, shown)?;
    eprintln!(
        "thymisctl: first use of {origin}: trusting its certificate, sha256 {shown} (compare it with the \
         controller's log); pinned in {}",
        pins.file().display()
    );
    Ok(shown)
}

/// A client of the controller's API.
#[derive(Debug)]
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
    /// The pin an https:// controller is held to (None: plain, or checked by a CA).
    pin: Option<(Fingerprint, Arc<Pinned>)>,
    ca_file: Option<std::path::PathBuf>,
}

impl Client {
    pub fn new(cli: &Connection) -> Result<Self> {
        let token = match (&cli.token, &cli.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            (None, None) => bail!("no admin token: pass --token, THYMIS_TOKEN or --token-file"),
        };
        let base = cli.url()?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut tls = ureq::tls::TlsConfig::builder().provider(ureq::tls::TlsProvider::Rustls);
        if let Some(ca) = &cli.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            let cert = ureq::tls::Certificate::from_pem(&pem).with_context(|| format!("parsing {}", ca.display()))?;
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&[cert]));
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .tls_config(tls.build())
            .build();
        let (agent, pin) = if base.starts_with("https://") && cli.ca_file.is_none() {
            let expected = expected_certificate(cli, &base)?;
            let verifier = Pinned::new(Some(expected), "the certificate pinned for this controller");
            let connector = ().chain(TcpConnector::default()).chain(known::PinnedTls::new(&verifier)?);
            (ureq::Agent::with_parts(config, connector, DefaultResolver::default()), Some((expected, verifier)))
        } else {
            (config.into(), None)
        };
        Ok(Client { base, token: token.trim().to_owned(), agent, pin, ca_file: cli.ca_file.clone() })
    }

    /// The TLS configuration for other connections to the controller (the terminal's
    /// WebSocket): the same pin or CA as the API's. None for plain http://.
    pub fn tls_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>> {
        if !self.base.starts_with("https://") {
            return Ok(None);
        }
        let config = match (&self.pin, &self.ca_file) {
            (Some((_, verifier)), _) => verifier.client_config()?,
            (None, Some(ca)) => thymis_tls_pin::ca_client_config(ca).map_err(anyhow::Error::msg)?,
            (None, None) => bail!("no way to check the controller's certificate"),
        };
        Ok(Some(Arc::new(config)))
    }

    /// A GET whose answer is read as it comes, for as long as it lasts (a followed
    /// journal): the body, or the controller's error.
    pub fn stream(&self, path: &str) -> Result<impl std::io::BufRead + use<>> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut resp = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .config()
            .timeout_global(None)
            .build()
            .call()
            .map_err(|e| self.explain(e))?;
        if !resp.status().is_success() {
            let v: Value = resp.body_mut().read_json().with_context(|| format!("GET {path}: reading the answer"))?;
            bail!("{}", error_text(v));
        }
        let reader = resp.into_body().into_with_config().limit(u64::MAX).reader();
        Ok(std::io::BufReader::new(reader))
    }

    /// Says what went wrong when the controller's certificate was not the pinned one.
    pub(crate) fn explain(&self, e: ureq::Error) -> anyhow::Error {
        let e = anyhow::Error::new(e).context(format!("reaching the controller at {}", self.base));
        match &self.pin {
            Some((expected, verifier)) if verifier.seen().is_some_and(|s| s != *expected) => {
                let shown = verifier.seen().unwrap_or(*expected);
                e.context(format!(
                    "the controller at {} presents the certificate sha256 {shown}, not the pinned {expected}: \
                     someone may be in between. If the controller's certificate was replaced on purpose, check \
                     the new sha256 in its log and run `thymisctl login {} --fingerprint {shown}`",
                    self.base, self.base
                ))
            }
            _ => e,
        }
    }

    /// Downloads `path` of the API to `dest` (through `dest.part`, renamed when complete).
    pub fn download(&self, path: &str, dest: &std::path::Path) -> Result<()> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut resp = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .call()
            .map_err(|e| self.explain(e))
            .with_context(|| format!("downloading {path}"))?;
        if !resp.status().is_success() {
            bail!("downloading {path}: {}", resp.status());
        }
        let tmp = dest.with_extension("part");
        // Images and bundles can hold secrets (an enrollment token): only for the owner.
        let mut f = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new().write(true).create(true).truncate(true),
            0o600,
        )
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
        std::io::copy(&mut resp.body_mut().with_config().limit(u64::MAX).reader(), &mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        Ok(())
    }

    /// The controller's URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The `Authorization` header's value.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// `GET path`, read as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.typed("GET", path, None)
    }

    /// `POST path` with `body` as JSON (none: an empty body), read as `T`.
    pub fn post<T: DeserializeOwned>(&self, path: &str, body: Option<&impl Serialize>) -> Result<T> {
        let body = body.map(serde_json::to_value).transpose()?;
        self.typed("POST", path, body)
    }

    /// `DELETE path`, read as `T`.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.typed("DELETE", path, None)
    }

    fn typed<T: DeserializeOwned>(&self, method: &str, path: &str, body: Option<Value>) -> Result<T> {
        let v = self.call(method, path, body)?;
        serde_json::from_value(v)
            .with_context(|| format!("{method} {path}: the controller answered what this client does not know"))
    }

    /// A JSON request; an error status becomes an error with the controller's message.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let mut resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &auth).call(),
            (_, Some(b)) => self.agent.post(&url).header("Authorization", &auth).send_json(&b),
            (_, None) => self.agent.post(&url).header("Authorization", &auth).send_empty(),
        }
        .map_err(|e| self.explain(e))?;
        let status = resp.status();
        let v: Value = resp.body_mut().read_json().with_context(|| format!("{method} {path}: reading the answer"))?;
        if !status.is_success() {
            bail!("{}", error_text(v));
        }
        Ok(v)
    }
}

/// The controller's error message from an error answer (`thymis_api::ErrorBody`), or the
/// answer itself.
fn error_text(v: Value) -> String {
    match serde_json::from_value::<thymis_api::ErrorBody>(v.clone()) {
        Ok(b) => b.error,
        Err(_) => v.to_string(),
    }
}
