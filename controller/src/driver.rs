//! Where every event of a device deployment goes: the copy, the agent connection,
//! cancel, supersede, a halted rollout, expiry and restart recovery report here, and
//! nowhere else. [`report`] applies the event through the machine
//! ([`crate::machine::next`], persisted by `Db::advance`, which only this module calls)
//! and then does what the transition asks of the world, in one place: a device whose
//! deployment ended before activation is told to drop it, and a finished deployment
//! gives back its log budget and has its task recomputed (here too: [`refresh_task`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use thymis_proto::AgentBound;
use tracing::debug;

use crate::controller::Controller;
use crate::db::{ChildRow, Details};
use crate::machine::{Event, Refused, Stage};
use crate::sync::lock;
use crate::task::deployment_state;

/// Applies `event` to `child`'s deployment: the new stage, or the machine's refusal
/// (nothing changed then).
pub fn report(
    ctl: &Arc<Controller>,
    child: &ChildRow,
    event: Event,
    details: &Details<'_>,
) -> Result<Result<Stage, Refused>> {
    let (before, after) = match ctl.db.advance(child.id, event, details)? {
        Ok(moved) => moved,
        Err(refused) => {
            debug!(device = %child.device, deployment = %child.deployment_id, "{refused}");
            return Ok(Err(refused));
        }
    };
    if let Stage::Finished(_) = after {
        // Offered (perhaps over a connection since lost) and ended by the controller: the
        // device drops what it holds of it.
        if matches!(before, Stage::Queued | Stage::Copying) && !matches!(event, Event::Outcome(_)) {
            if let Some(conn) = ctl.conn(&child.device) {
                let id = child.deployment_id.clone();
                tokio::spawn(async move { conn.send(AgentBound::Cancel { deployment_id: id }).await });
            }
        }
        close_log_budget(ctl, child)?;
    }
    refresh_task_soon(ctl, child.task);
    Ok(Ok(after))
}

/// A device deployment ended: its log budget goes, saying what it dropped, if anything.
pub fn close_log_budget(ctl: &Controller, child: &ChildRow) -> Result<()> {
    if let Some((lines, bytes)) = ctl.log_budget.finish(child.id) {
        let line = format!("{}: {lines} log lines ({bytes} bytes) over the budget were dropped", child.device);
        ctl.db.log(child.task, Some(child.id), &line)?;
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
