//! Offering a deployment (or one wave of a staged rollout, as the engine releases it)
//! to its devices, `--parallel` at a time. When the next wave goes, its soak and the
//! halt are the rollout's machine (`crate::model::rollout`), run by the engine.

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
