//! The offline update bundle (its format is written down here): an uncompressed tar of
//!
//! ```text
//! manifest.json            what, for whom, which sequence number, until when; the paths
//! manifest.sig             identity-key signature over "thymis/bundle-manifest/v2\n" and
//!                          the exact bytes of manifest.json
//! info/<digest>.json       path info with Nix signatures   } per path,
//! nar/<digest>.nar.zst     the path's NAR, zstd-compressed } dependencies first
//! ```
//!
//! The reader never extracts by archive names: it accepts exactly these names, in this
//! order, as regular files, so a hostile archive cannot write anywhere. Each NAR is
//! checked against the signed path info and the signed manifest while it is unpacked
//! to a private staging file.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::closure::{ClosureError, sort_dependencies_first};
use crate::hash::NarHash;
use crate::local_store::LocalStore;
use crate::nar::{NarError, copy_verified};
use crate::path_info::PathInfo;
use crate::signing::{PublicKey, SecretKey, SigningError, verify_any, verify_path};
use crate::store_path::StorePath;
use crate::zstd_limits;

/// The bundle format this code writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// Largest manifest accepted (a closure of tens of thousands of paths fits).
const MAX_MANIFEST: u64 = 16 << 20;
const MAX_INFO: u64 = 1 << 20;

/// Whom a bundle (or an offer) is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Device(String),
    Config(String),
}

impl std::str::FromStr for Target {
    type Err = String;

    /// `device:NAME` or `config:NAME`, as the command line takes it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("device", n)) if !n.is_empty() => Ok(Target::Device(n.to_owned())),
            Some(("config", n)) if !n.is_empty() => Ok(Target::Config(n.to_owned())),
            _ => Err(format!("target {s:?} is not device:NAME or config:NAME")),
        }
    }
}

/// One path of the bundle's closure, as the manifest pins it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPath {
    pub path: StorePath,
    pub nar_hash: NarHash,
    pub nar_size: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub target: Target,
    pub system: StorePath,
    pub commit: Option<String>,
    pub sequence: u64,
    /// Unix seconds after which the bundle must not be installed (where the clock is known).
    pub expires: Option<u64>,
    /// Unix seconds.
    pub created: u64,
    /// The whole closure of `system`, dependencies first.
    pub paths: Vec<ManifestPath>,
    /// A device bundle's secrets, sealed to that device's key for the deployment
    /// `bundle-SEQUENCE` (base64; signed with the manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<String>,
}

/// Why a bundle could not be written or was refused.
#[derive(Debug, Error)]
pub enum BundleError {
    #[error("bundle I/O")]
    Io(#[from] io::Error),
    #[error("bundle entry {index} is {found:?}, expected {expected}")]
    UnexpectedEntry { index: usize, found: String, expected: String },
    #[error("bundle entry {name:?} is not a regular file")]
    NotAFile { name: String },
    #[error("bundle entry {name:?} is {size} bytes, over the limit of {max}")]
    TooLarge { name: String, size: u64, max: u64 },
    #[error("bundle manifest is not valid")]
    Manifest(#[source] serde_json::Error),
    #[error("bundle format {0} is not supported (this build reads {FORMAT_VERSION})")]
    Format(u32),
    #[error("bundle manifest is not signed by a trusted controller identity key")]
    BadManifestSignature,
    #[error("path info of {path} is not valid")]
    Info {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("path info of {path} does not match the manifest")]
    InfoMismatch { path: String },
    #[error(transparent)]
    Signature(#[from] SigningError),
    #[error("NAR of {path} refused")]
    Nar {
        path: String,
        #[source]
        source: NarError,
    },
    #[error("bundle closure is not usable")]
    Closure(#[from] ClosureError),
    #[error("bundle ends before all {expected} paths of its manifest")]
    Incomplete { expected: usize },
    #[error("bundle refused: {0}")]
    Refused(String),
}

/// What the identity key signs for a manifest: its bytes under their own context, so
/// no signature the key makes for anything else (offers, the handshake) can pass for one.
fn manifest_message(manifest: &[u8]) -> Vec<u8> {
    [b"thymis/bundle-manifest/v2\n".as_slice(), manifest].concat()
}

/// Writes a bundle for `infos` (the closure, dependencies first, already signed with the
/// Nix key), reading NARs from `store`. `manifest.paths` is filled in from `infos`.
pub fn write<W: Write>(
    out: W,
    mut manifest: Manifest,
    identity: &SecretKey,
    store: &LocalStore,
    infos: &[PathInfo],
    scratch: &Path,
) -> Result<W, BundleError> {
    manifest.format = FORMAT_VERSION;
    manifest.paths = infos
        .iter()
        .map(|i| ManifestPath { path: i.path.clone(), nar_hash: i.nar_hash, nar_size: i.nar_size })
        .collect();
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).map_err(BundleError::Manifest)?;
    let sig = identity.sign(&manifest_message(&manifest_bytes));
    let mut tar = tar::Builder::new(out);
    let mtime = manifest.created;
    append(&mut tar, "manifest.json", mtime, manifest_bytes.len() as u64, &mut manifest_bytes.as_slice())?;
    append(&mut tar, "manifest.sig", mtime, sig.len() as u64, &mut sig.as_bytes())?;
    for info in infos {
        let json = serde_json::to_vec(info).map_err(BundleError::Manifest)?;
        append(&mut tar, &format!("info/{}.json", info.path.digest()), mtime, json.len() as u64, &mut json.as_slice())?;
        // The tar header needs the size first: compress to a scratch file.
        let mut staged = tempfile::tempfile_in(scratch)?;
        let mut enc = zstd_limits::encoder(&mut staged)?;
        store.dump(&info.path, &mut enc).map_err(|source| BundleError::Nar { path: info.path.to_string(), source })?;
        enc.finish()?;
        let size = staged.stream_position()?;
        staged.rewind()?;
        append(&mut tar, &format!("nar/{}.nar.zst", info.path.digest()), mtime, size, &mut staged)?;
    }
    Ok(tar.into_inner()?)
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    mtime: u64,
    size: u64,
    data: &mut dyn Read,
) -> io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, name, data)
}

/// A path from a bundle whose NAR passed every check, staged in a private file.
#[derive(Debug)]
pub struct VerifiedPath {
    pub info: PathInfo,
    /// The uncompressed NAR, positioned at its start.
    pub nar: File,
}

/// Reads and checks a bundle. `decide` sees the verified manifest and returns the paths
/// to unpack (usually those the store lacks), or refuses the bundle (wrong target, old
/// sequence). NARs are staged in `scratch`.
pub fn read<R: Read>(
    input: R,
    identity_keys: &[PublicKey],
    nix_keys: &[PublicKey],
    scratch: &Path,
    decide: impl FnOnce(&Manifest) -> Result<HashSet<StorePath>, BundleError>,
) -> Result<(Manifest, Vec<VerifiedPath>), BundleError> {
    let mut archive = tar::Archive::new(input);
    let mut entries = archive.entries()?.enumerate();
    let mut next = |expected: &str, max: u64| -> Result<tar::Entry<'_, R>, BundleError> {
        let (index, entry) = entries.next().ok_or_else(|| BundleError::UnexpectedEntry {
            index: usize::MAX,
            found: "end".into(),
            expected: expected.into(),
        })?;
        let entry = entry?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if name != expected {
            return Err(BundleError::UnexpectedEntry { index, found: name, expected: expected.into() });
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(BundleError::NotAFile { name });
        }
        let size = entry.size();
        if size > max {
            return Err(BundleError::TooLarge { name, size, max });
        }
        Ok(entry)
    };

    let mut manifest_bytes = Vec::new();
    next("manifest.json", MAX_MANIFEST)?.read_to_end(&mut manifest_bytes)?;
    let mut sig = String::new();
    next("manifest.sig", 4096)?.read_to_string(&mut sig)?;
    let sig = [sig.trim().to_owned()];
    if !verify_any(&manifest_message(&manifest_bytes), &sig, identity_keys) {
        // Format 1 signed the bare manifest: say so rather than "not signed".
        if verify_any(&manifest_bytes, &sig, identity_keys) {
            return Err(BundleError::Format(1));
        }
        return Err(BundleError::BadManifestSignature);
    }
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes).map_err(BundleError::Manifest)?;
    if manifest.format != FORMAT_VERSION {
        return Err(BundleError::Format(manifest.format));
    }
    let wanted = decide(&manifest)?;

    let mut infos = Vec::with_capacity(manifest.paths.len());
    let mut verified = Vec::new();
    for pinned in &manifest.paths {
        let digest = pinned.path.digest();
        let mut json = Vec::new();
        next(&format!("info/{digest}.json"), MAX_INFO)?.read_to_end(&mut json)?;
        let info: PathInfo = serde_json::from_slice(&json)
            .map_err(|source| BundleError::Info { path: pinned.path.to_string(), source })?;
        if info.path != pinned.path || info.nar_hash != pinned.nar_hash || info.nar_size != pinned.nar_size {
            return Err(BundleError::InfoMismatch { path: pinned.path.to_string() });
        }
        verify_path(&info, nix_keys)?;
        let entry = next(&format!("nar/{digest}.nar.zst"), u64::MAX)?;
        if wanted.contains(&info.path) {
            let mut staged = tempfile::tempfile_in(scratch)?;
            let nar_err = |source| BundleError::Nar { path: info.path.to_string(), source };
            let decoder = zstd_limits::decoder(io::BufReader::new(entry))?;
            copy_verified(decoder, &mut io::BufWriter::new(&mut staged), &info.nar_hash, info.nar_size)
                .map_err(nar_err)?;
            staged.rewind()?;
            verified.push(VerifiedPath { info: info.clone(), nar: staged });
        }
        infos.push(info);
    }
    // The manifest's list must be a complete closure of the system, in a usable order.
    let sorted = sort_dependencies_first(infos)?;
    if !sorted.iter().any(|i| i.path == manifest.system) {
        return Err(BundleError::Refused(format!("system {} is not among the bundle's paths", manifest.system)));
    }
    Ok((manifest, verified))
}
