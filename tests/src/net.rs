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
