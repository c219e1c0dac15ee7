//! The closure to put into an image: from the local store, or from a `closureInfo`
//! directory (inside a Nix build, where no store daemon is reachable).

use std::path::Path;

use anyhow::{Context, Result, bail};
use thymis_store::closure::sort_dependencies_first;
use thymis_store::local_store::LocalStore;
use thymis_store::{NarHash, PathInfo, StorePath};

pub fn from_store(system: &StorePath) -> Result<Vec<PathInfo>> {
    let infos = LocalStore::system().path_infos(std::slice::from_ref(system), true)?;
    Ok(sort_dependencies_first(infos)?)
}

/// Reads `DIR/registration` (the `nix-store --dump-db` format `closureInfo` writes:
/// path, hash, size, deriver, reference count, references; per path).
pub fn from_closure_info(dir: &Path) -> Result<Vec<PathInfo>> {
    let text = std::fs::read_to_string(dir.join("registration"))
        .with_context(|| format!("reading {}/registration", dir.display()))?;
    let mut lines = text.lines();
    let mut infos = Vec::new();
    while let Some(path) = lines.next() {
        if path.is_empty() {
            continue;
        }
        let mut next = |what: &str| lines.next().with_context(|| format!("registration ends inside {path} ({what})"));
        let path: StorePath = path.parse()?;
        let hash = next("hash")?;
        let nar_hash: NarHash = if hash.contains(':') { hash.parse()? } else { format!("sha256:{hash}").parse()? };
        let nar_size: u64 = next("size")?.parse().context("nar size")?;
        let deriver = match next("deriver")? {
            "" => None,
            d => Some(d.parse()?),
        };
        let n: usize = next("reference count")?.parse().context("reference count")?;
        let mut references = std::collections::BTreeSet::new();
        for _ in 0..n {
            references.insert(next("reference")?.parse()?);
        }
        infos.push(PathInfo { path, nar_hash, nar_size, references, deriver, signatures: vec![] });
    }
    if infos.is_empty() {
        bail!("{}/registration lists no paths", dir.display());
    }
    Ok(sort_dependencies_first(infos)?)
}

/// The registration text `nix-store --load-db` reads. Without derivers: the image holds
/// no derivations, and a deriver would make an image built from the local store differ
/// from one built from a `closureInfo` (which has none).
pub fn registration(infos: &[PathInfo]) -> String {
    let mut s = String::new();
    for i in infos {
        s.push_str(&format!("{}\n{}\n{}\n\n", i.path, i.nar_hash.to_hex(), i.nar_size));
        s.push_str(&format!("{}\n", i.references.len()));
        for r in &i.references {
            s.push_str(&format!("{r}\n"));
        }
    }
    s
}
