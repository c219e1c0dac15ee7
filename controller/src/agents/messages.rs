//! What an authenticated agent sends, handled: reports (rate-limited), log lines,
//! replies routed to the deployment runners, stream messages, and the outcomes and
//! confirmations of deployments, which go to the engine.

use super::*;

/// Reports a device may send: a burst of [`ReportRate::BURST`], then one a second. One
/// that comes faster is not lost: the latest waits for the next heartbeat tick with a
/// free slot (each costs a database write, and a compromised device could send
/// thousands a second).
pub(super) struct ReportRate {
    tokens: f64,
    at: Instant,
    waiting: Option<DeviceReport>,
    warned: bool,
}

impl ReportRate {
    const BURST: f64 = 10.0;

    pub(super) fn new() -> ReportRate {
        ReportRate { tokens: Self::BURST, at: Instant::now(), waiting: None, warned: false }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64()).min(Self::BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The report to handle now, if it may be.
    pub(super) fn admit(&mut self, report: DeviceReport, device: &str) -> Option<DeviceReport> {
        if self.take() {
            self.waiting = None;
            return Some(report);
        }
        if !self.warned {
            warn!(%device, "reports faster than one a second: the latest is kept for the next heartbeat");
            self.warned = true;
        }
        self.waiting = Some(report);
        None
    }

    /// The report that waited, once it may be handled.
    pub(super) fn due(&mut self) -> Option<DeviceReport> {
        if self.waiting.is_some() && self.take() { self.waiting.take() } else { None }
    }
}

pub(super) async fn handle(ctl: &Arc<Controller>, conn: &Arc<Conn>, msg: ControllerBound) -> Result<()> {
    let device = &conn.device;
    match msg {
        ControllerBound::Report(report) => {
            let report = report.bounded();
            ctl.db.record_report(device, &report)?;
            maybe_confirm(ctl, conn, &report).await?;
            // Its hold may be gone (or its time zone opened a window): staged
            // deployments that may switch now go on.
            crate::deploy::release_ready(ctl, Some(device))?;
        }
        ControllerBound::Outcome(outcome) => {
            let outcome = outcome.bounded();
            record_outcome(ctl, device, &outcome)?;
            conn.send(AgentBound::OutcomeRecorded { deployment_id: outcome.deployment_id }).await;
        }
        ControllerBound::Log { deployment_id, line } => {
            // Only for this device's deployment in flight, and within its budget.
            let child = ctl.db.child_by_deployment(&deployment_id)?;
            let Some(child) = child.filter(|c| &c.device == device && !c.stage.is_finished()) else {
                debug!(%device, deployment = %deployment_id, "log line for no deployment in flight: dropped");
                return Ok(());
            };
            let line = cut_line(&line);
            match ctl.log_budget.take(child.id, line.len()) {
                LogBudget::Within => ctl.db.log(child.task, Some(child.id), &format!("{device}: {line}"))?,
                LogBudget::NowSpent => ctl.db.log(
                    child.task,
                    Some(child.id),
                    &format!("{device}: the deployment's log budget ({} KiB) is spent; further lines are dropped and counted", LOG_BUDGET >> 10),
                )?,
                LogBudget::Spent => return Ok(()),
            }
            ctl.notify_task(child.task);
        }
        m @ (ControllerBound::OfferAccepted { .. }
        | ControllerBound::OfferRefused { .. }
        | ControllerBound::Staged { .. }
        | ControllerBound::Substituting { .. }
        | ControllerBound::PathsMissing { .. }
        | ControllerBound::PathsLacking { .. }
        | ControllerBound::PathImported { .. }
        | ControllerBound::PathsImported { .. }
        | ControllerBound::PathRefused { .. }
        | ControllerBound::CacheAnswer { .. }) => {
            let id = match &m {
                ControllerBound::OfferAccepted { deployment_id }
                | ControllerBound::OfferRefused { deployment_id, .. }
                | ControllerBound::Staged { deployment_id, .. }
                | ControllerBound::Substituting { deployment_id, .. }
                | ControllerBound::PathsMissing { deployment_id, .. }
                | ControllerBound::PathsLacking { deployment_id, .. }
                | ControllerBound::PathImported { deployment_id, .. }
                | ControllerBound::PathsImported { deployment_id, .. }
                | ControllerBound::PathRefused { deployment_id, .. } => deployment_id.clone(),
                // A preview's question about the device's caches, by its own id.
                ControllerBound::CacheAnswer { query, .. } => query.clone(),
                _ => String::new(),
            };
            if !conn.route(&id, m) {
                debug!(%device, deployment = %id, "reply nobody waits for");
            }
        }
        ControllerBound::Heartbeat { .. } => {
            // "Last seen" to the minute: a write per heartbeat of every agent would keep
            // the database busy for nothing.
            let mut last = lock(&conn.last_touch);
            if last.elapsed() > Duration::from_secs(60) {
                *last = Instant::now();
                drop(last);
                // Off the connection's task: the database may be busy with a deployment.
                let (c, d) = (ctl.clone(), device.clone());
                tokio::task::spawn_blocking(move || c.db.touch_device(&d));
            }
        }
        ControllerBound::Error { mut message } => {
            // Logged cut, and at most ERRORS_LOGGED times per connection.
            let n = conn.errors_logged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n < ERRORS_LOGGED {
                thymis_proto::bounds::cut(&mut message, 512);
                warn!(%device, %message, "agent reported an error");
            } else if n == ERRORS_LOGGED {
                warn!(%device, "agent reported more errors: not logged until it connects again");
            }
        }
        ControllerBound::JournalEntries { stream, entries, dropped } => {
            if dropped > 0 {
                conn.streams.route(stream, FromDevice::Dropped(dropped));
            }
            conn.streams.route(stream, FromDevice::Entries(entries));
        }
        ControllerBound::TerminalOutput { stream, data } => {
            match base64::engine::general_purpose::STANDARD.decode(data) {
                Ok(bytes) => conn.streams.route(stream, FromDevice::Output(bytes)),
                Err(_) => bail!("terminal output that is not base64"),
            }
        }
        ControllerBound::StreamEnd { stream, exit_status, error } => {
            conn.streams.route(stream, FromDevice::End { exit_status, error })
        }
        ControllerBound::Held { deployment_id, mut reason } => {
            thymis_proto::bounds::cut(&mut reason, thymis_proto::bounds::MAX_NAME);
            record_held(ctl, device, &deployment_id, reason)?;
        }
        ControllerBound::Hello { .. } | ControllerBound::Auth { .. } => bail!("handshake message mid-session"),
    }
    Ok(())
}

/// A device that reports an activated deployment over this (new) connection gets it
/// confirmed, if the controller activated it and has no result for it yet. This holds
/// after a controller restart too: the database knows what was activated.
async fn maybe_confirm(ctl: &Arc<Controller>, conn: &Conn, report: &DeviceReport) -> Result<()> {
    let Some(p) = &report.pending else { return Ok(()) };
    let Some(child) = ctl.db.child_by_deployment(&p.deployment_id)? else {
        warn!(device = %conn.device, deployment = %p.deployment_id, "unknown deployment pending: not confirming");
        return Ok(());
    };
    let matches = child.device == conn.device
        && child.stage.activated()
        && child.system.as_deref() == Some(&p.system.to_string())
        && child.sequence == Some(p.sequence as i64);
    if !matches {
        warn!(device = %conn.device, deployment = %p.deployment_id, "pending deployment does not match: not confirming");
        return Ok(());
    }
    let confirmation = Confirmation {
        device: conn.device.clone(),
        deployment_id: p.deployment_id.clone(),
        system: p.system.clone(),
        sequence: p.sequence,
        session: conn.session.clone(),
    };
    match engine::report(ctl, &child, Event::Confirming, &Details::default())? {
        Ok(step) if step.effects.contains(&Effect::Confirm) => {}
        Ok(_) => return Ok(()),
        Err(refused) => {
            warn!(device = %conn.device, deployment = %p.deployment_id, "not confirming: {refused}");
            return Ok(());
        }
    }
    ctl.db.log(child.task, Some(child.id), &format!("{}: reconnected after activation; confirming", conn.device))?;
    ctl.notify_task(child.task);
    conn.send(AgentBound::Confirm { confirmation: Signed::sign(&confirmation, &ctl.identity) }).await;
    Ok(())
}

/// The device did not activate: an application on it holds updates. The deployment is
/// staged again, and goes on when the device reports the hold gone.
fn record_held(ctl: &Arc<Controller>, device: &str, deployment_id: &str, reason: String) -> Result<()> {
    let Some(child) = ctl.db.child_by_deployment(deployment_id)?.filter(|c| c.device == device) else {
        warn!(%device, deployment = %deployment_id, "held: not a deployment of this device");
        return Ok(());
    };
    let since = crate::db::now() as u64;
    let hold = thymis_api::HoldReport { reason: reason.clone(), since, overdue: false };
    ctl.db.set_device_hold(device, Some(&hold))?;
    let waiting = thymis_api::Waiting::Hold { reason: reason.clone(), since };
    let details = Details { waiting: Some(&waiting), ..Default::default() };
    if engine::report(ctl, &child, Event::Held, &details)?.is_ok() {
        ctl.db.log(child.task, Some(child.id), &format!("{device}: held on the device ({reason}): staged"))?;
    }
    Ok(())
}

fn record_outcome(ctl: &Arc<Controller>, device: &str, o: &Outcome) -> Result<()> {
    let Some(child) = ctl.db.child_by_deployment(&o.deployment_id)? else {
        warn!(%device, deployment = %o.deployment_id, "outcome for an unknown deployment");
        return Ok(());
    };
    if child.device != device {
        warn!(%device, deployment = %o.deployment_id, "outcome for another device's deployment ignored");
        return Ok(());
    }
    info!(%device, deployment = %o.deployment_id, result = ?o.result, reason = ?o.reason, "outcome");
    let details = Details {
        reason: o.reason.map(thymis_api::Reason::Device),
        error: o.error.as_deref(),
        failed_units: &o.failed_units,
        failed_checks: &o.failed_checks,
        unit_logs: Some(&o.unit_logs),
        phase: o.phase,
        ..Default::default()
    };
    if let Err(refused) = engine::report(ctl, &child, Event::Outcome(o.result), &details)? {
        // Already finished (a repeated report), or not the device's to say.
        debug!(%device, deployment = %o.deployment_id, "outcome not recorded: {refused}");
        return Ok(());
    }
    let mut line = format!("{device}: {}", o.result.as_str());
    if let Some(r) = o.reason {
        line.push_str(&format!(" ({})", r.as_str()));
    }
    if !o.failed_units.is_empty() {
        line.push_str(&format!("; failed units: {}", o.failed_units.join(", ")));
    }
    if !o.failed_checks.is_empty() {
        line.push_str(&format!("; failed health checks: {}", o.failed_checks.join(", ")));
    }
    if let Some(e) = &o.error {
        line.push_str(&format!(": {e}"));
    }
    ctl.db.log(child.task, Some(child.id), &line)?;
    Ok(())
}

/// The longest log line kept; the rest of a line is cut.
const LOG_LINE_MAX: usize = 4 << 10;

fn cut_line(line: &str) -> std::borrow::Cow<'_, str> {
    if line.len() <= LOG_LINE_MAX {
        return line.into();
    }
    let mut end = LOG_LINE_MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &line[..end], line.len() - end).into()
}
