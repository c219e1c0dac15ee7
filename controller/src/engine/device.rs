//! A device deployment's events, and their effects.

use std::sync::Arc;

use anyhow::Result;
use thymis_proto::AgentBound;
use tracing::debug;

use crate::controller::Controller;
use crate::db::{ChildRow, Details};
use crate::model::device::{Effect, Event, Refused, Step};

/// Applies `event` to `child`'s deployment and carries out its effects, but those that
/// need the caller's connection ([`Effect::Activate`], [`Effect::Confirm`]): the step,
/// or the machine's refusal (nothing changed then).
pub fn report(
    ctl: &Arc<Controller>,
    child: &ChildRow,
    event: Event,
    details: &Details<'_>,
) -> Result<Result<Step, Refused>> {
    let step = match ctl.db.advance(child.id, event, details)? {
        Ok(step) => step,
        Err(refused) => {
            debug!(device = %child.device, deployment = %child.deployment_id, "{refused}");
            return Ok(Err(refused));
        }
    };
    for effect in &step.effects {
        match effect {
            Effect::Activate | Effect::Confirm => {}
            Effect::TellCancel => {
                // Offered (perhaps over a connection since lost) and ended by the
                // controller: the device drops what it holds of it.
                if let Some(conn) = ctl.conn(&child.device) {
                    let id = child.deployment_id.clone();
                    tokio::spawn(async move { conn.send(AgentBound::Cancel { deployment_id: id }).await });
                }
            }
            Effect::CloseLogBudget => close_log_budget(ctl, child)?,
            Effect::SettleWave => super::rollout::settle_wave(ctl, child.task, child.wave)?,
        }
    }
    super::refresh_task_soon(ctl, child.task);
    Ok(Ok(step))
}

/// A device deployment ended: its log budget goes, saying what it dropped, if anything.
pub fn close_log_budget(ctl: &Controller, child: &ChildRow) -> Result<()> {
    if let Some((lines, bytes)) = ctl.log_budget.finish(child.id) {
        let line = format!("{}: {lines} log lines ({bytes} bytes) over the budget were dropped", child.device);
        ctl.db.log(child.task, Some(child.id), &line)?;
    }
    Ok(())
}
