//! How the agent trusts the controller's TLS certificate: pinned by its sha256
//! (`controller_tls_sha256`, what generated configurations carry) or through a CA
//! (`controller_ca_file`). There is no fallback to a system trust store: a device
//! trusts exactly what its configuration names.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};
use thymis_tls_pin::{Fingerprint, Pinned};

use crate::config::AgentConfig;

/// The TLS client configuration for a wss:// controller URL.
pub fn client_config(config: &AgentConfig) -> Result<ClientConfig> {
    if let Some(pin) = &config.controller_tls_sha256 {
        let pin: Fingerprint = pin.parse().context("controller_tls_sha256")?;
        return Ok(Pinned::new(Some(pin), "controller_tls_sha256").client_config()?);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
    if let Some(ca) = &config.controller_ca_file {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
            roots.add(cert.with_context(|| format!("parsing {}", ca.display()))?)?;
        }
        return Ok(builder.with_root_certificates(roots).with_no_client_auth());
    }
    bail!("a wss:// controller_url needs controller_tls_sha256 or controller_ca_file")
}
