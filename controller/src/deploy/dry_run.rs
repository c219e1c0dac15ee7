//! `thymisctl deploy --dry-run`: what a deployment would change and cost, from the
//! systems built at its commit (uncommitted changes are built from a commit made for the
//! preview only), before anything is sent or switched: per configuration the packages
//! added, removed and changed (against the system most of its devices run), the closure's
//! size before and after, and whether it needs a reboot; per device the paths and bytes
//! it lacks.

use std::collections::{HashMap, HashSet};

use futures_util::StreamExt;
use thymis_api::preview::{ConfigChange, DeviceChange, DryRun, FromCaches, Package, PackageChange};
use thymis_store::closure::sort_dependencies_first;
use thymis_store::local_store::LocalStore;
use thymis_store::system::{boot_changes, package_diff, switch_inhibitors_changed};

use super::*;
use crate::delta_bases::DeltaBases;

/// A closure the controller's store holds, by path.
type Closure = HashMap<StorePath, PathInfo>;

async fn closure_of(system: &StorePath) -> Option<Closure> {
    let system = system.clone();
    tokio::task::spawn_blocking(move || {
        let store = LocalStore::system();
        if !store.invalid_paths(std::slice::from_ref(&system)).ok()?.is_empty() {
            return None;
        }
        let infos = store.path_infos(std::slice::from_ref(&system), true).ok()?;
        Some(infos.into_iter().map(|i| (i.path.clone(), i)).collect())
    })
    .await
    .ok()
    .flatten()
}

/// Records with each device deployment what it gets, by package, against the system
/// its device runs (where this controller's store has it): the task view shows it.
pub(super) async fn record_packages(ctl: &Controller, children: &[&ChildRow], new: &[PathInfo]) {
    let new_names: Vec<&str> = new.iter().map(|i| i.path.name()).collect();
    let mut seen: HashMap<String, Option<Vec<String>>> = HashMap::new();
    for c in children {
        let Ok(Some(d)) = ctl.db.device(&c.device) else { continue };
        let Some(runs) = d.system.clone() else { continue };
        if !seen.contains_key(&runs) {
            let names = match runs.parse::<StorePath>() {
                Ok(s) => closure_of(&s).await.map(|c| c.keys().map(|p| p.name().to_owned()).collect()),
                Err(_) => None,
            };
            seen.insert(runs.clone(), names);
        }
        let Some(Some(old)) = seen.get(&runs) else { continue };
        let d = package_diff(old.iter().map(String::as_str), new_names.iter().copied());
        let packages = thymis_api::preview::Packages::from_parts(d.added, d.removed, d.changed);
        if let Err(e) = ctl.db.set_child_packages(c.id, &packages) {
            debug!(device = %c.device, "recording its packages: {e:#}");
        }
    }
}

pub async fn dry_run(ctl: &Arc<Controller>, req: &DeployRequest) -> Result<DryRun> {
    let p = preview(ctl, req)?;
    let commit = match p.commit.clone() {
        Some(c) => c,
        None => ctl.project.snapshot()?,
    };
    let task = ctl.db.create_task(
        &ctl.instance,
        "preview",
        Some(&commit),
        Some("what a deployment would change (nothing is sent)"),
        None,
        false,
        None,
    )?;
    ctl.db.set_task_owner(task, &ctl.instance)?;
    engine::task_event(ctl, task, TaskEvent::Started, None)?;
    let result = compare(ctl, task, &commit, &p).await;
    let (end, error) = match &result {
        Ok(_) => (TaskResult::Succeeded, None),
        Err(e) => (TaskResult::Failed, Some(format!("{e:#}"))),
    };
    engine::task_event(ctl, task, TaskEvent::Ended(end), error.as_deref())?;
    let (configs, devices) = result?;
    Ok(DryRun { task, commit, configs, devices })
}

async fn compare(
    ctl: &Arc<Controller>,
    task: i64,
    commit: &str,
    p: &Preview,
) -> Result<(Vec<ConfigChange>, Vec<DeviceChange>)> {
    let runs: HashMap<String, Option<String>> =
        ctl.db.devices()?.into_iter().map(|d| (d.name.clone(), d.system.clone())).collect();
    let mut closures: HashMap<String, Option<Closure>> = HashMap::new();
    let mut closure = async |system: &str| -> Option<Closure> {
        if !closures.contains_key(system) {
            let c = match system.parse::<StorePath>() {
                Ok(s) => closure_of(&s).await,
                Err(_) => None,
            };
            closures.insert(system.to_owned(), c);
        }
        closures.get(system).cloned().flatten()
    };
    let (mut configs, mut devices) = (vec![], vec![]);
    for config in &p.configs {
        let system = build::build_cached(ctl, task, commit, config).await?;
        let new = closure(&system.to_string()).await.context("the built system is not in the store")?;
        let of_config: Vec<&PreviewDevice> = p.devices.iter().filter(|d| &d.config == config).collect();
        // Compared with the system most of its devices run (that the controller has).
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for d in &of_config {
            if let Some(Some(s)) = runs.get(&d.name) {
                *counts.entry(s.as_str()).or_default() += 1;
            }
        }
        let mut candidates: Vec<(&str, usize)> = counts.into_iter().collect();
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let mut before = None;
        for (s, _) in candidates {
            if let Some(c) = closure(s).await {
                before = Some((s.to_owned(), c));
                break;
            }
        }
        let names = |c: &Closure| c.keys().map(|p| p.name().to_owned()).collect::<Vec<_>>();
        let new_names = names(&new);
        let old_names = before.as_ref().map(|(_, c)| names(c)).unwrap_or_default();
        let diff = package_diff(old_names.iter().map(String::as_str), new_names.iter().map(String::as_str));
        let reboot = before.as_ref().and_then(|(s, _)| {
            let (old, new) = (std::path::PathBuf::from(s), std::path::PathBuf::from(system.to_absolute()));
            let mut why: Vec<String> = boot_changes(&old, &new).into_iter().map(|c| format!("{c} changed")).collect();
            let inhibitors = switch_inhibitors_changed(&old, &new);
            if !inhibitors.is_empty() {
                why.push(format!("switch inhibitors changed ({})", inhibitors.join(", ")));
            }
            (!why.is_empty()).then(|| why.join("; "))
        });
        configs.push(ConfigChange {
            config: config.clone(),
            system: system.to_string(),
            before: before.as_ref().map(|(s, _)| s.clone()),
            closure_paths: new.len(),
            closure_bytes: new.values().map(|i| i.nar_size).sum(),
            before_bytes: before.as_ref().map(|(_, c)| c.values().map(|i| i.nar_size).sum()),
            added: diff.added.into_iter().map(|(name, version)| Package { name, version }).collect(),
            removed: diff.removed.into_iter().map(|(name, version)| Package { name, version }).collect(),
            changed: diff.changed.into_iter().map(|(name, old, new)| PackageChange { name, old, new }).collect(),
            reboot,
        });
        // The new closure, dependencies first (the order a deployment asks in).
        let order: Vec<StorePath> =
            sort_dependencies_first(new.values().cloned().collect())?.into_iter().map(|i| i.path).collect();
        // Devices on the same system get the same figures: made once per system.
        let mut sends: HashMap<Option<String>, Send> = HashMap::new();
        for d in &of_config {
            let runs_now = runs.get(&d.name).cloned().flatten();
            if !sends.contains_key(&runs_now) {
                let has = match &runs_now {
                    Some(s) => closure(s).await,
                    None => None,
                };
                sends.insert(runs_now.clone(), send(ctl, &new, &order, has.as_ref()).await);
            }
        }
        // Every device asked about its caches at once (a few at a time would make a
        // fleet's preview wait on each device's narinfo lookups in turn).
        let asks: Vec<(String, Option<String>, Arc<Vec<StorePath>>)> = of_config
            .iter()
            .map(|d| {
                let runs_now = runs.get(&d.name).cloned().flatten();
                let lacking = sends[&runs_now].lacking.clone();
                (d.name.clone(), runs_now, lacking)
            })
            .collect();
        let answers: Vec<_> = futures_util::stream::iter(asks)
            .map(|(name, runs_now, lacking)| {
                let ctl = ctl.clone();
                async move {
                    let caches = ask_caches(&ctl, &name, &lacking).await;
                    (name, runs_now, caches)
                }
            })
            .buffered(ASKED_AT_ONCE)
            .collect()
            .await;
        for (name, runs_now, caches) in answers {
            let s = &sends[&runs_now];
            let (send_bytes, deltas) = s.sent_by_controller(caches.as_ref().map(|(served, _)| served));
            devices.push(DeviceChange {
                device: name,
                config: config.clone(),
                runs: runs_now,
                paths: s.paths,
                bytes: s.bytes,
                send_bytes,
                deltas,
                from_caches: caches.map(|(served, bytes)| FromCaches { paths: served.len(), bytes }),
                known: s.known,
            });
        }
    }
    Ok((configs, devices))
}

/// What a device that has `has` (the closure of the system it runs; `None`: unknown, so
/// nothing) lacks of `new`, and what the controller would send it for that.
struct Send {
    paths: usize,
    bytes: u64,
    known: bool,
    /// The paths it lacks (dependencies first), and each one's file: size, and whether
    /// a delta.
    lacking: Arc<Vec<StorePath>>,
    files: HashMap<StorePath, (u64, bool)>,
}

impl Send {
    /// What the controller would send (bytes, and how many paths as deltas), leaving out
    /// what the device's caches serve.
    fn sent_by_controller(&self, served: Option<&HashSet<StorePath>>) -> (u64, usize) {
        self.files
            .iter()
            .filter(|(p, _)| served.is_none_or(|s| !s.contains(*p)))
            .fold((0, 0), |(bytes, n), (_, (size, delta))| (bytes + size, n + usize::from(*delta)))
    }
}

/// Devices asked about their caches at once.
const ASKED_AT_ONCE: usize = 64;

/// How long a device may take to say what its caches would serve.
const CACHE_ANSWER: std::time::Duration = std::time::Duration::from_secs(30);

/// Asks `device` (online, protocol 4) which of `lacking` its binary caches would serve:
/// those paths and their compressed bytes; `None` when it cannot be asked or does not
/// answer in time.
async fn ask_caches(ctl: &Arc<Controller>, device: &str, lacking: &[StorePath]) -> Option<(HashSet<StorePath>, u64)> {
    let conn = ctl.conn(device)?;
    if conn.protocol < thymis_proto::CACHE_QUERY_PROTOCOL {
        return None;
    }
    if lacking.is_empty() {
        return Some((HashSet::new(), 0));
    }
    let query = format!("cq-{}", crate::random::hex::<8>().ok()?);
    let mut rx = conn.subscribe(&query);
    if !conn.send(thymis_proto::AgentBound::CacheQuery { query: query.clone(), paths: lacking.to_vec() }).await {
        return None;
    }
    let answer = tokio::time::timeout(CACHE_ANSWER, rx.recv()).await;
    conn.unsubscribe(&query);
    match answer {
        Ok(Some(thymis_proto::ControllerBound::CacheAnswer { served, bytes, .. })) => {
            // Only paths it was asked about count.
            let asked: HashSet<&StorePath> = lacking.iter().collect();
            Some((served.into_iter().filter(|p| asked.contains(p)).collect(), bytes))
        }
        _ => {
            debug!(%device, "no answer about its caches");
            None
        }
    }
}

/// Each lacking path's file as a deployment would choose it (the NAR cache's: made now
/// if the warm-up after the build has not yet, and then ready for the deployment).
async fn send(ctl: &Arc<Controller>, new: &Closure, order: &[StorePath], has: Option<&Closure>) -> Send {
    let bases = DeltaBases::new(has.into_iter().flat_map(|c| c.keys().cloned()));
    let lacking: Vec<StorePath> = order.iter().filter(|p| has.is_none_or(|h| !h.contains_key(*p))).cloned().collect();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    let pairs: Vec<(PathInfo, Option<StorePath>)> =
        lacking.iter().map(|p| (new[p].clone(), bases.for_path(p).cloned())).collect();
    let files: Vec<Option<(StorePath, (u64, bool))>> = futures_util::stream::iter(pairs)
        .map(|(info, base)| {
            let ctl = ctl.clone();
            async move {
                let (file, base) = ctl.nar_cache.best(&info, base.as_ref()).await.ok()?;
                Some((info.path, (std::fs::metadata(file).ok()?.len(), base.is_some())))
            }
        })
        .buffered(workers)
        .collect()
        .await;
    Send {
        paths: lacking.len(),
        bytes: lacking.iter().map(|p| new[p].nar_size).sum(),
        known: has.is_some(),
        lacking: Arc::new(lacking),
        files: files.into_iter().flatten().collect(),
    }
}
