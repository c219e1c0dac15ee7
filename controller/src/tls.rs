//! TLS for the controller: a certificate from `--tls-cert`/`--tls-key`, or one it
//! generates (self-signed, kept in the state directory). Agents pin its sha256, which
//! generated agent configurations carry; `thymisctl` trusts it with `--ca-file`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

/// The loaded certificate and what agents pin.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    /// sha256 of the leaf certificate (DER), lower-case hex.
    pub cert_sha256: String,
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
    let cert_sha256 = Sha256::digest(leaf.as_ref()).iter().map(|b| format!("{b:02x}")).collect();
    let key = PrivateKeyDer::from_pem_file(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    Ok(Tls { acceptor: TlsAcceptor::from(Arc::new(config)), cert_sha256, cert_path })
}

fn generate(cert: &Path, key: &Path, hosts: &[String]) -> Result<()> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    names.extend(hosts.iter().filter(|h| !h.is_empty()).cloned());
    names.sort();
    names.dedup();
    let generated = rcgen::generate_simple_self_signed(names).context("generating a TLS certificate")?;
    std::fs::write(cert, generated.cert.pem())?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(key)?;
    f.write_all(generated.signing_key.serialize_pem().as_bytes())?;
    Ok(())
}
