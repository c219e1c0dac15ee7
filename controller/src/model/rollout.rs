//! A staged rollout as a state machine: which wave is offered, the soak after it, and
//! the halt when more devices failed than tolerated. The engine raises its events (a
//! wave's last device finishing, a soak's end, `thymisctl resume`, cancel, the
//! deployment's systems being built) and performs the actions [`next`] returns.
//!
//! ```text
//!            start ─▶ Release(w)                     soak over (w), not too many failed
//!   ┌──────────────┐  wave settled (w), w < last  ┌───────────────┐ ─▶ Release(w + 1)
//!   │ Delivering w │ ───────────────────────────▶ │ Soaking w     │ ────────────┐
//!   └──────────────┘   (without a soak: w + 1)    └───────────────┘             │
//!     │   ▲  │ wave settled (last)                       │ too many failed      │
//!     │   │  └──▶ Done          too many failed ──▶ Halted ◀┘                   │
//!     │   └─────────────────────────────────────────────────────────────────────┘
//!     └── cancel (also while soaking) ──▶ Cancelled
//! ```

use thymis_api::rollout::{Staging, halts};

/// Where a rollout is. The task row keeps it: `wave`, `soak_until` and `stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollout {
    /// Wave `wave` (from 0) is offered; it settles when each of its devices finished.
    Delivering {
        wave: usize,
    },
    /// Wave `wave` settled; the next one is released at `until` (seconds since the epoch).
    Soaking {
        wave: usize,
        until: i64,
    },
    /// The last wave settled.
    Done,
    /// Stopped by itself: more devices failed than tolerated.
    Halted,
    Cancelled,
}

/// What happened to a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Its systems are built (again, after a restart): it goes on from where it is.
    Start,
    /// Every device of `wave` finished; `failed` names the rollout's failures so far.
    WaveSettled {
        wave: usize,
        failed: Vec<String>,
    },
    /// The soak after `wave` is over (its time came, or `thymisctl resume`); `failed`
    /// also names devices that left the deployed system meanwhile.
    SoakOver {
        wave: usize,
        failed: Vec<String>,
    },
    Cancel,
}

/// What a rollout's step asks of the engine, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Offer wave `wave` to its devices; the log says `label` and their names.
    Release { wave: usize, label: String },
    /// End the soak at this time (a timer; the periodic sweep too, after a restart).
    WakeAt(i64),
    /// Stop: the devices not offered yet end cancelled; the task says why.
    Halt(String),
    /// A line for the task's log.
    Log(String),
}

/// A step: the next state and its actions.
pub type Next = (Rollout, Vec<Action>);

/// The rollout's shape, fixed when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The last wave (from 0).
    pub last: usize,
    /// Failed devices tolerated before halting.
    pub tolerated: usize,
    /// Seconds between waves.
    pub soak: Option<u64>,
    pub canary: bool,
}

impl Plan {
    pub fn new(staging: &Staging, devices: usize) -> Plan {
        Plan {
            last: staging.waves(devices).len().saturating_sub(1),
            tolerated: staging.tolerated(devices),
            soak: staging.soak,
            canary: staging.canary.is_some(),
        }
    }
}

/// A disallowed (state, event) pair: nothing changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a rollout {state:?} does not take {event:?}")]
pub struct Refused {
    pub state: Rollout,
    pub event: Event,
}

/// The rollout's next state and its actions, or why not. `now` is the time the event
/// happened (seconds since the epoch).
pub fn next(state: Rollout, event: Event, plan: &Plan, now: i64) -> Result<Next, Refused> {
    use Rollout as R;
    let release = |wave: usize| {
        let what = if wave == 0 && plan.canary { " (canary)" } else { "" };
        vec![Action::Release { wave, label: format!("wave {} of {}{what}", wave + 1, plan.last + 1) }]
    };
    let halt = |wave: usize, failed: &[String]| {
        let why = format!(
            "halted after wave {}: {} failed ({}), {} tolerated",
            wave + 1,
            failed.len(),
            failed.join(", "),
            plan.tolerated
        );
        (R::Halted, vec![Action::Log(why.clone()), Action::Halt(why)])
    };
    Ok(match (state, &event) {
        (R::Delivering { wave }, Event::Start) => (state, release(wave)),
        (R::Soaking { until, .. }, Event::Start) => (state, vec![Action::WakeAt(until)]),
        (R::Delivering { wave }, Event::WaveSettled { wave: w, failed }) if *w == wave => {
            if halts(failed.len(), plan.tolerated) {
                halt(wave, failed)
            } else if wave >= plan.last {
                (R::Done, vec![])
            } else if let Some(soak) = plan.soak {
                let until = now + soak as i64;
                let log = Action::Log(format!("wave {} done; soaking {soak} s", wave + 1));
                (R::Soaking { wave, until }, vec![log, Action::WakeAt(until)])
            } else {
                (R::Delivering { wave: wave + 1 }, release(wave + 1))
            }
        }
        (R::Soaking { wave, .. }, Event::SoakOver { wave: w, failed }) if *w == wave => {
            if halts(failed.len(), plan.tolerated) {
                halt(wave, failed)
            } else {
                (R::Delivering { wave: wave + 1 }, release(wave + 1))
            }
        }
        (R::Delivering { .. } | R::Soaking { .. }, Event::Cancel) => (R::Cancelled, vec![]),
        _ => return Err(Refused { state, event }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action as A;
    use Rollout as R;

    const PLAN: Plan = Plan { last: 2, tolerated: 1, soak: Some(60), canary: true };

    fn failed(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i} failed")).collect()
    }

    fn releases(actions: &[Action]) -> Vec<usize> {
        actions.iter().filter_map(|a| if let A::Release { wave, .. } = a { Some(*wave) } else { None }).collect()
    }

    #[test]
    fn a_canary_a_soak_and_two_more_waves() {
        let plan = PLAN;
        let (s, a) = next(R::Delivering { wave: 0 }, Event::Start, &plan, 100).expect("start");
        assert_eq!((s, releases(&a)), (R::Delivering { wave: 0 }, vec![0]));
        assert_eq!(a, vec![A::Release { wave: 0, label: "wave 1 of 3 (canary)".into() }]);
        let (s, a) = next(s, Event::WaveSettled { wave: 0, failed: vec![] }, &plan, 100).expect("settled");
        assert_eq!(s, R::Soaking { wave: 0, until: 160 });
        assert!(a.contains(&A::WakeAt(160)) && releases(&a).is_empty(), "{a:?}");
        // A restart during the soak: the soak goes on to its old end.
        let (s, a) = next(s, Event::Start, &plan, 130).expect("restarted");
        assert_eq!((s, a), (R::Soaking { wave: 0, until: 160 }, vec![A::WakeAt(160)]));
        let (s, a) = next(s, Event::SoakOver { wave: 0, failed: failed(1) }, &plan, 160).expect("soaked");
        assert_eq!((s, releases(&a)), (R::Delivering { wave: 1 }, vec![1]), "one failure is tolerated");
        let (s, _) = next(s, Event::WaveSettled { wave: 1, failed: failed(1) }, &plan, 200).expect("settled");
        let (s, a) = next(s, Event::SoakOver { wave: 1, failed: failed(1) }, &plan, 260).expect("soaked");
        assert_eq!((s, releases(&a)), (R::Delivering { wave: 2 }, vec![2]));
        let (s, a) = next(s, Event::WaveSettled { wave: 2, failed: failed(1) }, &plan, 300).expect("last");
        assert_eq!((s, a), (R::Done, vec![]), "no soak after the last wave");
    }

    #[test]
    fn too_many_failures_halt_after_a_wave_or_its_soak() {
        let plan = PLAN;
        let (s, a) = next(R::Delivering { wave: 0 }, Event::WaveSettled { wave: 0, failed: failed(2) }, &plan, 0)
            .expect("settled");
        assert_eq!(s, R::Halted);
        let why = "halted after wave 1: 2 failed (d0 failed, d1 failed), 1 tolerated".to_owned();
        assert_eq!(a, vec![A::Log(why.clone()), A::Halt(why)]);
        let soaking = R::Soaking { wave: 1, until: 50 };
        let (s, a) = next(soaking, Event::SoakOver { wave: 1, failed: failed(2) }, &plan, 50).expect("soaked");
        assert_eq!(s, R::Halted);
        assert!(releases(&a).is_empty());
    }

    #[test]
    fn without_a_soak_the_next_wave_follows_at_once() {
        let plan = Plan { soak: None, canary: false, ..PLAN };
        let (s, a) =
            next(R::Delivering { wave: 1 }, Event::WaveSettled { wave: 1, failed: vec![] }, &plan, 0).expect("settled");
        assert_eq!((s, releases(&a)), (R::Delivering { wave: 2 }, vec![2]));
        assert_eq!(a, vec![A::Release { wave: 2, label: "wave 3 of 3".into() }]);
    }

    /// Every (state, event) pair that is not a step above changes nothing: a wave's
    /// settling seen twice (two controllers, or two devices finishing at once), a timer
    /// after `resume` ended the soak, anything after the end.
    #[test]
    fn everything_else_is_refused() {
        let plan = PLAN;
        let states = [R::Delivering { wave: 1 }, R::Soaking { wave: 1, until: 10 }, R::Done, R::Halted, R::Cancelled];
        let events = [
            Event::Start,
            Event::WaveSettled { wave: 1, failed: vec![] },
            Event::WaveSettled { wave: 0, failed: vec![] },
            Event::SoakOver { wave: 1, failed: vec![] },
            Event::SoakOver { wave: 0, failed: vec![] },
            Event::Cancel,
        ];
        for s in states {
            for e in events.clone() {
                let allowed = matches!(
                    (s, &e),
                    (R::Delivering { .. } | R::Soaking { .. }, Event::Start | Event::Cancel)
                        | (R::Delivering { .. }, Event::WaveSettled { wave: 1, .. })
                        | (R::Soaking { .. }, Event::SoakOver { wave: 1, .. })
                );
                let got = next(s, e.clone(), &plan, 0);
                assert_eq!(got.is_ok(), allowed, "{s:?} + {e:?}: {got:?}");
                if let Err(r) = got {
                    assert_eq!(r, Refused { state: s, event: e });
                }
            }
        }
        assert_eq!(next(R::Soaking { wave: 1, until: 9 }, Event::Cancel, &plan, 0), Ok((R::Cancelled, vec![])));
    }
}
