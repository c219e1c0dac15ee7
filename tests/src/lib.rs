//! Fleet test harness: the real `thymis-controller` and real `thymis-agent`s on
//! **process devices**: each agent in its own mount namespace (its own `/nix`, a
//! private tmpfs `/run`) and its own network namespace, linked to the controller by a
//! veth pair on a bridge. Everything a fleet creates is removed when it is dropped,
//! even when the test fails.
//!
//! Needs root, Nix, iproute2 and nftables (`scripts/setup.sh` installs them) and the
//! workspace's binaries built (`cargo build --workspace --bins`; `make test` does).
//!
//! `fleet` (a fleet and its options), `controller`, `device` (process and systemd
//! devices), `net` (the bridge and veths), `bus` (a private system bus); beside them the
//! parts some tests add: `vm` and `board` (QEMU), `postgres`, `nginx`, `balancer`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub mod balancer;
pub mod board;
pub mod nginx;
pub mod postgres;
pub mod vm;

mod bus;
mod controller;
mod device;
mod fleet;
mod net;

pub use bus::SystemBus;
pub use controller::Controller;
use device::install_units;
pub use device::{Device, Kind};
pub use fleet::{Fleet, FleetOptions};
pub use net::ClientNet;
use net::{NEXT_NET, Net};

/// The directory holding the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("THYMIS_BIN_DIR") {
        return d.into();
    }
    // target/debug/deps/<test binary> -> target/debug; target/release/<bench> -> target/release
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_owned()
    } else {
        dir.to_owned()
    }
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` first (make test does)", p.display());
    p
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Waits until `f` returns `Some`, or fails after `timeout` with `what`.
/// Unix seconds by this machine's clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A WebSocket to `url` (`ws://` or `wss://`), as a scripted agent opens one: over TLS
/// it takes whatever certificate the controller shows (the harness's own controller;
/// pinning is what `tests/tests/tls.rs` checks).
pub async fn ws_connect(
    url: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
    let config = thymis_tls_pin::Pinned::new(None, "nothing").client_config()?;
    let connector = tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(config));
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector)).await?;
    Ok(ws)
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
