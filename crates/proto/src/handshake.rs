//! Mutual authentication at the start of every connection.
//!
//! ```text
//! agent                                   controller
//!   Hello{versions, device_key, client_nonce}  ──▶
//!   ◀── Challenge{version, controller_key, server_nonce, session, sig_controller}
//!        agent checks controller_key is pinned and sig_controller is valid
//!   Auth{sig_device, enrollment_token?}        ──▶
//!        controller checks sig_device, then the key is enrolled (or enrolls it once)
//!   ◀── Welcome{device, config, timings} | Refused{reason}
//! ```
//!
//! Both signatures cover both fresh nonces and the session id, so neither can be
//! replayed on another connection. The enrollment token is sent only after the
//! controller has proved its identity.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use thymis_store::signing::PublicKey;

use crate::{PROTOCOL_MAX, PROTOCOL_MIN};

/// 32 fresh random bytes, base64 on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce(pub [u8; 32]);

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", STANDARD.encode(self.0))
    }
}

impl Serialize for Nonce {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Nonce {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = STANDARD.decode(s).map_err(serde::de::Error::custom)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| serde::de::Error::custom("nonce is not 32 bytes"))?;
        Ok(Nonce(arr))
    }
}

/// What the controller signs to prove its identity to the agent.
pub fn controller_transcript(client: &Nonce, server: &Nonce, session: &str, device_key: &PublicKey) -> Vec<u8> {
    transcript("controller", client, server, session, &device_key.to_string())
}

/// What the device signs to prove possession of its key.
pub fn device_transcript(client: &Nonce, server: &Nonce, session: &str, controller_key: &PublicKey) -> Vec<u8> {
    transcript("device", client, server, session, &controller_key.to_string())
}

fn transcript(role: &str, client: &Nonce, server: &Nonce, session: &str, peer: &str) -> Vec<u8> {
    let mut m = format!("thymis/handshake/v1/{role}\n").into_bytes();
    m.extend_from_slice(&client.0);
    m.extend_from_slice(&server.0);
    m.extend_from_slice(format!("\n{session}\n{peer}").as_bytes());
    m
}

/// The highest version both sides speak, or a message saying who must upgrade.
pub fn negotiate(peer_min: u32, peer_max: u32) -> Result<u32, String> {
    let (lo, hi) = (peer_min.max(PROTOCOL_MIN), peer_max.min(PROTOCOL_MAX));
    if lo <= hi {
        return Ok(hi);
    }
    let who = if peer_max < PROTOCOL_MIN {
        "the agent is too old: upgrade it"
    } else {
        "the controller is too old: upgrade it"
    };
    Err(format!(
        "incompatible protocol: agent speaks {peer_min}..={peer_max}, controller {PROTOCOL_MIN}..={PROTOCOL_MAX}; {who}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_the_highest_common_version_or_explains() {
        assert_eq!(negotiate(1, 5), Ok(PROTOCOL_MAX));
        let err = negotiate(PROTOCOL_MAX + 1, PROTOCOL_MAX + 3).expect_err("too new");
        assert!(err.contains("controller is too old"), "{err}");
        if PROTOCOL_MIN > 0 {
            let err = negotiate(0, PROTOCOL_MIN - 1).expect_err("too old");
            assert!(err.contains("agent is too old"), "{err}");
        }
    }

    #[test]
    fn transcripts_differ_by_role_and_nonce() {
        let k = thymis_store::signing::SecretKey::generate("k").expect("key").public();
        let (a, b) = (Nonce([1; 32]), Nonce([2; 32]));
        assert_ne!(controller_transcript(&a, &b, "s", &k), device_transcript(&a, &b, "s", &k));
        assert_ne!(controller_transcript(&a, &b, "s", &k), controller_transcript(&b, &a, "s", &k));
        assert_ne!(controller_transcript(&a, &b, "s", &k), controller_transcript(&a, &b, "t", &k));
    }
}
