//! Whether a copied device may switch now, and letting staged devices go on once they
//! may. A device waits (in the stage `staged`, its system kept on the device) while its
//! deployment is stage-only and not yet activated, while it is outside its maintenance
//! window (the one given on deploy, else its configuration's or tag's in thymis.toml),
//! and while an application on it holds updates. `thymisctl activate` lifts the first
//! two; only the device lifts its hold (or the hold's maximum age).

use jiff::Timestamp;
use thymis_api::Waiting;

use super::deliver::spawn_delivery;
use super::*;
use crate::model::window::{Now, Window};

/// Why `child` may not switch now; `None` when it may.
pub(super) fn waiting(ctl: &Controller, child: &ChildRow) -> Result<Option<Waiting>> {
    let device = ctl.db.device(&child.device)?;
    if !child.activate_now {
        if ctl.db.task_stage_only(child.task)? {
            return Ok(Some(Waiting::Activation));
        }
        if let Some(spec) = child.window.clone() {
            let zone = device.as_ref().and_then(|d| d.time_zone.clone());
            match Window::parse(&spec)?.at(Timestamp::now(), zone.as_deref()) {
                Now::Open { .. } => {}
                Now::Closed { opens } => return Ok(Some(Waiting::Window { window: spec, opens: opens.as_second() })),
            }
        }
    }
    if let Some(hold) = device.and_then(|d| d.info.hold).filter(|h| !h.overdue) {
        return Ok(Some(Waiting::Hold { reason: hold.reason, since: hold.since }));
    }
    Ok(None)
}

/// Staged device deployments that may switch now go on: queued again (with a
/// deployment's lifetime from now), offered again over the device's connection (nothing
/// is left to copy) and activated. Of `device` (it reported: its hold may be gone), or
/// of every device connected here (the sweep: windows that opened). A device connected
/// elsewhere is the business of the controller it is connected to.
pub fn release_ready(ctl: &Arc<Controller>, device: Option<&str>) -> Result<()> {
    for child in ctl.db.staged_children(device)? {
        let wait = waiting(ctl, &child)?;
        let connected = ctl.conn(&child.device).is_some();
        match wait {
            Some(w) => ctl.db.set_waiting(child.id, &w)?,
            None if !connected => ctl.db.set_waiting(child.id, &Waiting::Connection)?,
            None => go(ctl, child)?,
        }
    }
    Ok(())
}

fn go(ctl: &Arc<Controller>, child: ChildRow) -> Result<()> {
    if report(ctl, &child, Event::Go, &Details::default())?.is_err() {
        return Ok(());
    }
    ctl.db.extend_task_expiry(child.task, now() + ctl.settings.deployment_ttl.as_secs() as i64)?;
    ctl.db.log(child.task, Some(child.id), &format!("{}: may switch now", child.device))?;
    spawn_delivery(ctl, child);
    Ok(())
}

/// Stops a copied device before its switch: the device keeps the system (an agent
/// before staging is not told, and keeps it only until its next garbage collection),
/// and the deployment is staged, saying why.
pub(super) async fn stage(
    ctl: &Arc<Controller>,
    conn: &Conn,
    child: &ChildRow,
    waiting: &Waiting,
    rx: &mut mpsc::UnboundedReceiver<ControllerBound>,
) -> Result<(), copy::Stop> {
    use copy::Stop;
    let id = &child.deployment_id;
    let mut reboot_needed = None;
    if conn.protocol >= thymis_proto::STAGING_PROTOCOL {
        if !conn.send(AgentBound::Stage { deployment_id: id.clone() }).await {
            return Err(Stop::Disconnected);
        }
        match copy::reply(rx, ctl.settings.reply_timeout).await? {
            ControllerBound::Staged { reboot_needed: r, .. } => reboot_needed = r,
            other => return Err(Stop::Refused(format!("unexpected reply to staging: {other:?}"))),
        }
    }
    let details = Details { waiting: Some(waiting), reboot_needed: reboot_needed.as_deref(), ..Default::default() };
    if let Ok(Ok(_)) = report(ctl, child, Event::Stage, &details) {
        let mut line = format!("{}: {}", child.device, waiting.describe());
        if let Some(r) = &reboot_needed {
            line.push_str(&format!("; reboot needed: {r}"));
        }
        let _ = ctl.db.log(child.task, Some(child.id), &line);
    }
    Ok(())
}
