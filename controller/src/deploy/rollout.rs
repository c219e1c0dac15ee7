//! A deployment's waves: offering each wave to its devices, the soak between waves,
//! halting when too many failed.

use super::deliver::{Delivering, deliver};
use super::*;

/// Offers the deployment to its queued devices that `pick` selects, and returns once
/// each was told to activate (or ended).
pub(super) async fn deliver_all(
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
pub(super) async fn drive_waves(
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
pub(super) fn halt_if_failed(
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
