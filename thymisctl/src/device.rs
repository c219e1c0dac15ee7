//! The device-side commands: talk to the local agent over the D-Bus system bus
//! (`io.thymis.Agent1`; `DBUS_SYSTEM_BUS_ADDRESS` is honoured).

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};

#[zbus::proxy(interface = "io.thymis.Agent1", default_service = "io.thymis.Agent1", default_path = "/io/thymis/Agent1")]
trait Agent1 {
    fn rollback(&self) -> zbus::Result<String>;
    fn install_bundle(&self, path: &str) -> zbus::Result<String>;
    fn hold(&self, reason: &str) -> zbus::Result<String>;
    fn release(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn held(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn current_system(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn current_commit(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn previous_system(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn controller_connected(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<u8>;
    #[zbus(property)]
    fn last_deployment(&self) -> zbus::Result<String>;
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

async fn proxy(timeout: Duration) -> Result<Agent1Proxy<'static>> {
    let conn = zbus::connection::Builder::system()
        .method_timeout(timeout)
        .build()
        .await
        .context("connecting to the D-Bus system bus")?;
    Ok(Agent1Proxy::new(&conn).await?)
}

/// The agent's properties.
pub fn status() -> Result<Value> {
    block_on(async {
        let p = proxy(Duration::from_secs(10)).await?;
        let last: Value = serde_json::from_str(&p.last_deployment().await.context("is thymis-agent running?")?)
            .unwrap_or(Value::Null);
        Ok(json!({
            "State": p.state().await?,
            "CurrentSystem": p.current_system().await?,
            "CurrentCommit": p.current_commit().await?,
            "PreviousSystem": p.previous_system().await?,
            "ControllerConnected": p.controller_connected().await?,
            "Progress": p.progress().await?,
            "LastDeployment": last,
            "Held": serde_json::from_str::<Value>(&p.held().await?).unwrap_or(Value::Null),
        }))
    })
}

pub fn rollback() -> Result<String> {
    block_on(async { Ok(proxy(Duration::from_secs(60)).await?.rollback().await?) })
}

/// Holds updates (root, or the agent's hold_group).
pub fn hold(reason: &str) -> Result<String> {
    block_on(async { Ok(proxy(Duration::from_secs(10)).await?.hold(reason).await?) })
}

/// Releases the hold taken with [`hold`].
pub fn release() -> Result<String> {
    block_on(async { Ok(proxy(Duration::from_secs(10)).await?.release().await?) })
}

/// Installs a bundle; waits for its outcome (activation, health check, commit).
pub fn install_bundle(path: &std::path::Path) -> Result<Value> {
    let abs = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
    block_on(async {
        let out = proxy(Duration::from_secs(3600)).await?.install_bundle(&abs.to_string_lossy()).await?;
        Ok(serde_json::from_str(&out).unwrap_or(Value::String(out)))
    })
}
