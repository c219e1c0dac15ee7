//! The agent's observable status: what D-Bus publishes and reports summarise.

use thymis_proto::AgentState;
use thymis_store::StorePath;

/// Published through a `watch` channel; D-Bus mirrors it as properties.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    pub state: AgentState,
    pub current_system: Option<StorePath>,
    pub current_commit: Option<String>,
    pub previous_system: Option<StorePath>,
    pub controller_connected: bool,
    /// 0..=100 while downloading; 100 otherwise.
    pub progress: u8,
    /// JSON of the last outcome.
    pub last_deployment: String,
    /// The hold on updates, as JSON (`reason`, `since`, `overdue`); empty when none.
    pub hold: String,
}
