//! The controller's HTTP API as a client sees it (used by thymisctl and thymis-imager).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// How to reach the controller's API.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Controller URL.
    #[arg(long, env = "THYMIS_CONTROLLER", default_value = "http://127.0.0.1:8443", global = true)]
    pub controller: String,
    /// Admin token (or THYMIS_TOKEN; or --token-file).
    #[arg(long, env = "THYMIS_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// File holding the admin token (the controller writes STATE_DIR/admin-token).
    #[arg(long, env = "THYMIS_TOKEN_FILE", global = true)]
    pub token_file: Option<std::path::PathBuf>,
    /// A certificate (PEM) to trust for an https:// controller, e.g. the STATE_DIR/tls.crt
    /// a controller started with --tls generated.
    #[arg(long, env = "THYMIS_CA_FILE", global = true)]
    pub ca_file: Option<std::path::PathBuf>,
}

/// A client of the controller's API.
#[derive(Debug)]
pub struct Client {
    pub(crate) base: String,
    pub(crate) token: String,
    pub(crate) agent: ureq::Agent,
}

impl Client {
    pub fn new(cli: &Connection) -> Result<Self> {
        let token = match (&cli.token, &cli.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            (None, None) => bail!("no admin token: pass --token, THYMIS_TOKEN or --token-file"),
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut tls = ureq::tls::TlsConfig::builder().provider(ureq::tls::TlsProvider::Rustls);
        if let Some(ca) = &cli.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            let cert = ureq::tls::Certificate::from_pem(&pem).with_context(|| format!("parsing {}", ca.display()))?;
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&[cert]));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .tls_config(tls.build())
            .build()
            .into();
        Ok(Client { base: cli.controller.trim_end_matches('/').to_owned(), token: token.trim().to_owned(), agent })
    }

    /// Downloads `path` of the API to `dest` (through `dest.part`, renamed when complete).
    pub fn download(&self, path: &str, dest: &std::path::Path) -> Result<()> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut resp = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .call()
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

    /// A JSON request; an error status becomes an error with the controller's message.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let mut resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &auth).call(),
            (_, Some(b)) => self.agent.post(&url).header("Authorization", &auth).send_json(&b),
            (_, None) => self.agent.post(&url).header("Authorization", &auth).send_empty(),
        }
        .with_context(|| format!("reaching the controller at {}", self.base))?;
        let status = resp.status();
        let v: Value = resp.body_mut().read_json().with_context(|| format!("{method} {path}: reading the answer"))?;
        if !status.is_success() {
            bail!("{}", v.get("error").and_then(Value::as_str).unwrap_or(&v.to_string()));
        }
        Ok(v)
    }
}
