//! `.narinfo` files of the Nix binary cache protocol: what a cache says about a store
//! path (its NAR's hash and size, references, signatures) and where its (compressed) NAR
//! is. Parsed strictly: a narinfo is only a claim, which its signature and the NAR's
//! hash then check.

use std::collections::BTreeSet;

use thiserror::Error;

use crate::hash::NarHash;
use crate::path_info::PathInfo;
use crate::store_path::StorePath;

/// How a cache compressed a NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
}

/// A parsed narinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub info: PathInfo,
    /// The NAR's location, relative to the cache's URL.
    pub url: String,
    pub compression: Compression,
    /// The compressed file's size, when given.
    pub file_size: Option<u64>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("narinfo line {0:?} is not `Key: value`")]
    Line(String),
    #[error("narinfo lacks {0}")]
    Missing(&'static str),
    #[error("narinfo field {field}: {value:?} is not valid")]
    Field { field: &'static str, value: String },
    #[error("narinfo compression {0:?} is not one this agent reads (xz, zstd, none)")]
    Compression(String),
    #[error("narinfo URL {0:?} is not a relative path inside the cache")]
    Url(String),
}

impl NarInfo {
    pub fn parse(text: &str) -> Result<NarInfo, NarInfoError> {
        let mut path = None;
        let mut url = None;
        let mut compression = Compression::Xz; // Nix's default when the field is absent
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = BTreeSet::new();
        let mut deriver = None;
        let mut signatures = vec![];
        let field = |field: &'static str, value: &str| NarInfoError::Field { field, value: value.to_owned() };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line.split_once(": ").ok_or_else(|| NarInfoError::Line(line.to_owned()))?;
            let in_store = |v: &str| format!("/nix/store/{v}").parse::<StorePath>();
            match key {
                "StorePath" => path = Some(value.parse::<StorePath>().map_err(|_| field("StorePath", value))?),
                "URL" => url = Some(value.to_owned()),
                "Compression" => {
                    compression = match value {
                        "xz" => Compression::Xz,
                        "zstd" => Compression::Zstd,
                        "none" => Compression::None,
                        other => return Err(NarInfoError::Compression(other.to_owned())),
                    }
                }
                "FileSize" => file_size = Some(value.parse().map_err(|_| field("FileSize", value))?),
                "NarHash" => nar_hash = Some(value.parse::<NarHash>().map_err(|_| field("NarHash", value))?),
                "NarSize" => nar_size = Some(value.parse().map_err(|_| field("NarSize", value))?),
                "References" => {
                    for r in value.split_whitespace() {
                        references.insert(in_store(r).map_err(|_| field("References", r))?);
                    }
                }
                "Deriver" if value != "unknown-deriver" => {
                    deriver = Some(in_store(value).map_err(|_| field("Deriver", value))?)
                }
                "Sig" => signatures.push(value.to_owned()),
                // FileHash, System, CA, ...: not needed to check or import the path.
                _ => {}
            }
        }
        let url = url.ok_or(NarInfoError::Missing("URL"))?;
        if url.is_empty() || url.starts_with('/') || url.contains("..") || url.contains("://") || url.contains('?') {
            return Err(NarInfoError::Url(url));
        }
        Ok(NarInfo {
            info: PathInfo {
                path: path.ok_or(NarInfoError::Missing("StorePath"))?,
                nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
                nar_size: nar_size.ok_or(NarInfoError::Missing("NarSize"))?,
                references,
                deriver,
                signatures,
            },
            url,
            compression,
            file_size,
        })
    }
}

/// The part of a store path a cache names its narinfo by (`HASH.narinfo`).
pub fn narinfo_name(path: &StorePath) -> String {
    let base = path.base_name();
    format!("{}.narinfo", base.split('-').next().unwrap_or(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "StorePath: /nix/store/0c9n7lz8mfsd6j3bk3r7ssp6a0h2sfaa-hello-2.12
URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz
Compression: xz
FileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3
FileSize: 50088
NarHash: sha256:0kcibqqrg3crz07q6jcfs0h2wnsqa2v4x9ldk0b8lf4r7g3kvyzc
NarSize: 226560
References: 0c9n7lz8mfsd6j3bk3r7ssp6a0h2sfaa-hello-2.12 1b9p07z77phvv2hf6gm9f28syp39f1ag-glibc-2.37
Deriver: 2a1z6lz4zz5w7v4lrb2dxlk0b6lqiqk0-hello-2.12.drv
Sig: cache.example-1:c2lnbmF0dXJl
";

    #[test]
    fn a_narinfo_reads_as_the_path_info_it_claims() {
        let n = NarInfo::parse(TEXT).expect("parse");
        assert_eq!(n.info.path.to_string(), "/nix/store/0c9n7lz8mfsd6j3bk3r7ssp6a0h2sfaa-hello-2.12");
        assert_eq!((n.compression, n.file_size, n.info.nar_size), (Compression::Xz, Some(50088), 226560));
        assert_eq!(n.info.references.len(), 2);
        assert!(n.info.fingerprint().ends_with(",/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-glibc-2.37"));
        assert_eq!(n.info.signatures, ["cache.example-1:c2lnbmF0dXJl"]);
        assert_eq!(narinfo_name(&n.info.path), "0c9n7lz8mfsd6j3bk3r7ssp6a0h2sfaa.narinfo");
    }

    #[test]
    fn what_could_lead_outside_the_cache_or_is_unknown_is_refused() {
        for (from, to) in [
            ("URL: nar/1w1f", "URL: ../../etc/passwd"),
            ("URL: nar/1w1f", "URL: http://elsewhere.example/x"),
            ("URL: nar/1w1f", "URL: /etc/passwd"),
            ("Compression: xz", "Compression: br"),
            ("NarSize: 226560", "NarSize: many"),
            ("StorePath: /nix/store/", "StorePath: /tmp/"),
        ] {
            assert!(NarInfo::parse(&TEXT.replace(from, to)).is_err(), "{to}");
        }
        assert_eq!(NarInfo::parse("NarSize: 1\n"), Err(NarInfoError::Missing("URL")));
        assert!(NarInfo::parse("no colon\n").is_err());
    }
}
