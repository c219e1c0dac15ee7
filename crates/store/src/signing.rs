//! Nix's ed25519 signing scheme, also used for Thymis's identity signatures.
//!
//! Keys are written `name:base64` as `nix-store --generate-binary-cache-key` writes
//! them (the secret as 64 bytes: seed then public key); signatures `name:base64`.
//! A signature counts only when a trusted key of the same name verifies it.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use thiserror::Error;

use crate::path_info::PathInfo;

/// Why a key or signature was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SigningError {
    #[error("key {0:?} is not of the form name:base64")]
    KeyFormat(String),
    #[error("key {name:?}: {why}")]
    BadKey { name: String, why: &'static str },
    #[error("the operating system's random number generator failed")]
    Random,
    #[error("{path}: no signature by a trusted key (signatures: {signatures:?})")]
    Untrusted { path: String, signatures: Vec<String> },
}

/// A secret signing key. Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

/// A public key trusted for verification.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

fn split(s: &str) -> Result<(&str, Vec<u8>), SigningError> {
    let (name, b64) = s.trim().split_once(':').ok_or_else(|| SigningError::KeyFormat(s.to_owned()))?;
    if name.is_empty() {
        return Err(SigningError::KeyFormat(s.to_owned()));
    }
    let bytes = STANDARD.decode(b64).map_err(|_| SigningError::KeyFormat(name.to_owned()))?;
    Ok((name, bytes))
}

impl SecretKey {
    /// The X25519 scalar of this key (`crate::sealed` opens boxes with it).
    pub(crate) fn scalar_bytes(&self) -> [u8; 32] {
        self.key.to_scalar_bytes()
    }

    /// A new key from the OS CSPRNG.
    pub fn generate(name: &str) -> Result<Self, SigningError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|_| SigningError::Random)?;
        Ok(SecretKey { name: name.to_owned(), key: SigningKey::from_bytes(&seed) })
    }

    /// The key whose seed is `seed` (a key derived from a secret, not random).
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Self {
        SecretKey { name: name.to_owned(), key: SigningKey::from_bytes(seed) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public(&self) -> PublicKey {
        PublicKey { name: self.name.clone(), key: self.key.verifying_key() }
    }

    /// Signs `msg`, giving `name:base64(signature)`.
    pub fn sign(&self, msg: &[u8]) -> String {
        format!("{}:{}", self.name, STANDARD.encode(self.key.sign(msg).to_bytes()))
    }

    /// Adds this key's signature to a path info (replacing an older one by this key).
    pub fn sign_path(&self, info: &mut PathInfo) {
        let prefix = format!("{}:", self.name);
        info.signatures.retain(|s| !s.starts_with(&prefix));
        info.signatures.push(self.sign(info.fingerprint().as_bytes()));
    }

    /// The `name:base64` text of `nix-store --generate-binary-cache-key`.
    pub fn to_secret_string(&self) -> String {
        let mut bytes = self.key.to_bytes().to_vec();
        bytes.extend_from_slice(self.key.verifying_key().as_bytes());
        format!("{}:{}", self.name, STANDARD.encode(bytes))
    }
}

impl FromStr for SecretKey {
    type Err = SigningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split(s)?;
        let bad = |why| SigningError::BadKey { name: name.to_owned(), why };
        let seed: [u8; 32] = match bytes.len() {
            64 | 32 => bytes[..32].try_into().map_err(|_| bad("bad length"))?,
            _ => return Err(bad("secret key is not 64 bytes")),
        };
        let key = SigningKey::from_bytes(&seed);
        if bytes.len() == 64 && key.verifying_key().as_bytes() != &bytes[32..] {
            return Err(bad("secret key's public half does not match"));
        }
        Ok(SecretKey { name: name.to_owned(), key })
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

impl PublicKey {
    /// This key's X25519 equivalent (`crate::sealed` seals to it).
    pub(crate) fn montgomery(&self) -> curve25519_dalek::MontgomeryPoint {
        self.key.to_montgomery()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `signature` (`name:base64`) is this key's signature of `msg`.
    pub fn verifies(&self, msg: &[u8], signature: &str) -> bool {
        let Some((name, b64)) = signature.split_once(':') else { return false };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = STANDARD.decode(b64) else { return false };
        let Ok(sig) = Signature::from_slice(&bytes) else { return false };
        self.key.verify(msg, &sig).is_ok()
    }

    /// A short fingerprint for people to compare: the first 16 bytes of the key, hex.
    pub fn short_fingerprint(&self) -> String {
        self.key.as_bytes()[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl FromStr for PublicKey {
    type Err = SigningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split(s)?;
        let bad = |why| SigningError::BadKey { name: name.to_owned(), why };
        let arr: [u8; 32] = bytes.try_into().map_err(|_| bad("public key is not 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| bad("not an ed25519 point"))?;
        Ok(PublicKey { name: name.to_owned(), key })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// Whether any of `signatures` over `msg` is by one of `trusted`.
pub fn verify_any(msg: &[u8], signatures: &[String], trusted: &[PublicKey]) -> bool {
    signatures.iter().any(|s| trusted.iter().any(|k| k.verifies(msg, s)))
}

/// Checks that a path info carries a signature by a trusted key.
pub fn verify_path(info: &PathInfo, trusted: &[PublicKey]) -> Result<(), SigningError> {
    if verify_any(info.fingerprint().as_bytes(), &info.signatures, trusted) {
        Ok(())
    } else {
        Err(SigningError::Untrusted { path: info.path.to_string(), signatures: info.signatures.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_name_binding() {
        let k = SecretKey::generate("thymis-1").expect("key");
        let again: SecretKey = k.to_secret_string().parse().expect("parse");
        let pk: PublicKey = k.public().to_string().parse().expect("public");
        let sig = again.sign(b"hello");
        assert!(pk.verifies(b"hello", &sig));
        assert!(!pk.verifies(b"hellO", &sig));
        // Same key bytes under another name are not trusted.
        let renamed: PublicKey = pk.to_string().replacen("thymis-1", "other", 1).parse().expect("renamed");
        assert!(!renamed.verifies(b"hello", &sig));
        assert!(!format!("{k:?}").contains(&k.to_secret_string()[9..]));
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert!("nocolon".parse::<PublicKey>().is_err());
        assert!("k:AAAA".parse::<PublicKey>().is_err());
        assert!(":AAAA".parse::<SecretKey>().is_err());
    }
}
