//! The life of one deployment on the device, as a pure state machine.
//!
//! ```text
//!             exit 0/4             checks passed               confirmed            commit ok
//! Activating ─────────▶ Checking ─────────▶ AwaitingConfirmation ─────▶ Committing ─────────▶ succeeded[-with-failed-units|checks]
//!     │ other exit          │ a required check      │ deadline / asked          │ commit failed
//!     ▼                     ▼ failed                ▼                           ▼
//! RollingBack(reason) ◀─────┴───────────────────────┴───────────────────────────┘
//!     ├─ ok ─▶ rolled-back(reason)        (no previous generation: failed)
//!     └─ err ▶ rollback-failed
//! Activating / Rebooting / AwaitingConfirmation ── booted another boot, unplanned ──▶ RollingBack(rebooted-unconfirmed)
//!                                      (finished rolled-back at once when there is no previous system)
//! Committing ── booted the new system ──▶ Committing again; the previous ──▶ RollingBack
//! RollingBack ── any boot ──▶ RollingBack again (the rollback is idempotent)
//! Committing / RollingBack ── the system was changed on the device by someone else ──▶ failed(changed-on-device)
//!
//! reboot deployments (a part only a boot applies changed, or asked; or `test` exited 100):
//! Activating ── prepared (profile, boot entry, one-shot) ──▶ Rebooting ── booted the new system ──▶ Checking
//!     └── the loader's files give no way back ──▶ RollingBack(no-safe-reboot) ──▶ failed(no-safe-reboot)
//!                                                               ├── booted something else ──▶ RollingBack(activation-failed)
//!                                                               └── reboot command failed ──▶ RollingBack(activation-failed)
//! ```
//!
//! [`step`] decides; the agent performs the returned [`Action`] and persists the new
//! [`Stage`] before acting on it.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use thymis_proto::{DeviceResult, Phase, RollbackReason};

/// Where a deployment that has started activating is. Persisted in `pending.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "kebab-case")]
pub enum Stage {
    Activating,
    /// Rebooting into the new system (a planned reboot).
    Rebooting,
    /// Running the new system's health checks (`crate::health`).
    Checking {
        failed_units: Vec<String>,
    },
    AwaitingConfirmation {
        failed_units: Vec<String>,
        /// Wanted health checks that failed (required ones roll back).
        #[serde(default)]
        failed_checks: Vec<String>,
    },
    Committing {
        failed_units: Vec<String>,
        #[serde(default)]
        failed_checks: Vec<String>,
    },
    RollingBack {
        reason: RollbackReason,
        error: Option<String>,
    },
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `switch-to-configuration test` ended; `None` when it died without an exit code.
    ActivationExited {
        code: Option<i32>,
        failed_units: Vec<String>,
        output: String,
    },
    Confirmed,
    DeadlinePassed,
    RollbackAsked,
    /// The device runs another boot than the one it activated in, without a planned
    /// reboot; `runs_new` when that boot runs the new system.
    BootedElsewhere {
        runs_new: bool,
    },
    /// A reboot deployment's profile and boot entries are ready (or failed to be).
    RebootPrepared(Result<(), String>),
    /// Preparing the reboot found no way back in the boot loader's files (or nothing
    /// that resets a generation that hangs): the reboot would not be safe.
    RebootUnsafe(String),
    /// The reboot command failed: the device still runs the system it ran.
    RebootFailed(String),
    /// The planned reboot happened; `runs_new` when it came up on the new system.
    Rebooted {
        runs_new: bool,
    },
    /// Someone changed the system on the device (its profile or running system is
    /// neither the new nor the previous one): it is theirs now.
    ChangedOnDevice(String),
    CommitFinished(Result<(), String>),
    RollbackFinished(Result<(), String>),
    /// The health checks ended: a required one that still failed at the deadline
    /// (its name and the end of its output), and the wanted ones that did.
    ChecksFinished {
        required_failed: Option<String>,
        wanted_failed: Vec<String>,
    },
}

/// The terminal result parts the agent reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub result: DeviceResult,
    pub reason: Option<RollbackReason>,
    pub phase: Option<Phase>,
    pub error: Option<String>,
    pub failed_units: Vec<String>,
    pub failed_checks: Vec<String>,
}

/// What the agent must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the new system's health checks, until their deadline.
    RunChecks,
    /// Start (or keep) the confirmation deadline and reach the controller anew.
    AwaitConfirmation,
    /// Make the new system permanent: profile generation and boot entry.
    Commit,
    /// Re-activate the previous system.
    Rollback,
    /// Reboot into the new system.
    Reboot,
    /// Prepare a reboot into the new system (`switch-to-configuration test` changed
    /// nothing: exit 100, "takes effect after a reboot").
    PrepareReboot,
    /// Done: report this result and forget the pending state.
    Finish(Finish),
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{event} is not allowed while {stage}")]
pub struct NotAllowed {
    pub stage: String,
    pub event: String,
}

/// The next stage (`None` once finished) and the action to perform.
pub fn step(stage: &Stage, event: Event, has_previous: bool) -> Result<(Option<Stage>, Action), NotAllowed> {
    use Event as E;
    use Stage as S;
    let rollback = |reason, error| {
        if has_previous {
            (Some(S::RollingBack { reason, error }), Action::Rollback)
        } else {
            // A first deployment has nothing to go back to.
            let error = Some(error.unwrap_or_else(|| "activation failed".into()));
            let reason = (reason == RollbackReason::NoSafeReboot).then_some(reason);
            (None, Action::Finish(finish(DeviceResult::Failed, reason, Some(Phase::Activate), error, vec![])))
        }
    };
    Ok(match (stage, event) {
        // NixOS's switch-to-configuration: "won't take effect until you reboot", nothing changed.
        (S::Activating, E::ActivationExited { code: Some(100), .. }) => (Some(S::Activating), Action::PrepareReboot),
        (S::Activating, E::ActivationExited { code: Some(0 | 4), failed_units, .. }) => {
            (Some(S::Checking { failed_units }), Action::RunChecks)
        }
        (S::Checking { .. }, E::ChecksFinished { required_failed: Some(why), .. }) => {
            rollback(RollbackReason::HealthCheckFailed, Some(why))
        }
        (S::Checking { failed_units }, E::ChecksFinished { required_failed: None, wanted_failed }) => (
            Some(S::AwaitingConfirmation { failed_units: failed_units.clone(), failed_checks: wanted_failed }),
            Action::AwaitConfirmation,
        ),
        (S::Activating, E::ActivationExited { code, output, .. }) => {
            let how = code.map_or("was killed".to_owned(), |c| format!("exited {c}"));
            let tail = output.trim();
            let error = if tail.is_empty() { format!("activation {how}") } else { format!("activation {how}: {tail}") };
            rollback(RollbackReason::ActivationFailed, Some(error))
        }
        // The boot default already named the new system (no one-shot boot entry).
        (
            S::Activating | S::Rebooting | S::Checking { .. } | S::AwaitingConfirmation { .. },
            E::BootedElsewhere { runs_new: true },
        ) => rollback(RollbackReason::RebootedUnconfirmed, None),
        (S::Activating, E::RebootPrepared(Ok(()))) => (Some(S::Rebooting), Action::Reboot),
        (S::Activating, E::RebootUnsafe(why)) => rollback(RollbackReason::NoSafeReboot, Some(why)),
        (S::Activating, E::RebootPrepared(Err(e))) => {
            rollback(RollbackReason::ActivationFailed, Some(format!("preparing the reboot failed: {e}")))
        }
        (S::Rebooting, E::Rebooted { runs_new: true }) => {
            (Some(S::Checking { failed_units: vec![] }), Action::RunChecks)
        }
        (S::Rebooting, E::RebootFailed(e)) => rollback(
            RollbackReason::ActivationFailed,
            Some(format!("the reboot into the new system did not happen: {e}")),
        ),
        (S::Rebooting, E::Rebooted { runs_new: false }) => {
            rollback(RollbackReason::ActivationFailed, Some("the new system did not come up after the reboot".into()))
        }
        // Back on the previous system, which the profile and the boot loader may not
        // name yet (a power loss while preparing a reboot): the rollback makes them.
        (
            S::Activating | S::Rebooting | S::Checking { .. } | S::AwaitingConfirmation { .. },
            E::BootedElsewhere { runs_new: false },
        ) if has_previous => rollback(RollbackReason::RebootedUnconfirmed, None),
        (
            S::Activating | S::Rebooting | S::Checking { .. } | S::AwaitingConfirmation { .. },
            E::BootedElsewhere { runs_new: false },
        ) => (
            None,
            Action::Finish(finish(
                DeviceResult::RolledBack,
                Some(RollbackReason::RebootedUnconfirmed),
                None,
                None,
                vec![],
            )),
        ),
        // A power loss while committing: a new system that came up is the confirmed one
        // (commit again); the previous one means the device runs what it ran before the
        // deployment, which its profile and boot default must name again.
        (S::Committing { failed_units, failed_checks }, E::BootedElsewhere { runs_new: true }) => (
            Some(S::Committing { failed_units: failed_units.clone(), failed_checks: failed_checks.clone() }),
            Action::Commit,
        ),
        (S::Committing { .. }, E::BootedElsewhere { runs_new: false }) => rollback(
            RollbackReason::RebootedUnconfirmed,
            Some("the device restarted while making the new system permanent, into the previous system".into()),
        ),
        // A power loss while rolling back: the rollback is finished again (it is idempotent).
        (S::RollingBack { reason, error }, E::BootedElsewhere { .. }) => {
            (Some(S::RollingBack { reason: *reason, error: error.clone() }), Action::Rollback)
        }
        (S::AwaitingConfirmation { failed_units, failed_checks }, E::Confirmed) => (
            Some(S::Committing { failed_units: failed_units.clone(), failed_checks: failed_checks.clone() }),
            Action::Commit,
        ),
        (S::AwaitingConfirmation { .. }, E::DeadlinePassed) => rollback(RollbackReason::Unconfirmed, None),
        (S::AwaitingConfirmation { .. }, E::RollbackAsked) => rollback(RollbackReason::Asked, None),
        (S::Committing { failed_units, failed_checks }, E::CommitFinished(Ok(()))) => {
            let result = if !failed_units.is_empty() {
                DeviceResult::SucceededWithFailedUnits
            } else if !failed_checks.is_empty() {
                DeviceResult::SucceededWithFailedChecks
            } else {
                DeviceResult::Succeeded
            };
            let mut f = finish(result, None, None, None, failed_units.clone());
            f.failed_checks = failed_checks.clone();
            (None, Action::Finish(f))
        }
        (S::Committing { .. }, E::CommitFinished(Err(e))) => {
            rollback(RollbackReason::ActivationFailed, Some(format!("making the system permanent failed: {e}")))
        }
        // Nothing new ever ran: the deployment failed, and the device is as it was.
        (S::RollingBack { reason: RollbackReason::NoSafeReboot, error }, E::RollbackFinished(Ok(()))) => (
            None,
            Action::Finish(finish(
                DeviceResult::Failed,
                Some(RollbackReason::NoSafeReboot),
                Some(Phase::Activate),
                error.clone(),
                vec![],
            )),
        ),
        (S::RollingBack { reason, error }, E::RollbackFinished(Ok(()))) => {
            (None, Action::Finish(finish(DeviceResult::RolledBack, Some(*reason), None, error.clone(), vec![])))
        }
        (S::RollingBack { reason, error }, E::RollbackFinished(Err(e))) => {
            let error = Some(match error {
                Some(first) => format!("{first}; then the rollback failed: {e}"),
                None => format!("rollback failed: {e}"),
            });
            (None, Action::Finish(finish(DeviceResult::RollbackFailed, Some(*reason), None, error, vec![])))
        }
        // Never touch what a person chose on the device; the deployment ends there.
        (S::Committing { .. } | S::RollingBack { .. }, E::ChangedOnDevice(why)) => (
            None,
            Action::Finish(finish(
                DeviceResult::Failed,
                Some(RollbackReason::ChangedOnDevice),
                None,
                Some(why),
                vec![],
            )),
        ),
        (stage, event) => {
            return Err(NotAllowed { stage: format!("{stage:?}"), event: format!("{event:?}") });
        }
    })
}

/// The event that a start in another boot than the deployment's brings, from the
/// persisted stage, whether the agent rebooted on purpose, and what the device runs.
pub fn after_boot(stage: &Stage, planned_reboot: bool, runs_new: bool, runs_previous: bool) -> Event {
    match (stage, planned_reboot) {
        (Stage::Rebooting, true) => Event::Rebooted { runs_new },
        (Stage::RollingBack { .. }, true) => Event::RollbackFinished(if runs_previous {
            Ok(())
        } else {
            Err("after the reboot the device does not run the previous system".into())
        }),
        // Unplanned (a power loss, a crash): whatever the loader booted.
        _ => Event::BootedElsewhere { runs_new },
    }
}

fn finish(
    result: DeviceResult,
    reason: Option<RollbackReason>,
    phase: Option<Phase>,
    error: Option<String>,
    failed_units: Vec<String>,
) -> Finish {
    Finish { result, reason, phase, error, failed_units, failed_checks: vec![] }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: Option<i32>, units: &[&str]) -> Event {
        Event::ActivationExited {
            code,
            failed_units: units.iter().map(|u| u.to_string()).collect(),
            output: "boom".into(),
        }
    }

    fn finished(a: Action) -> Finish {
        match a {
            Action::Finish(f) => f,
            other => panic!("expected Finish, got {other:?}"),
        }
    }

    fn checked(wanted_failed: &[&str]) -> Event {
        Event::ChecksFinished {
            required_failed: None,
            wanted_failed: wanted_failed.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn happy_path_with_failed_units_succeeds_with_their_names() {
        let (s, a) = step(&Stage::Activating, exited(Some(4), &["demo.service"]), true).expect("ok");
        assert_eq!(a, Action::RunChecks, "the health checks come before the confirmation");
        let (s, a) = step(&s.expect("stage"), checked(&[]), true).expect("ok");
        assert_eq!(a, Action::AwaitConfirmation);
        let (s, a) = step(&s.expect("stage"), Event::Confirmed, true).expect("ok");
        assert_eq!(a, Action::Commit);
        let (s, a) = step(&s.expect("stage"), Event::CommitFinished(Ok(())), true).expect("ok");
        assert_eq!(s, None);
        let f = finished(a);
        assert_eq!(f.result, DeviceResult::SucceededWithFailedUnits);
        assert_eq!(f.failed_units, ["demo.service"]);
    }

    #[test]
    fn a_required_check_rolls_back_and_wanted_ones_are_named_in_the_result() {
        let checking = Stage::Checking { failed_units: vec![] };
        let failed = Event::ChecksFinished {
            required_failed: Some("health check page failed: exited 1".into()),
            wanted_failed: vec![],
        };
        let (s, a) = step(&checking, failed, true).expect("ok");
        assert_eq!(a, Action::Rollback);
        let (_, a) = step(&s.expect("stage"), Event::RollbackFinished(Ok(())), true).expect("ok");
        let f = finished(a);
        assert_eq!((f.result, f.reason), (DeviceResult::RolledBack, Some(RollbackReason::HealthCheckFailed)));
        assert!(f.error.expect("error").contains("health check page failed"));

        let (s, a) = step(&checking, checked(&["sensor"]), true).expect("ok");
        assert_eq!(a, Action::AwaitConfirmation);
        let (s, _) = step(&s.expect("stage"), Event::Confirmed, true).expect("ok");
        let (_, a) = step(&s.expect("stage"), Event::CommitFinished(Ok(())), true).expect("ok");
        let f = finished(a);
        assert_eq!((f.result, f.failed_checks), (DeviceResult::SucceededWithFailedChecks, vec!["sensor".to_owned()]));

        // A reboot deployment checks after the boot into the new system.
        let (s, a) = step(&Stage::Rebooting, Event::Rebooted { runs_new: true }, true).expect("ok");
        assert_eq!((s, a), (Some(checking), Action::RunChecks));
    }

    #[test]
    fn failed_activation_rolls_back_or_fails_on_a_first_deployment() {
        let (s, a) = step(&Stage::Activating, exited(Some(1), &[]), true).expect("ok");
        assert_eq!(a, Action::Rollback);
        let (_, a) = step(&s.expect("stage"), Event::RollbackFinished(Ok(())), true).expect("ok");
        let f = finished(a);
        assert_eq!((f.result, f.reason), (DeviceResult::RolledBack, Some(RollbackReason::ActivationFailed)));
        assert!(f.error.expect("error").contains("exited 1: boom"));

        let (s, a) = step(&Stage::Activating, exited(None, &[]), false).expect("ok");
        assert_eq!(s, None);
        let f = finished(a);
        assert_eq!((f.result, f.phase), (DeviceResult::Failed, Some(Phase::Activate)));
    }

    #[test]
    fn deadline_asked_and_reboot() {
        let waiting = Stage::AwaitingConfirmation { failed_units: vec![], failed_checks: vec![] };
        for (event, reason) in
            [(Event::DeadlinePassed, RollbackReason::Unconfirmed), (Event::RollbackAsked, RollbackReason::Asked)]
        {
            let (s, a) = step(&waiting, event, true).expect("ok");
            assert_eq!(a, Action::Rollback);
            let (_, a) = step(&s.expect("stage"), Event::RollbackFinished(Err("disk".into())), true).expect("ok");
            let f = finished(a);
            assert_eq!((f.result, f.reason), (DeviceResult::RollbackFailed, Some(reason)));
        }
        let (s, a) = step(&waiting, Event::BootedElsewhere { runs_new: false }, true).expect("ok");
        assert_eq!(a, Action::Rollback, "the profile may name the unconfirmed system: the rollback names the previous");
        assert!(matches!(s, Some(Stage::RollingBack { reason: RollbackReason::RebootedUnconfirmed, .. })));
        let (_, a) = step(&waiting, Event::BootedElsewhere { runs_new: false }, false).expect("ok");
        assert_eq!(finished(a).reason, Some(RollbackReason::RebootedUnconfirmed));
        let (s, a) = step(&waiting, Event::BootedElsewhere { runs_new: true }, true).expect("ok");
        assert_eq!(a, Action::Rollback, "a boot into the unconfirmed system must be undone");
        assert!(matches!(s, Some(Stage::RollingBack { reason: RollbackReason::RebootedUnconfirmed, .. })));
    }

    /// Every stage survives a restart into either system: no stage refuses the boot
    /// (a refused one left pending.json blocking every later offer).
    #[test]
    fn every_stage_takes_a_boot_into_either_system() {
        let stages = stages();
        for stage in &stages {
            for runs_new in [true, false] {
                for has_previous in [true, false] {
                    let r = step(stage, Event::BootedElsewhere { runs_new }, has_previous);
                    let (next, action) = r.unwrap_or_else(|e| panic!("{e}"));
                    // It finishes, or goes on with an action that ends in an event the stage takes.
                    match (&next, &action) {
                        (None, Action::Finish(_)) => {}
                        (Some(Stage::RollingBack { .. }), Action::Rollback) => {}
                        (Some(Stage::Committing { .. }), Action::Commit) => {
                            assert!(runs_new, "{stage:?}: committing a system that does not run");
                        }
                        other => panic!("{stage:?} after a boot (new: {runs_new}): {other:?}"),
                    }
                }
            }
        }
        // Committing, back on the previous system: rolled back (the profile names it again).
        let (s, a) = step(&stages[4], Event::BootedElsewhere { runs_new: false }, true).expect("ok");
        assert_eq!(a, Action::Rollback);
        assert!(matches!(s, Some(Stage::RollingBack { reason: RollbackReason::RebootedUnconfirmed, error: Some(_) })));
    }

    /// The kinds of stage, with one representative each.
    fn stages() -> Vec<Stage> {
        vec![
            Stage::Activating,
            Stage::Rebooting,
            Stage::Checking { failed_units: vec![] },
            Stage::AwaitingConfirmation { failed_units: vec![], failed_checks: vec![] },
            Stage::Committing { failed_units: vec![], failed_checks: vec![] },
            Stage::RollingBack { reason: RollbackReason::Unconfirmed, error: None },
        ]
    }

    /// What can happen in each stage without a crash: the ends of its action.
    fn events_in(stage: &Stage) -> Vec<Event> {
        let both = |f: fn(Result<(), String>) -> Event| vec![f(Ok(())), f(Err("x".into()))];
        match stage {
            Stage::Activating => {
                let mut v = vec![exited(Some(0), &[]), exited(Some(1), &[]), exited(Some(100), &[]), exited(None, &[])];
                v.extend(both(Event::RebootPrepared));
                v.push(Event::RebootUnsafe("x".into()));
                v
            }
            // The reboot itself, or its command failing.
            Stage::Rebooting => vec![Event::RebootFailed("x".into())],
            Stage::Checking { .. } => vec![
                checked(&[]),
                checked(&["x"]),
                Event::ChecksFinished { required_failed: Some("x".into()), wanted_failed: vec![] },
            ],
            Stage::AwaitingConfirmation { .. } => vec![Event::Confirmed, Event::DeadlinePassed, Event::RollbackAsked],
            Stage::Committing { .. } => {
                let mut v = both(Event::CommitFinished);
                v.push(Event::ChangedOnDevice("x".into()));
                v
            }
            Stage::RollingBack { .. } => {
                let mut v = both(Event::RollbackFinished);
                v.push(Event::ChangedOnDevice("x".into()));
                v
            }
        }
    }

    /// Every stage × every crash point × every boot outcome: a start in another boot
    /// (planned or not; on the new system, the previous one, or neither) is an event
    /// the stage takes, and from every stage reached, a finish is reachable. So
    /// `pending.json` never blocks offers for good.
    #[test]
    fn crashes_anywhere_always_lead_to_a_finish() {
        let kind = |s: &Stage| std::mem::discriminant(s);
        for has_previous in [true, false] {
            let mut seen: Vec<Stage> = vec![];
            let mut edges: Vec<(Stage, Option<Stage>)> = vec![];
            let mut todo = vec![Stage::Activating];
            while let Some(stage) = todo.pop() {
                if seen.iter().any(|s| kind(s) == kind(&stage)) {
                    continue;
                }
                seen.push(stage.clone());
                let mut events = events_in(&stage);
                for planned in [false, true] {
                    for (runs_new, runs_previous) in [(true, false), (false, true), (false, false)] {
                        events.push(after_boot(&stage, planned, runs_new, runs_previous));
                    }
                }
                for event in events {
                    let (next, action) = step(&stage, event.clone(), has_previous)
                        .unwrap_or_else(|e| panic!("refused (has previous: {has_previous}): {e}"));
                    assert_eq!(next.is_none(), matches!(action, Action::Finish(_)), "{stage:?} {event:?}");
                    edges.push((stage.clone(), next.clone()));
                    todo.extend(next);
                }
            }
            for start in &seen {
                let mut frontier = vec![start.clone()];
                let mut visited: Vec<Stage> = vec![];
                let mut finishes = false;
                while let Some(s) = frontier.pop() {
                    if visited.iter().any(|v| kind(v) == kind(&s)) {
                        continue;
                    }
                    visited.push(s.clone());
                    for (_, to) in edges.iter().filter(|(from, _)| kind(from) == kind(&s)) {
                        match to {
                            None => finishes = true,
                            Some(t) => frontier.push(t.clone()),
                        }
                    }
                }
                assert!(finishes, "no way to a finish from {start:?} (has previous: {has_previous})");
            }
            let expected = if has_previous { stages().len() } else { stages().len() - 1 };
            assert_eq!(seen.len(), expected, "stages reached (has previous: {has_previous}): {seen:?}");
        }
    }

    #[test]
    fn reboot_deployments_confirm_after_booting_the_new_system_only() {
        let (s, a) = step(&Stage::Activating, Event::RebootPrepared(Ok(())), true).expect("ok");
        assert_eq!((s, a), (Some(Stage::Rebooting), Action::Reboot));
        assert!(step(&Stage::Rebooting, Event::Confirmed, true).is_err(), "confirmed before the reboot");
        let (s2, a) = step(&Stage::Rebooting, Event::Rebooted { runs_new: true }, true).expect("ok");
        assert_eq!(a, Action::RunChecks);
        let (s2, a) = step(&s2.expect("stage"), checked(&[]), true).expect("ok");
        assert_eq!(a, Action::AwaitConfirmation);
        assert!(matches!(s2, Some(Stage::AwaitingConfirmation { .. })));
        let (s3, a) = step(&Stage::Rebooting, Event::Rebooted { runs_new: false }, true).expect("ok");
        assert_eq!(a, Action::Rollback);
        assert!(matches!(s3, Some(Stage::RollingBack { reason: RollbackReason::ActivationFailed, .. })));
        let (_, a) = step(&Stage::Activating, Event::RebootPrepared(Err("disk full".into())), false).expect("ok");
        assert_eq!(finished(a).result, DeviceResult::Failed);
    }

    #[test]
    fn exit_100_means_a_reboot_and_an_unsafe_one_fails_with_the_device_as_it_was() {
        let (s, a) = step(&Stage::Activating, exited(Some(100), &[]), true).expect("ok");
        assert_eq!((s, a), (Some(Stage::Activating), Action::PrepareReboot), "not a failed activation");
        let (s, a) = step(&Stage::Activating, Event::RebootUnsafe("no entry".into()), true).expect("ok");
        assert_eq!(a, Action::Rollback, "what the preparation changed is undone");
        let (_, a) = step(&s.expect("stage"), Event::RollbackFinished(Ok(())), true).expect("ok");
        let f = finished(a);
        assert_eq!(
            (f.result, f.reason, f.phase),
            (DeviceResult::Failed, Some(RollbackReason::NoSafeReboot), Some(Phase::Activate))
        );
        assert_eq!(f.error.as_deref(), Some("no entry"));
        let (_, a) = step(&Stage::Activating, Event::RebootUnsafe("no entry".into()), false).expect("ok");
        let f = finished(a);
        assert_eq!((f.result, f.reason), (DeviceResult::Failed, Some(RollbackReason::NoSafeReboot)));
    }

    #[test]
    fn confirmation_is_only_accepted_while_waiting_for_it() {
        assert!(step(&Stage::Activating, Event::Confirmed, true).is_err());
        let rolling = Stage::RollingBack { reason: RollbackReason::Unconfirmed, error: None };
        assert!(step(&rolling, Event::Confirmed, true).is_err(), "a late confirmation must not stop a rollback");
    }
}
