//! A device's secrets: opened from the deployment's offer (sealed to this device's key
//! for this deployment, `thymis_proto::secrets`) and written into `secrets_dir` before
//! the new system is activated, each file atomically with its owner, group and mode;
//! files no longer set are removed. The sealed payloads of the current and the previous
//! deployment are kept (`STATE_DIR/secrets.json`), so a rollback puts the previous
//! values back. Nothing here logs a value.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use thymis_proto::secrets::{self as wire, MAX_SECRETS, MAX_VALUE, valid_account, valid_name};
use thymis_store::sealed;
use thymis_store::signing::SecretKey;

use crate::persist;

pub use thymis_proto::secrets::{Kept, Sealed};

fn kept_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("secrets.json")
}

/// Opens a deployment's sealed secrets with the device's key, checking they are this
/// device's, for this deployment.
fn open(key: &SecretKey, s: &Sealed) -> Result<Vec<wire::Secret>> {
    let bytes = STANDARD.decode(&s.sealed).context("the secrets are not base64")?;
    let plain = sealed::open(key, &wire::context(&s.device, &s.deployment_id), &bytes)
        .map_err(|e| anyhow!("the secrets do not open with this device's key: {e}"))?;
    let payload: wire::Secrets = serde_json::from_slice(&plain).context("the secrets are malformed")?;
    if payload.device != s.device || payload.deployment_id != s.deployment_id {
        bail!("the secrets are for {} / {}, not this deployment", payload.device, payload.deployment_id);
    }
    if payload.secrets.len() > MAX_SECRETS {
        bail!("{} secrets; at most {MAX_SECRETS}", payload.secrets.len());
    }
    for x in &payload.secrets {
        if !valid_name(&x.name) || !valid_account(&x.owner) || !valid_account(&x.group) || x.mode > 0o777 {
            bail!("secret {:?} has a bad name, owner, group or mode", x.name);
        }
    }
    Ok(payload.secrets)
}

/// Writes `secrets` into `dir`, each atomically, and removes the files that are no
/// longer set.
fn write_all(dir: &Path, secrets: &[wire::Secret]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for s in secrets {
        let value = STANDARD.decode(&s.value).with_context(|| format!("secret {}: not base64", s.name))?;
        if value.len() > MAX_VALUE {
            bail!("secret {} has {} bytes; at most {MAX_VALUE}", s.name, value.len());
        }
        let uid = crate::accounts::user_id(&s.owner).with_context(|| format!("secret {}'s owner", s.name))?;
        let gid = crate::accounts::group_id(&s.group).with_context(|| format!("secret {}'s group", s.name))?;
        let tmp = dir.join(format!(".{}.tmp", s.name));
        let _ = std::fs::remove_file(&tmp);
        {
            // Created unreadable to others from the start, then given to its owner.
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(&value)?;
            f.sync_all()?;
        }
        rustix::fs::chown(&tmp, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))
            .with_context(|| format!("giving secret {} to {}:{}", s.name, s.owner, s.group))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(s.mode))?;
        std::fs::rename(&tmp, dir.join(&s.name))?;
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && !secrets.iter().any(|s| s.name == name) {
            std::fs::remove_file(entry.path()).with_context(|| format!("removing secret {name}"))?;
        }
    }
    Ok(())
}

/// Puts a deployment's secrets in place, and remembers them (the ones before become
/// the previous, for a rollback).
pub fn apply(key: &SecretKey, state_dir: &Path, dir: &Path, new: Sealed) -> Result<usize> {
    let secrets = open(key, &new)?;
    write_all(dir, &secrets)?;
    let mut kept: Kept = persist::read_json(&kept_path(state_dir)).ok().flatten().unwrap_or_default();
    if kept.current.as_ref().map(|c| &c.deployment_id) != Some(&new.deployment_id) {
        kept.previous = kept.current.take();
    }
    kept.current = Some(new);
    persist::write_json(&kept_path(state_dir), &kept)?;
    Ok(secrets.len())
}

/// At start: the current secrets are put in place again (`secrets_dir` is a tmpfs, empty
/// after a boot), before the agent says it is ready. Returns how many.
pub fn restore_current(key: &SecretKey, state_dir: &Path, dir: &Path) -> Result<usize> {
    let kept: Kept = persist::read_json(&kept_path(state_dir))?.unwrap_or_default();
    let Some(current) = kept.current else { return Ok(0) };
    let secrets = open(key, &current)?;
    write_all(dir, &secrets)?;
    Ok(secrets.len())
}

/// After a rollback of `deployment_id`: the secrets the previous deployment had are
/// back (none were known: the deployment's are left, as nothing else is known).
pub fn restore_previous(key: &SecretKey, state_dir: &Path, dir: &Path, deployment_id: &str) -> Result<()> {
    let mut kept: Kept = persist::read_json(&kept_path(state_dir)).ok().flatten().unwrap_or_default();
    if kept.current.as_ref().map(|c| c.deployment_id.as_str()) != Some(deployment_id) {
        return Ok(());
    }
    let Some(previous) = kept.previous.take() else { return Ok(()) };
    write_all(dir, &open(key, &previous)?)?;
    kept.current = Some(previous);
    persist::write_json(&kept_path(state_dir), &kept)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed_for(key: &SecretKey, device: &str, id: &str, secrets: Vec<wire::Secret>) -> Sealed {
        let payload = wire::Secrets { device: device.into(), deployment_id: id.into(), secrets };
        let bytes =
            sealed::seal(&key.public(), &wire::context(device, id), &serde_json::to_vec(&payload).expect("json"))
                .expect("seal");
        Sealed { device: device.into(), deployment_id: id.into(), sealed: STANDARD.encode(bytes) }
    }

    fn secret(name: &str, value: &str, mode: u32) -> wire::Secret {
        wire::Secret {
            name: name.into(),
            owner: "root".into(),
            group: "root".into(),
            mode,
            value: STANDARD.encode(value),
        }
    }

    #[test]
    fn applied_atomically_with_their_modes_removed_when_gone_and_restored_on_rollback() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let (state, dir) = (tmp.path().join("state"), tmp.path().join("secrets"));
        std::fs::create_dir_all(&state).expect("state");
        let key = SecretKey::generate("thymis-device").expect("key");
        let first = sealed_for(&key, "k1", "dp-1", vec![secret("wifi", "one", 0o400), secret("token", "t", 0o440)]);
        assert_eq!(apply(&key, &state, &dir, first).expect("apply"), 2);
        assert_eq!(std::fs::read_to_string(dir.join("wifi")).expect("wifi"), "one");
        let mode = std::fs::metadata(dir.join("token")).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o440);
        // The next deployment changes one and drops the other.
        let second = sealed_for(&key, "k1", "dp-2", vec![secret("wifi", "two", 0o400)]);
        apply(&key, &state, &dir, second).expect("apply");
        assert_eq!(std::fs::read_to_string(dir.join("wifi")).expect("wifi"), "two");
        assert!(!dir.join("token").exists(), "a removed secret stayed");
        // After a boot (the tmpfs empty), the current ones are back at start.
        std::fs::remove_dir_all(&dir).expect("a boot empties it");
        assert_eq!(restore_current(&key, &state, &dir).expect("restore"), 1);
        assert_eq!(std::fs::read_to_string(dir.join("wifi")).expect("wifi"), "two");
        // Rolled back: the first deployment's values are back.
        restore_previous(&key, &state, &dir, "dp-2").expect("restore");
        assert_eq!(std::fs::read_to_string(dir.join("wifi")).expect("wifi"), "one");
        assert!(dir.join("token").exists());
        // Another device's secrets, or another deployment's, do not open.
        let other = SecretKey::generate("thymis-device").expect("key");
        let theirs = sealed_for(&other, "k2", "dp-3", vec![secret("wifi", "theirs", 0o400)]);
        assert!(apply(&key, &state, &dir, theirs).is_err());
        let mut moved = sealed_for(&key, "k1", "dp-4", vec![secret("wifi", "x", 0o400)]);
        moved.deployment_id = "dp-5".into();
        assert!(apply(&key, &state, &dir, moved).is_err(), "secrets moved to another deployment opened");
        assert_eq!(std::fs::read_to_string(dir.join("wifi")).expect("wifi"), "one", "a refused payload changed a file");
        // Hostile names never leave the directory.
        let bad = sealed_for(&key, "k1", "dp-6", vec![secret("../escape", "x", 0o400)]);
        assert!(apply(&key, &state, &dir, bad).is_err());
        assert!(!tmp.path().join("escape").exists());
    }
}
