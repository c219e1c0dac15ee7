//! Exact per-device outcomes of a deployment (docs/controller.md, "Results").

use serde::{Deserialize, Serialize};

/// Where a per-device deployment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Build,
    Copy,
    Activate,
    Confirm,
}

impl Phase {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Build => "build",
            Phase::Copy => "copy",
            Phase::Activate => "activate",
            Phase::Confirm => "confirm",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Phase::Build, Phase::Copy, Phase::Activate, Phase::Confirm].into_iter().find(|p| p.as_str() == s)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A terminal per-device result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceResult {
    Succeeded,
    /// Activation exited 4: the system switched, some units failed.
    SucceededWithFailedUnits,
    /// The system switched and every required health check passed; some wanted ones
    /// did not (`failed_checks` names them).
    SucceededWithFailedChecks,
    RolledBack,
    /// The rollback itself failed: the device needs attention.
    RollbackFailed,
    /// Nothing was activated.
    Failed,
    Cancelled,
    Superseded,
    Expired,
    Interrupted,
    Unreachable,
}

impl DeviceResult {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceResult::Succeeded => "succeeded",
            DeviceResult::SucceededWithFailedUnits => "succeeded-with-failed-units",
            DeviceResult::SucceededWithFailedChecks => "succeeded-with-failed-checks",
            DeviceResult::RolledBack => "rolled-back",
            DeviceResult::RollbackFailed => "rollback-failed",
            DeviceResult::Failed => "failed",
            DeviceResult::Cancelled => "cancelled",
            DeviceResult::Superseded => "superseded",
            DeviceResult::Expired => "expired",
            DeviceResult::Interrupted => "interrupted",
            DeviceResult::Unreachable => "unreachable",
        }
    }

    /// Whether the device ended on the new system.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            DeviceResult::Succeeded | DeviceResult::SucceededWithFailedUnits | DeviceResult::SucceededWithFailedChecks
        )
    }

    /// Whether the agent itself produces this result (the others are the controller's).
    pub fn is_reported_by_agent(self) -> bool {
        matches!(
            self,
            DeviceResult::Succeeded
                | DeviceResult::SucceededWithFailedUnits
                | DeviceResult::SucceededWithFailedChecks
                | DeviceResult::RolledBack
                | DeviceResult::RollbackFailed
                | DeviceResult::Failed
        )
    }
}

/// Why a device rolled back, or (`NoSafeReboot`, with `failed`) why it changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackReason {
    ActivationFailed,
    Unconfirmed,
    RebootedUnconfirmed,
    Asked,
    /// A reboot was needed, and the device's boot loader cannot boot a new generation
    /// once while keeping the previous one the default (extlinux).
    NoSafeReboot,
    /// Someone changed the system on the device during the deployment (`nixos-rebuild`):
    /// the agent stopped touching the profile and the boot loader (with `failed`).
    ChangedOnDevice,
    /// A required health check of the new system still failed at its deadline.
    HealthCheckFailed,
}

impl RollbackReason {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RollbackReason::ActivationFailed => "activation-failed",
            RollbackReason::Unconfirmed => "unconfirmed",
            RollbackReason::RebootedUnconfirmed => "rebooted-unconfirmed",
            RollbackReason::Asked => "asked",
            RollbackReason::NoSafeReboot => "no-safe-reboot",
            RollbackReason::ChangedOnDevice => "changed-on-device",
            RollbackReason::HealthCheckFailed => "health-check-failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_documented_ones() {
        let names: Vec<String> = [
            DeviceResult::Succeeded,
            DeviceResult::SucceededWithFailedUnits,
            DeviceResult::SucceededWithFailedChecks,
            DeviceResult::RolledBack,
            DeviceResult::RollbackFailed,
            DeviceResult::Failed,
            DeviceResult::Cancelled,
            DeviceResult::Superseded,
            DeviceResult::Expired,
            DeviceResult::Interrupted,
            DeviceResult::Unreachable,
        ]
        .iter()
        .map(|r| serde_json::to_string(r).expect("json"))
        .collect();
        assert_eq!(
            names.join(" "),
            r#""succeeded" "succeeded-with-failed-units" "succeeded-with-failed-checks" "rolled-back" "rollback-failed" "failed" "cancelled" "superseded" "expired" "interrupted" "unreachable""#
        );
        assert_eq!(
            serde_json::to_string(&RollbackReason::RebootedUnconfirmed).expect("json"),
            r#""rebooted-unconfirmed""#
        );
        assert_eq!(serde_json::to_string(&RollbackReason::NoSafeReboot).expect("json"), r#""no-safe-reboot""#);
        assert_eq!(serde_json::to_string(&RollbackReason::ChangedOnDevice).expect("json"), r#""changed-on-device""#);
        use RollbackReason as B;
        for r in
            [B::ActivationFailed, B::Unconfirmed, B::RebootedUnconfirmed, B::Asked, B::NoSafeReboot, B::ChangedOnDevice]
        {
            assert_eq!(serde_json::to_value(r).expect("json"), r.as_str(), "as_str is the JSON spelling");
        }
        for p in [Phase::Build, Phase::Copy, Phase::Activate, Phase::Confirm] {
            assert_eq!(serde_json::to_value(p).expect("json"), p.as_str(), "as_str is the JSON spelling");
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        use DeviceResult as R;
        for r in [
            R::Succeeded,
            R::SucceededWithFailedUnits,
            R::SucceededWithFailedChecks,
            R::RolledBack,
            R::RollbackFailed,
            R::Failed,
            R::Cancelled,
            R::Superseded,
            R::Expired,
            R::Interrupted,
            R::Unreachable,
        ] {
            assert_eq!(serde_json::to_value(r).expect("json"), r.as_str(), "as_str is the JSON spelling");
        }
    }
}

/// What the agent is doing, as published on D-Bus (`State`) and in reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    #[default]
    Idle,
    Downloading,
    Activating,
    AwaitingConfirmation,
    RollingBack,
}

impl AgentState {
    /// The D-Bus / JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Idle => "idle",
            AgentState::Downloading => "downloading",
            AgentState::Activating => "activating",
            AgentState::AwaitingConfirmation => "awaiting-confirmation",
            AgentState::RollingBack => "rolling-back",
        }
    }
}
