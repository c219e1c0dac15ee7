//! Limits per source address on the agent socket, so that no one peer can lock the
//! fleet out: connections in their handshake (a shared pool filled by one peer's idle
//! sockets kept every agent out), and failed enrollments per minute (a shared limit let
//! thirty made-up tokens a minute block every enrollment).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::controller::lock;

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct PeerLimits {
    max_handshakes: usize,
    failures_per_minute: u32,
    handshakes: Mutex<HashMap<IpAddr, usize>>,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// One connection's place among its peer's handshakes; given back when dropped.
#[derive(Debug)]
pub struct HandshakeSlot {
    limits: Arc<PeerLimits>,
    peer: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut h = lock(&self.limits.handshakes);
        if let Some(n) = h.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                h.remove(&self.peer);
            }
        }
    }
}

impl PeerLimits {
    pub fn new(max_handshakes: usize, failures_per_minute: u32) -> Arc<PeerLimits> {
        Arc::new(PeerLimits {
            max_handshakes,
            failures_per_minute,
            handshakes: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// A handshake slot for `peer`, unless it has its share in handshake already.
    pub fn handshake(self: &Arc<Self>, peer: IpAddr) -> Option<HandshakeSlot> {
        let mut h = lock(&self.handshakes);
        let n = h.entry(peer).or_insert(0);
        if *n >= self.max_handshakes {
            return None;
        }
        *n += 1;
        Some(HandshakeSlot { limits: self.clone(), peer })
    }

    /// Whether `peer` may try to enroll now.
    pub fn may_enroll(&self, peer: IpAddr) -> bool {
        let f = lock(&self.failures);
        f.get(&peer).is_none_or(|(since, n)| since.elapsed() > WINDOW || *n < self.failures_per_minute)
    }

    pub fn enrollment_failed(&self, peer: IpAddr) {
        let mut f = lock(&self.failures);
        if f.len() > 100_000 {
            // Bounded: peers whose minute is over are forgotten.
            f.retain(|_, (since, _)| since.elapsed() <= WINDOW);
        }
        let e = f.entry(peer).or_insert((Instant::now(), 0));
        if e.0.elapsed() > WINDOW {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_has_its_own_share() {
        let limits = PeerLimits::new(2, 3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let s1 = limits.handshake(a).expect("first");
        let _s2 = limits.handshake(a).expect("second");
        assert!(limits.handshake(a).is_none(), "a third handshake from the same peer");
        let _other = limits.handshake(b).expect("another peer is not affected");
        drop(s1);
        assert!(limits.handshake(a).is_some(), "a finished handshake gives its slot back");

        for _ in 0..3 {
            assert!(limits.may_enroll(a));
            limits.enrollment_failed(a);
        }
        assert!(!limits.may_enroll(a), "a peer past its failures");
        assert!(limits.may_enroll(b), "another peer enrolls all the same");
    }
}
