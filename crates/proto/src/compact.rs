//! The compact copy (protocol 5): a copy's per-path messages name paths by their index
//! in the closure the controller's [`AgentBound::QueryPaths`](crate::AgentBound::QueryPaths)
//! listed, and leave out the deployment (the query's). A nixpkgs bump sends each path
//! as a delta of a few hundred bytes; naming the path, its references, its base and its
//! deployment again in every message cost more than the deltas themselves
//! (docs/benchmarks.md, "A nixpkgs bump").

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use thymis_store::{NarHash, PathInfo, StorePath};

/// A path's signed info, the path and its references by index in the query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactPath {
    pub index: u32,
    #[serde(rename = "narHash")]
    pub nar_hash: NarHash,
    #[serde(rename = "narSize")]
    pub nar_size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deriver: Option<StorePath>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<String>,
    /// The NAR follows as a delta against the base the device named for this path.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delta: bool,
}

/// Why a compact message could not be written or read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CompactError {
    #[error("path index {index} is outside the query's {len} paths")]
    Index { index: u32, len: usize },
    #[error("{0} is not in the query")]
    NotInQuery(StorePath),
}

/// The paths of a copy's query, numbered as both sides number them: from 0, in the
/// query's order.
#[derive(Debug, Clone, Default)]
pub struct QueryIndex {
    paths: Vec<StorePath>,
    by_path: HashMap<StorePath, u32>,
}

impl QueryIndex {
    pub fn new(paths: Vec<StorePath>) -> QueryIndex {
        let by_path = paths.iter().enumerate().map(|(i, p)| (p.clone(), i as u32)).collect();
        QueryIndex { paths, by_path }
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub fn path(&self, index: u32) -> Result<&StorePath, CompactError> {
        self.paths.get(index as usize).ok_or(CompactError::Index { index, len: self.paths.len() })
    }

    pub fn index(&self, path: &StorePath) -> Result<u32, CompactError> {
        self.by_path.get(path).copied().ok_or_else(|| CompactError::NotInQuery(path.clone()))
    }

    /// The paths at `indexes`.
    pub fn paths(&self, indexes: &[u32]) -> Result<Vec<StorePath>, CompactError> {
        indexes.iter().map(|&i| self.path(i).cloned()).collect()
    }

    /// `info` as the compact copy sends it; its references must be in the query (a
    /// closure holds every reference of its paths).
    pub fn compact(&self, info: &PathInfo, delta: bool) -> Result<CompactPath, CompactError> {
        Ok(CompactPath {
            index: self.index(&info.path)?,
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            references: info.references.iter().map(|r| self.index(r)).collect::<Result<_, _>>()?,
            deriver: info.deriver.clone(),
            signatures: info.signatures.clone(),
            delta,
        })
    }

    /// The path info `c` stands for; its signature is still to be checked.
    pub fn expand(&self, c: &CompactPath) -> Result<PathInfo, CompactError> {
        Ok(PathInfo {
            path: self.path(c.index)?.clone(),
            nar_hash: c.nar_hash,
            nar_size: c.nar_size,
            references: c.references.iter().map(|&i| self.path(i).cloned()).collect::<Result<_, _>>()?,
            deriver: c.deriver.clone(),
            signatures: c.signatures.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(hash: char, name: &str) -> StorePath {
        format!("/nix/store/{}-{name}", hash.to_string().repeat(32)).parse().expect("path")
    }

    #[test]
    fn a_path_info_survives_the_compact_form_and_stays_small() {
        let (lib, app) = (sp('a', "lib-1.2"), sp('b', "app-3"));
        let q = QueryIndex::new(vec![lib.clone(), app.clone()]);
        let info = PathInfo {
            path: app.clone(),
            nar_hash: NarHash([7; 32]),
            nar_size: 4096,
            references: [lib.clone(), app.clone()].into(),
            deriver: None,
            signatures: vec!["thymis-1:c2ln".into()],
        };
        let c = q.compact(&info, true).expect("compact");
        assert_eq!((c.index, c.references.clone(), c.delta), (1, vec![0, 1], true));
        assert_eq!(q.expand(&c).expect("expand"), info);
        let full = serde_json::to_string(&info).expect("json").len();
        let small = serde_json::to_string(&c).expect("json").len();
        // What remains is mostly the hash and the signature, which no form can leave out.
        assert!(small * 10 < full * 6, "{small} bytes compact, {full} in full");
    }

    #[test]
    fn indexes_outside_the_query_and_paths_outside_it_are_errors() {
        let q = QueryIndex::new(vec![sp('a', "lib")]);
        let mut c = CompactPath {
            index: 0,
            nar_hash: NarHash([1; 32]),
            nar_size: 8,
            references: vec![1],
            deriver: None,
            signatures: vec![],
            delta: false,
        };
        assert_eq!(q.expand(&c), Err(CompactError::Index { index: 1, len: 1 }));
        c.references.clear();
        c.index = u32::MAX;
        assert!(q.expand(&c).is_err());
        assert!(q.paths(&[0, 7]).is_err());
        let stranger = PathInfo {
            path: sp('a', "lib"),
            nar_hash: NarHash([1; 32]),
            nar_size: 8,
            references: [sp('c', "elsewhere")].into(),
            deriver: None,
            signatures: vec![],
        };
        assert_eq!(q.compact(&stranger, false), Err(CompactError::NotInQuery(sp('c', "elsewhere"))));
    }
}
