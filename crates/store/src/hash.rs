//! The sha256 NAR hash in the notations Nix uses, normalised to one value.
//!
//! Nix prints `sha256:<nix-base32>` (Nix < 2.19 and all fingerprints), `sha256-<base64>`
//! (SRI, newer `nix path-info --json`) and sometimes `sha256:<hex>`. Fingerprints must use
//! the first, so everything is parsed into [`NarHash`] and printed back as needed.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::base32;

/// Why a hash string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashParseError {
    #[error("hash {0:?} is not sha256 (expected `sha256:` or `sha256-`)")]
    NotSha256(String),
    #[error("hash {hash:?} is malformed: {why}")]
    Malformed { hash: String, why: String },
}

/// A sha256 digest of a NAR serialisation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NarHash(pub [u8; 32]);

impl NarHash {
    /// `sha256-<base64>`, the SRI form.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", STANDARD.encode(self.0))
    }

    /// Lower-case hex, as `sha256sum` prints it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for NarHash {
    /// `sha256:<nix-base32>`, the form fingerprints and `nix-store -q --hash` use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", base32::encode(&self.0))
    }
}

impl fmt::Debug for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for NarHash {
    type Err = HashParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = |why: &str| HashParseError::Malformed { hash: s.to_owned(), why: why.to_owned() };
        if let Some(b64) = s.strip_prefix("sha256-") {
            let bytes = STANDARD.decode(b64).map_err(|e| malformed(&e.to_string()))?;
            let arr: [u8; 32] = bytes.try_into().map_err(|_| malformed("not 32 bytes"))?;
            return Ok(NarHash(arr));
        }
        let rest = s.strip_prefix("sha256:").ok_or_else(|| HashParseError::NotSha256(s.to_owned()))?;
        match rest.len() {
            52 => base32::decode::<32>(rest).map(NarHash).map_err(|e| malformed(&e.to_string())),
            64 => {
                let mut out = [0u8; 32];
                for (i, chunk) in rest.as_bytes().chunks(2).enumerate() {
                    let hex = std::str::from_utf8(chunk).map_err(|_| malformed("not hex"))?;
                    out[i] = u8::from_str_radix(hex, 16).map_err(|_| malformed("not hex"))?;
                }
                Ok(NarHash(out))
            }
            _ => Err(malformed("wrong length for base32 or hex")),
        }
    }
}

impl serde::Serialize for NarHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NarHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A `Write`/`Read` companion that hashes and counts every byte passing through.
#[derive(Debug, Default, Clone)]
pub struct NarHasher {
    sha: Sha256,
    len: u64,
}

impl NarHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hash and size of everything seen.
    pub fn finish(self) -> (NarHash, u64) {
        (NarHash(self.sha.finalize().into()), self.len)
    }
}

impl std::io::Write for NarHasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B32: &str = "sha256:19l59z9nbs59axnhw6iqsz5bdagqb22kf0dp2zhkiq5m4b6k5247";

    #[test]
    fn all_notations_parse_to_one_value() {
        let h: NarHash = B32.parse().expect("base32");
        let sri: NarHash = h.to_sri().parse().expect("sri");
        let hex: NarHash = format!("sha256:{}", h.to_hex()).parse().expect("hex");
        assert_eq!(h, sri);
        assert_eq!(h, hex);
        assert_eq!(h.to_string(), B32);
    }

    #[test]
    fn refuses_other_algorithms_and_garbage() {
        assert!(matches!("md5:abc".parse::<NarHash>(), Err(HashParseError::NotSha256(_))));
        assert!(matches!("sha256:xyz".parse::<NarHash>(), Err(HashParseError::Malformed { .. })));
        assert!("sha256-AAAA".parse::<NarHash>().is_err());
    }
}
