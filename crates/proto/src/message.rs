//! Every control message, by direction. One JSON object per WebSocket text frame,
//! tagged by `type`. Unknown fields are ignored, so a newer peer may add optional
//! fields within a protocol version; anything else needs a new version.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use thymis_store::{PathInfo, StorePath};

use crate::compact::CompactPath;
use crate::handshake::Nonce;
use crate::outcome::{AgentState, DeviceResult, Phase, RollbackReason};
use crate::signed::Signed;
use crate::stream::{JournalEntry, JournalQuery};
use crate::{MAX_HANDSHAKE_MESSAGE, MAX_TEXT_MESSAGE};

/// Messages the controller sends to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentBound {
    /// Handshake step 2: the controller proves its identity.
    Challenge {
        protocol: u32,
        /// The controller identity public key, `name:base64`.
        controller_key: String,
        server_nonce: Nonce,
        session: String,
        /// Identity-key signature over [`crate::handshake::controller_transcript`].
        signature: String,
    },
    /// Handshake step 4: the device is known and authenticated.
    Welcome {
        device: String,
        config: String,
        /// How often each side sends a heartbeat.
        heartbeat_secs: u64,
        /// Silence after which either side declares the connection dead.
        dead_after_secs: u64,
        /// The controller's clock (unix seconds) when it welcomed the agent: an agent
        /// without a synchronised clock judges offers' expiry by it.
        #[serde(default)]
        time: u64,
        /// Identity-key signature over [`crate::handshake::welcome_message`]; an agent
        /// refuses a welcome without one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    /// The connection is refused; the reason is meant for a person.
    Refused {
        reason: String,
    },
    /// A signed [`crate::signed::Offer`].
    Offer {
        offer: Signed,
    },
    /// Which of these paths (the offer's closure, dependencies first) does the device lack?
    QueryPaths {
        deployment_id: String,
        paths: Vec<StorePath>,
    },
    /// The NAR of `info.path` follows as binary frames of zstd data, then `PathEnd`.
    PathStart {
        deployment_id: String,
        info: PathInfo,
        /// The zstd data is a delta: compressed with the NAR of this path (one the device
        /// named in [`ControllerBound::PathsMissing`]'s `bases`) as reference prefix.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delta_base: Option<StorePath>,
    },
    PathEnd {
        deployment_id: String,
        path: StorePath,
    },
    /// Protocol 5, the compact copy: as [`AgentBound::PathStart`], for the path at
    /// `index` in the connection's last [`AgentBound::QueryPaths`] (its deployment),
    /// with its references by their indexes there too. With `delta`, the zstd data is
    /// a delta against the base the device named for this path in
    /// [`ControllerBound::PathsLacking`]. See [`crate::compact`].
    PathAt(CompactPath),
    /// Protocol 5: the path begun by the last [`AgentBound::PathAt`] is complete.
    PathDone,
    /// Every path is there: activate the offered system.
    Activate {
        deployment_id: String,
    },
    /// Protocol 3: every path is there, but the device may not switch yet (the
    /// deployment is staged: stage-only, outside its window, or held on the device).
    /// Keep the offered system from the garbage collector and answer
    /// [`ControllerBound::Staged`]; the switch comes later, with a new offer over a
    /// later connection (its copy is then empty) and [`AgentBound::Activate`].
    Stage {
        deployment_id: String,
    },
    /// Protocol 4: which of these paths (an update's closure, dependencies first) would
    /// the device's binary caches serve it, were it deployed? Answered with
    /// [`ControllerBound::CacheAnswer`]; no NAR is fetched and nothing changes.
    CacheQuery {
        query: String,
        paths: Vec<StorePath>,
    },
    /// A signed [`crate::signed::Confirmation`] for the pending deployment.
    Confirm {
        confirmation: Signed,
    },
    /// Stop this deployment if it has not activated yet.
    Cancel {
        deployment_id: String,
    },
    /// The controller recorded this outcome; the agent may stop re-sending it.
    OutcomeRecorded {
        deployment_id: String,
    },
    Heartbeat {
        seq: u64,
    },
    Error {
        message: String,
    },
    /// Protocol 2: stream journal entries ([`ControllerBound::JournalEntries`]) until the
    /// query is done or, with `follow`, until [`AgentBound::StreamClose`].
    JournalOpen {
        stream: u32,
        query: JournalQuery,
    },
    /// Protocol 2: a terminal: a PTY running `command`, or a login shell when it is empty.
    /// Refused unless the agent's configuration enables the terminal.
    TerminalOpen {
        stream: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        command: Vec<String>,
        cols: u16,
        rows: u16,
    },
    /// Keystrokes for a terminal (base64, at most [`crate::stream::MAX_TERMINAL_CHUNK`]
    /// bytes decoded).
    TerminalInput {
        stream: u32,
        data: String,
    },
    TerminalResize {
        stream: u32,
        cols: u16,
        rows: u16,
    },
    /// The client left: stop the stream (journalctl or the terminal's processes).
    StreamClose {
        stream: u32,
    },
}

/// Messages an agent sends to the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControllerBound {
    /// Handshake step 1.
    Hello {
        protocol_min: u32,
        protocol_max: u32,
        agent_version: String,
        /// The device's public key, `name:base64`.
        device_key: String,
        client_nonce: Nonce,
    },
    /// Handshake step 3: the device proves possession of its key.
    Auth {
        /// Device-key signature over [`crate::handshake::device_transcript`].
        signature: String,
        /// Sent by agents before the enrollment proof; refused (a token in the clear
        /// could be used by whoever saw it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        enrollment_token: Option<String>,
        /// Sent once, to enroll this key, and only after the controller proved itself:
        /// [`crate::handshake::enrollment_proof`] of the token.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        enrollment_proof: Option<String>,
    },
    /// What the device runs and has pending; sent right after the handshake.
    Report(DeviceReport),
    OfferAccepted {
        deployment_id: String,
    },
    OfferRefused {
        deployment_id: String,
        reason: String,
    },
    PathsMissing {
        deployment_id: String,
        missing: Vec<StorePath>,
        /// For some missing paths, a path of the same name the device has (an earlier
        /// version, usually): the controller may send a delta against it. An agent that
        /// sends none gets whole NARs.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        bases: Vec<DeltaBase>,
        /// How much the controller may send ahead of [`ControllerBound::PathImported`]
        /// acknowledgements. An agent that sends none gets [`CopyWindow::LEGACY`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<CopyWindow>,
        /// Paths of the closure the device got from its binary caches meanwhile (they are
        /// not in `missing`), and their compressed bytes.
        #[serde(default, skip_serializing_if = "is_zero")]
        substituted_paths: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        substituted_bytes: u64,
    },
    /// Protocol 5: [`ControllerBound::PathsMissing`] by index in the query: the paths
    /// the device lacks, and for some of them a base (a path of the same package it has).
    PathsLacking {
        deployment_id: String,
        missing: Vec<u32>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        bases: Vec<IndexedBase>,
        window: CopyWindow,
        #[serde(default, skip_serializing_if = "is_zero")]
        substituted_paths: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        substituted_bytes: u64,
    },
    /// Progress while the device substitutes from its binary caches, before it answers
    /// a path query: the controller keeps waiting while these come.
    Substituting {
        deployment_id: String,
        paths: u64,
        bytes: u64,
    },
    /// The path passed every check and is registered in the device's store.
    PathImported {
        deployment_id: String,
        path: StorePath,
    },
    /// Protocol 5: these paths (by index in the query) passed every check and are
    /// registered: one message for a whole import.
    PathsImported {
        deployment_id: String,
        paths: Vec<u32>,
    },
    /// The path was refused; the deployment is aborted on the device.
    PathRefused {
        deployment_id: String,
        path: StorePath,
        error: String,
    },
    /// Protocol 3: the offered system is kept (GC-rooted) until it is activated or
    /// replaced. `reboot_needed` says why activating it will reboot the device (a part
    /// only a boot applies changed, the offer asks for a reboot, or the new system's
    /// switch inhibitors differ from the running one's); `None` when it switches live.
    Staged {
        deployment_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reboot_needed: Option<String>,
    },
    /// Protocol 3: told to activate while an application on the device holds updates:
    /// nothing was switched, the offered system stays kept.
    Held {
        deployment_id: String,
        reason: String,
    },
    /// Output of activation, a line at a time.
    Log {
        deployment_id: String,
        line: String,
    },
    /// A terminal per-device result. Re-sent on every connection until recorded.
    Outcome(Outcome),
    Heartbeat {
        seq: u64,
    },
    Error {
        message: String,
    },
    /// Entries of a journal stream; `dropped` entries before these were over its rate.
    JournalEntries {
        stream: u32,
        entries: Vec<JournalEntry>,
        #[serde(default, skip_serializing_if = "is_zero")]
        dropped: u64,
    },
    /// A terminal's output (base64).
    TerminalOutput {
        stream: u32,
        data: String,
    },
    /// A stream is over: a journal query answered, a terminal's command exited (with
    /// its status), or an error that says why it could not run or went on.
    StreamEnd {
        stream: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_status: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Protocol 4: the paths of a [`AgentBound::CacheQuery`] the device lacks that its
    /// caches would serve (their references present or served too), and their
    /// compressed bytes.
    CacheAnswer {
        query: String,
        served: Vec<StorePath>,
        bytes: u64,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The device's account of itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    pub agent_version: String,
    /// The system it runs (`/run/current-system`, else the one it last activated).
    pub system: Option<StorePath>,
    pub commit: Option<String>,
    /// The system profile generation it runs, when it runs a committed generation.
    pub generation: Option<u64>,
    pub state: AgentState,
    /// The highest offer sequence it has applied.
    pub last_sequence: u64,
    /// A deployment activated and awaiting confirmation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingReport>,
    /// The system the profile names (what the device boots next) when it is not the one
    /// it runs: someone set it on the device, or a deployment is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_system: Option<StorePath>,
    /// Protocol 3: an application on the device holds updates (re-sent in a new report
    /// whenever it changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldReport>,
    /// Protocol 3: the device's time zone (IANA name), in which windows without one
    /// are read; UTC when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Protocol 3: why the device cannot serve its journal, or a terminal (absent: it
    /// can), so that the controller's pages offer only what works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_journal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_terminal: Option<String>,
}

/// A hold on updates, taken on the device over D-Bus or by its hold file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReport {
    pub reason: String,
    /// Unix time the hold was taken.
    pub since: u64,
    /// Older than the agent's `hold_max_age`: no longer obeyed (the device switches
    /// despite it), and said so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overdue: bool,
}

/// A deployment waiting for the controller's confirmation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReport {
    pub deployment_id: String,
    pub system: StorePath,
    pub sequence: u64,
    /// Seconds left before the agent rolls back by itself.
    pub seconds_left: u64,
}

/// How one deployment ended on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub deployment_id: String,
    pub result: DeviceResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<RollbackReason>,
    /// The phase a `failed` deployment stopped in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_units: Vec<String>,
    /// Last journal lines of each failed unit, where journald exists.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unit_logs: BTreeMap<String, Vec<String>>,
    /// The wanted health checks that still failed at their deadline (the new system
    /// stays; a required one failing rolls it back instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_checks: Vec<String>,
    /// The system the device runs now.
    pub system: Option<StorePath>,
    pub commit: Option<String>,
    pub generation: Option<u64>,
}

/// Why a message was refused.
#[derive(Debug, Error)]
pub enum ProtoError {
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message")]
    Malformed(#[source] serde_json::Error),
}

fn decode<T: serde::de::DeserializeOwned>(text: &str, authenticated: bool) -> Result<T, ProtoError> {
    let max = if authenticated { MAX_TEXT_MESSAGE } else { MAX_HANDSHAKE_MESSAGE };
    if text.len() > max {
        return Err(ProtoError::TooLarge { len: text.len(), max });
    }
    serde_json::from_str(text).map_err(ProtoError::Malformed)
}

/// Parses a message from the controller. Before the handshake is done (`authenticated`
/// false) only small messages are accepted.
pub fn decode_agent_bound(text: &str, authenticated: bool) -> Result<AgentBound, ProtoError> {
    decode(text, authenticated)
}

/// Parses a message from an agent; see [`decode_agent_bound`].
pub fn decode_controller_bound(text: &str, authenticated: bool) -> Result<ControllerBound, ProtoError> {
    decode(text, authenticated)
}

/// The JSON text of a message.
pub fn encode<T: Serialize>(msg: &T) -> String {
    // These types serialise infallibly (string keys, no non-finite floats).
    serde_json::to_string(msg).unwrap_or_default()
}

/// A path the device lacks, and one of the same name it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaBase {
    pub path: StorePath,
    pub base: StorePath,
}

/// A lacking path (by its index in the query) and a path of the same package the device
/// has, against which the controller may send a delta; `[index, "/nix/store/…"]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedBase(pub u32, pub StorePath);

/// Flow control of a copy: the sender keeps at most `paths` paths and `bytes` compressed
/// bytes sent but not yet acknowledged by [`ControllerBound::PathImported`] (or refused).
/// A single path larger than `bytes` may still go when nothing else is in flight. This
/// bounds what the agent holds (staged, not yet imported) whatever the closure's shape,
/// and lets it import many paths at once while the next ones arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyWindow {
    pub paths: u32,
    pub bytes: u64,
}

impl CopyWindow {
    /// What an agent that names no window gets: one path at a time.
    pub const LEGACY: CopyWindow = CopyWindow { paths: 1, bytes: 0 };

    /// Whether a path of `size` compressed bytes may go with `paths`/`bytes` in flight.
    pub fn admits(&self, paths: usize, bytes: u64, size: u64) -> bool {
        paths == 0 || (paths < self.paths as usize && bytes.saturating_add(size) <= self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::CopyWindow;

    #[test]
    fn a_window_admits_what_fits_and_always_one_path() {
        let w = CopyWindow { paths: 3, bytes: 100 };
        assert!(w.admits(0, 0, 1_000), "a path larger than the window goes alone");
        assert!(!w.admits(1, 1_000, 1), "nothing joins it");
        assert!(w.admits(2, 60, 40));
        assert!(!w.admits(2, 60, 41), "bytes");
        assert!(!w.admits(3, 3, 1), "paths");
        assert!(!CopyWindow::LEGACY.admits(1, 0, 0));
    }
}
