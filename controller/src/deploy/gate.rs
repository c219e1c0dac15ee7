//! Whether a copied device may switch now. A device waits (in the stage `staged`, its
//! system kept on the device) while its deployment is stage-only and not yet activated, while it is outside its maintenance
//! window (the one given on deploy, else its configuration's or tag's in thymis.toml),
//! and while an application on it holds updates. `thymisctl activate` lifts the first
//! two; only the device lifts its hold (or the hold's maximum age).

use jiff::Timestamp;
use thymis_api::Waiting;

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
