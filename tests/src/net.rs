//! The fleet's network: a bridge on this machine and a veth pair per device.

use super::*;

pub(crate) static NEXT_NET: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
/// A bridge on the host with its own /24; devices hang off it.
pub(crate) struct Net {
    pub(crate) bridge: String,
    pub(crate) subnet: u32,
}

impl Net {
    pub(crate) fn new() -> Result<Net> {
        let pid = std::process::id();
        for _ in 0..250 {
            let n = NEXT_NET.fetch_add(1, Ordering::SeqCst);
            let subnet = (pid.wrapping_mul(31).wrapping_add(n)) % 250 + 1;
            let bridge = format!("thbr{subnet}");
            if ip(&["link", "add", &bridge, "type", "bridge"]).is_err() {
                continue; // taken by a concurrent fleet
            }
            let net = Net { bridge, subnet };
            ip(&["addr", "add", &format!("{}/24", net.host()), "dev", &net.bridge])?;
            ip(&["link", "set", &net.bridge, "up"])?;
            return Ok(net);
        }
        bail!("no free test subnet")
    }

    pub(crate) fn host(&self) -> String {
        format!("10.213.{}.1", self.subnet)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// A network namespace on a fleet's bridge for a client such as the test's browser.
/// Chromium fails every request in flight (`ERR_NETWORK_CHANGED`) when an interface
/// appears or goes in its namespace, and concurrent tests add and remove veths on this
/// machine all the time; in here it sees only its own.
#[derive(Debug)]
pub struct ClientNet {
    pub netns: String,
    pub(crate) veth: String,
}

impl ClientNet {
    /// `program`, run inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }
}

impl Drop for ClientNet {
    fn drop(&mut self) {
        if let Ok(pids) = run(Command::new("ip").args(["netns", "pids", &self.netns])) {
            for p in pids.lines() {
                let _ = Command::new("kill").args(["-9", p.trim()]).status();
            }
        }
        // The veth first: a namespace's devices go only once the kernel has torn it down,
        // and the next client's namespace takes the same names.
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}
