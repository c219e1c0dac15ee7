//! How the agent trusts the controller's TLS certificate: pinned by its sha256
//! (`controller_tls_sha256`, what generated configurations carry) or through a CA
//! (`controller_ca_file`). There is no fallback to a system trust store: a device
//! trusts exactly what its configuration names.

use anyhow::{Context, Result, bail};
use rustls::ClientConfig;
use thymis_tls_pin::{Fingerprint, Pinned};

use crate::config::AgentConfig;

/// The TLS client configuration for a wss:// controller URL.
pub fn client_config(config: &AgentConfig) -> Result<ClientConfig> {
    if let Some(pin) = &config.controller_tls_sha256 {
        let pin: Fingerprint = pin.parse().context("controller_tls_sha256")?;
        return Ok(Pinned::new(Some(pin), "controller_tls_sha256").client_config()?);
    }
    if let Some(ca) = &config.controller_ca_file {
        return thymis_tls_pin::ca_client_config(ca).map_err(anyhow::Error::msg);
    }
    bail!("a wss:// controller_url needs controller_tls_sha256 or controller_ca_file")
}
