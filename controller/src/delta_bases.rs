//! The delta base for a path a device lacks, among the paths of the system it runs:
//! the same name first (the version the new path replaces), else the same package whose
//! version moved ([`StorePath::package`]), the lowest base name among equals, as the
//! agent chooses (`LocalStore::missing_with_bases`). The controller only accepts bases
//! in the closure of the system a device reports, or of its last deployments' systems
//! (deploy/copy.rs `known_bases`); nearly all come from the first, which the warm-up
//! after a build and the preview reckon with.

use std::collections::HashMap;

use thymis_store::store_path::StorePath;

#[derive(Debug, Default)]
pub struct DeltaBases {
    by_name: HashMap<String, StorePath>,
    by_package: HashMap<String, StorePath>,
}

impl DeltaBases {
    /// The bases a device running a system with this closure has.
    pub fn new(closure: impl IntoIterator<Item = StorePath>) -> Self {
        let mut bases = DeltaBases::default();
        let lowest = |slot: &mut StorePath, p: &StorePath| {
            if p.base_name() < slot.base_name() {
                *slot = p.clone();
            }
        };
        for p in closure {
            bases.by_name.entry(p.name().to_owned()).and_modify(|s| lowest(s, &p)).or_insert_with(|| p.clone());
            bases.by_package.entry(p.package()).and_modify(|s| lowest(s, &p)).or_insert(p);
        }
        bases
    }

    /// The base for `path`, which the device lacks.
    pub fn for_path(&self, path: &StorePath) -> Option<&StorePath> {
        self.by_name.get(path.name()).or_else(|| self.by_package.get(&path.package())).filter(|b| *b != path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(digest: char, name: &str) -> StorePath {
        format!("/nix/store/{}-{name}", digest.to_string().repeat(32)).parse().expect("store path")
    }

    #[test]
    fn the_same_name_first_then_the_same_package_lowest_first() {
        let bases = DeltaBases::new([p('b', "openssl-3.0.13"), p('a', "openssl-3.0.12"), p('c', "zlib-1.3")]);
        assert_eq!(bases.for_path(&p('d', "openssl-3.0.13")), Some(&p('b', "openssl-3.0.13")));
        assert_eq!(bases.for_path(&p('d', "openssl-3.1.0")), Some(&p('a', "openssl-3.0.12")));
        assert_eq!(bases.for_path(&p('d', "curl-8.0")), None);
        assert_eq!(bases.for_path(&p('c', "zlib-1.3")), None, "a path is not its own base");
    }
}
