//! Deployments: targets and preview, one child per device, each configuration built
//! once at the deployed commit, then per device: offer, copy only what it lacks,
//! activate. Confirmation and outcomes arrive over the agent connection
//! ([`crate::agents`]). Also cancel, supersede, expiry and restart recovery.
//!
//! Here the verbs the API calls (preview, start, cancel, resume, build, a changed
//! secret's deployment) and a deployment's run; `rollout` (waves and soak), `deliver`
//! (one device deployment, attempt after attempt), `copy` (one attempt over one
//! connection), `recovery` (expiry, restarts, carrying on another controller's work).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use thymis_proto::signed::{Offer, Signed};
use thymis_proto::{AgentBound, ControllerBound, CopyWindow};
use thymis_store::{PathInfo, StorePath};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use thymis_api::secrets::Scope;
pub use thymis_api::{DeployRequest, Preview, PreviewDevice};

use crate::build;
use crate::conn::{Conn, Out};
use crate::controller::{Controller, lock};
use crate::db::{ChildRow, Details, now};
use crate::engine::{self, report};
use crate::model::device::{Effect, Event, Stage};
use crate::model::task::{Event as TaskEvent, Stopped, TaskResult};

mod copy;
mod deliver;
mod dry_run;
mod gate;
mod recovery;
mod rollout;

use crate::engine::{refresh_task, refresh_task_soon};
pub use deliver::release_ready;
pub use dry_run::dry_run;
pub use recovery::{carry_on, recover, sweep};
use rollout::deliver_all;

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
    let commit_of: HashMap<&str, Option<String>> = all.iter().map(|d| (d.name.as_str(), d.commit.clone())).collect();
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
        if req.devices.is_empty() && req.configs.is_empty() && req.tags.is_empty() {
            bail!("no target: give --device NAME, --config NAME or --tag TAG (thymisctl devices lists the devices)");
        }
        bail!(
            "the targets select no device: no device is bound to {} (add one with thymisctl device add NAME CONFIG)",
            configs.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let configs: BTreeSet<String> = devices.values().cloned().collect();
    let waves = if req.staging.is_staged() { req.staging.waves(devices.len()) } else { vec![] };
    Ok(Preview {
        commit,
        uncommitted_changes: changes,
        configs: configs.into_iter().collect(),
        devices: devices
            .into_iter()
            .map(|(name, config)| PreviewDevice {
                online: online.contains(&name),
                commit: commit_of.get(name.as_str()).cloned().flatten(),
                name,
                config,
            })
            .collect(),
        waves,
    })
}

/// Commits if needed, creates the deployment task and starts it. Returns the task id.
pub async fn start(ctl: &Arc<Controller>, req: DeployRequest) -> Result<i64> {
    let staging = req.staging;
    if !staging.is_staged() && (staging.max_failures.is_some() || staging.soak.is_some()) {
        bail!("--max-failures and --soak apply between waves: give --canary or --wave-size too");
    }
    if let Some(w) = &req.window {
        crate::model::window::Window::parse(w)?;
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
    if req.stage_only {
        ctl.db.set_task_stage_only(task)?;
    }
    // Each device's window: the one given, else its configuration's (or tag's) at the
    // deployed commit.
    let toml = ctl.project.toml_at(&commit)?;
    // The devices in waves, in the preview's order (by name).
    let waves = staging.waves(p.devices.len());
    let wave_of = waves.iter().enumerate().flat_map(|(w, n)| std::iter::repeat_n(w, *n));
    for (d, wave) in p.devices.iter().zip(wave_of) {
        let window = req.window.clone().or_else(|| toml.window(&d.config));
        ctl.db.add_child(task, &d.name, &d.config, wave, window.as_deref())?;
        supersede(ctl, &d.name, task)?;
    }
    if waves.len() > 1 {
        let sizes: Vec<String> = waves.iter().map(usize::to_string).collect();
        ctl.db.log(task, None, &format!("{} waves, of {} devices", waves.len(), sizes.join(", then ")))?;
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
            let _ = engine::task_event(&ctl, task, TaskEvent::Ended(TaskResult::Failed), Some(&format!("{e:#}")));
        }
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

async fn run(ctl: &Arc<Controller>, task: i64, commit: &str, reboot: bool) -> Result<()> {
    engine::task_event(ctl, task, TaskEvent::Started, None)?;
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
                dry_run::record_packages(ctl, &of_config, &closure).await;
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
        Some(_) => {
            // Each wave as the engine releases it (when the one before settled, and its
            // soak is over); the channel closes when the rollout ends.
            let mut waves = engine::start_rollout(ctl, task)?;
            while let Some(wave) = waves.recv().await {
                deliver_all(ctl, task, |c| c.wave == wave, &closures, commit, reboot).await?;
            }
        }
    }
    refresh_task(ctl, task)
}

type Closures = HashMap<String, (StorePath, Arc<Vec<PathInfo>>)>;

/// Carries a changed secret to the devices it reaches: a deployment of the commit each
/// runs (nothing is built or copied again: only the secrets change). Devices with a
/// deployment under way get the change with it; devices never deployed, with their
/// first.
pub async fn secret_changed(ctl: &Arc<Controller>, name: &str, scope: &Scope) -> Result<Vec<i64>> {
    let toml = ctl.project.toml_worktree()?;
    let busy: HashSet<String> = ctl.db.open_children()?.into_iter().map(|c| c.device).collect();
    let mut by_commit: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in ctl.db.devices()? {
        let reaches = match scope {
            Scope::Device(x) => &d.name == x,
            Scope::Config(c) => &d.config == c,
            Scope::Tag(t) => toml.configs.get(&d.config).is_some_and(|c| c.tags.contains(t)),
        };
        if !reaches || d.revoked || !d.enrolled || busy.contains(&d.name) {
            continue;
        }
        if let Some(commit) = d.commit.clone() {
            by_commit.entry(commit).or_default().push(d.name.clone());
        }
    }
    let mut tasks = vec![];
    for (commit, devices) in by_commit {
        let req = thymis_api::DeployRequest {
            devices,
            commit: Some(commit),
            message: Some(format!("secret {name} for {scope} changed")),
            ..Default::default()
        };
        tasks.push(start(ctl, req).await?);
    }
    Ok(tasks)
}

/// Cancels a deployment: every device that has not activated stops.
pub async fn cancel(ctl: &Arc<Controller>, task: i64) -> Result<()> {
    engine::cancel(ctl, task)?;
    for c in ctl.db.children(task)? {
        let _ = report(ctl, &c, Event::Cancelled, &Details::default())?;
    }
    refresh_task(ctl, task)
}

/// `thymisctl resume TASK`: a soaking rollout goes on to its next wave now; a halted
/// one goes on as a new deployment (at the project's HEAD, where the fix is) to its
/// devices that did not succeed, staged the same way. Returns the task that goes on.
pub async fn resume(ctl: &Arc<Controller>, task: i64) -> Result<i64> {
    let Some((staging, ..)) = ctl.db.task_rollout(task)? else { bail!("task {task} is not a staged rollout") };
    if engine::resume_soak(ctl, task)? {
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

/// `thymisctl activate TASK [--device D]...`: the deployment's devices (those named, or
/// all) switch now instead of waiting for the activation of a stage-only deployment or
/// for their window; those still copying switch when their copy ends. A hold on a
/// device still holds it: it switches once released.
pub async fn activate(ctl: &Arc<Controller>, task: i64, devices: &[String]) -> Result<thymis_api::Activated> {
    let children = ctl.db.children(task)?;
    if children.is_empty() {
        bail!("task {task} is not a deployment");
    }
    for name in devices {
        match children.iter().find(|c| &c.device == name) {
            None => bail!("device {name} is not part of task {task}"),
            Some(c) if c.stage.is_finished() || c.stage.activated() => {
                bail!("device {name} has already switched or finished in task {task}")
            }
            Some(_) => {}
        }
    }
    let chosen: Vec<ChildRow> = children
        .into_iter()
        .filter(|c| devices.is_empty() || devices.contains(&c.device))
        .filter(|c| !c.stage.is_finished() && !c.stage.activated())
        .collect();
    if chosen.is_empty() {
        bail!("no device of task {task} is waiting to switch");
    }
    let mut answer = thymis_api::Activated::default();
    for mut c in chosen {
        ctl.db.set_activate_now(c.id)?;
        c.activate_now = true;
        ctl.db.log(task, Some(c.id), &format!("{}: told to activate", c.device))?;
        match gate::waiting(ctl, &c)? {
            Some(thymis_api::Waiting::Hold { .. }) => answer.held.push(c.device.clone()),
            _ => answer.activating.push(c.device.clone()),
        }
        if c.stage == Stage::Staged {
            release_ready(ctl, Some(&c.device))?;
        }
    }
    // Recounted now: whoever asked sees the deployment running again at once.
    refresh_task(ctl, task)?;
    Ok(answer)
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
        let _ = engine::task_event(&ctl, task, TaskEvent::Started, None);
        match build::build_cached(&ctl, task, &commit, &config).await {
            Ok(system) => {
                // A build on its own prepares the deployment: it ends when the closure
                // is compressed, ready to be sent.
                let _ = ctl.db.log(task, None, "compressing the closure for deployment");
                ctl.notify_task(task);
                let t0 = std::time::Instant::now();
                if let Ok(n) = build::warm_nar_cache(&ctl, &system, &config).await {
                    let secs = t0.elapsed().as_secs_f64();
                    let _ = ctl.db.log(
                        task,
                        None,
                        &format!("compressed for deployment in {secs:.2} s ({n} paths and deltas)"),
                    );
                }
                let _ = ctl.db.set_task_system(task, &system.to_string());
                let _ = engine::task_event(&ctl, task, TaskEvent::Ended(TaskResult::Succeeded), None);
            }
            Err(e) => {
                let error = format!("{e:#}");
                let _ = engine::task_event(&ctl, task, TaskEvent::Ended(TaskResult::Failed), Some(&error));
            }
        }
    });
    Ok(task)
}
