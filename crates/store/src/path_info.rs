//! Path info: what Nix knows about a valid store path, and its signing fingerprint.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::hash::NarHash;
use crate::store_path::{STORE_DIR, StorePath};

/// A store path's metadata. Serialised with Nix's field names, so the JSON in bundles
/// reads like `nix path-info --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathInfo {
    pub path: StorePath,
    #[serde(rename = "narHash")]
    pub nar_hash: NarHash,
    #[serde(rename = "narSize")]
    pub nar_size: u64,
    /// May include the path itself (a self-reference).
    pub references: BTreeSet<StorePath>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deriver: Option<StorePath>,
    /// Nix signatures, `keyname:base64`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<String>,
}

impl PathInfo {
    /// What a Nix signature signs: `1;<path>;<sha256:base32>;<narSize>;<refs,...>`.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self.references.iter().map(StorePath::to_string).collect();
        format!("1;{};{};{};{}", self.path, self.nar_hash, self.nar_size, refs.join(","))
    }

    /// References to other paths: what must be present before this one.
    pub fn dependencies(&self) -> impl Iterator<Item = &StorePath> {
        self.references.iter().filter(move |r| **r != self.path)
    }
}

/// Why `nix path-info --json` output was refused.
#[derive(Debug, Error)]
pub enum PathInfoError {
    #[error("path-info JSON is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("path-info JSON is neither an array nor an object keyed by path")]
    Shape,
    #[error("path-info JSON for {path}: {why}")]
    Field { path: String, why: String },
    #[error("{0} is not valid in that store")]
    Invalid(String),
}

/// Parses `nix path-info --json [--recursive]` output in both of its shapes: an array of
/// objects with a `path` field (Nix < 2.19) or an object keyed by path (later), with
/// hashes in any notation and references as full paths or base names.
pub fn parse_nix_path_info_json(json: &[u8]) -> Result<Vec<PathInfo>, PathInfoError> {
    let value: Value = serde_json::from_slice(json).map_err(PathInfoError::Json)?;
    let entries: Vec<(String, Value)> = match value {
        Value::Array(items) => items
            .into_iter()
            .map(|item| {
                let path = item.get("path").and_then(Value::as_str).unwrap_or_default().to_owned();
                (path, item)
            })
            .collect(),
        Value::Object(map) => map.into_iter().collect(),
        _ => return Err(PathInfoError::Shape),
    };
    entries.into_iter().map(|(path, v)| one(&path, &v)).collect()
}

fn one(path_str: &str, v: &Value) -> Result<PathInfo, PathInfoError> {
    let field = |why: String| PathInfoError::Field { path: path_str.to_owned(), why };
    if v.is_null() || v.get("valid").and_then(Value::as_bool) == Some(false) {
        return Err(PathInfoError::Invalid(path_str.to_owned()));
    }
    let path = parse_path(path_str).map_err(field)?;
    let nar_hash = v
        .get("narHash")
        .and_then(Value::as_str)
        .ok_or_else(|| field("no narHash".into()))?
        .parse()
        .map_err(|e: crate::hash::HashParseError| field(e.to_string()))?;
    let nar_size = v.get("narSize").and_then(Value::as_u64).ok_or_else(|| field("no narSize".into()))?;
    let references = match v.get("references") {
        None | Some(Value::Null) => BTreeSet::new(),
        Some(Value::Array(refs)) => refs
            .iter()
            .map(|r| r.as_str().ok_or_else(|| "reference is not a string".to_owned()).and_then(parse_path))
            .collect::<Result<_, _>>()
            .map_err(field)?,
        Some(_) => return Err(field("references is not an array".into())),
    };
    let deriver = match v.get("deriver").and_then(Value::as_str) {
        Some(d) => Some(parse_path(d).map_err(field)?),
        None => None,
    };
    let signatures = v
        .get("signatures")
        .and_then(Value::as_array)
        .map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    Ok(PathInfo { path, nar_hash, nar_size, references, deriver, signatures })
}

/// Accepts `/nix/store/<base>` and bare `<base>` (newer Nix prints references that way).
fn parse_path(s: &str) -> Result<StorePath, String> {
    let parsed = if s.starts_with(STORE_DIR) { s.parse() } else { StorePath::from_base_name(s) };
    parsed.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/wipdr80wxxrlc00qzxc0qi5s6wwdkais-a";
    const B: &str = "/nix/store/1ipdr80wxxrlc00qzxc0qi5s6wwdkais-b";

    #[test]
    fn both_shapes_give_the_same_info() {
        // Nix 2.8 (the test machine's): array, SRI hash, full reference paths.
        let old = format!(
            r#"[{{"path":"{A}","narHash":"sha256-h4gyzSK14DjhF7cBN4VY+Km2ytc4Gg5tV6noZdNPhaY=","narSize":288,"references":["{A}","{B}"],"signatures":["k:sig"]}}]"#
        );
        // Nix >= 2.19: object keyed by path; base32 hash here; base-name references.
        let new = format!(
            r#"{{"{A}":{{"narHash":"sha256:19l59z9nbs59axnhw6iqsz5bdagqb22kf0dp2zhkiq5m4b6k5247","narSize":288,"references":["wipdr80wxxrlc00qzxc0qi5s6wwdkais-a","1ipdr80wxxrlc00qzxc0qi5s6wwdkais-b"],"signatures":["k:sig"],"deriver":null}}}}"#
        );
        let old = parse_nix_path_info_json(old.as_bytes()).expect("old shape");
        let new = parse_nix_path_info_json(new.as_bytes()).expect("new shape");
        assert_eq!(old, new);
        assert_eq!(old[0].dependencies().map(ToString::to_string).collect::<Vec<_>>(), vec![B.to_owned()]);
        assert_eq!(
            old[0].fingerprint(),
            format!("1;{A};sha256:19l59z9nbs59axnhw6iqsz5bdagqb22kf0dp2zhkiq5m4b6k5247;288;{B},{A}")
        );
    }

    #[test]
    fn invalid_paths_and_garbage_are_errors() {
        assert!(matches!(
            parse_nix_path_info_json(format!(r#"[{{"path":"{A}","valid":false}}]"#).as_bytes()),
            Err(PathInfoError::Invalid(_))
        ));
        assert!(matches!(parse_nix_path_info_json(b"42"), Err(PathInfoError::Shape)));
        assert!(parse_nix_path_info_json(format!(r#"{{"{A}":{{"narSize":1}}}}"#).as_bytes()).is_err());
    }
}
