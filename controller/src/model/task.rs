//! Task states, and how a deployment's state follows from its devices' stages (a pure
//! function, tested without I/O).

use crate::model::device::Stage;
pub use thymis_api::{TaskResult, TaskState};

/// Why a deployment stopped before all its devices finished by themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Cancelled,
    Halted,
}

impl Stopped {
    pub fn as_str(self) -> &'static str {
        match self {
            Stopped::Cancelled => "cancelled",
            Stopped::Halted => "halted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cancelled" => Some(Stopped::Cancelled),
            "halted" => Some(Stopped::Halted),
            _ => None,
        }
    }
}

/// A deployment's state and result from how many of its devices are in each stage
/// (as the database counts them: a deployment to ten thousand devices is a handful of
/// groups), and whether it was stopped.
/// `queued_online` counts the queued devices that are connected (about to be offered).
/// Staged devices wait too (for their activation, window or hold): a deployment whose
/// only unfinished devices are queued or staged, and the later waves behind staged ones,
/// is `waiting`.
pub fn deployment_state(
    children: &[(Stage, usize)],
    queued_online: usize,
    stopped: Option<Stopped>,
) -> (TaskState, Option<TaskResult>) {
    let any = |f: &dyn Fn(Stage) -> bool| children.iter().any(|(s, n)| *n > 0 && f(*s));
    let staged = any(&|s| s == Stage::Staged);
    // Later waves wait for the staged devices of the wave before; behind anything else
    // (an offline device, a soak) the rollout is still under way.
    let waits = |s: Stage| matches!(s, Stage::Queued | Stage::Staged) || (staged && s == Stage::Waiting);
    if any(&|s| !s.is_finished() && !waits(s)) || queued_online > 0 {
        return (TaskState::Running, None);
    }
    if any(&waits) {
        return (TaskState::Waiting, None);
    }
    match stopped {
        Some(Stopped::Cancelled) => return (TaskState::Cancelled, Some(TaskResult::Cancelled)),
        Some(Stopped::Halted) => return (TaskState::Halted, Some(TaskResult::Halted)),
        None => {}
    }
    let total: usize = children.iter().map(|(_, n)| n).sum();
    let succeeded: usize =
        children.iter().filter(|(s, _)| matches!(s, Stage::Finished(r) if r.is_success())).map(|(_, n)| n).sum();
    let result = if succeeded == total {
        TaskResult::Succeeded
    } else if succeeded == 0 {
        TaskResult::Failed
    } else {
        TaskResult::PartiallyFailed
    };
    (TaskState::Finished, Some(result))
}

/// What happens to a task as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Its work began.
    Started,
    /// Its job ended with this result (a terminal: its command's exit, or the client
    /// leaving).
    Ended(TaskResult),
    /// A controller restart (or the controller running it stopping) cut its job short.
    Interrupted,
    /// A deployment's devices changed: its state follows from them.
    Recount { state: TaskState, result: Option<TaskResult> },
}

/// A disallowed (state, event) pair: nothing changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a task {state:?} does not take {event:?}")]
pub struct Refused {
    pub state: TaskState,
    pub event: Event,
}

/// A task's next state and result, or why not. A job that ended stays ended; a
/// deployment's recount may change even a settled one (an unreachable device's late
/// outcome changes its result).
pub fn next(state: TaskState, event: Event) -> Result<(TaskState, Option<TaskResult>), Refused> {
    use TaskState as S;
    let open = matches!(state, S::Pending | S::Running | S::Waiting);
    match event {
        Event::Started if state == S::Pending => Ok((S::Running, None)),
        Event::Ended(r) if open => Ok((S::Finished, Some(r))),
        Event::Interrupted if open => Ok((S::Finished, Some(TaskResult::Failed))),
        Event::Recount { state, result } => Ok((state, result)),
        _ => Err(Refused { state, event }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Stage::*;
    use thymis_proto::DeviceResult as R;

    #[test]
    fn every_job_transition() {
        use TaskResult as T;
        use TaskState as S;
        let states = [S::Pending, S::Running, S::Waiting, S::Finished, S::Cancelled, S::Halted];
        let events = [
            Event::Started,
            Event::Ended(T::Succeeded),
            Event::Ended(T::Cancelled),
            Event::Interrupted,
            Event::Recount { state: S::Waiting, result: None },
        ];
        for s in states {
            for e in events {
                let open = matches!(s, S::Pending | S::Running | S::Waiting);
                let expected = match e {
                    Event::Started if s == S::Pending => Ok((S::Running, None)),
                    Event::Ended(r) if open => Ok((S::Finished, Some(r))),
                    Event::Interrupted if open => Ok((S::Finished, Some(T::Failed))),
                    Event::Recount { .. } => Ok((S::Waiting, None)),
                    _ => Err(Refused { state: s, event: e }),
                };
                assert_eq!(next(s, e), expected, "{s:?} + {e:?}");
            }
        }
        // A finished job is not started again, nor does a late failure replace success.
        assert!(next(S::Finished, Event::Started).is_err());
        assert!(next(S::Finished, Event::Ended(T::Failed)).is_err());
    }

    #[test]
    fn state_follows_children() {
        let st = |c: &[(Stage, usize)], stopped| deployment_state(c, 0, stopped);
        assert_eq!(st(&[(Copying, 1), (Finished(R::Succeeded), 2)], None), (TaskState::Running, None));
        assert_eq!(st(&[(Waiting, 1), (Finished(R::Succeeded), 2)], None), (TaskState::Running, None));
        assert_eq!(st(&[(Queued, 1), (Finished(R::Succeeded), 1)], None), (TaskState::Waiting, None));
        assert_eq!(deployment_state(&[(Queued, 2)], 1, None), (TaskState::Running, None), "one is online");
        // Staged devices wait (for activation, their window, their hold): not running.
        assert_eq!(st(&[(Staged, 2), (Finished(R::Succeeded), 1)], None), (TaskState::Waiting, None));
        assert_eq!(st(&[(Staged, 1), (Copying, 1)], None), (TaskState::Running, None));
        assert_eq!(st(&[(Staged, 1), (Waiting, 3)], None), (TaskState::Waiting, None), "a staged canary");
        assert_eq!(st(&[(Queued, 1), (Waiting, 3)], None), (TaskState::Running, None), "an offline canary");
        assert_eq!(
            st(&[(Finished(R::Succeeded), 5), (Finished(R::SucceededWithFailedUnits), 1)], None),
            (TaskState::Finished, Some(TaskResult::Succeeded))
        );
        assert_eq!(
            st(&[(Finished(R::Succeeded), 9), (Finished(R::RolledBack), 1)], None),
            (TaskState::Finished, Some(TaskResult::PartiallyFailed))
        );
        assert_eq!(st(&[(Finished(R::Expired), 3)], None), (TaskState::Finished, Some(TaskResult::Failed)));
        assert_eq!(
            st(&[(Finished(R::Cancelled), 1)], Some(Stopped::Cancelled)),
            (TaskState::Cancelled, Some(TaskResult::Cancelled))
        );
        assert_eq!(st(&[(Activated, 1)], Some(Stopped::Cancelled)), (TaskState::Running, None));
        assert_eq!(
            st(&[(Finished(R::RolledBack), 1), (Finished(R::Cancelled), 5)], Some(Stopped::Halted)),
            (TaskState::Halted, Some(TaskResult::Halted))
        );
    }
}
