//! Deployments: targets and preview, one child per device, each configuration built
//! once at the deployed commit, then per device: offer, copy only what it lacks,
//! activate. Confirmation and outcomes arrive over the agent connection
//! ([`crate::agents`]). Also cancel, supersede, expiry and restart recovery.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use thymis_proto::signed::{Offer, Signed};
use thymis_proto::{AgentBound, ControllerBound, CopyWindow};
use thymis_store::{PathInfo, StorePath};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

pub use thymis_api::{DeployRequest, Preview, PreviewDevice};

use crate::build;
use crate::controller::{Conn, Controller, Out, lock};
use crate::db::{ChildRow, Details, now};
use crate::driver::report;
use crate::machine::{Event, Stage};
use crate::task::{Stopped, TaskResult, TaskState, deployment_state};
use thymis_api::rollout::Staging;

/// Resolves targets against `thymis.toml` (at the commit, or the work tree when it
/// would be committed) and the devices table.
pub fn preview(ctl: &Controller, req: &DeployRequest) -> Result<Preview> {
    let changes = ctl.project.status()?.len();
    let (commit, toml) = match &req.commit {
        Some(rev) => {
            let c = ctl.project.resolve(rev)?;
            let t = ctl.project.toml_at(&c)?;
            (Some(c), t)
        }
        None if changes > 0 => (None, ctl.project.toml_worktree()?),
        None => {
            let c = ctl.project.head()?;
            let t = ctl.project.toml_at(&c)?;
            (Some(c), t)
        }
    };
    let mut configs: BTreeSet<String> = BTreeSet::new();
    for c in &req.configs {
        if !toml.configs.contains_key(c) {
            bail!("no configuration {c:?} in thymis.toml");
        }
        configs.insert(c.clone());
    }
    for t in &req.tags {
        let tagged = toml.with_tag(t);
        if tagged.is_empty() {
            bail!("no configuration carries tag {t:?}");
        }
        configs.extend(tagged);
    }
    let all = ctl.db.devices()?;
    let online = ctl.online();
    let mut devices: BTreeMap<String, String> = BTreeMap::new();
    for d in all.iter().filter(|d| !d.revoked && configs.contains(&d.config)) {
        devices.insert(d.name.clone(), d.config.clone());
    }
    for name in &req.devices {
        let d = all.iter().find(|d| &d.name == name).ok_or_else(|| anyhow!("no device {name:?}"))?;
        if d.revoked {
            bail!("device {name} is revoked");
        }
        if !toml.configs.contains_key(&d.config) {
            bail!("device {name} is bound to {:?}, which is not in thymis.toml", d.config);
        }
        devices.insert(d.name.clone(), d.config.clone());
    }
    if devices.is_empty() {
        bail!("the targets select no device");
    }
    let configs: BTreeSet<String> = devices.values().cloned().collect();
    Ok(Preview {
        commit,
        uncommitted_changes: changes,
        configs: configs.into_iter().collect(),
        devices: devices
            .into_iter()
            .map(|(name, config)| PreviewDevice { online: online.contains(&name), name, config })
            .collect(),
    })
}

/// Commits if needed, creates the deployment task and starts it. Returns the task id.
pub async fn start(ctl: &Arc<Controller>, req: DeployRequest) -> Result<i64> {
    let staging = req.staging;
    if !staging.is_staged() && (staging.max_failures.is_some() || staging.soak.is_some()) {
        bail!("--max-failures and --soak apply between waves: give --canary or --wave-size too");
    }
    let p = preview(ctl, &req)?;
    let commit = match p.commit {
        Some(c) => c,
        None => {
            let msg = match &req.message {
                Some(m) if !m.trim().is_empty() => m.clone(),
                _ => ctl.project.default_message()?,
            };
            ctl.project.commit(&msg)?
        }
    };
    let expires = now() + ctl.settings.deployment_ttl.as_secs() as i64;
    let message = req.message.clone().unwrap_or_default();
    let task = ctl.db.create_task(
        &ctl.instance,
        "deployment",
        Some(&commit),
        Some(&message),
        None,
        req.reboot,
        Some(expires),
    )?;
    ctl.db.set_task_owner(task, &ctl.instance)?;
    if staging.is_staged() {
        ctl.db.set_task_rollout(task, &staging)?;
    }
    // The devices in waves, in the preview's order (by name).
    let waves = staging.waves(p.devices.len());
    let wave_of = waves.iter().enumerate().flat_map(|(w, n)| std::iter::repeat_n(w, *n));
    for (d, wave) in p.devices.iter().zip(wave_of) {
        ctl.db.add_child(task, &d.name, &d.config, wave)?;
        supersede(ctl, &d.name, task)?;
    }
    if waves.len() > 1 {
        let sizes: Vec<String> = waves.iter().map(usize::to_string).collect();
        ctl.db.log(task, None, &format!("{} waves of {} devices", waves.len(), sizes.join(", ")))?;
    }
    info!(task, commit = %commit, devices = p.devices.len(), "deployment created");
    spawn_run(ctl, task, commit, req.reboot);
    Ok(task)
}

fn spawn_run(ctl: &Arc<Controller>, task: i64, commit: String, reboot: bool) {
    let ctl = ctl.clone();
    tokio::spawn(async move {
        if let Err(e) = run(&ctl, task, &commit, reboot).await {
            warn!(task, "deployment failed: {e:#}");
            let _ = ctl.db.set_task_state(task, TaskState::Finished, Some(TaskResult::Failed), Some(&format!("{e:#}")));
        }
        ctl.notify_task(task);
    });
}

/// Older unfinished deployments of `device` that have not activated are superseded.
fn supersede(ctl: &Arc<Controller>, device: &str, new_task: i64) -> Result<()> {
    for c in ctl.db.open_children_of_device(device, new_task)? {
        let why = format!("superseded by task {new_task}");
        // Refused once activated: then only the device ends it.
        let _ = report(ctl, &c, Event::Superseded, &Details::error(&why))?;
    }
    Ok(())
}

/// Recomputes a deployment's state soon (within 200 ms), once however many of its
/// devices change meanwhile: a deployment to thousands of devices would otherwise
/// recount its children thousands of times.
pub fn refresh_task_soon(ctl: &Arc<Controller>, task: i64) {
    if !lock(&ctl.refresh_pending).insert(task) {
        return;
    }
    let ctl = ctl.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        lock(&ctl.refresh_pending).remove(&task);
        let c = ctl.clone();
        let _ = tokio::task::spawn_blocking(move || refresh_task(&c, task)).await;
    });
}

/// Recomputes a deployment's state from its children.
pub fn refresh_task(ctl: &Controller, task: i64) -> Result<()> {
    // A queued device that is online is about to be offered: the deployment is not
    // waiting for it.
    let online = ctl.online();
    let queued_online = ctl.db.queued_devices(task)?.iter().filter(|d| online.contains(*d)).count();
    let (state, result) = deployment_state(&ctl.db.child_counts(task)?, queued_online, ctl.db.task_stopped(task)?);
    ctl.db.set_task_state(task, state, result, None)?;
    ctl.notify_task(task);
    Ok(())
}

async fn run(ctl: &Arc<Controller>, task: i64, commit: &str, reboot: bool) -> Result<()> {
    ctl.db.set_task_state(task, TaskState::Running, None, None)?;
    ctl.notify_task(task);
    let children: Vec<ChildRow> = ctl.db.children(task)?.into_iter().filter(|c| !c.stage.is_finished()).collect();
    let configs: BTreeSet<String> = children.iter().map(|c| c.config.clone()).collect();
    let rollout = ctl.db.task_rollout(task)?;
    let wave = rollout.as_ref().map(|r| r.1).unwrap_or(0);
    // Each configuration is built once, whatever the number of its devices.
    let mut closures: Closures = HashMap::new();
    for config in &configs {
        let of_config: Vec<&ChildRow> = children.iter().filter(|c| &c.config == config).collect();
        ctl.notify_task(task);
        // Built before (by this controller before a restart, or by another one that
        // stopped): the recorded system, not a new build.
        let recorded: BTreeSet<Option<&String>> = of_config.iter().map(|c| c.system.as_ref()).collect();
        let built = match recorded.into_iter().collect::<Vec<_>>().as_slice() {
            [Some(system)] => build::present(system).await,
            _ => build::build_cached(ctl, task, commit, config).await,
        };
        let built = match built {
            Ok(system) => {
                // In the background: the copies start at once, compressing what they
                // need first (and the next path while one is sent).
                build::warm_nar_cache(ctl, &system, config);
                build::signed_closure(ctl, &system).await.map(|cl| (system, cl))
            }
            Err(e) => Err(e),
        };
        match built {
            Ok((system, closure)) => {
                for c in &of_config {
                    ctl.db.set_child_system(c.id, &system.to_string())?;
                    // Its wave now, or later. Refused for one cancelled or superseded
                    // meanwhile, or past building (after a restart).
                    let event = if c.wave <= wave { Event::Built } else { Event::Wait };
                    let _ = report(ctl, c, event, &Details::default())?;
                }
                closures.insert(config.clone(), (system, Arc::new(closure)));
            }
            Err(e) => {
                let msg = format!("{e:#}");
                for c in &of_config {
                    let _ = report(ctl, c, Event::Failed, &Details::error(&msg))?;
                }
                refresh_task(ctl, task)?;
            }
        }
    }
    match rollout {
        None => deliver_all(ctl, task, |_| true, &closures, commit, reboot).await?,
        Some((staging, ..)) => drive_waves(ctl, task, &staging, &closures, commit, reboot).await?,
    }
    refresh_task(ctl, task)
}

type Closures = HashMap<String, (StorePath, Arc<Vec<PathInfo>>)>;

/// Offers the deployment to its queued devices that `pick` selects, and returns once
/// each was told to activate (or ended).
async fn deliver_all(
    ctl: &Arc<Controller>,
    task: i64,
    pick: impl Fn(&ChildRow) -> bool,
    closures: &Closures,
    commit: &str,
    reboot: bool,
) -> Result<()> {
    let limit = Arc::new(Semaphore::new(ctl.settings.parallel.max(1)));
    let mut handles = Vec::new();
    for child in ctl.db.children(task)? {
        let Some((system, closure)) = closures.get(&child.config).cloned() else { continue };
        // Copying: left mid-copy by a controller that stopped (this task was taken over).
        if !matches!(child.stage, Stage::Queued | Stage::Copying) || !pick(&child) {
            continue;
        }
        let Some(delivering) = Delivering::start(ctl, child.id) else { continue };
        let (ctl, limit) = (ctl.clone(), limit.clone());
        let commit = commit.to_owned();
        handles.push(tokio::spawn(async move {
            let _delivering = delivering;
            let row = child.clone();
            if let Err(e) = deliver(&ctl, &limit, child, system, closure, &commit, reboot).await {
                warn!(child = row.id, "delivery failed: {e:#}");
                let _ = report(&ctl, &row, Event::Failed, &Details::error(&format!("{e:#}")));
            }
            refresh_task_soon(&ctl, task);
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    Ok(())
}

/// A staged rollout from the wave the task is at: each wave offered, waited for until
/// every device in it finished, its failures counted, then its soak; halted by itself
/// when more devices failed than tolerated. Where it is (wave, end of the soak) is kept
/// in the task row before each step, so a restarted controller goes on from there.
async fn drive_waves(
    ctl: &Arc<Controller>,
    task: i64,
    staging: &Staging,
    closures: &Closures,
    commit: &str,
    reboot: bool,
) -> Result<()> {
    loop {
        if ctl.db.task_stopped(task)?.is_some() {
            return Ok(());
        }
        let Some((_, wave, soak_until)) = ctl.db.task_rollout(task)? else { return Ok(()) };
        let children = ctl.db.children(task)?;
        let (total, last) = (children.len(), children.iter().map(|c| c.wave).max().unwrap_or(0));
        match soak_until {
            None => {
                let of_wave: Vec<&ChildRow> = children.iter().filter(|c| c.wave == wave).collect();
                for c in &of_wave {
                    let _ = report(ctl, c, Event::Release, &Details::default())?;
                }
                let names: Vec<&str> = of_wave.iter().map(|c| c.device.as_str()).collect();
                let what = if wave == 0 && staging.canary.is_some() { " (canary)" } else { "" };
                ctl.db.log(task, None, &format!("wave {} of {}{what}: {}", wave + 1, last + 1, names.join(", ")))?;
                deliver_all(ctl, task, |c| c.wave == wave, closures, commit, reboot).await?;
                // Done when every device of the wave has its result.
                loop {
                    if ctl.db.task_stopped(task)?.is_some() {
                        return Ok(());
                    }
                    let open = ctl.db.children(task)?.iter().any(|c| c.wave == wave && !c.stage.is_finished());
                    if !open {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                if halt_if_failed(ctl, task, staging, total, wave, false)? {
                    return Ok(());
                }
                if wave == last {
                    return Ok(());
                }
                match staging.soak {
                    Some(soak) => {
                        ctl.db.set_task_wave(task, wave, Some(now() + soak as i64))?;
                        ctl.db.log(task, None, &format!("wave {} done; soaking {soak} s", wave + 1))?;
                    }
                    None => ctl.db.set_task_wave(task, wave + 1, None)?,
                }
            }
            Some(until) => {
                // `thymisctl resume` ends a soak early (it moves `until` to now).
                if now() < until {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                if halt_if_failed(ctl, task, staging, total, wave, true)? {
                    return Ok(());
                }
                ctl.db.set_task_wave(task, wave + 1, None)?;
            }
        }
        ctl.notify_task(task);
    }
}

/// Counts the rollout's failed devices so far (after a soak also those that left the
/// system they were deployed, a rollback after their confirmation); past what is
/// tolerated, the devices not offered yet end `cancelled` (`halted`) and the task halts.
fn halt_if_failed(
    ctl: &Arc<Controller>,
    task: i64,
    staging: &Staging,
    total: usize,
    wave: usize,
    after_soak: bool,
) -> Result<bool> {
    let children = ctl.db.children(task)?;
    let devices: HashMap<String, Option<String>> =
        ctl.db.devices()?.into_iter().map(|d| (d.name.clone(), d.system.clone())).collect();
    let mut failed: Vec<String> = vec![];
    for c in &children {
        match c.stage {
            Stage::Finished(r) if thymis_api::rollout::is_failure(r) => {
                failed.push(format!("{} {}", c.device, crate::db::result_str(r)));
            }
            Stage::Finished(r) if r.is_success() && after_soak => {
                let now_runs = devices.get(&c.device).cloned().flatten();
                if now_runs.is_some() && now_runs != c.system {
                    failed.push(format!("{} left the deployed system during the soak", c.device));
                }
            }
            _ => {}
        }
    }
    let tolerated = staging.tolerated(total);
    if !thymis_api::rollout::halts(failed.len(), tolerated) {
        return Ok(false);
    }
    let why = format!(
        "halted after wave {}: {} failed ({}), {tolerated} tolerated",
        wave + 1,
        failed.len(),
        failed.join(", ")
    );
    warn!(task, "{why}");
    ctl.db.set_task_stopped(task, Stopped::Halted)?;
    let halted = Details { reason: Some("halted"), ..Default::default() };
    for c in children.iter().filter(|c| c.stage == Stage::Waiting) {
        let _ = report(ctl, c, Event::Halted, &halted)?;
    }
    ctl.db.log(task, None, &why)?;
    refresh_task(ctl, task)?;
    ctl.db.set_task_state(task, TaskState::Halted, Some(TaskResult::Halted), Some(&why))?;
    ctl.notify_task(task);
    Ok(true)
}

/// A device deployment this process is delivering: one delivery each (the task's run
/// and the pickup of devices connected here may both want it), until dropped.
struct Delivering {
    ctl: Arc<Controller>,
    child: i64,
}

impl Delivering {
    fn start(ctl: &Arc<Controller>, child: i64) -> Option<Delivering> {
        lock(&ctl.delivering).insert(child).then(|| Delivering { ctl: ctl.clone(), child })
    }
}

impl Drop for Delivering {
    fn drop(&mut self) {
        lock(&self.ctl.delivering).remove(&self.child);
    }
}

/// Why one attempt to deliver to a device stopped.
enum Stop {
    /// The connection went away: wait for the device to come back.
    Disconnected,
    /// The device refused: the deployment ends for it.
    Refused(String),
}

fn is_over(ctl: &Controller, child: &ChildRow) -> Result<bool> {
    Ok(ctl.db.child(child.id)?.is_none_or(|c| c.stage.is_finished()))
}

async fn deliver(
    ctl: &Arc<Controller>,
    limit: &Semaphore,
    child: ChildRow,
    system: StorePath,
    closure: Arc<Vec<PathInfo>>,
    commit: &str,
    reboot: bool,
) -> Result<()> {
    let mut connected = ctl.connected.subscribe();
    // Paths streamed whole whose acknowledgement the connection lost: if the device has
    // them on the next attempt, they count as sent (and are not sent again).
    let mut unacked: HashMap<StorePath, u64> = HashMap::new();
    let expires =
        ctl.db.task_expires(child.task)?.unwrap_or_else(|| now() + ctl.settings.deployment_ttl.as_secs() as i64);
    let mut offline = false;
    loop {
        if is_over(ctl, &child)? {
            return Ok(());
        }
        let Some(conn) = ctl.conn(&child.device) else {
            if !offline {
                // The deployment is waiting once only offline devices are left.
                offline = true;
                refresh_task_soon(ctl, child.task);
            }
            // Woken when any device connects; re-checks cancel and expiry each second.
            let _ = tokio::time::timeout(Duration::from_secs(1), connected.recv()).await;
            continue;
        };
        // Controllers sharing the database: one of them delivers at a time.
        if !ctl.db.claim_child(child.id, &ctl.instance, ctl.alive_since())? {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Left mid-copy by a controller that stopped: offered again from here (refused,
        // changing nothing, for one that is queued).
        let _ = report(ctl, &child, Event::Lost, &Details::default())?;
        if report(ctl, &child, Event::Offered, &Details::default())?.is_err() {
            return Ok(());
        }
        offline = false;
        let sequence = match child.sequence {
            Some(s) => s as u64,
            None => match ctl.db.child_by_deployment(&child.deployment_id)?.and_then(|c| c.sequence) {
                Some(s) => s as u64,
                None => {
                    let s = ctl.db.next_sequence()?;
                    ctl.db.set_child_sequence(child.id, s)?;
                    s
                }
            },
        };
        let offer = Offer {
            device: child.device.clone(),
            deployment_id: child.deployment_id.clone(),
            config: child.config.clone(),
            system: system.clone(),
            commit: Some(commit.to_owned()),
            sequence,
            expires: expires as u64,
            reboot,
            session: Some(conn.session.clone()),
        };
        // Up to `parallel` devices at a time (sending ten thousand offers at once was
        // slower: every delivery then contends for the database).
        let _permit = limit.acquire().await?;
        match send_to(ctl, &conn, &child, &offer, &closure, &mut unacked).await {
            Ok(()) => return Ok(()),
            Err(Stop::Refused(reason)) => {
                if report(ctl, &child, Event::Failed, &Details::error(&reason))?.is_ok() {
                    ctl.db.log(child.task, Some(child.id), &format!("{}: failed: {reason}", child.device))?;
                }
                return Ok(());
            }
            Err(Stop::Disconnected) => {
                let lost = report(ctl, &child, Event::Lost, &Details::default())?;
                // The device may come back through another controller, which finds it
                // queued once the claim is released.
                ctl.db.release_child(child.id, &ctl.instance)?;
                if lost.is_err() {
                    return Ok(());
                }
                ctl.db.log(child.task, Some(child.id), &format!("{}: connection lost; will resume", child.device))?;
                ctl.notify_task(child.task);
            }
        }
    }
}

async fn reply(rx: &mut mpsc::UnboundedReceiver<ControllerBound>, timeout: Duration) -> Result<ControllerBound, Stop> {
    match tokio::time::timeout(timeout, rx.recv()).await {
        Ok(Some(m)) => Ok(m),
        Ok(None) | Err(_) => Err(Stop::Disconnected),
    }
}

/// The delta bases a device names, kept only where the controller knows the device has
/// the base (in the closure of the system it reports) and it is an earlier version of
/// the path (the same name): a device cannot make the controller read, hold and
/// compress against any store path it likes.
async fn known_bases(
    ctl: &Arc<Controller>,
    device: &str,
    bases: HashMap<StorePath, StorePath>,
) -> HashMap<StorePath, StorePath> {
    if bases.is_empty() {
        return bases;
    }
    let reported =
        ctl.db.device(device).ok().flatten().and_then(|d| d.info.system).and_then(|s| s.parse::<StorePath>().ok());
    let Some(system) = reported else { return HashMap::new() };
    let closure = tokio::task::spawn_blocking(move || {
        thymis_store::local_store::LocalStore::system().path_infos(std::slice::from_ref(&system), true)
    })
    .await;
    let has: std::collections::HashSet<StorePath> = match closure {
        Ok(Ok(infos)) => infos.into_iter().map(|i| i.path).collect(),
        _ => return HashMap::new(),
    };
    let before = bases.len();
    let kept: HashMap<StorePath, StorePath> =
        bases.into_iter().filter(|(path, base)| has.contains(base) && base.name() == path.name()).collect();
    if kept.len() < before {
        debug!(%device, named = before, kept = kept.len(), "delta bases the device is not known to have were ignored");
    }
    kept
}

/// One attempt over one connection: offer, query, copy what is missing, activate.
async fn send_to(
    ctl: &Arc<Controller>,
    conn: &Arc<Conn>,
    child: &ChildRow,
    offer: &Offer,
    closure: &[PathInfo],
    unacked: &mut HashMap<StorePath, u64>,
) -> Result<(), Stop> {
    let id = &child.deployment_id;
    let t = ctl.settings.reply_timeout;
    let mut rx = conn.subscribe(id);
    if !conn.send(AgentBound::Offer { offer: Signed::sign(offer, &ctl.identity) }).await {
        return Err(Stop::Disconnected);
    }
    match reply(&mut rx, t).await? {
        ControllerBound::OfferAccepted { .. } => {}
        ControllerBound::OfferRefused { reason, .. } => return Err(Stop::Refused(format!("offer refused: {reason}"))),
        other => return Err(Stop::Refused(format!("unexpected reply to the offer: {other:?}"))),
    }
    let paths: Vec<StorePath> = closure.iter().map(|i| i.path.clone()).collect();
    if !conn.send(AgentBound::QueryPaths { deployment_id: id.clone(), paths }).await {
        return Err(Stop::Disconnected);
    }
    // What this attempt's substitution adds to earlier attempts'.
    let (base_paths, base_bytes) = ctl.db.substituted(child.id).unwrap_or((0, 0));
    let substituted = |paths: u64, bytes: u64| {
        let _ = ctl.db.set_substituted(child.id, base_paths + paths as i64, base_bytes + bytes as i64);
        ctl.notify_task(child.task);
    };
    // The device may substitute from its binary caches first. It is given `t` from its
    // last real progress (more bytes than before), not from its last message: a device
    // or cache that only says it is at work cannot hold the deployment.
    let mut deadline = tokio::time::Instant::now() + t;
    let mut progress = None;
    let (missing, bases, window): (BTreeSet<StorePath>, HashMap<StorePath, StorePath>, CopyWindow) = loop {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match reply(&mut rx, wait).await? {
            ControllerBound::Substituting { paths, bytes, .. } => {
                if progress.is_none_or(|p| bytes > p) {
                    progress = Some(bytes);
                    deadline = tokio::time::Instant::now() + t;
                    substituted(paths, bytes);
                }
            }
            ControllerBound::PathsMissing { missing, bases, window, substituted_paths, substituted_bytes, .. } => {
                if substituted_paths > 0 {
                    substituted(substituted_paths, substituted_bytes);
                    let line = format!(
                        "{}: got {substituted_paths} paths ({substituted_bytes} bytes) from its binary caches",
                        child.device
                    );
                    let _ = ctl.db.log(child.task, Some(child.id), &line);
                }
                break (
                    missing.into_iter().collect(),
                    bases.into_iter().map(|b| (b.path, b.base)).collect(),
                    window.unwrap_or(CopyWindow::LEGACY),
                );
            }
            other => return Err(Stop::Refused(format!("unexpected reply to the path query: {other:?}"))),
        }
    };
    let bases = known_bases(ctl, &child.device, bases).await;
    let mut acks = Acks { ctl, child, paths: 0, bytes: 0 };
    for (path, bytes) in unacked.drain() {
        if !missing.contains(&path) {
            acks.paths += 1;
            acks.bytes += bytes;
        }
    }
    acks.flush();
    let to_send: Vec<&PathInfo> = closure.iter().filter(|i| missing.contains(&i.path)).collect();
    let _ = ctl.db.set_paths_total(child.id, to_send.len() as i64);
    let _ = ctl.db.log(
        child.task,
        Some(child.id),
        &format!("{}: lacks {} of {} paths", child.device, to_send.len(), closure.len()),
    );
    ctl.notify_task(child.task);
    // Paths sent and not yet acknowledged (`unacked`) stay within the agent's window;
    // acknowledgements are taken as they come, without waiting for each.
    let mut in_flight_bytes = 0u64;
    // The next path is compressed (when no one has yet) while this one is sent; a path
    // the device has an earlier version of goes as a delta against it when smaller.
    // Its file is opened and its first chunk read then too (most NARs are one chunk).
    let prefetch = |info: &&PathInfo| {
        let (ctl, info, base) = (ctl.clone(), (*info).clone(), bases.get(&info.path).cloned());
        tokio::spawn(async move {
            let (file, delta_base) = ctl.nar_cache.best(&info, base.as_ref()).await?;
            let nar = Outgoing::open(&file).await?;
            anyhow::Ok((nar, delta_base))
        })
    };
    let mut next = to_send.first().map(prefetch);
    for (n, info) in to_send.iter().enumerate() {
        let compressed = match next.take() {
            Some(handle) => handle.await.map_err(|e| anyhow::anyhow!("compression task: {e}")).and_then(|r| r),
            None => Err(anyhow::anyhow!("no compression started")),
        };
        next = to_send.get(n + 1).map(prefetch);
        let (nar, delta_base) = match compressed {
            Ok(f) => f,
            Err(e) => return Err(Stop::Refused(format!("reading {}: {e:#}", info.path))),
        };
        let size = nar.size;
        while let Ok(m) = rx.try_recv() {
            acks.take(m, unacked, &mut in_flight_bytes)?;
        }
        while !window.admits(unacked.len(), in_flight_bytes, size) {
            acks.flush();
            let m = ack_reply(&mut rx, t, in_flight_bytes).await?;
            acks.take(m, unacked, &mut in_flight_bytes)?;
        }
        acks.flush();
        let start = AgentBound::PathStart { deployment_id: id.clone(), info: (*info).clone(), delta_base };
        if conn.data.send(Out::Msg(start)).await.is_err() {
            return Err(Stop::Disconnected);
        }
        let bytes = nar.send(&conn.data).await?;
        if conn
            .data
            .send(Out::Msg(AgentBound::PathEnd { deployment_id: id.clone(), path: info.path.clone() }))
            .await
            .is_err()
        {
            return Err(Stop::Disconnected);
        }
        unacked.insert(info.path.clone(), bytes);
        in_flight_bytes += bytes;
    }
    while !unacked.is_empty() {
        acks.flush();
        let m = ack_reply(&mut rx, t, in_flight_bytes).await?;
        acks.take(m, unacked, &mut in_flight_bytes)?;
    }
    acks.flush();
    // Recorded before the device is told: from here on a restart must not interrupt it,
    // and only a recorded activation is ever confirmed. Unrecorded, the device is not
    // told (it would roll back for want of a confirmation).
    match report(ctl, child, Event::Activating, &Details::default()) {
        Ok(Ok(_)) => {}
        // Ended meanwhile (cancelled, superseded, expired): the device is not told.
        Ok(Err(refused)) => {
            debug!(device = %child.device, "not activating: {refused}");
            return Ok(());
        }
        Err(e) => {
            conn.send(AgentBound::Cancel { deployment_id: id.clone() }).await;
            return Err(Stop::Refused(format!("not activated: recording the activation failed: {e:#}")));
        }
    }
    let _ = ctl.db.log(child.task, Some(child.id), &format!("{}: activating", child.device));
    ctl.notify_task(child.task);
    if !conn.send(AgentBound::Activate { deployment_id: id.clone() }).await {
        // Activation may or may not have reached the device; its report will tell.
        warn!(device = %child.device, "connection lost while sending activate");
    }
    Ok(())
}

/// Acknowledged paths and their bytes, written to the database a batch at a time (the
/// agent acknowledges a whole import at once; a write per path would cost thousands of
/// writes per device).
struct Acks<'a> {
    ctl: &'a Controller,
    child: &'a ChildRow,
    paths: i64,
    bytes: u64,
}

impl Acks<'_> {
    fn take(
        &mut self,
        m: ControllerBound,
        unacked: &mut HashMap<StorePath, u64>,
        in_flight: &mut u64,
    ) -> Result<(), Stop> {
        match m {
            ControllerBound::PathImported { path, .. } => {
                let bytes = unacked.remove(&path).unwrap_or(0);
                *in_flight = in_flight.saturating_sub(bytes);
                self.paths += 1;
                self.bytes += bytes;
                Ok(())
            }
            ControllerBound::PathRefused { path, error, .. } => Err(Stop::Refused(format!("{path} refused: {error}"))),
            other => Err(Stop::Refused(format!("unexpected reply during the copy: {other:?}"))),
        }
    }

    fn flush(&mut self) {
        if self.paths > 0 {
            let _ = self.ctl.db.add_progress(self.child.id, self.paths, self.bytes as i64);
            self.ctl.notify_task(self.child.task);
            (self.paths, self.bytes) = (0, 0);
        }
    }
}

/// The lowest rate at which a device must take in a copy before the wait for an
/// acknowledgement gives up on it (on top of the reply timeout): what is in flight
/// must cross the link first.
const SLOWEST_LINK_BYTES_PER_SEC: u64 = 32 << 10;

/// The next acknowledgement; the connection's own liveness checks end a dead link
/// sooner (the waiter closes with it).
async fn ack_reply(
    rx: &mut mpsc::UnboundedReceiver<ControllerBound>,
    reply_timeout: Duration,
    in_flight: u64,
) -> Result<ControllerBound, Stop> {
    reply(rx, reply_timeout + Duration::from_secs(in_flight / SLOWEST_LINK_BYTES_PER_SEC)).await
}

/// A compressed NAR on its way to a device: the open file, its size and its first
/// chunk.
struct Outgoing {
    file: std::sync::Arc<std::fs::File>,
    size: u64,
    first: Vec<u8>,
}

impl Outgoing {
    /// Opens a cached NAR (on this thread, like the cache's check that it exists, which
    /// has just looked it up) and reads its first chunk.
    async fn open(path: &std::path::Path) -> Result<Outgoing> {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        let file = std::sync::Arc::new(file);
        let first =
            read_chunk(&file, 0, size.min(FIRST_CHUNK)).await.with_context(|| format!("reading {}", path.display()))?;
        Ok(Outgoing { file, size, first })
    }

    /// Sends it as binary frames on the copy stream; returns the bytes sent.
    async fn send(self, data: &mpsc::Sender<Out>) -> Result<u64, Stop> {
        let Outgoing { file, size, first } = self;
        let mut offset = first.len() as u64;
        if !first.is_empty() {
            data.send(Out::Bin(first)).await.map_err(|_| Stop::Disconnected)?;
        }
        while offset < size {
            // Read once the queue has room: no chunk waits in hand.
            let room = data.reserve().await.map_err(|_| Stop::Disconnected)?;
            let buf =
                read_chunk(&file, offset, size).await.map_err(|e| Stop::Refused(format!("reading a NAR: {e:#}")))?;
            offset += buf.len() as u64;
            room.send(Out::Bin(buf));
        }
        Ok(size)
    }
}

/// How much of a NAR is read ahead, while the path before it is sent: all of a small
/// one (most are), a little of a large one (a thousand devices each hold one).
const FIRST_CHUNK: u64 = 64 << 10;

/// The chunk of `file` at `offset`, up to `end`: sized to what is left, so that a
/// small NAR costs a small buffer. Read on this thread when the page cache holds it
/// (the usual case: a fleet's copies read the same NARs), so that a chunk costs no trip
/// to a blocking thread and back; on a blocking thread when the read would wait for the
/// disk.
async fn read_chunk(file: &std::sync::Arc<std::fs::File>, offset: u64, end: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let len = (end - offset).min(thymis_proto::CHUNK_SIZE as u64) as usize;
    let mut buf = vec![0; len];
    let cached = rustix::io::preadv2(
        &**file,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        offset,
        rustix::io::ReadWriteFlags::NOWAIT,
    );
    if cached.is_ok_and(|n| n == len) {
        return Ok(buf);
    }
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        file.read_exact_at(&mut buf, offset).context("the cached NAR is shorter than it was")?;
        Ok(buf)
    })
    .await?
}

/// Cancels a deployment: every device that has not activated stops.
pub async fn cancel(ctl: &Arc<Controller>, task: i64) -> Result<()> {
    ctl.db.set_task_stopped(task, Stopped::Cancelled)?;
    for c in ctl.db.children(task)? {
        let _ = report(ctl, &c, Event::Cancelled, &Details::default())?;
    }
    refresh_task(ctl, task)
}

/// Ends what is past its deployment's expiry: queued devices `expired`, activated
/// devices never heard from `unreachable` (their agents roll back by themselves). Only
/// this controller's own tasks, whose expiry its own clock set (another controller's
/// are its own business while it is alive, and this one's once it carries them on).
pub fn sweep(ctl: &Arc<Controller>) -> Result<()> {
    let t = now();
    for (task, kind, expires) in ctl.db.open_tasks(&ctl.instance)? {
        if kind != "deployment" || expires.is_none_or(|e| e > t) {
            continue;
        }
        for c in ctl.db.children(task)? {
            let error = if c.stage.activated() {
                "not heard from after activation before the deployment expired"
            } else {
                "the deployment expired before the device received it"
            };
            // Refused for the finished ones.
            let _ = report(ctl, &c, Event::Expired, &Details::error(error))?;
        }
        refresh_task(ctl, task)?;
    }
    // Deployments that ended without the device's outcome (cancelled, superseded,
    // expired, ...) give their log budgets back here.
    for id in ctl.log_budget.children() {
        match ctl.db.child(id)? {
            Some(c) if c.stage.is_finished() => crate::driver::close_log_budget(ctl, &c)?,
            Some(_) => {}
            None => drop(ctl.log_budget.finish(id)),
        }
    }
    Ok(())
}

/// After a restart: the open tasks this controller carried before (or that no live
/// controller carries) are its own again; their children that had not activated end
/// `interrupted`, activated ones keep waiting for their devices (which are confirmed
/// when they reconnect). Staged rollouts then go on from the wave, or the soak, they
/// were at.
pub fn recover(ctl: &Arc<Controller>) -> Result<()> {
    let me = &ctl.instance;
    let mine: Vec<(i64, Option<String>)> = ctl.db.orphaned_tasks(me, ctl.alive_since(), true)?;
    let mine = mine.into_iter().map(|(t, _)| t).chain(ctl.db.tasks_of(me)?);
    for task in mine.collect::<BTreeSet<i64>>() {
        ctl.db.set_task_owner(task, me)?;
        let Some(t) = ctl.db.task(task)? else { continue };
        if t.kind != "deployment" {
            ctl.db.set_task_state(
                task,
                TaskState::Finished,
                Some(TaskResult::Failed),
                Some("interrupted by a controller restart"),
            )?;
            continue;
        }
        // Another live controller goes on delivering what it delivers.
        let elsewhere = ctl.db.delivered_elsewhere(task, me, ctl.alive_since())?;
        for c in ctl.db.children(task)?.into_iter().filter(|c| !elsewhere.contains(&c.id)) {
            // What the restart ends says why (a later wave's devices wait on).
            let details = match c.stage {
                Stage::Building | Stage::Queued | Stage::Copying => {
                    Details::error("the controller stopped before this device activated")
                }
                _ => Details::default(),
            };
            let _ = report(ctl, &c, Event::Restarted, &details)?;
        }
        refresh_task(ctl, task)?;
        if t.rollout.is_some() && ctl.db.task_stopped(task)?.is_none() {
            let Some((commit, reboot)) = ctl.db.task_commit(task)? else { continue };
            info!(task, "resuming a staged rollout");
            spawn_run(ctl, task, commit, reboot);
        }
    }
    Ok(())
}

/// Every sweep, for controllers that share a database: the open tasks of a controller
/// that stopped are carried on here (nothing is ended for it: its devices reconnect
/// here, are offered their deployment again or confirmed); and device deployments of
/// other controllers' tasks whose device is connected here are delivered from here
/// (this controller's own tasks deliver theirs themselves).
pub fn carry_on(ctl: &Arc<Controller>) -> Result<()> {
    let me = &ctl.instance;
    ctl.end_revoked()?;
    for (task, from) in ctl.db.orphaned_tasks(me, ctl.alive_since(), false)? {
        if !ctl.db.take_task(task, me, from.as_deref())? {
            continue;
        }
        let from = from.unwrap_or_default();
        warn!(task, from, "carrying on the task of a controller that stopped");
        let Some(t) = ctl.db.task(task)? else { continue };
        if t.kind != "deployment" {
            let why = format!("interrupted: controller {from}, which ran it, stopped");
            ctl.db.set_task_state(task, TaskState::Finished, Some(TaskResult::Failed), Some(&why))?;
            ctl.notify_task(task);
            continue;
        }
        ctl.db.log(task, None, &format!("controller {from} stopped; controller {me} carries on"))?;
        if let Some((commit, reboot)) = ctl.db.task_commit(task)? {
            spawn_run(ctl, task, commit, reboot);
        }
    }
    for child in ctl.db.deliverable_here(me, ctl.alive_since())? {
        let Some(delivering) = Delivering::start(ctl, child.id) else { continue };
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let _delivering = delivering;
            let row = child.clone();
            if let Err(e) = deliver_here(&ctl, child).await {
                warn!(child = row.id, "delivery failed: {e:#}");
                let _ = report(&ctl, &row, Event::Failed, &Details::error(&format!("{e:#}")));
            }
        });
    }
    Ok(())
}

/// Delivers a device deployment of another controller's task to its device connected
/// here: its closure from the recorded system.
async fn deliver_here(ctl: &Arc<Controller>, child: ChildRow) -> Result<()> {
    let Some((commit, reboot)) = ctl.db.task_commit(child.task)? else { return Ok(()) };
    let system = child.system.clone().context("not built")?;
    let system = build::present(&system).await?;
    build::warm_nar_cache(ctl, &system, &child.config);
    let closure = Arc::new(build::signed_closure(ctl, &system).await?);
    deliver(ctl, &ctl.adopted, child, system, closure, &commit, reboot).await
}

/// `thymisctl resume TASK`: a soaking rollout goes on to its next wave now; a halted
/// one goes on as a new deployment (at the project's HEAD, where the fix is) to its
/// devices that did not succeed, staged the same way. Returns the task that goes on.
pub async fn resume(ctl: &Arc<Controller>, task: i64) -> Result<i64> {
    let Some((staging, ..)) = ctl.db.task_rollout(task)? else { bail!("task {task} is not a staged rollout") };
    if ctl.db.end_soak(task)? {
        ctl.db.log(task, None, "soak ended early (resumed)")?;
        return Ok(task);
    }
    if ctl.db.task_stopped(task)? != Some(Stopped::Halted) {
        bail!("task {task} is neither soaking nor halted");
    }
    let devices: Vec<String> = ctl
        .db
        .children(task)?
        .into_iter()
        .filter(|c| !matches!(c.stage, Stage::Finished(r) if r.is_success()))
        .map(|c| c.device)
        .collect();
    let reboot = ctl.db.task_commit(task)?.is_some_and(|(_, r)| r);
    let req =
        DeployRequest { devices, message: Some(format!("resume task {task}")), reboot, staging, ..Default::default() };
    let next = start(ctl, req).await?;
    ctl.db.log(task, None, &format!("resumed as task {next}"))?;
    ctl.notify_task(task);
    Ok(next)
}

/// A build task: build a configuration without deploying it.
pub async fn start_build(ctl: &Arc<Controller>, config: &str, commit: Option<&str>) -> Result<i64> {
    let commit = match commit {
        Some(c) => ctl.project.resolve(c)?,
        None => ctl.project.head()?,
    };
    if !ctl.project.toml_at(&commit)?.configs.contains_key(config) {
        bail!("no configuration {config:?} in thymis.toml at {commit}");
    }
    let task = ctl.db.create_task(&ctl.instance, "build", Some(&commit), None, Some(config), false, None)?;
    ctl.db.set_task_owner(task, &ctl.instance)?;
    let (ctl, config) = (ctl.clone(), config.to_owned());
    tokio::spawn(async move {
        let _ = ctl.db.set_task_state(task, TaskState::Running, None, None);
        ctl.notify_task(task);
        match build::build_cached(&ctl, task, &commit, &config).await {
            Ok(system) => {
                // A build on its own prepares the deployment: it ends when the closure
                // is compressed, ready to be sent.
                let _ = ctl.db.log(task, None, "compressing the closure for deployment");
                ctl.notify_task(task);
                let _ = build::warm_nar_cache(&ctl, &system, &config).await;
                let _ = ctl.db.set_task_system(task, &system.to_string());
                let _ = ctl.db.set_task_state(task, TaskState::Finished, Some(TaskResult::Succeeded), None);
            }
            Err(e) => {
                let _ =
                    ctl.db.set_task_state(task, TaskState::Finished, Some(TaskResult::Failed), Some(&format!("{e:#}")));
            }
        }
        ctl.notify_task(task);
    });
    Ok(task)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NAR is read back whole and in order, in chunks of at most CHUNK_SIZE, whether
    /// the page cache holds it or the read falls back to a blocking thread.
    #[tokio::test]
    async fn chunks_read_back_the_whole_file_cached_or_not() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tmp");
        let path = dir.path().join("nar.zst");
        let data: Vec<u8> = (0..(3 * thymis_proto::CHUNK_SIZE + 12345)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        for evict in [false, true] {
            if evict {
                let f = std::fs::File::open(&path).expect("open");
                f.sync_all().expect("sync");
                let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
            }
            let nar = Outgoing::open(&path).await.expect("open");
            assert_eq!(nar.first, data[..FIRST_CHUNK as usize]);
            let (tx, mut rx) = mpsc::channel(1);
            let sender = tokio::spawn(async move { nar.send(&tx).await.map_err(|_| ()) });
            let mut got = Vec::new();
            while let Some(out) = rx.recv().await {
                let Out::Bin(b) = out else { panic!("not a chunk") };
                assert!(b.len() <= thymis_proto::CHUNK_SIZE);
                got.extend_from_slice(&b);
            }
            assert_eq!(sender.await.expect("join"), Ok(data.len() as u64));
            assert!(got == data, "the chunks differ from the file (evicted: {evict})");
        }
        // A file that shrank after it was opened is an error, not a short NAR.
        let nar = Outgoing::open(&path).await.expect("open");
        std::fs::write(&path, &data[..1000]).expect("truncate");
        let (tx, mut rx) = mpsc::channel(1);
        let sender = tokio::spawn(async move { nar.send(&tx).await.map_err(|_| ()) });
        while rx.recv().await.is_some() {}
        assert!(sender.await.expect("join").is_err());
    }
}
