//! TLS for the controller, on unless `--insecure-plain-http`: a certificate from
//! `--tls-cert`/`--tls-key`, or one it generates at its first start (self-signed, kept in
//! the state directory, its key 0600). Agents pin its sha256, which generated agent
//! configurations carry; `thymisctl` pins it at first use or at `thymisctl login`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thymis_tls_pin::Fingerprint;
use tokio_rustls::TlsAcceptor;

/// The loaded certificate and what agents pin.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    /// sha256 of the leaf certificate (DER).
    pub cert_sha256: Fingerprint,
    pub cert_path: PathBuf,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls({}, sha256 {})", self.cert_path.display(), self.cert_sha256)
    }
}

/// Loads the given certificate, or generates one for `hosts` into `state_dir` on first use.
pub fn load(cert: Option<&Path>, key: Option<&Path>, state_dir: &Path, hosts: &[String]) -> Result<Tls> {
    let (cert_path, key_path) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_owned(), k.to_owned()),
        (None, None) => {
            let (c, k) = (state_dir.join("tls.crt"), state_dir.join("tls.key"));
            if !c.exists() {
                generate(&c, &k, hosts)?;
                tracing::info!("generated a TLS certificate for {hosts:?}: {}", c.display());
            }
            (c, k)
        }
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert_path.display()))?;
    let leaf = certs.first().with_context(|| format!("{} holds no certificate", cert_path.display()))?;
    let cert_sha256 = Fingerprint::of(leaf.as_ref());
    let key = PrivateKeyDer::from_pem_file(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    Ok(Tls { acceptor: TlsAcceptor::from(Arc::new(config)), cert_sha256, cert_path })
}

/// Writes the key, then the certificate (each through a rename): a crash in between
/// leaves no certificate, and the next start generates both again.
fn generate(cert: &Path, key: &Path, hosts: &[String]) -> Result<()> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    names.extend(hosts.iter().filter(|h| !h.is_empty()).cloned());
    names.sort();
    names.dedup();
    let generated = rcgen::generate_simple_self_signed(names).context("generating a TLS certificate")?;
    write_new(key, generated.signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(cert, generated.cert.pem().as_bytes(), 0o644)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
