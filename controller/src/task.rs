//! Task and per-device child states, and how a deployment's state follows from its
//! children (a pure function, tested without I/O).

/// A task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Pending,
    Running,
    /// Only queued children (offline devices) remain.
    Waiting,
    Finished,
    Cancelled,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Waiting => "waiting",
            TaskState::Finished => "finished",
            TaskState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => TaskState::Pending,
            "running" => TaskState::Running,
            "waiting" => TaskState::Waiting,
            "finished" => TaskState::Finished,
            "cancelled" => TaskState::Cancelled,
            _ => return None,
        })
    }
}

/// A per-device child's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildState {
    Pending,
    /// The device is offline; it gets the deployment when it connects.
    Queued,
    Running,
    Finished,
}

impl ChildState {
    pub fn as_str(self) -> &'static str {
        match self {
            ChildState::Pending => "pending",
            ChildState::Queued => "queued",
            ChildState::Running => "running",
            ChildState::Finished => "finished",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => ChildState::Pending,
            "queued" => ChildState::Queued,
            "running" => ChildState::Running,
            "finished" => ChildState::Finished,
            _ => return None,
        })
    }
}

/// A deployment's state and result from its children: (state, result).
/// `cancelled` is whether someone cancelled the deployment.
/// `children` holds (state, result, how many children have them), as the database
/// counts them (a deployment to ten thousand devices is a handful of groups).
pub fn deployment_state(
    children: &[(ChildState, Option<&str>, usize)],
    cancelled: bool,
) -> (TaskState, Option<&'static str>) {
    if children.iter().any(|(s, _, n)| *n > 0 && matches!(s, ChildState::Pending | ChildState::Running)) {
        return (TaskState::Running, None);
    }
    if children.iter().any(|(s, _, n)| *n > 0 && *s == ChildState::Queued) {
        return (TaskState::Waiting, None);
    }
    if cancelled {
        return (TaskState::Cancelled, Some("cancelled"));
    }
    let ok = |r: &Option<&str>| matches!(r, Some("succeeded" | "succeeded-with-failed-units"));
    let total: usize = children.iter().map(|(_, _, n)| n).sum();
    let succeeded: usize = children.iter().filter(|(_, r, _)| ok(r)).map(|(_, _, n)| n).sum();
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
    use ChildState::*;

    #[test]
    fn state_follows_children() {
        let st = |c: &[(ChildState, Option<&str>, usize)], cancelled| deployment_state(c, cancelled);
        assert_eq!(st(&[(Running, None, 1), (Finished, Some("succeeded"), 2)], false), (TaskState::Running, None));
        assert_eq!(st(&[(Queued, None, 1), (Finished, Some("succeeded"), 1)], false), (TaskState::Waiting, None));
        assert_eq!(
            st(&[(Finished, Some("succeeded"), 5), (Finished, Some("succeeded-with-failed-units"), 1)], false),
            (TaskState::Finished, Some("succeeded"))
        );
        assert_eq!(
            st(&[(Finished, Some("succeeded"), 9), (Finished, Some("rolled-back"), 1)], false),
            (TaskState::Finished, Some("partially-failed"))
        );
        assert_eq!(st(&[(Finished, Some("expired"), 3)], false), (TaskState::Finished, Some("failed")));
        assert_eq!(st(&[(Finished, Some("cancelled"), 1)], true), (TaskState::Cancelled, Some("cancelled")));
    }
}
