//! One device's deployment as the controller sees it: a stage, and one pure transition
//! function ([`step`]) from (stage, event) to the next stage and what that asks of the
//! world, or a typed refusal. The database keeps the stage in one column. Every event
//! (from the copy, the agent connection, cancel, supersede, a halted rollout, expiry,
//! restart recovery) goes to [`crate::engine::report`], which applies it here, persists
//! it in one transaction and carries out its effects; whatever the machine refuses
//! changes nothing.
//!
//! ```text
//!  building ──built──▶ queued ◀──lost── copying ──activating──▶ activated ──confirming──▶ confirming
//!     │  └──wait──▶ waiting ─release─▶ │ ──offered──▶ │  │             │  ▲ (restart)           │
//!     │                                ▲         stage│  │             │held                    │
//!     │                                └───go─── staged ◀──────────────┘                        │
//!     └────────────── failed, cancelled, superseded, halted, expired, ──▶ finished ◀── outcome ─┘
//!                     interrupted (restart), before activation              (expired: unreachable)
//! ```
//!
//! `staged`: copied, and may not switch yet (stage-only, outside its window, or held on
//! the device); it neither expires nor ends at a restart, and goes back to `queued`
//! (offered again over the device's connection: nothing left to copy) when it may.

use thymis_proto::{DeviceResult, Phase};

/// Where a device deployment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Its configuration is being built.
    Building,
    /// Built, and not its turn yet (a later wave of a staged rollout).
    Waiting,
    /// Its turn: waiting for the device to be connected.
    Queued,
    /// Offered over a connection; the paths it lacks are being copied.
    Copying,
    /// Copied, waiting until the device may switch (the device keeps the system).
    Staged,
    /// Told to activate (recorded before it was told): from here on only the device's
    /// outcome, or silence until expiry, ends it.
    Activated,
    /// It came back after activating and was sent the confirmation.
    Confirming,
    Finished(DeviceResult),
}

/// What happened to a device deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Built,
    /// Built, but its wave has not started.
    Wait,
    /// Its wave started.
    Release,
    /// An offer went out over a connection.
    Offered,
    /// The connection went away before activation.
    Lost,
    /// Every path is there; the device is about to be told to activate.
    Activating,
    /// Every path is there, and the device may not switch yet.
    Stage,
    /// The device did not activate: an application on it holds updates.
    Held,
    /// A staged device may switch now.
    Go,
    /// The device reported the activated deployment over a new connection.
    Confirming,
    /// The device's own outcome.
    Outcome(DeviceResult),
    /// The controller could not build, offer or copy it.
    Failed,
    Cancelled,
    Superseded,
    /// The rollout halted before this device's turn.
    Halted,
    /// The deployment expired.
    Expired,
    /// The controller restarted.
    Restarted,
}

/// A disallowed (stage, event) pair: nothing changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a device deployment {stage:?} does not take {event:?}")]
pub struct Refused {
    pub stage: Stage,
    pub event: Event,
}

impl Stage {
    /// Whether the device may have activated it (nothing before this is undone by
    /// cancel, supersede or halt; after it, only the device ends it).
    pub fn activated(self) -> bool {
        matches!(self, Stage::Activated | Stage::Confirming)
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Stage::Finished(_))
    }

    /// The stored spelling (the `stage` column; finished ones keep their result beside it).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Building => "building",
            Stage::Waiting => "waiting",
            Stage::Queued => "queued",
            Stage::Copying => "copying",
            Stage::Staged => "staged",
            Stage::Activated => "activated",
            Stage::Confirming => "confirming",
            Stage::Finished(_) => "finished",
        }
    }

    /// From the stored spelling and result.
    pub fn parse(stage: &str, result: Option<DeviceResult>) -> Option<Stage> {
        Some(match (stage, result) {
            ("building", None) => Stage::Building,
            ("waiting", None) => Stage::Waiting,
            ("queued", None) => Stage::Queued,
            ("copying", None) => Stage::Copying,
            ("staged", None) => Stage::Staged,
            ("activated", None) => Stage::Activated,
            ("confirming", None) => Stage::Confirming,
            ("finished", Some(r)) => Stage::Finished(r),
            _ => return None,
        })
    }

    /// The API's `state` of a child (docs/controller.md).
    pub fn state(self) -> thymis_api::ChildState {
        use thymis_api::ChildState as C;
        match self {
            Stage::Waiting => C::Pending,
            Stage::Queued => C::Queued,
            Stage::Staged => C::Staged,
            Stage::Building | Stage::Copying | Stage::Activated | Stage::Confirming => C::Running,
            Stage::Finished(_) => C::Finished,
        }
    }

    /// The API's `phase` while in this stage (a finished child keeps the phase it ended in).
    pub fn phase(self) -> Option<Phase> {
        match self {
            Stage::Building | Stage::Waiting => Some(Phase::Build),
            Stage::Queued | Stage::Copying | Stage::Staged => Some(Phase::Copy),
            Stage::Activated => Some(Phase::Activate),
            Stage::Confirming => Some(Phase::Confirm),
            Stage::Finished(_) => None,
        }
    }
}

/// What a transition asks of the world; the engine performs it after the new stage is
/// stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Tell the device to activate (the copy does, over the connection it copied on).
    Activate,
    /// Send the device its signed confirmation (over the connection it came back on).
    Confirm,
    /// The device was offered the deployment, which ended before activation: tell it to
    /// drop what it holds of it.
    TellCancel,
    /// Give back the deployment's log budget, saying what it dropped.
    CloseLogBudget,
    /// A device of a staged rollout finished: its wave may have settled.
    SettleWave,
}

/// A transition: the next stage and its effects, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub before: Stage,
    pub stage: Stage,
    pub effects: Vec<Effect>,
}

/// The next stage and what it asks of the world, or why not.
pub fn step(stage: Stage, event: Event) -> Result<Step, Refused> {
    let new = next(stage, event)?;
    let mut effects = vec![];
    match (stage, new) {
        (Stage::Copying, Stage::Activated) => effects.push(Effect::Activate),
        (_, Stage::Confirming) => effects.push(Effect::Confirm),
        (_, Stage::Finished(_)) => {
            if matches!(stage, Stage::Queued | Stage::Copying | Stage::Staged) && !matches!(event, Event::Outcome(_)) {
                effects.push(Effect::TellCancel);
            }
            effects.push(Effect::CloseLogBudget);
            // An unreachable device's late outcome changes its result, not its wave.
            if !stage.is_finished() {
                effects.push(Effect::SettleWave);
            }
        }
        _ => {}
    }
    Ok(Step { before: stage, stage: new, effects })
}

/// The next stage, or why not.
fn next(stage: Stage, event: Event) -> Result<Stage, Refused> {
    use Event as E;
    use Stage as S;
    let refused = Err(Refused { stage, event });
    let before_activation = matches!(stage, S::Building | S::Waiting | S::Queued | S::Copying | S::Staged);
    Ok(match (stage, event) {
        (S::Building, E::Built) => S::Queued,
        (S::Building, E::Wait) => S::Waiting,
        (S::Waiting, E::Release) => S::Queued,
        (S::Queued, E::Offered) => S::Copying,
        (S::Copying, E::Lost) => S::Queued,
        (S::Copying, E::Activating) => S::Activated,
        (S::Copying, E::Stage) => S::Staged,
        // The device said it did not switch: told to activate, it found a hold.
        (S::Activated, E::Held) => S::Staged,
        (S::Staged, E::Go) => S::Queued,
        (S::Activated | S::Confirming, E::Confirming) => S::Confirming,
        // What the agent says ends it, at any point it could say it: an agent refuses
        // before activation (a reboot its boot loader cannot undo), or reports after.
        (S::Queued | S::Copying | S::Staged | S::Activated | S::Confirming, E::Outcome(r))
            if r.is_reported_by_agent() =>
        {
            S::Finished(r)
        }
        // The agent's own outcome is the truth about the device: it replaces the
        // controller's guess.
        (S::Finished(DeviceResult::Unreachable), E::Outcome(r)) if r.is_reported_by_agent() => S::Finished(r),
        (_, E::Failed) if before_activation => S::Finished(DeviceResult::Failed),
        (_, E::Cancelled) if before_activation => S::Finished(DeviceResult::Cancelled),
        (_, E::Halted) if before_activation => S::Finished(DeviceResult::Cancelled),
        (_, E::Superseded) if before_activation => S::Finished(DeviceResult::Superseded),
        // A staged device waits for its window (or its activation, or its hold) as long
        // as that takes: it does not expire.
        (S::Staged, E::Expired) => return refused,
        (_, E::Expired) if before_activation => S::Finished(DeviceResult::Expired),
        (S::Activated | S::Confirming, E::Expired) => S::Finished(DeviceResult::Unreachable),
        // A later wave's devices wait on: the rollout goes on after the restart.
        (S::Waiting, E::Restarted) => S::Waiting,
        // A staged device too: the device keeps its system, the controller its stage.
        (S::Staged, E::Restarted) => S::Staged,
        (_, E::Restarted) if before_activation => S::Finished(DeviceResult::Interrupted),
        // Activated before the restart: the device comes back and is confirmed then.
        (S::Activated | S::Confirming, E::Restarted) => S::Activated,
        _ => return refused,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceResult as R;
    use Event as E;
    use Stage as S;

    const STAGES: [Stage; 9] = [
        S::Building,
        S::Waiting,
        S::Queued,
        S::Copying,
        S::Staged,
        S::Activated,
        S::Confirming,
        S::Finished(R::Succeeded),
        S::Finished(R::Unreachable),
    ];
    const EVENTS: [Event; 18] = [
        E::Built,
        E::Wait,
        E::Release,
        E::Offered,
        E::Lost,
        E::Activating,
        E::Stage,
        E::Held,
        E::Go,
        E::Confirming,
        E::Outcome(R::RolledBack),
        E::Outcome(R::Cancelled),
        E::Failed,
        E::Cancelled,
        E::Superseded,
        E::Halted,
        E::Expired,
        E::Restarted,
    ];

    #[test]
    fn the_happy_path_and_a_resumed_copy() {
        let mut s = S::Building;
        for e in [E::Built, E::Offered, E::Lost, E::Offered, E::Activating, E::Confirming, E::Outcome(R::Succeeded)] {
            s = next(s, e).expect("allowed");
        }
        assert_eq!(s, S::Finished(R::Succeeded));
        assert_eq!(next(S::Building, E::Wait).and_then(|s| next(s, E::Release)), Ok(S::Queued));
    }

    /// Every pair: what each event does in each stage, written out once more as a table.
    #[test]
    fn every_transition() {
        let table: &[(Stage, Event, Stage)] = &[
            (S::Building, E::Built, S::Queued),
            (S::Building, E::Wait, S::Waiting),
            (S::Waiting, E::Release, S::Queued),
            (S::Queued, E::Offered, S::Copying),
            (S::Copying, E::Lost, S::Queued),
            (S::Copying, E::Activating, S::Activated),
            (S::Copying, E::Stage, S::Staged),
            (S::Activated, E::Held, S::Staged),
            (S::Staged, E::Go, S::Queued),
            (S::Staged, E::Outcome(R::RolledBack), S::Finished(R::RolledBack)),
            (S::Staged, E::Restarted, S::Staged),
            (S::Activated, E::Confirming, S::Confirming),
            (S::Confirming, E::Confirming, S::Confirming),
            (S::Queued, E::Outcome(R::RolledBack), S::Finished(R::RolledBack)),
            (S::Copying, E::Outcome(R::RolledBack), S::Finished(R::RolledBack)),
            (S::Activated, E::Outcome(R::RolledBack), S::Finished(R::RolledBack)),
            (S::Confirming, E::Outcome(R::RolledBack), S::Finished(R::RolledBack)),
            (S::Finished(R::Unreachable), E::Outcome(R::RolledBack), S::Finished(R::RolledBack)),
            (S::Activated, E::Expired, S::Finished(R::Unreachable)),
            (S::Confirming, E::Expired, S::Finished(R::Unreachable)),
            (S::Activated, E::Restarted, S::Activated),
            (S::Confirming, E::Restarted, S::Activated),
            (S::Waiting, E::Restarted, S::Waiting),
        ];
        let before = [S::Building, S::Waiting, S::Queued, S::Copying, S::Staged];
        let ends = [
            (E::Failed, R::Failed),
            (E::Cancelled, R::Cancelled),
            (E::Halted, R::Cancelled),
            (E::Superseded, R::Superseded),
            (E::Expired, R::Expired),
            (E::Restarted, R::Interrupted),
        ];
        for s in STAGES {
            for e in EVENTS {
                let listed = table.iter().find(|(ts, te, _)| *ts == s && *te == e).map(|t| t.2);
                let ended = ends.iter().find(|(ee, _)| *ee == e && before.contains(&s)).map(|(_, r)| S::Finished(*r));
                let waits_on = [(S::Waiting, E::Restarted), (S::Staged, E::Restarted), (S::Staged, E::Expired)];
                let ended = if waits_on.contains(&(s, e)) { None } else { ended };
                let expected = listed.or(ended).ok_or(Refused { stage: s, event: e });
                assert_eq!(next(s, e), expected, "{s:?} + {e:?}");
            }
        }
    }

    #[test]
    fn nothing_undoes_an_activation_but_the_device() {
        for s in [S::Activated, S::Confirming] {
            for e in [E::Cancelled, E::Superseded, E::Halted, E::Failed, E::Lost, E::Built, E::Offered] {
                assert!(next(s, e).is_err(), "{s:?} + {e:?}");
            }
            // A controller-side result is not the device's.
            assert!(next(s, E::Outcome(R::Cancelled)).is_err());
        }
        for r in [R::Succeeded, R::RolledBack, R::Cancelled, R::Failed] {
            for e in EVENTS {
                assert!(next(S::Finished(r), e).is_err(), "finished {r:?} + {e:?}");
            }
        }
    }

    /// What each kind of transition asks of the world.
    #[test]
    fn every_effect() {
        use Effect::*;
        for s in STAGES {
            for e in EVENTS {
                let Ok(st) = step(s, e) else { continue };
                let expected: Vec<Effect> = match (s, st.stage) {
                    (S::Copying, S::Activated) => vec![Activate],
                    (_, S::Confirming) => vec![Confirm],
                    (S::Finished(_), S::Finished(_)) => vec![CloseLogBudget],
                    (S::Queued | S::Copying | S::Staged, S::Finished(_)) if !matches!(e, E::Outcome(_)) => {
                        vec![TellCancel, CloseLogBudget, SettleWave]
                    }
                    (_, S::Finished(_)) => vec![CloseLogBudget, SettleWave],
                    _ => vec![],
                };
                assert_eq!(st.effects, expected, "{s:?} + {e:?}");
                assert_eq!(st.before, s);
            }
        }
        // The ones a user would notice, spelled out.
        assert_eq!(step(S::Copying, E::Cancelled).map(|s| s.effects), Ok(vec![TellCancel, CloseLogBudget, SettleWave]));
        assert_eq!(step(S::Building, E::Cancelled).map(|s| s.effects), Ok(vec![CloseLogBudget, SettleWave]));
        assert_eq!(step(S::Copying, E::Outcome(R::Failed)).map(|s| s.effects), Ok(vec![CloseLogBudget, SettleWave]));
        assert_eq!(step(S::Activated, E::Confirming).map(|s| s.effects), Ok(vec![Confirm]));
        assert_eq!(step(S::Confirming, E::Restarted).map(|s| s.effects), Ok(vec![]));
    }

    #[test]
    fn stored_spellings_round_trip() {
        for s in STAGES {
            let result = match s {
                S::Finished(r) => Some(r),
                _ => None,
            };
            assert_eq!(Stage::parse(s.as_str(), result), Some(s));
        }
        assert_eq!(Stage::parse("finished", None), None);
        assert_eq!(Stage::parse("queued", Some(R::Failed)), None);
    }
}
