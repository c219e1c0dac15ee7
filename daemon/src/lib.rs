//! `thymis-agent`: the device half of Thymis's over-the-air deployments.
//!
//! It connects out to the controller, proves its identity, receives only the store
//! paths it lacks (each checked before it enters the store), activates the new system
//! through a helper that survives the agent, and keeps it only when the controller
//! confirms over a new connection in time; otherwise it returns to the previous
//! generation by itself. See `docs/agent.md`.

pub mod accounts;
pub mod activation;
pub mod agent;
pub mod bootloader;
pub mod bundle_install;
pub mod clock;
pub mod config;
pub mod connection;
pub mod dbus;
pub mod health;
pub mod hold;
pub mod journal;
pub mod lifecycle;
pub mod liveness;
pub mod persist;
pub mod profile;
pub mod receive;
pub mod sd_notify;
pub mod secrets;
pub mod state;
pub mod status;
pub mod streams;
pub mod substitute;
pub mod terminal;
pub mod tls;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use thymis_store::StorePath;

/// Command line of `thymis-agent`.
#[derive(Debug, Parser)]
#[command(name = "thymis-agent", version, about = "Thymis device agent")]
pub struct Cli {
    /// The agent's TOML configuration.
    #[arg(long, env = "THYMIS_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Internal: the activation helper (runs switch-to-configuration, records the result).
    #[command(hide = true)]
    Activate {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        system: StorePath,
        #[arg(long, value_enum)]
        action: activation::SwitchAction,
    },
}

/// Runs the agent (or the helper) until it is stopped.
pub fn main(cli: Cli) -> Result<()> {
    if let Some(Command::Activate { state_dir, name, system, action }) = cli.command {
        return activation::run_helper(&state_dir, &name, &system, action);
    }
    init_logging();
    let path = cli.config.context("--config FILE is required")?;
    let config = config::AgentConfig::load(&path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(config))
}

/// The agent's tasks: resume a pending deployment, the connection, D-Bus.
pub async fn run(config: config::AgentConfig) -> Result<()> {
    let agent = agent::Agent::new(config)?;
    // The secrets dir is a tmpfs: after a boot, the current secrets go back first.
    match secrets::restore_current(&agent.device_key, agent.state_dir(), &agent.config.secrets_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!("{n} secrets in place"),
        Err(e) => tracing::warn!("putting the secrets back in place: {e:#}"),
    }
    agent.resume().await;
    let dbus = tokio::spawn(dbus::serve_forever(agent.clone()));
    let conn = tokio::spawn(connection::run_forever(agent.clone()));
    let watchdog = tokio::spawn(sd_notify::watchdog(agent.liveness.clone()));
    let holds = tokio::spawn(agent.clone().watch_holds());
    sd_notify::ready();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    sd_notify::stopping();
    watchdog.abort();
    holds.abort();
    conn.abort();
    dbus.abort();
    Ok(())
}

/// Logs to stderr; without timestamps under systemd, whose journal adds its own.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("THYMIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).init();
    } else {
        // Colours only on a terminal: a log file gets plain text.
        builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
}
