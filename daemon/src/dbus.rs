//! D-Bus service `io.thymis.Agent1` (placeholder until wired): see docs/agent.md.

use std::sync::Arc;

use crate::agent::Agent;

/// Serves the agent's status on the system bus, retrying while there is none.
pub async fn serve_forever(_agent: Arc<Agent>) {}
