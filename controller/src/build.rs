//! Building a configuration of the project at a commit with `nix build`, its log
//! streamed into the task, and preparing the signed closure to send.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use thymis_store::closure::sort_dependencies_first;
use thymis_store::local_store::LocalStore;
use thymis_store::{PathInfo, StorePath};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::controller::Controller;
use crate::delta_bases::DeltaBases;

/// Builds `config` at `commit` (never the work tree); logs go to `task`.
pub async fn build(ctl: &Arc<Controller>, task: i64, commit: &str, config: &str) -> Result<StorePath> {
    let toml = ctl.project.toml_at(commit)?;
    let attr = toml.attr(config).ok_or_else(|| anyhow!("configuration {config} is not in thymis.toml at {commit}"))?;
    let installable = format!("{}#{attr}", ctl.project.flake_ref(commit));
    ctl.build_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ctl.db.log(
        task,
        None,
        &format!("building {config} at {}: nix build {installable}", &commit[..commit.len().min(12)]),
    )?;
    ctl.notify_task(task);
    let mut cmd = tokio::process::Command::new("nix");
    cmd.args(["--extra-experimental-features", "nix-command flakes", "build", "--no-link", "--json", "-L"]);
    for (name, flake_ref) in &ctl.settings.override_inputs {
        cmd.args(["--override-input", name, flake_ref]);
    }
    let mut child = cmd
        .arg(&installable)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running nix build")?;
    let stderr = child.stderr.take().context("nix build stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let mut tail: Vec<String> = Vec::new();
    while let Some(line) = lines.next_line().await? {
        ctl.db.log(task, None, &line)?;
        ctl.notify_task(task);
        tail.push(line);
        if tail.len() > 10 {
            tail.remove(0);
        }
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!("nix build of {config} failed: {}", tail.join("\n"));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("nix build --json output")?;
    let path = json
        .get(0)
        .and_then(|b| b.get("outputs"))
        .and_then(|o| o.get("out"))
        .and_then(|p| p.as_str())
        .ok_or_else(|| anyhow!("nix build printed no output path"))?;
    let system: StorePath = path.parse()?;
    ctl.db.log(task, None, &format!("built {config}: {system}"))?;
    publish(ctl, task, &system).await?;
    Ok(system)
}

/// A system built before (recorded with its deployment), made present in this
/// controller's store: already there (one machine, or built here), or fetched by Nix
/// from its substituters (another controller's `--publish-cache`, docs/scale.md).
pub async fn present(system: &str) -> Result<StorePath> {
    let path: StorePath = system.parse()?;
    let check = path.clone();
    let missing = tokio::task::spawn_blocking(move || LocalStore::system().invalid_paths(&[check])).await??;
    if missing.is_empty() {
        return Ok(path);
    }
    let out = tokio::process::Command::new("nix-store")
        .arg("--realise")
        .arg(path.to_absolute())
        .stdin(Stdio::null())
        .output()
        .await
        .context("running nix-store --realise")?;
    if !out.status.success() {
        bail!(
            "{system} was built by another controller and is not in this one's Nix store, nor on its substituters \
             (give the controllers a shared --publish-cache and list it in nix.conf's substituters): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(path)
}

/// Copies a built closure to the binary cache of `--publish-cache`, signed with the
/// controller's Nix key, before any device is offered it (so that devices find it
/// there). A cache that cannot take it is logged; devices then get it from the controller.
async fn publish(ctl: &Arc<Controller>, task: i64, system: &StorePath) -> Result<()> {
    let Some(cache) = &ctl.settings.publish_cache else { return Ok(()) };
    let sep = if cache.contains('?') { '&' } else { '?' };
    let to = format!("{cache}{sep}secret-key={}", ctl.paths.nix_key.display());
    let out = tokio::process::Command::new("nix")
        .args(["--extra-experimental-features", "nix-command", "copy", "--to", &to])
        .arg(system.to_absolute())
        .output()
        .await
        .context("running nix copy")?;
    let line = if out.status.success() {
        format!("published {system} to the binary cache {cache}")
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        format!("publishing to the binary cache {cache} failed (devices get it from the controller): {}", err.trim())
    };
    ctl.db.log(task, None, &line)?;
    Ok(())
}

/// [`build`], reusing an earlier build of the same configuration at the same commit
/// (a commit's build does not change) while its output is still in the store.
pub async fn build_cached(ctl: &Arc<Controller>, task: i64, commit: &str, config: &str) -> Result<StorePath> {
    let key = (commit.to_owned(), config.to_owned());
    let cached = ctl.builds.lock().await.get(&key).cloned();
    if let Some(Ok(system)) = cached {
        let check = system.clone();
        let valid = tokio::task::spawn_blocking(move || LocalStore::system().invalid_paths(&[check]))
            .await?
            .is_ok_and(|invalid| invalid.is_empty());
        if valid {
            ctl.db.log(
                task,
                None,
                &format!("{config} at {} was built before: {system}", &commit[..commit.len().min(12)]),
            )?;
            return Ok(system);
        }
    }
    let system = build(ctl, task, commit, config).await?;
    ctl.builds.lock().await.insert(key, Ok(system.clone()));
    Ok(system)
}

/// The most older systems a build makes deltas for ahead of time; devices on others get
/// theirs made at their copy (once per pair, too).
const WARM_SYSTEMS: usize = 4;

/// Compresses the closure's paths for the NAR cache (those not compressed yet), and the
/// deltas against the versions the devices of `config` run (for each of the systems they
/// run, most devices first: every device on a base shares its delta), so that
/// deployments find them ready. A deployment that needs one meanwhile waits for, or
/// makes, it: each is made once. Returns, when done, the number of (path, base) pairs.
pub fn warm_nar_cache(ctl: &Arc<Controller>, system: &StorePath, config: &str) -> tokio::task::JoinHandle<usize> {
    let (ctl, system) = (ctl.clone(), system.clone());
    let mut counts: HashMap<StorePath, usize> = HashMap::new();
    for d in ctl.db.devices().unwrap_or_default().into_iter().filter(|d| d.config == config) {
        if let Some(s) = d.info.system.and_then(|s| s.parse().ok()) {
            *counts.entry(s).or_default() += 1;
        }
    }
    let mut running: Vec<(StorePath, usize)> = counts.into_iter().collect();
    running.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    running.truncate(WARM_SYSTEMS);
    tokio::spawn(async move {
        let query = system.clone();
        let work = tokio::task::spawn_blocking(move || -> Result<Vec<(PathInfo, Option<StorePath>)>> {
            let store = LocalStore::system();
            let infos = sort_dependencies_first(store.path_infos(std::slice::from_ref(&query), true)?)?;
            // Each path once whole, and once per distinct base the devices have for it.
            let mut pairs: BTreeSet<(usize, Option<StorePath>)> = (0..infos.len()).map(|i| (i, None)).collect();
            for (r, _) in running {
                let closure: HashSet<StorePath> = store.closure(&r).unwrap_or_default().into_iter().collect();
                let bases = DeltaBases::new(closure.iter().cloned());
                for (i, info) in infos.iter().enumerate() {
                    if !closure.contains(&info.path)
                        && let Some(b) = bases.for_path(&info.path)
                    {
                        pairs.remove(&(i, None));
                        pairs.insert((i, Some(b.clone())));
                    }
                }
            }
            Ok(pairs.into_iter().map(|(i, b)| (infos[i].clone(), b)).collect())
        })
        .await;
        let Ok(Ok(pairs)) = work else { return 0 };
        // One compression per core, at most four (a delta holds its base, up to 64 MiB,
        // and a window twice that); the system's own paths first (what changed is most
        // often near the top).
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
        futures_util::stream::iter(pairs.iter().rev())
            .for_each_concurrent(workers, |(info, base)| {
                let ctl = &ctl;
                async move {
                    if let Err(e) = ctl.nar_cache.best(info, base.as_ref()).await {
                        tracing::warn!(path = %info.path, "compressing for the NAR cache: {e:#}");
                    }
                }
            })
            .await;
        pairs.len()
    })
}

/// The closure of `system`, dependencies first, each path signed with the Nix key.
pub async fn signed_closure(ctl: &Arc<Controller>, system: &StorePath) -> Result<Vec<PathInfo>> {
    let system = system.clone();
    let ctl = ctl.clone();
    tokio::task::spawn_blocking(move || {
        let infos = LocalStore::system().path_infos(std::slice::from_ref(&system), true)?;
        let mut sorted = sort_dependencies_first(infos)?;
        for info in &mut sorted {
            ctl.nix_key.sign_path(info);
        }
        Ok(sorted)
    })
    .await?
}
