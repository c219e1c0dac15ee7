//! What the agent keeps in its state directory. Everything is written atomically.
//!
//! ```text
//! STATE_DIR/device.key          the device's ed25519 key (0600), unless the imager put one
//! STATE_DIR/state.json          enrollment, last applied sequence, running system, outbox
//! STATE_DIR/pending.json        the deployment that is activating or awaiting confirmation
//! STATE_DIR/activations/        the activation helper's logs and results
//! STATE_DIR/gcroots/            GC roots of a deployment's new system and rollback point
//! STATE_DIR/staging/            NARs being received and checked (cleared at start)
//! ```

use serde::{Deserialize, Serialize};
use thymis_proto::message::Outcome;
use thymis_proto::signed::Offer;
use thymis_store::StorePath;

use crate::clock::BootDeadline;
use crate::lifecycle::Stage;

/// How many finished deployments the local history keeps.
pub const HISTORY_LEN: usize = 50;

/// `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Persisted {
    /// The controller accepted this device's key; the token is not sent again.
    pub enrolled: bool,
    /// The name the controller knows this device by (from its welcome).
    pub device_name: Option<String>,
    /// Its configuration (from the welcome), for bundles addressed to a configuration.
    pub config: Option<String>,
    /// Highest offer sequence applied (activated). Offers at or below are refused.
    pub last_sequence: u64,
    /// The system last made permanent (or returned to), and its commit.
    pub system: Option<StorePath>,
    pub commit: Option<String>,
    /// Outcomes the controller has not yet acknowledged.
    pub outbox: Vec<Outcome>,
    /// Recent outcomes, newest last.
    pub history: Vec<Outcome>,
}

/// `pending.json`: a deployment between "activation starts" and its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub offer: Offer,
    /// The system profile's system before this deployment: the rollback point.
    pub previous: Option<StorePath>,
    pub previous_commit: Option<String>,
    /// The boot during which activation happened.
    pub boot_id: String,
    /// Set once activation succeeded.
    pub deadline: Option<BootDeadline>,
    pub stage: Stage,
    /// A reboot the agent itself asked for (boot-once deployments).
    #[serde(default)]
    pub planned_reboot: bool,
    /// Confirmed locally (offline bundle): activation exit 0/4 and the health check.
    #[serde(default)]
    pub local_confirm: bool,
    /// Applied by rebooting (kernel changed, or the offer asked): rolling back reboots too.
    #[serde(default)]
    pub reboot: bool,
}
