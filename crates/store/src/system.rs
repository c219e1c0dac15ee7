//! What a NixOS system closure says about itself: what only a boot applies, and its
//! switch inhibitors (the agent decides reboots by them; the controller's preview says
//! whether an update needs one).

use std::path::Path;

/// The parts of a system that only a boot applies (NixOS's `switch-to-configuration`
/// leaves them to the next boot): links compared by target, files by content.
pub const BOOT_PARTS: [&str; 6] =
    ["kernel", "initrd", "kernel-modules", "dtbs", "kernel-params", "init-interface-version"];

/// The boot parts that differ between the system that booted and `new`. Systems
/// without a kernel (containers, test systems) are never booted by one: none.
pub fn boot_changes(booted: &Path, new: &Path) -> Vec<&'static str> {
    if !has_kernel(booted) || !has_kernel(new) {
        return vec![];
    }
    let part = |sys: &Path, name: &str| -> Option<Vec<u8>> {
        let p = sys.join(name);
        match std::fs::read_link(&p) {
            Ok(target) => Some(target.into_os_string().into_encoded_bytes()),
            Err(_) => std::fs::read(&p).ok(),
        }
    };
    BOOT_PARTS.into_iter().filter(|name| part(booted, name) != part(new, name)).collect()
}

/// The switch inhibitors (NixOS's `system.switch.inhibitors`, a JSON object in
/// `$system/switch-inhibitors`) whose values differ between the running system and
/// `new`: NixOS's `switch-to-configuration` refuses to switch live then, so the new
/// system takes effect by a reboot. As NixOS compares them: only keys both systems
/// have, and a missing (or unreadable) file is an empty object.
pub fn switch_inhibitors_changed(running: &Path, new: &Path) -> Vec<String> {
    let read = |sys: &Path| -> serde_json::Map<String, serde_json::Value> {
        std::fs::read(sys.join("switch-inhibitors"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    let (old, new) = (read(running), read(new));
    old.iter().filter(|(k, v)| new.get(*k).is_some_and(|n| n != *v)).map(|(k, _)| k.clone()).collect()
}

/// Whether `system` carries a kernel (a link into the store).
pub fn has_kernel(system: &Path) -> bool {
    system.join("kernel").symlink_metadata().is_ok()
}

/// The version in a store path's name: its `-`-separated parts that start with a digit
/// (`openssl-3.0.13-bin` has `3.0.13`), empty for a name without one.
pub fn version_of(name: &str) -> String {
    name.split('-').filter(|p| p.starts_with(|c: char| c.is_ascii_digit())).collect::<Vec<_>>().join("-")
}

/// What changed between two closures, by package (a store path's name without its
/// version, [`crate::store_path::package_of`]), as nvd shows it: packages added and
/// removed with their versions, and packages whose versions changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageDiff {
    pub added: Vec<(String, String)>,
    pub removed: Vec<(String, String)>,
    /// (package, old versions, new versions), versions joined with ", ".
    pub changed: Vec<(String, String, String)>,
}

/// [`PackageDiff`] of the closures named by their paths' names.
pub fn package_diff<'a>(
    before: impl IntoIterator<Item = &'a str>,
    after: impl IntoIterator<Item = &'a str>,
) -> PackageDiff {
    use std::collections::{BTreeMap, BTreeSet};
    let versions = |names: &mut dyn Iterator<Item = &'a str>| {
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for n in names {
            m.entry(crate::store_path::package_of(n)).or_default().insert(version_of(n));
        }
        m
    };
    let (old, new) = (versions(&mut before.into_iter()), versions(&mut after.into_iter()));
    let join = |v: &BTreeSet<String>| v.iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>().join(", ");
    let mut diff = PackageDiff::default();
    for (p, v) in &new {
        match old.get(p) {
            None => diff.added.push((p.clone(), join(v))),
            Some(o) if o != v => diff.changed.push((p.clone(), join(o), join(v))),
            Some(_) => {}
        }
    }
    for (p, v) in &old {
        if !new.contains_key(p) {
            diff.removed.push((p.clone(), join(v)));
        }
    }
    diff
}

#[cfg(test)]
mod tests {
    #[test]
    fn packages_added_removed_and_changed_by_version() {
        let before = ["openssl-3.0.13", "openssl-3.0.13-bin", "bash-5.2", "old-tool-1.0", "etc"];
        let after = ["openssl-3.0.14", "openssl-3.0.14-bin", "bash-5.2", "new-tool-2.1", "etc"];
        let d = super::package_diff(before, after);
        assert_eq!(d.added, vec![("new-tool".into(), "2.1".into())]);
        assert_eq!(d.removed, vec![("old-tool".into(), "1.0".into())]);
        assert_eq!(
            d.changed,
            vec![
                ("openssl".into(), "3.0.13".into(), "3.0.14".into()),
                ("openssl-bin".into(), "3.0.13".into(), "3.0.14".into())
            ]
        );
        assert_eq!(super::version_of("linux-6.6.30-modules"), "6.6.30");
    }
}
