//! systemd's readiness and watchdog protocol (`Type=notify`, `WatchdogSec=`): datagrams
//! to `$NOTIFY_SOCKET`. A no-op when not started by systemd.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let path = path.to_string_lossy().into_owned();
    let Ok(sock) = UnixDatagram::unbound() else { return };
    // '@' names a socket in the abstract namespace.
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    if let Ok(addr) = addr {
        let _ = sock.send_to_addr(state.as_bytes(), &addr);
    }
}

/// Tells systemd the agent is up.
pub fn ready() {
    send("READY=1");
}

pub fn stopping() {
    send("STOPPING=1");
}

/// Pings the watchdog at half its interval, when systemd set one, but only while
/// `liveness` has beaten within that half: a wedged connection loop gets the agent
/// restarted.
pub async fn watchdog(liveness: std::sync::Arc<crate::liveness::Liveness>) {
    let Some(usec) = std::env::var("WATCHDOG_USEC").ok().and_then(|v| v.parse::<u64>().ok()) else { return };
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    loop {
        let silent = liveness.silent_for();
        if silent < every {
            send("WATCHDOG=1");
        } else {
            tracing::error!("the connection loop has made no progress for {silent:?}: not feeding the watchdog");
        }
        tokio::time::sleep(every).await;
    }
}
