//! Task states, and how a deployment's state follows from its devices' stages (a pure
//! function, tested without I/O).

use crate::machine::Stage;

/// A task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Pending,
    Running,
    /// Only queued children (offline devices) remain.
    Waiting,
    Finished,
    Cancelled,
    /// A staged rollout stopped by itself: too many devices failed.
    Halted,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Waiting => "waiting",
            TaskState::Finished => "finished",
            TaskState::Cancelled => "cancelled",
            TaskState::Halted => "halted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => TaskState::Pending,
            "running" => TaskState::Running,
            "waiting" => TaskState::Waiting,
            "finished" => TaskState::Finished,
            "cancelled" => TaskState::Cancelled,
            "halted" => TaskState::Halted,
            _ => return None,
        })
    }
}

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
pub fn deployment_state(
    children: &[(Stage, usize)],
    queued_online: usize,
    stopped: Option<Stopped>,
) -> (TaskState, Option<&'static str>) {
    let any = |f: &dyn Fn(Stage) -> bool| children.iter().any(|(s, n)| *n > 0 && f(*s));
    if any(&|s| !s.is_finished() && s != Stage::Queued) || queued_online > 0 {
        return (TaskState::Running, None);
    }
    if any(&|s| s == Stage::Queued) {
        return (TaskState::Waiting, None);
    }
    match stopped {
        Some(Stopped::Cancelled) => return (TaskState::Cancelled, Some("cancelled")),
        Some(Stopped::Halted) => return (TaskState::Halted, Some("halted")),
        None => {}
    }
    let total: usize = children.iter().map(|(_, n)| n).sum();
    let succeeded: usize =
        children.iter().filter(|(s, _)| matches!(s, Stage::Finished(r) if r.is_success())).map(|(_, n)| n).sum();
    let result = if succeeded == total {
        "succeeded"
    } else if succeeded == 0 {
        "failed"
    } else {
        "partially-failed"
    };
    (TaskState::Finished, Some(result))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Stage::*;
    use thymis_proto::DeviceResult as R;

    #[test]
    fn state_follows_children() {
        let st = |c: &[(Stage, usize)], stopped| deployment_state(c, 0, stopped);
        assert_eq!(st(&[(Copying, 1), (Finished(R::Succeeded), 2)], None), (TaskState::Running, None));
        assert_eq!(st(&[(Waiting, 1), (Finished(R::Succeeded), 2)], None), (TaskState::Running, None));
        assert_eq!(st(&[(Queued, 1), (Finished(R::Succeeded), 1)], None), (TaskState::Waiting, None));
        assert_eq!(deployment_state(&[(Queued, 2)], 1, None), (TaskState::Running, None), "one is online");
        assert_eq!(
            st(&[(Finished(R::Succeeded), 5), (Finished(R::SucceededWithFailedUnits), 1)], None),
            (TaskState::Finished, Some("succeeded"))
        );
        assert_eq!(
            st(&[(Finished(R::Succeeded), 9), (Finished(R::RolledBack), 1)], None),
            (TaskState::Finished, Some("partially-failed"))
        );
        assert_eq!(st(&[(Finished(R::Expired), 3)], None), (TaskState::Finished, Some("failed")));
        assert_eq!(
            st(&[(Finished(R::Cancelled), 1)], Some(Stopped::Cancelled)),
            (TaskState::Cancelled, Some("cancelled"))
        );
        assert_eq!(st(&[(Activated, 1)], Some(Stopped::Cancelled)), (TaskState::Running, None));
        assert_eq!(
            st(&[(Finished(R::RolledBack), 1), (Finished(R::Cancelled), 5)], Some(Stopped::Halted)),
            (TaskState::Halted, Some("halted"))
        );
    }
}
