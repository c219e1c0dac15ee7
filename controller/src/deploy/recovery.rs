//! What time and restarts end or carry on: expiry, recovery after this controller
//! restarts, and the work of a controller that stopped.

use super::deliver::spawn_delivery;
use super::*;

/// Ends what is past its deployment's expiry: queued devices `expired`, activated
/// devices never heard from `unreachable` (their agents roll back by themselves). Only
/// this controller's own tasks, whose expiry its own clock set (another controller's
/// are its own business while it is alive, and this one's once it carries them on).
pub fn sweep(ctl: &Arc<Controller>) -> Result<()> {
    let t = now();
    let open = ctl.db.open_tasks(&ctl.instance)?;
    let deployments: Vec<i64> = open.iter().filter(|(_, kind, _)| kind == "deployment").map(|(t, ..)| *t).collect();
    engine::tick(ctl, &deployments)?;
    // Windows that opened: their staged devices connected here go on.
    super::deliver::release_ready(ctl, None)?;
    for (task, kind, expires) in open {
        if kind != "deployment" || expires.is_none_or(|e| e > t) {
            continue;
        }
        let children = ctl.db.children(task)?;
        // Staged devices wait as long as their activation, window or hold takes, and
        // the later waves behind them with them: such a deployment does not expire (it
        // gets a lifetime again when they go on).
        if children.iter().any(|c| c.stage == Stage::Staged) {
            continue;
        }
        for c in children {
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
            Some(c) if c.stage.is_finished() => engine::close_log_budget(ctl, &c)?,
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
            engine::task_event(ctl, task, TaskEvent::Interrupted, Some("interrupted by a controller restart"))?;
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
            engine::task_event(ctl, task, TaskEvent::Interrupted, Some(&why))?;
            continue;
        }
        ctl.db.log(task, None, &format!("controller {from} stopped; controller {me} carries on"))?;
        if let Some((commit, reboot)) = ctl.db.task_commit(task)? {
            spawn_run(ctl, task, commit, reboot);
        }
    }
    for child in ctl.db.deliverable_here(me, ctl.alive_since())? {
        spawn_delivery(ctl, child);
    }
    Ok(())
}
