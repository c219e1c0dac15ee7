//! Closures: ordering a set of paths dependencies-first, and what a peer lacks.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use thiserror::Error;

use crate::path_info::PathInfo;
use crate::store_path::StorePath;

/// Why a set of paths is not a usable closure.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClosureError {
    #[error("closure is incomplete: {path} references {missing}, which is not in it")]
    Incomplete { path: StorePath, missing: StorePath },
    #[error("closure has a reference cycle through {0}")]
    Cycle(StorePath),
    #[error("closure lists {0} twice")]
    Duplicate(StorePath),
}

/// Orders `infos` so that every path comes after everything it references (a path's
/// reference to itself is not a dependency). Deterministic: ties go by store path.
pub fn sort_dependencies_first(infos: Vec<PathInfo>) -> Result<Vec<PathInfo>, ClosureError> {
    let mut by_path: BTreeMap<StorePath, PathInfo> = BTreeMap::new();
    for info in infos {
        if let Some(dup) = by_path.insert(info.path.clone(), info) {
            return Err(ClosureError::Duplicate(dup.path));
        }
    }
    let mut pending: BTreeMap<&StorePath, usize> = BTreeMap::new();
    let mut dependents: BTreeMap<&StorePath, Vec<&StorePath>> = BTreeMap::new();
    for info in by_path.values() {
        let mut count = 0;
        for dep in info.dependencies() {
            if !by_path.contains_key(dep) {
                return Err(ClosureError::Incomplete { path: info.path.clone(), missing: dep.clone() });
            }
            dependents.entry(dep).or_default().push(&info.path);
            count += 1;
        }
        pending.insert(&info.path, count);
    }
    let mut ready: BTreeSet<&StorePath> = pending.iter().filter(|(_, n)| **n == 0).map(|(p, _)| *p).collect();
    let mut order: Vec<StorePath> = Vec::with_capacity(by_path.len());
    while let Some(next) = ready.pop_first() {
        order.push(next.clone());
        for dependent in dependents.get(next).into_iter().flatten() {
            if let Some(n) = pending.get_mut(dependent) {
                *n -= 1;
                if *n == 0 {
                    ready.insert(dependent);
                }
            }
        }
    }
    if order.len() != by_path.len() {
        let stuck = pending.iter().find(|(_, n)| **n > 0).map(|(p, _)| (*p).clone());
        return Err(ClosureError::Cycle(stuck.unwrap_or_else(|| order[0].clone())));
    }
    Ok(order.into_iter().filter_map(|p| by_path.remove(&p)).collect())
}

/// The paths of `closure` that are not in `present`, in `closure`'s order.
pub fn missing<'a>(closure: &'a [PathInfo], present: &HashSet<StorePath>) -> Vec<&'a PathInfo> {
    closure.iter().filter(|i| !present.contains(&i.path)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::NarHash;

    fn info(name: &str, refs: &[&str]) -> PathInfo {
        let p = |n: &str| StorePath::from_base_name(&format!("{:0>32}-{n}", n.len())).expect("path");
        PathInfo {
            path: p(name),
            nar_hash: NarHash([0; 32]),
            nar_size: 8,
            references: refs.iter().map(|r| p(r)).collect(),
            deriver: None,
            signatures: vec![],
        }
    }

    fn names(v: &[PathInfo]) -> Vec<&str> {
        v.iter().map(|i| i.path.name()).collect()
    }

    #[test]
    fn dependencies_come_first_and_self_references_are_ignored() {
        let sorted = sort_dependencies_first(vec![
            info("system", &["system", "app", "lib"]),
            info("app", &["lib", "app"]),
            info("lib", &[]),
        ])
        .expect("closure");
        assert_eq!(names(&sorted), ["lib", "app", "system"]);
    }

    #[test]
    fn incomplete_and_cyclic_sets_are_refused() {
        assert!(matches!(sort_dependencies_first(vec![info("app", &["lib"])]), Err(ClosureError::Incomplete { .. })));
        assert!(matches!(
            sort_dependencies_first(vec![info("a", &["bb"]), info("bb", &["a"])]),
            Err(ClosureError::Cycle(_))
        ));
        assert!(matches!(
            sort_dependencies_first(vec![info("a", &[]), info("a", &[])]),
            Err(ClosureError::Duplicate(_))
        ));
    }

    #[test]
    fn missing_keeps_order() {
        let c = sort_dependencies_first(vec![info("lib", &[]), info("app", &["lib"]), info("sys", &["app"])])
            .expect("closure");
        let present: HashSet<_> = [c[1].path.clone()].into();
        assert_eq!(missing(&c, &present).iter().map(|i| i.path.name()).collect::<Vec<_>>(), ["lib", "sys"]);
    }
}
