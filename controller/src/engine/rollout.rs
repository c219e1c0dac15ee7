//! A staged rollout's events, and their actions: a wave's last device finishing
//! ([`settle_wave`], from a device's step), a soak's end (a timer, or [`tick`] after a
//! restart), `thymisctl resume`, cancel, and the deployment's systems being built
//! ([`start_rollout`]). Nothing polls: each is raised where it happens.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use thymis_api::Reason;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::controller::Controller;
use crate::db::{Details, now, result_str};
use crate::model::device::{self, Stage};
use crate::model::rollout::{Action, Event, Rollout};
use crate::model::task::Stopped;
use crate::sync::lock;

/// Applies `event` to `task`'s rollout and carries out its actions. Returns the new
/// state, or `None` when the event was refused (or the task has no rollout).
fn raise(ctl: &Arc<Controller>, task: i64, event: Event) -> Result<Option<Rollout>> {
    let (state, actions) = match ctl.db.rollout_step(task, event, now())? {
        Some(Ok(step)) => step,
        Some(Err(refused)) => {
            debug!(task, "{refused}");
            return Ok(None);
        }
        None => return Ok(None),
    };
    for action in actions {
        match action {
            Action::Log(line) => ctl.db.log(task, None, &line)?,
            Action::Release { wave, label } => release(ctl, task, wave, &label)?,
            Action::WakeAt(until) => wake_at(ctl, task, until),
            Action::Halt(why) => {
                warn!(task, "{why}");
                let halted = Details { reason: Some(Reason::Halted), ..Default::default() };
                for c in ctl.db.children(task)?.iter().filter(|c| c.stage == Stage::Waiting) {
                    let _ = super::report(ctl, c, device::Event::Halted, &halted)?;
                }
                super::task::recount(ctl, task, Some(&why))?;
            }
        }
    }
    if matches!(state, Rollout::Done | Rollout::Halted | Rollout::Cancelled) {
        // The run delivering its waves ends once it has delivered what it was sent.
        lock(&ctl.pending.waves).remove(&task);
    }
    ctl.notify_task(task);
    Ok(Some(state))
}

/// Offers a wave: its waiting devices are queued, the deployment's run here delivers
/// it, and a wave with nothing left to do (its devices failed to build) settles at once.
fn release(ctl: &Arc<Controller>, task: i64, wave: usize, label: &str) -> Result<()> {
    let of_wave: Vec<_> = ctl.db.children(task)?.into_iter().filter(|c| c.wave == wave).collect();
    for c in of_wave.iter().filter(|c| c.stage == Stage::Waiting) {
        let _ = super::report(ctl, c, device::Event::Release, &Details::default())?;
    }
    let names: Vec<&str> = of_wave.iter().map(|c| c.device.as_str()).collect();
    ctl.db.log(task, None, &format!("{label}: {}", names.join(", ")))?;
    send_wave(ctl, task, wave);
    settle_wave(ctl, task, wave)
}

/// Hands wave `wave` to the deployment's run in this process (if it runs here; the
/// controller carrying the task learns of a wave another one released at its next
/// [`tick`]).
fn send_wave(ctl: &Controller, task: i64, wave: usize) {
    if let Some(run) = lock(&ctl.pending.waves).get_mut(&task) {
        if run.last.is_none_or(|l| l < wave) && run.tx.send(wave).is_ok() {
            run.last = Some(wave);
        }
    }
}

/// A device of `wave` finished: when it was the wave's last, the wave settles.
pub(super) fn settle_wave(ctl: &Arc<Controller>, task: i64, wave: usize) -> Result<()> {
    if ctl.db.task_rollout(task)?.is_none() || ctl.db.open_in_wave(task, wave)? > 0 {
        return Ok(());
    }
    let failed = failures(ctl, task, false)?;
    raise(ctl, task, Event::WaveSettled { wave, failed })?;
    Ok(())
}

/// Ends the soak after `wave` (refused, changing nothing, when it is over already).
fn soak_over(ctl: &Arc<Controller>, task: i64, wave: usize) -> Result<Option<Rollout>> {
    let failed = failures(ctl, task, true)?;
    raise(ctl, task, Event::SoakOver { wave, failed })
}

fn wake_at(ctl: &Arc<Controller>, task: i64, until: i64) {
    let ctl = ctl.clone();
    tokio::spawn(async move {
        let wait = (until - now()).max(0) as u64;
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let Ok(Some((_, wave, Some(u)))) = ctl.db.task_rollout(task) else { return };
        if u == until {
            let c = ctl.clone();
            let _ = tokio::task::spawn_blocking(move || soak_over(&c, task, wave)).await;
        }
    });
}

/// The rollout's failed devices so far, described (after a soak also those that left
/// the system they were deployed: a rollback after their confirmation).
fn failures(ctl: &Controller, task: i64, after_soak: bool) -> Result<Vec<String>> {
    let children = ctl.db.children(task)?;
    let devices: HashMap<String, Option<String>> = if after_soak {
        ctl.db.devices()?.into_iter().map(|d| (d.name.clone(), d.system.clone())).collect()
    } else {
        HashMap::new()
    };
    let mut failed = vec![];
    for c in &children {
        match c.stage {
            Stage::Finished(r) if thymis_api::rollout::is_failure(r) => {
                failed.push(format!("{} {}", c.device, result_str(r)));
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
    Ok(failed)
}

/// The deployment's systems are built: its rollout goes on from where it is, its
/// waves handed to the returned receiver as they are released (it ends with the
/// rollout).
pub fn start_rollout(ctl: &Arc<Controller>, task: i64) -> Result<mpsc::UnboundedReceiver<usize>> {
    let (tx, rx) = mpsc::unbounded_channel();
    lock(&ctl.pending.waves).insert(task, crate::pending::Run { tx, last: None });
    if raise(ctl, task, Event::Start)?.is_none() {
        lock(&ctl.pending.waves).remove(&task);
    }
    Ok(rx)
}

/// Cancels a deployment: it stops (its rollout too); its devices that have not
/// activated are told by the caller.
pub fn cancel(ctl: &Arc<Controller>, task: i64) -> Result<()> {
    if raise(ctl, task, Event::Cancel)?.is_none() {
        ctl.db.set_task_stopped(task, Stopped::Cancelled)?;
    }
    lock(&ctl.pending.waves).remove(&task);
    Ok(())
}

/// `thymisctl resume` during a soak: the next wave now. Whether it was soaking.
pub fn resume_soak(ctl: &Arc<Controller>, task: i64) -> Result<bool> {
    let Some((_, wave, Some(_))) = ctl.db.task_rollout(task)? else { return Ok(false) };
    if ctl.db.task_stopped(task)?.is_some() {
        return Ok(false);
    }
    ctl.db.log(task, None, "soak ended early (resumed)")?;
    Ok(soak_over(ctl, task, wave)?.is_some())
}

/// The periodic sweep's part, for this controller's staged rollouts: soaks whose time
/// came (their timer was lost with a restart), and waves another controller released
/// (it finished their last device), handed to the run here.
pub fn tick(ctl: &Arc<Controller>, tasks: &[i64]) -> Result<()> {
    for &task in tasks {
        let Some((_, wave, soak_until)) = ctl.db.task_rollout(task)? else { continue };
        if ctl.db.task_stopped(task)?.is_some() {
            continue;
        }
        match soak_until {
            Some(until) if until <= now() => drop(soak_over(ctl, task, wave)?),
            Some(_) => {}
            None => send_wave(ctl, task, wave),
        }
    }
    Ok(())
}
