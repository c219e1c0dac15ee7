//! Store paths: `/nix/store/<32 nix-base32 chars>-<name>`, validated once at the edge.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::base32;

/// The only store directory Thymis supports (NixOS's).
pub const STORE_DIR: &str = "/nix/store";

/// Why a store path was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("{0:?} is not under {STORE_DIR}/")]
    NotInStore(String),
    #[error("store path {path:?} has a bad digest: {why}")]
    BadDigest { path: String, why: &'static str },
    #[error("store path {path:?} has a bad name: {why}")]
    BadName { path: String, why: &'static str },
}

/// A validated store path. Ordered by its base name, as Nix orders them.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    /// `<digest>-<name>`, the part after `/nix/store/`.
    base: String,
}

impl StorePath {
    /// Parses `<digest>-<name>` (a store path without its directory).
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        let full = || format!("{STORE_DIR}/{base}");
        let bad_digest = |why| StorePathError::BadDigest { path: full(), why };
        let bad_name = |why| StorePathError::BadName { path: full(), why };
        if base.len() < 34 || !base.is_char_boundary(32) {
            return Err(bad_digest("shorter than 32 characters plus a name"));
        }
        let (digest, rest) = base.split_at(32);
        if !digest.bytes().all(base32::is_valid_char) {
            return Err(bad_digest("not nix-base32"));
        }
        let name = rest.strip_prefix('-').ok_or_else(|| bad_digest("not followed by '-'"))?;
        if name.is_empty() || name.len() > 211 {
            return Err(bad_name("empty or longer than 211 characters"));
        }
        if name.starts_with('.') {
            return Err(bad_name("starts with '.'"));
        }
        let allowed = |c: u8| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c);
        if !name.bytes().all(allowed) {
            return Err(bad_name("characters outside [A-Za-z0-9+-._?=]"));
        }
        Ok(StorePath { base: base.to_owned() })
    }

    /// `<digest>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// The 32-character digest, unique per path: used as a file name in bundles.
    pub fn digest(&self) -> &str {
        &self.base[..32]
    }

    /// The name after the digest.
    pub fn name(&self) -> &str {
        &self.base[33..]
    }

    /// The name without its version: the `-`-separated parts that start with a digit
    /// are left out (`openssl-3.0.13-bin` is `openssl-bin`, `python3.11-requests-2.31.0`
    /// is `python3.11-requests`), so a package whose version moved still finds its
    /// earlier version (as nvd matches packages).
    pub fn package(&self) -> String {
        package_of(self.name())
    }

    /// The absolute path.
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}", self.base)
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let base = s
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_owned()))?;
        if base.contains('/') {
            return Err(StorePathError::NotInStore(s.to_owned()));
        }
        Self::from_base_name(base)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl serde::Serialize for StorePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StorePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// [`StorePath::package`] of a name.
pub fn package_of(name: &str) -> String {
    let kept: Vec<&str> = name.split('-').filter(|part| !part.starts_with(|c: char| c.is_ascii_digit())).collect();
    if kept.is_empty() { name.to_owned() } else { kept.join("-") }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "/nix/store/wipdr80wxxrlc00qzxc0qi5s6wwdkais-t1";

    #[test]
    fn parses_and_prints() {
        let p: StorePath = GOOD.parse().expect("valid");
        assert_eq!(p.to_string(), GOOD);
        assert_eq!(p.digest(), "wipdr80wxxrlc00qzxc0qi5s6wwdkais");
        assert_eq!(p.name(), "t1");
    }

    #[test]
    fn packages_are_names_without_their_versions() {
        for (name, package) in [
            ("openssl-3.0.13", "openssl"),
            ("openssl-3.0.13-bin", "openssl-bin"),
            ("python3.11-requests-2.31.0", "python3.11-requests"),
            ("linux-6.6.30-modules", "linux-modules"),
            ("nixos-system-kiosk-24.05.20240101.abcdef", "nixos-system-kiosk"),
            ("hello", "hello"),
            ("1.0", "1.0"),
        ] {
            assert_eq!(super::package_of(name), package, "{name}");
        }
    }

    #[test]
    fn refuses_hostile_and_malformed_paths() {
        for bad in [
            "/nix/store/wipdr80wxxrlc00qzxc0qi5s6wwdkais-t1/sub",
            "/nix/store/../etc/passwd",
            "/tmp/wipdr80wxxrlc00qzxc0qi5s6wwdkais-t1",
            "/nix/store/wipdr80wxxrlc00qzxc0qi5s6wwdkaie-t1", // 'e' is not nix-base32
            "/nix/store/wipdr80wxxrlc00qzxc0qi5s6wwdkais-",
            "/nix/store/wipdr80wxxrlc00qzxc0qi5s6wwdkais-.hidden",
            "/nix/store/wipdr80wxxrlc00qzxc0qi5s6wwdkais-a b",
            "/nix/store/short-x",
        ] {
            assert!(bad.parse::<StorePath>().is_err(), "{bad} accepted");
        }
    }
}
