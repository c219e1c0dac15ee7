//! Limits per source address on the agent socket, so that no one peer can lock the
//! fleet out: connections in their handshake (a shared pool filled by one peer's idle
//! sockets kept every agent out), and failed enrollments per minute (a shared limit let
//! thirty made-up tokens a minute block every enrollment). And per device: logins per
//! minute, counted only once the device proved it holds its key, so that a device in a
//! reconnect loop (each login costs signatures, queries and resent offers) is slowed,
//! while no one else can spend a device's logins by naming its public key.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;

const WINDOW: Duration = Duration::from_secs(60);

/// Events per key in the current minute of that key.
#[derive(Debug)]
struct PerMinute<K> {
    limit: u32,
    counts: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Hash + Eq> PerMinute<K> {
    fn new(limit: u32) -> Self {
        PerMinute { limit, counts: Mutex::new(HashMap::new()) }
    }

    fn below_limit(&self, key: &K) -> bool {
        let c = lock(&self.counts);
        c.get(key).is_none_or(|(since, n)| since.elapsed() > WINDOW || *n < self.limit)
    }

    /// Counts one event; whether it was within the limit.
    fn count(&self, key: K) -> bool {
        let mut c = lock(&self.counts);
        if c.len() > 100_000 {
            // Bounded: keys whose minute is over are forgotten.
            c.retain(|_, (since, _)| since.elapsed() <= WINDOW);
        }
        let e = c.entry(key).or_insert((Instant::now(), 0));
        if e.0.elapsed() > WINDOW {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
        e.1 <= self.limit
    }
}

#[derive(Debug)]
pub struct PeerLimits {
    max_handshakes: usize,
    handshakes: Mutex<HashMap<IpAddr, usize>>,
    failures: PerMinute<IpAddr>,
    logins: PerMinute<String>,
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
    pub fn new(max_handshakes: usize, failures_per_minute: u32, logins_per_minute: u32) -> Arc<PeerLimits> {
        Arc::new(PeerLimits {
            max_handshakes,
            handshakes: Mutex::new(HashMap::new()),
            failures: PerMinute::new(failures_per_minute),
            logins: PerMinute::new(logins_per_minute),
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
        self.failures.below_limit(&peer)
    }

    pub fn enrollment_failed(&self, peer: IpAddr) {
        self.failures.count(peer);
    }

    /// Counts a login of `device` (which proved it holds its key); whether it may go on.
    pub fn log_in(&self, device: &str) -> bool {
        self.logins.count(device.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_has_its_own_share() {
        let limits = PeerLimits::new(2, 3, 2);
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

        assert!(limits.log_in("d1") && limits.log_in("d1"));
        assert!(!limits.log_in("d1"), "a device past its logins");
        assert!(limits.log_in("d2"), "another device logs in all the same");
    }
}
