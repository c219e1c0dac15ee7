//! A task's events: its job's start and end, and a deployment's recount.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tracing::debug;

use crate::controller::Controller;
use crate::model::task::{Event, deployment_state};
use crate::sync::lock;

/// Applies `event` to a task (with `error` as its error, when given), and tells live
/// views. A refused event (a job that already ended) changes nothing.
pub fn task_event(ctl: &Controller, task: i64, event: Event, error: Option<&str>) -> Result<()> {
    if let Err(refused) = ctl.db.task_step(task, event, error)? {
        debug!(task, "{refused}");
    }
    ctl.notify_task(task);
    Ok(())
}

/// Recomputes a deployment's state soon (within 200 ms), once however many of its
/// devices change meanwhile: a deployment to thousands of devices would otherwise
/// recount its children thousands of times.
pub fn refresh_task_soon(ctl: &Arc<Controller>, task: i64) {
    if !lock(&ctl.pending.recounts).insert(task) {
        return;
    }
    let ctl = ctl.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        lock(&ctl.pending.recounts).remove(&task);
        let c = ctl.clone();
        let _ = tokio::task::spawn_blocking(move || refresh_task(&c, task)).await;
    });
}

/// Recomputes a deployment's state from its children.
pub fn refresh_task(ctl: &Controller, task: i64) -> Result<()> {
    recount(ctl, task, None)
}

/// The recount, with the error a halt gives the task.
pub(super) fn recount(ctl: &Controller, task: i64, error: Option<&str>) -> Result<()> {
    // A queued device that is online is about to be offered: the deployment is not
    // waiting for it.
    let online = ctl.online();
    let queued_online = ctl.db.queued_devices(task)?.iter().filter(|d| online.contains(*d)).count();
    let (state, result) = deployment_state(&ctl.db.child_counts(task)?, queued_online, ctl.db.task_stopped(task)?);
    task_event(ctl, task, Event::Recount { state, result }, error)
}
