//! Delivering one device deployment: claiming it, one attempt after another until it
//! ends, and the device's replies.

use super::copy::{Stop, send_to};
use super::*;

/// A device deployment this process is delivering: one delivery each (the task's run
/// and the pickup of devices connected here may both want it), until dropped.
pub(super) struct Delivering {
    ctl: Arc<Controller>,
    child: i64,
}

impl Delivering {
    pub(super) fn start(ctl: &Arc<Controller>, child: i64) -> Option<Delivering> {
        lock(&ctl.delivering).insert(child).then(|| Delivering { ctl: ctl.clone(), child })
    }
}

impl Drop for Delivering {
    fn drop(&mut self) {
        lock(&self.ctl.delivering).remove(&self.child);
    }
}

pub(super) fn is_over(ctl: &Controller, child: &ChildRow) -> Result<bool> {
    Ok(ctl.db.child(child.id)?.is_none_or(|c| c.stage.is_finished()))
}

pub(super) async fn deliver(
    ctl: &Arc<Controller>,
    limit: &Semaphore,
    child: ChildRow,
    system: StorePath,
    closure: Arc<Vec<PathInfo>>,
    commit: &str,
    reboot: bool,
) -> Result<()> {
    let mut connected = ctl.connected.subscribe();
    // Paths streamed whole whose acknowledgement the connection lost: if the device has
    // them on the next attempt, they count as sent (and are not sent again).
    let mut unacked: HashMap<StorePath, u64> = HashMap::new();
    let expires =
        ctl.db.task_expires(child.task)?.unwrap_or_else(|| now() + ctl.settings.deployment_ttl.as_secs() as i64);
    let mut offline = false;
    // The configuration's tags at the deployed commit: which tag's secrets it gets. A
    // deployment another controller made may be at a commit this one's project lacks:
    // then the tags its project has now.
    let toml = ctl.project.toml_at(commit).or_else(|_| ctl.project.toml_worktree()).unwrap_or_default();
    let tags = toml.configs.get(&child.config).map(|c| c.tags.clone()).unwrap_or_default();
    loop {
        if is_over(ctl, &child)? {
            return Ok(());
        }
        let Some(conn) = ctl.conn(&child.device) else {
            if !offline {
                // The deployment is waiting once only offline devices are left.
                offline = true;
                refresh_task_soon(ctl, child.task);
            }
            // Woken when any device connects; re-checks cancel and expiry each second.
            let _ = tokio::time::timeout(Duration::from_secs(1), connected.recv()).await;
            continue;
        };
        // Controllers sharing the database: one of them delivers at a time.
        if !ctl.db.claim_child(child.id, &ctl.instance, ctl.alive_since())? {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Left mid-copy by a controller that stopped: offered again from here (refused,
        // changing nothing, for one that is queued).
        let _ = report(ctl, &child, Event::Lost, &Details::default())?;
        if report(ctl, &child, Event::Offered, &Details::default())?.is_err() {
            return Ok(());
        }
        offline = false;
        let sequence = match child.sequence {
            Some(s) => s as u64,
            None => match ctl.db.child_by_deployment(&child.deployment_id)?.and_then(|c| c.sequence) {
                Some(s) => s as u64,
                None => {
                    let s = ctl.db.next_sequence()?;
                    ctl.db.set_child_sequence(child.id, s)?;
                    s
                }
            },
        };
        let offer = Offer {
            device: child.device.clone(),
            deployment_id: child.deployment_id.clone(),
            config: child.config.clone(),
            system: system.clone(),
            commit: Some(commit.to_owned()),
            sequence,
            expires: expires as u64,
            reboot,
            session: Some(conn.session.clone()),
            secrets: crate::secrets::for_device(ctl, &child.device, &child.config, &tags, &child.deployment_id)?,
        };
        // Up to `parallel` devices at a time (sending ten thousand offers at once was
        // slower: every delivery then contends for the database).
        let _permit = limit.acquire().await?;
        match send_to(ctl, &conn, &child, &offer, &closure, &mut unacked).await {
            Ok(()) => return Ok(()),
            Err(Stop::Refused(reason)) => {
                if report(ctl, &child, Event::Failed, &Details::error(&reason))?.is_ok() {
                    ctl.db.log(child.task, Some(child.id), &format!("{}: failed: {reason}", child.device))?;
                }
                return Ok(());
            }
            Err(Stop::Disconnected) => {
                let lost = report(ctl, &child, Event::Lost, &Details::default())?;
                // The device may come back through another controller, which finds it
                // queued once the claim is released.
                ctl.db.release_child(child.id, &ctl.instance)?;
                if lost.is_err() {
                    return Ok(());
                }
                ctl.db.log(child.task, Some(child.id), &format!("{}: connection lost; will resume", child.device))?;
                ctl.notify_task(child.task);
            }
        }
    }
}

/// Delivers `child` from here in the background (from its recorded system), unless this
/// process delivers it already; a delivery that cannot even start fails the device's
/// deployment with the reason.
pub(super) fn spawn_delivery(ctl: &Arc<Controller>, child: ChildRow) {
    let Some(delivering) = Delivering::start(ctl, child.id) else { return };
    let ctl = ctl.clone();
    tokio::spawn(async move {
        let _delivering = delivering;
        let row = child.clone();
        if let Err(e) = deliver_here(&ctl, child).await {
            warn!(child = row.id, "delivery failed: {e:#}");
            let _ = report(&ctl, &row, Event::Failed, &Details::error(&format!("{e:#}")));
        }
    });
}

/// Delivers a device deployment of another controller's task to its device connected
/// here: its closure from the recorded system.
async fn deliver_here(ctl: &Arc<Controller>, child: ChildRow) -> Result<()> {
    let Some((commit, reboot)) = ctl.db.task_commit(child.task)? else { return Ok(()) };
    let system = child.system.clone().context("not built")?;
    let system = build::present(&system).await?;
    build::warm_nar_cache(ctl, &system, &child.config);
    let closure = Arc::new(build::signed_closure(ctl, &system).await?);
    deliver(ctl, &ctl.adopted, child, system, closure, &commit, reboot).await
}

/// Staged device deployments that may switch now go on: queued again (with a
/// deployment's lifetime from now), offered again over the device's connection (nothing
/// is left to copy) and activated. Of `device` (it reported: its hold may be gone), or
/// of every device connected here (the sweep: windows that opened). A device connected
/// elsewhere is the business of the controller it is connected to.
pub fn release_ready(ctl: &Arc<Controller>, device: Option<&str>) -> Result<()> {
    for child in ctl.db.staged_children(device)? {
        let wait = super::gate::waiting(ctl, &child)?;
        let connected = ctl.conn(&child.device).is_some();
        match wait {
            Some(w) => ctl.db.set_waiting(child.id, &w)?,
            None if !connected => ctl.db.set_waiting(child.id, &thymis_api::Waiting::Connection)?,
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
