//! The system profile: its generations are the rollback points.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use thymis_store::StorePath;

/// The store path a profile (or `/run/current-system`) points at, if any.
pub fn resolve(link: &Path) -> Option<StorePath> {
    let mut target = PathBuf::from(link);
    // Follow links until we reach the store (profile -> system-N-link -> /nix/store/...).
    for _ in 0..8 {
        let next = std::fs::read_link(&target).ok()?;
        target = if next.is_absolute() { next } else { target.parent()?.join(next) };
        if let Ok(p) = target.to_str()?.parse::<StorePath>() {
            return Some(p);
        }
    }
    None
}

/// The generation number a profile link points at (`system-N-link`).
pub fn generation(profile: &Path) -> Option<u64> {
    let target = std::fs::read_link(profile).ok()?;
    let name = target.file_name()?.to_str()?;
    let prefix = format!("{}-", profile.file_name()?.to_str()?);
    name.strip_prefix(&prefix)?.strip_suffix("-link")?.parse().ok()
}

/// Adds `system` as the profile's new generation; returns its number.
pub fn set(profile: &Path, system: &StorePath) -> Result<u64> {
    if let Some(dir) = profile.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let out = Command::new("nix-env")
        .arg("-p")
        .arg(profile)
        .arg("--set")
        .arg(system.to_absolute())
        .output()
        .context("running nix-env --set")?;
    if !out.status.success() {
        bail!("nix-env --set {system} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    generation(profile).with_context(|| format!("{} has no generation after nix-env --set", profile.display()))
}

/// The profile's generations: (number, link), in no particular order.
fn generations(profile: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let (Some(dir), Some(name)) = (profile.parent(), profile.file_name().and_then(|n| n.to_str())) else {
        return Ok(vec![]);
    };
    let prefix = format!("{name}-");
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    Ok(entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name();
            let n = file.to_str()?.strip_prefix(&prefix)?.strip_suffix("-link")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect())
}

/// The newest generation that points at `system`.
pub fn generation_of(profile: &Path, system: &StorePath) -> Result<Option<u64>> {
    Ok(generations(profile)?
        .into_iter()
        .filter(|(_, link)| resolve(link).as_ref() == Some(system))
        .map(|(n, _)| n)
        .max())
}

/// Deletes the profile's generations that point at `system`, except the current one
/// (a failed deployment's, after a rollback); returns their numbers. The boot menu
/// drops them at the next `switch-to-configuration boot`.
pub fn delete_generations_of(profile: &Path, system: &StorePath) -> Result<Vec<u64>> {
    let current = generation(profile);
    let doomed: Vec<u64> = generations(profile)?
        .into_iter()
        .filter(|(n, link)| Some(*n) != current && resolve(link).as_ref() == Some(system))
        .map(|(n, _)| n)
        .collect();
    delete(profile, doomed)
}

/// Deletes the oldest generations beyond the newest `keep`, except those that point at
/// one of `protect` (the running, booted and new systems); returns their numbers. So
/// the boot menu, which lists every generation, cannot outgrow a small ESP.
pub fn prune(profile: &Path, keep: usize, protect: &[&StorePath]) -> Result<Vec<u64>> {
    let mut all = generations(profile)?;
    all.sort_unstable_by_key(|(n, _)| std::cmp::Reverse(*n));
    let current = generation(profile);
    let doomed: Vec<u64> = all
        .into_iter()
        .skip(keep)
        .filter(|(n, link)| Some(*n) != current && !resolve(link).is_some_and(|s| protect.contains(&&s)))
        .map(|(n, _)| n)
        .collect();
    delete(profile, doomed)
}

fn delete(profile: &Path, mut doomed: Vec<u64>) -> Result<Vec<u64>> {
    if doomed.is_empty() {
        return Ok(doomed);
    }
    doomed.sort_unstable();
    let out = Command::new("nix-env")
        .arg("-p")
        .arg(profile)
        .arg("--delete-generations")
        .args(doomed.iter().map(u64::to_string))
        .output()
        .context("running nix-env --delete-generations")?;
    if !out.status.success() {
        bail!("nix-env --delete-generations failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(doomed)
}
