//! The agent on the D-Bus system bus: `io.thymis.Agent1` at `/io/thymis/Agent1`.
//!
//! The interface object is a thin adapter over [`Agent`]: properties read the agent's
//! status, changes are announced with `PropertiesChanged` as the status changes, and
//! methods check the caller's uid (root only) on top of the bus policy
//! (`daemon/dbus/io.thymis.Agent1.conf`). Without a system bus the agent runs on and
//! retries.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, fdo, interface};

use crate::agent::Agent;
use crate::status::Status;

pub const BUS_NAME: &str = "io.thymis.Agent1";
pub const OBJECT_PATH: &str = "/io/thymis/Agent1";

/// The exported object.
#[derive(Debug)]
pub struct AgentObject {
    agent: Arc<Agent>,
}

fn path_or_empty(p: &Option<thymis_store::StorePath>) -> String {
    p.as_ref().map(ToString::to_string).unwrap_or_default()
}

/// Refuses callers that are not root, whatever the bus policy says.
async fn require_root(conn: &Connection, hdr: &Header<'_>) -> fdo::Result<()> {
    let sender = hdr.sender().ok_or_else(|| fdo::Error::AccessDenied("no sender".into()))?;
    let uid = fdo::DBusProxy::new(conn)
        .await?
        .get_connection_unix_user(sender.clone().into())
        .await
        .map_err(|e| fdo::Error::AccessDenied(format!("cannot identify the caller: {e}")))?;
    if uid != 0 {
        return Err(fdo::Error::AccessDenied(format!("only root may do this (caller uid {uid})")));
    }
    Ok(())
}

/// Refuses callers that are neither root nor in `group` (by the groups the bus saw
/// when they connected).
async fn require_root_or_group(conn: &Connection, hdr: &Header<'_>, group: Option<&str>) -> fdo::Result<()> {
    let Some(group) = group else { return require_root(conn, hdr).await };
    let sender = hdr.sender().ok_or_else(|| fdo::Error::AccessDenied("no sender".into()))?;
    let creds = fdo::DBusProxy::new(conn)
        .await?
        .get_connection_credentials(sender.clone().into())
        .await
        .map_err(|e| fdo::Error::AccessDenied(format!("cannot identify the caller: {e}")))?;
    let uid = creds.unix_user_id();
    if uid == Some(0) {
        return Ok(());
    }
    let gid = crate::accounts::group_id(group).ok();
    let member = gid.is_some_and(|g| creds.unix_group_ids().is_some_and(|ids| ids.contains(&g)));
    if member {
        return Ok(());
    }
    Err(fdo::Error::AccessDenied(format!(
        "only root or members of group {group} may do this (caller uid {})",
        uid.map_or("unknown".into(), |u| u.to_string())
    )))
}

#[interface(name = "io.thymis.Agent1")]
impl AgentObject {
    /// idle, downloading, activating, awaiting-confirmation or rolling-back.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.agent.status().state.as_str().to_owned()
    }

    #[zbus(property)]
    async fn current_system(&self) -> String {
        path_or_empty(&self.agent.status().current_system)
    }

    #[zbus(property)]
    async fn current_commit(&self) -> String {
        self.agent.status().current_commit.unwrap_or_default()
    }

    /// The rollback point while a deployment is pending.
    #[zbus(property)]
    async fn previous_system(&self) -> String {
        path_or_empty(&self.agent.status().previous_system)
    }

    #[zbus(property)]
    async fn controller_connected(&self) -> bool {
        self.agent.status().controller_connected
    }

    /// Percent of the current download (100 when idle).
    #[zbus(property)]
    async fn progress(&self) -> u8 {
        self.agent.status().progress
    }

    /// The last deployment's outcome as JSON (empty before the first).
    #[zbus(property)]
    async fn last_deployment(&self) -> String {
        self.agent.status().last_deployment
    }

    /// Rolls back the deployment awaiting confirmation.
    async fn rollback(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> fdo::Result<String> {
        require_root(conn, &hdr).await?;
        self.agent.rollback_requested().await.map_err(|e| fdo::Error::Failed(format!("{e:#}")))?;
        Ok("rolling back".into())
    }

    /// The hold on updates as JSON (`reason`, `since`, `overdue`); empty when none.
    #[zbus(property)]
    async fn held(&self) -> String {
        self.agent.status().hold
    }

    /// Holds updates: deployments are copied and staged, and switch once released.
    async fn hold(
        &self,
        reason: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> fdo::Result<String> {
        require_root_or_group(conn, &hdr, self.agent.config.hold_group.as_deref()).await?;
        self.agent.holds.hold(&reason).map_err(|e| fdo::Error::Failed(format!("storing the hold: {e}")))?;
        self.agent.hold_changed();
        Ok("held".into())
    }

    /// Releases the hold taken with `Hold` (a hold file stays until it is removed).
    async fn release(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> fdo::Result<String> {
        require_root_or_group(conn, &hdr, self.agent.config.hold_group.as_deref()).await?;
        let had = self.agent.holds.release().map_err(|e| fdo::Error::Failed(format!("removing the hold: {e}")))?;
        self.agent.hold_changed();
        Ok(if had { "released" } else { "there was no hold" }.into())
    }

    /// Installs an offline update bundle from a file the caller names.
    async fn install_bundle(
        &self,
        path: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> fdo::Result<String> {
        require_root(conn, &hdr).await?;
        crate::bundle_install::install(&self.agent, std::path::Path::new(&path))
            .await
            .map_err(|e| fdo::Error::Failed(format!("{e:#}")))
    }

    /// A deployment ended: its id, result and reason (empty when none).
    #[zbus(signal)]
    async fn deployment_finished(
        emitter: &SignalEmitter<'_>,
        deployment_id: &str,
        result: &str,
        reason: &str,
    ) -> zbus::Result<()>;
}

/// Serves on the system bus for as long as the agent runs, reconnecting when needed.
pub async fn serve_forever(agent: Arc<Agent>) {
    if !agent.config.dbus {
        return;
    }
    // Said once per kind of failure: a device without a bus would otherwise fill its
    // journal with the same line every few seconds.
    let mut last = String::new();
    loop {
        match serve(agent.clone()).await {
            Ok(()) => return,
            Err(e) => {
                let text = format!("{e:#}");
                if text != last {
                    warn!("D-Bus system bus: {text}; retrying every 5 s");
                } else {
                    debug!("D-Bus system bus: {text}; retrying in 5 s");
                }
                last = text;
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn serve(agent: Arc<Agent>) -> anyhow::Result<()> {
    let conn = zbus::connection::Builder::system()
        .serve_at(OBJECT_PATH, AgentObject { agent: agent.clone() })
        .name(BUS_NAME)
        .build()
        .await?;
    info!(name = BUS_NAME, "serving on the D-Bus system bus");
    let iface = conn.object_server().interface::<_, AgentObject>(OBJECT_PATH).await?;
    let mut rx = agent.subscribe();
    let mut last: Status = rx.borrow().clone();
    loop {
        if rx.changed().await.is_err() {
            return Ok(());
        }
        let now = rx.borrow_and_update().clone();
        let obj = iface.get().await;
        let e = iface.signal_emitter();
        if now.state != last.state {
            obj.state_changed(e).await?;
        }
        if now.current_system != last.current_system {
            obj.current_system_changed(e).await?;
        }
        if now.current_commit != last.current_commit {
            obj.current_commit_changed(e).await?;
        }
        if now.previous_system != last.previous_system {
            obj.previous_system_changed(e).await?;
        }
        if now.controller_connected != last.controller_connected {
            obj.controller_connected_changed(e).await?;
        }
        if now.hold != last.hold {
            obj.held_changed(e).await?;
        }
        if now.progress != last.progress {
            obj.progress_changed(e).await?;
        }
        if now.last_deployment != last.last_deployment {
            obj.last_deployment_changed(e).await?;
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&now.last_deployment) {
                let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                AgentObject::deployment_finished(e, &s("deployment_id"), &s("result"), &s("reason")).await?;
            }
        }
        last = now;
    }
}
