//! How the agent trusts the controller's TLS certificate: pinned by its sha256
//! (`controller_tls_sha256`, what generated configurations carry) or through a CA
//! (`controller_ca_file`). There is no fallback to a system trust store: a device
//! trusts exactly what its configuration names.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::AgentConfig;

/// Accepts exactly the certificate whose sha256 is pinned; its signatures are still
/// checked, so only the holder of the certificate's key gets through.
#[derive(Debug)]
struct Pinned {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("the controller's certificate does not match controller_tls_sha256".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn parse_sha256(hex: &str) -> Result<[u8; 32]> {
    let hex: String = hex.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        bail!("controller_tls_sha256 must be 64 hex digits");
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).context("controller_tls_sha256 is not hex")?;
    }
    Ok(out)
}

/// The TLS client configuration for a wss:// controller URL.
pub fn client_config(config: &AgentConfig) -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    if let Some(pin) = &config.controller_tls_sha256 {
        let verifier = Pinned { sha256: parse_sha256(pin)?, provider };
        return Ok(builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth());
    }
    if let Some(ca) = &config.controller_ca_file {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
            roots.add(cert.with_context(|| format!("parsing {}", ca.display()))?)?;
        }
        return Ok(builder.with_root_certificates(roots).with_no_client_auth());
    }
    bail!("a wss:// controller_url needs controller_tls_sha256 or controller_ca_file")
}
