//! Installing an offline update bundle (`InstallBundle` on D-Bus, `thymisctl
//! install-bundle`): the same checks as an over-the-air deployment (identity-signed
//! manifest, target, sequence, expiry, Nix signatures, NAR hashes and sizes), the same
//! activation and rollback; confirmation is local: activation exits 0 or 4 and the
//! configured health check passes before the deadline.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use thymis_proto::signed::Offer;
use thymis_store::StorePath;
use thymis_store::bundle::{self, BundleError, Target};
use tracing::info;

use crate::agent::Agent;
use crate::clock;

/// Opens a bundle without following links; it must be a regular file owned by root
/// (or by the agent's own user), so no other user can swap it underneath.
fn open_bundle(path: &Path) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .with_context(|| format!("opening bundle {} (symlinks are not followed)", path.display()))?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        bail!("{} is owned by uid {}, not root", path.display(), meta.uid());
    }
    Ok(f)
}

/// Verifies, imports and activates a bundle; returns the outcome as JSON once the
/// deployment has ended.
pub async fn install(agent: &Arc<Agent>, path: &Path) -> Result<String> {
    let file = open_bundle(path)?;
    let persisted = agent.persisted();
    let me = persisted.device_name.clone().unwrap_or_default();
    let my_config = persisted.config.clone().unwrap_or_default();
    if agent.pending().is_some() {
        bail!("a deployment is still pending; try again when it has ended");
    }
    let (a, store) = (agent.clone(), agent.store.clone());
    let (manifest, verified) = tokio::task::spawn_blocking(move || {
        bundle::read(BufReader::new(file), &a.identity_keys, &a.nix_keys, &a.staging_dir(), |m| {
            let ok = match &m.target {
                Target::Device(d) => !d.is_empty() && *d == me,
                Target::Config(c) => !c.is_empty() && *c == my_config,
            };
            if !ok {
                return Err(BundleError::Refused(format!(
                    "bundle is for {:?}; this is device {me:?} with configuration {my_config:?}",
                    m.target
                )));
            }
            if m.sequence <= persisted.last_sequence {
                return Err(BundleError::Refused(format!(
                    "bundle sequence {} is not above the last applied {}: replayed or outdated",
                    m.sequence, persisted.last_sequence
                )));
            }
            if let Some(exp) = m.expires
                && clock::wall_clock_synchronised()
                && exp < clock::unix_now()
            {
                return Err(BundleError::Refused(format!("bundle expired at {exp} (unix time)")));
            }
            let all: Vec<StorePath> = m.paths.iter().map(|p| p.path.clone()).collect();
            let lacking = store.invalid_paths(&all).map_err(|e| BundleError::Refused(e.to_string()))?;
            Ok(lacking.into_iter().collect::<HashSet<_>>())
        })
    })
    .await??;
    info!(system = %manifest.system, sequence = manifest.sequence, paths = verified.len(), "bundle verified");
    let (store, items) = (agent.store.clone(), verified);
    tokio::task::spawn_blocking(move || {
        store.import(items.iter().map(|v| (&v.info, Box::new(&v.nar) as Box<dyn Read + '_>)))
    })
    .await??;

    let offer = Offer {
        device: agent.persisted().device_name.unwrap_or_default(),
        deployment_id: format!("bundle-{}", manifest.sequence),
        config: agent.persisted().config.unwrap_or_default(),
        system: manifest.system.clone(),
        commit: manifest.commit.clone(),
        sequence: manifest.sequence,
        expires: manifest.expires.unwrap_or(u64::MAX),
        reboot: false,
        session: None,
        secrets: manifest.secrets.clone(),
    };
    let id = offer.deployment_id.clone();
    agent.stage_local_offer(offer);
    agent.activate(&id).await?;
    // Wait for the outcome (confirmation is local: see Agent::drive).
    loop {
        if let Some(o) = agent.persisted().history.iter().rev().find(|o| o.deployment_id == id) {
            return Ok(serde_json::to_string(o)?);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
