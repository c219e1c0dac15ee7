//! The controller's HTTP API (`/api/v1`, docs/controller.md) as types: what clients send
//! and what the controller answers. The controller serializes these, and `thymisctl`,
//! the imager and the fleet tests read them, so the JSON on the wire has one
//! definition. Device results are `thymis_proto::DeviceResult` everywhere, and whether
//! a device succeeded is its `is_success`.

pub mod artifacts;
pub mod preview;
pub mod project;
pub mod rollout;
pub mod secrets;
pub mod terminal;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
pub use thymis_proto::{DeviceResult, HoldReport, Phase, RollbackReason};

pub use artifacts::{Artifact, ArtifactRequest, ArtifactsDeleted, BuildRequest};
pub use project::{CommitRequest, Committed, FileChange, ProjectStatus};
pub use rollout::{Count, Staging};
pub use terminal::{ErrorBody, TerminalControl, TerminalEnd, TerminalSize};

/// What to deploy where (`POST /deploy` and `/deploy/preview`, `thymisctl deploy`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct DeployRequest {
    pub devices: Vec<String>,
    pub configs: Vec<String>,
    pub tags: Vec<String>,
    /// A commit to deploy; default: HEAD, after committing uncommitted changes.
    pub commit: Option<String>,
    /// Commit message when the project has uncommitted changes.
    pub message: Option<String>,
    pub reboot: bool,
    /// Waves: a canary, wave sizes, failures tolerated, a soak (none by default).
    #[serde(flatten)]
    pub staging: Staging,
    /// Copy, then stop in the stage `staged` until `POST /tasks/{id}/activate`.
    pub stage_only: bool,
    /// The maintenance window the devices switch in (docs/controller.md, "Maintenance
    /// windows"), instead of their configurations' or tags' from thymis.toml.
    pub window: Option<String>,
}

/// Which staged devices of a deployment to switch now (`POST /tasks/{id}/activate`);
/// none named: all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct ActivateRequest {
    pub devices: Vec<String>,
}

/// What `POST /tasks/{id}/activate` did, per device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Activated {
    /// Switching now (or once their copy ends).
    pub activating: Vec<String>,
    /// Still waiting: an application on the device holds updates.
    pub held: Vec<String>,
}

/// `YYYY-MM-DDTHH:MM:SSZ` of unix seconds.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// Bytes in the unit a person reads them in: `512 B`, `1.5 KiB`, `76.3 MiB`.
pub fn human_bytes(n: i64) -> String {
    let mut v = n.max(0) as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 || unit == "GiB" {
            return if unit == "B" { format!("{v} B") } else { format!("{v:.1} {unit}") };
        }
        v /= 1024.0;
    }
    unreachable!("GiB ends the loop")
}

/// Seconds as a person reads them: `45 s`, `3 min 12 s`, `1 h 4 min`.
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

impl Child {
    /// What the device's part of the deployment is doing, in the words the web UI uses
    /// (docs/ui.md): `waiting for wave 2`, `offline: queued`, `about to copy`,
    /// `building`, `copying`, `staged`, `activating`, `confirming`, `done`.
    pub fn status(&self) -> String {
        if self.result.is_some() {
            return "done".into();
        }
        match (self.state, self.phase) {
            (ChildState::Pending, _) => format!("waiting for wave {}", self.wave),
            (ChildState::Queued, _) if self.online => "about to copy".into(),
            (ChildState::Queued, _) => "offline: queued".into(),
            (ChildState::Staged, _) => "staged".into(),
            (_, Some(Phase::Build)) => "building".into(),
            (_, Some(Phase::Copy)) => "copying".into(),
            (_, Some(Phase::Activate)) => "activating".into(),
            (_, Some(Phase::Confirm)) => "confirming".into(),
            (state, None) => state.as_str().into(),
        }
    }
}

impl Waiting {
    /// What a person reads (the task view, `thymisctl task`, the task's log).
    pub fn describe(&self) -> String {
        match self {
            Waiting::Activation => "staged: waiting for thymisctl activate".into(),
            Waiting::Window { window, opens } => {
                format!("waiting for window {window:?} (opens {})", utc((*opens).max(0) as u64))
            }
            Waiting::Hold { reason, .. } => format!("held: {reason}"),
            Waiting::Connection => "staged: switches when the device connects".into(),
        }
    }
}

/// Why a staged device has not switched yet.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "for", rename_all = "kebab-case")]
pub enum Waiting {
    /// A `--stage-only` deployment: `thymisctl activate` switches it.
    Activation,
    /// Outside its maintenance window, which opens at `opens` (unix time).
    Window { window: String, opens: i64 },
    /// An application on the device holds updates.
    Hold { reason: String, since: u64 },
    /// It may switch; the device is not connected.
    Connection,
}

/// What a deployment would touch.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Preview {
    /// The commit that would be deployed; `None` when uncommitted changes would be
    /// committed first.
    pub commit: Option<String>,
    pub uncommitted_changes: usize,
    pub configs: Vec<String>,
    pub devices: Vec<PreviewDevice>,
    /// A staged rollout's waves: how many devices each (in the devices' order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct PreviewDevice {
    pub name: String,
    pub config: String,
    pub online: bool,
    /// The commit it runs now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

/// A task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    Pending,
    Running,
    /// Only queued devices (offline ones) remain.
    Waiting,
    Finished,
    Cancelled,
    /// A staged rollout stopped by itself: more devices failed than tolerated.
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
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }

    /// Nothing more happens by itself (a waiting task goes on when its devices connect).
    pub fn is_settled(self) -> bool {
        !matches!(self, TaskState::Pending | TaskState::Running)
    }
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskResult {
    Succeeded,
    PartiallyFailed,
    Failed,
    Cancelled,
    Halted,
}

impl TaskResult {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskResult::Succeeded => "succeeded",
            TaskResult::PartiallyFailed => "partially-failed",
            TaskResult::Failed => "failed",
            TaskResult::Cancelled => "cancelled",
            TaskResult::Halted => "halted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

/// A device's part of a deployment, as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChildState {
    /// A later wave's device, not offered yet.
    Pending,
    /// Its turn, waiting for the device to connect.
    Queued,
    /// Copied; waiting until it may switch (its `waiting` says what for).
    Staged,
    Running,
    Finished,
}

impl ChildState {
    pub fn as_str(self) -> &'static str {
        match self {
            ChildState::Pending => "pending",
            ChildState::Queued => "queued",
            ChildState::Staged => "staged",
            ChildState::Running => "running",
            ChildState::Finished => "finished",
        }
    }
}

/// A task (`GET /tasks/{id}`, `GET /tasks`, the `task` events).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Task {
    pub id: i64,
    /// `deployment`, `build`, `image`, `bundle`.
    pub kind: String,
    pub state: TaskState,
    pub result: Option<TaskResult>,
    pub commit: Option<String>,
    pub message: Option<String>,
    pub config: Option<String>,
    pub system: Option<String>,
    pub error: Option<String>,
    pub created: i64,
    pub updated: i64,
    pub expires: Option<i64>,
    /// A staged rollout's plan and where it is.
    pub rollout: Option<Rollout>,
    /// One per device, for a deployment.
    pub children: Vec<Child>,
    /// The first line of the commit's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_subject: Option<String>,
    /// What a task that succeeded wants its reader to know: an image that cannot boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl Task {
    /// Every device ended on the new system (what `thymisctl deploy --wait` exits 0 for).
    pub fn all_succeeded(&self) -> bool {
        !self.children.is_empty() && self.children.iter().all(|c| c.result.is_some_and(DeviceResult::is_success))
    }

    /// Every device succeeded or is staged (copied, switching later: stage-only,
    /// outside its window, or held), or, in a later wave, waits behind staged ones.
    pub fn all_succeeded_or_staged(&self) -> bool {
        !self.children.is_empty()
            && self.children.iter().all(|c| {
                matches!(c.state, ChildState::Staged | ChildState::Pending)
                    || c.result.is_some_and(DeviceResult::is_success)
            })
    }

    pub fn child(&self, device: &str) -> Option<&Child> {
        self.children.iter().find(|c| c.device == device)
    }
}

/// A staged rollout: its plan, the wave it is at (from 1), and the end of a soak.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Rollout {
    #[serde(flatten)]
    pub plan: Staging,
    pub wave: usize,
    pub soak_until: Option<i64>,
}

/// One device's deployment.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Child {
    pub id: i64,
    pub device: String,
    pub config: String,
    pub state: ChildState,
    /// `build`, `copy`, `activate`, `confirm` (a finished one: where it ended).
    pub phase: Option<Phase>,
    pub result: Option<DeviceResult>,
    /// Why it rolled back (`activation-failed`, ...), `no-safe-reboot`, `changed-on-device`, `halted`.
    pub reason: Option<Reason>,
    pub error: Option<String>,
    pub failed_units: Vec<String>,
    /// The wanted health checks that failed (`succeeded-with-failed-checks`).
    #[serde(default)]
    pub failed_checks: Vec<String>,
    /// Last journal lines of each failed unit.
    pub unit_logs: BTreeMap<String, Vec<String>>,
    pub paths_sent: i64,
    pub bytes_sent: i64,
    /// Paths the device lacked when the copy first started.
    pub paths_total: Option<i64>,
    pub system: Option<String>,
    pub deployment_id: String,
    pub sequence: Option<i64>,
    pub updated: i64,
    /// Its wave (from 1).
    pub wave: usize,
    /// Paths the device got from its binary caches instead (and their compressed bytes).
    #[serde(default)]
    pub paths_substituted: i64,
    #[serde(default)]
    pub bytes_substituted: i64,
    /// A staged device's reason to wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// Why switching it will reboot the device (a new kernel, changed switch
    /// inhibitors, `--reboot`), as the device said when it was staged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_needed: Option<String>,
    /// Whether the device is connected now (a queued one that is not waits for it).
    #[serde(default)]
    pub online: bool,
    /// While its copy runs: how far, in the NAR bytes of the paths it lacks (counted as
    /// they stream, so one large path shows progress too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyProgress>,
    /// What it gets, by package, against the system it ran when the deployment was
    /// built (where the controller had that system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<preview::Packages>,
}

/// A copy under way (`Child::copy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct CopyProgress {
    /// NAR bytes of the paths sent so far, the one being sent in proportion.
    pub nar_bytes_done: u64,
    pub nar_bytes_total: u64,
    /// Compressed bytes written to the device's connection, acknowledged or not.
    pub bytes_streamed: u64,
}

/// A device (`GET /devices`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Device {
    pub name: String,
    pub config: String,
    pub key_fingerprint: Option<String>,
    pub enrolled: bool,
    pub revoked: bool,
    pub last_seen: Option<i64>,
    pub system: Option<String>,
    pub commit: Option<String>,
    pub generation: Option<i64>,
    pub agent_version: Option<String>,
    pub agent_state: Option<String>,
    /// The system the device's profile names when it is not the one it runs: what it
    /// boots next, set on the device by hand (or a deployment under way).
    #[serde(default)]
    pub boots_next: Option<String>,
    pub online: bool,
    /// An application on the device holds updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldReport>,
    /// The device's time zone (windows without their own are read in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Why the device cannot serve its journal, or a terminal, as its agent says (absent:
    /// it can, or its agent does not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_journal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_terminal: Option<String>,
    /// The first line of its commit's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_subject: Option<String>,
    /// How many commits the project's HEAD is ahead of the device's commit (0: it runs
    /// HEAD); none when its commit is not in the project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behind_head: Option<u32>,
    /// Its deployment under way, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<OpenDeployment>,
}

/// A device's deployment under way: its task, and where the device is in it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct OpenDeployment {
    pub task: i64,
    pub state: ChildState,
}

/// A device with what its page shows (`GET /devices/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub device: Device,
    /// Its configuration's tags in the project's working tree.
    pub tags: Vec<String>,
    /// Whether its configuration still exists in the project's working tree.
    pub config_exists: bool,
    /// Its deployments, newest first (the last 50).
    pub history: Vec<DeviceDeployment>,
}

/// Why a device's deployment ended as it did: the agent's reason, or the controller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Not offered: the staged rollout halted before the device's wave.
    Halted,
    /// The agent's (`activation-failed`, `unconfirmed`, `no-safe-reboot`, ...).
    #[serde(untagged)]
    Device(RollbackReason),
}

impl Reason {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Halted => "halted",
            Reason::Device(r) => r.as_str(),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One deployment to a device, as its history shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct DeviceDeployment {
    pub task: i64,
    pub deployment_id: String,
    pub commit: Option<String>,
    pub message: Option<String>,
    pub state: ChildState,
    pub result: Option<DeviceResult>,
    pub reason: Option<Reason>,
    pub error: Option<String>,
    pub system: Option<String>,
    /// When the deployment was created, and when this device's part last changed.
    pub created: i64,
    pub updated: i64,
    /// A staged deployment's reason to wait, and why switching will reboot the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_needed: Option<String>,
}

/// One event of a journal stream (`GET /devices/{name}/journal`, one JSON object per
/// line): an entry, entries dropped over a rate or a slow reader, or the end.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalEvent {
    Entry(thymis_proto::stream::JournalEntry),
    Dropped(u64),
    End {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// A device's enrollment (`POST /devices`, `/devices/{name}/reenroll`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Enrollment {
    pub name: String,
    pub enrollment_token: String,
    /// A complete agent configuration (TOML) holding the token.
    pub agent_config: String,
}

/// `POST /devices`: a device added, bound to a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct AddDevice {
    pub name: String,
    pub config: String,
}

/// `POST /devices/{name}/revoke`: its key no longer connects.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Revoked {
    pub name: String,
    pub revoked: bool,
}

/// The controller's public keys (`GET /identity`): what agents and images pin.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Identity {
    pub identity_key: String,
    pub nix_signing_key: String,
}

/// A line of a task's log (`GET /tasks/{id}/logs`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct LogLine {
    pub id: i64,
    pub child: Option<i64>,
    pub line: String,
}

#[cfg(test)]
mod human_tests {
    #[test]
    fn sizes_and_durations_read_as_people_write_them() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(80_000_000), "76.3 MiB");
        assert_eq!(super::human_duration(45), "45 s");
        assert_eq!(super::human_duration(192), "3 min 12 s");
        assert_eq!(super::human_duration(3840), "1 h 4 min");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_back_as_their_documented_names() {
        let reasons =
            [Reason::Halted, Reason::Device(RollbackReason::NoSafeReboot), Reason::Device(RollbackReason::Unconfirmed)];
        for r in reasons {
            let json = serde_json::to_value(r).expect("json");
            assert_eq!(json, r.as_str());
            assert_eq!(serde_json::from_value::<Reason>(json).expect("read"), r);
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        assert_eq!(Reason::parse("halted"), Some(Reason::Halted));
        assert_eq!(Reason::parse("activation-failed"), Some(Reason::Device(RollbackReason::ActivationFailed)));
        assert_eq!(Reason::parse("made-up"), None);
    }

    #[test]
    fn a_task_reads_back_as_written_and_success_is_one_rule() {
        let child = |device: &str, result: Option<DeviceResult>| Child {
            id: 1,
            device: device.into(),
            config: "kiosk".into(),
            state: if result.is_some() { ChildState::Finished } else { ChildState::Running },
            phase: Some(Phase::Confirm),
            result,
            reason: None,
            error: None,
            failed_units: vec![],
            failed_checks: vec![],
            unit_logs: BTreeMap::new(),
            paths_sent: 3,
            bytes_sent: 1000,
            paths_total: Some(3),
            system: None,
            deployment_id: "dp-0011223344556677".into(),
            sequence: Some(4),
            updated: 0,
            wave: 1,
            paths_substituted: 0,
            bytes_substituted: 0,
            waiting: None,
            reboot_needed: None,
            online: true,
            copy: None,
            packages: None,
        };
        let mut t = Task {
            id: 7,
            kind: "deployment".into(),
            state: TaskState::Finished,
            result: Some(TaskResult::Succeeded),
            commit: None,
            message: None,
            config: None,
            system: None,
            error: None,
            created: 0,
            updated: 0,
            expires: None,
            rollout: Some(Rollout {
                plan: Staging { canary: Some(Count::Devices(1)), ..Default::default() },
                wave: 2,
                soak_until: None,
            }),
            children: vec![
                child("a", Some(DeviceResult::Succeeded)),
                child("b", Some(DeviceResult::SucceededWithFailedUnits)),
            ],
            commit_subject: None,
            warning: None,
        };
        let json = serde_json::to_value(&t).expect("json");
        assert_eq!(json["rollout"]["canary"], 1);
        assert_eq!(json["rollout"]["wave"], 2);
        assert_eq!(json["children"][1]["result"], "succeeded-with-failed-units");
        assert_eq!(serde_json::from_value::<Task>(json).expect("back"), t);
        assert!(t.all_succeeded());
        t.children.push(child("c", Some(DeviceResult::RolledBack)));
        assert!(!t.all_succeeded());
        t.children[2].result = None;
        assert!(!t.all_succeeded());
        assert_eq!(TaskState::parse("halted"), Some(TaskState::Halted));
        assert_eq!(TaskResult::parse("partially-failed"), Some(TaskResult::PartiallyFailed));
    }
}
