//! Mutual authentication at the start of every connection.
//!
//! ```text
//! agent                                   controller
//!   Hello{versions, device_key, client_nonce}  ──▶
//!   ◀── Challenge{version, controller_key, server_nonce, session, sig_controller}
//!        agent checks controller_key is pinned and sig_controller is valid
//!   Auth{sig_device, enrollment_proof?}        ──▶
//!        controller checks sig_device, then the key is enrolled (or enrolls it once)
//!   ◀── Welcome{device, config, timings, time, sig_welcome} | Refused{reason}
//!        agent checks sig_welcome before it takes the name and configuration
//! ```
//!
//! Both signatures cover both fresh nonces and the session id, so neither can be
//! replayed on another connection. The enrollment token itself never crosses the wire:
//! the agent sends a proof that it holds it, bound to this connection and to its own
//! key ([`token_proof`]), so whoever sees the exchange cannot enroll another key; and
//! the controller keeps only the token key's public half, so whoever reads its
//! database cannot make a proof either.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thymis_store::signing::{PublicKey, SecretKey};

use crate::{PROTOCOL_MAX, PROTOCOL_MIN};

mod agent;

pub use agent::{AgentHandshake, HandshakeError, Welcomed};

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

/// What the enrollment proof covers: this connection's nonces and session, the key
/// being enrolled and the controller it enrolls with.
pub fn enrollment_transcript(
    client: &Nonce,
    server: &Nonce,
    session: &str,
    device_key: &PublicKey,
    controller_key: &PublicKey,
) -> Vec<u8> {
    let mut m = transcript("enroll", client, server, session, &device_key.to_string());
    m.extend_from_slice(format!("\n{controller_key}").as_bytes());
    m
}

/// An enrollment token's id: how the agent names it beside its proof, and the
/// controller finds it (a hash of the token that gives nothing toward a proof).
pub fn token_id(token: &str) -> String {
    let h = Sha256::digest(format!("thymis enrollment token id\n{token}").as_bytes());
    h[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// The signing key an enrollment token derives. The agent proves it holds the token by
/// signing the enrollment transcript with it; the controller keeps only its public half,
/// which can check a proof but not make one.
pub fn token_key(token: &str) -> SecretKey {
    let seed: [u8; 32] = Sha256::digest(format!("thymis enrollment key\n{token}").as_bytes()).into();
    SecretKey::from_seed("thymis-enrollment", &seed)
}

/// The agent's proof that it holds `token`, bound to this connection and key
/// (`transcript`): `ID/SIGNATURE`, the token's id and the token key's signature.
pub fn token_proof(token: &str, transcript: &[u8]) -> String {
    format!("{}/{}", token_id(token), token_key(token).sign(transcript))
}

/// A proof as the agent sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof<'a> {
    /// [`token_proof`]: the token's id and a signature by its key.
    Signed { id: &'a str, signature: &'a str },
    /// An older agent's HMAC keyed with the token's hash ([`enrollment_proof`]).
    Hmac(&'a str),
}

impl<'a> Proof<'a> {
    pub fn parse(proof: &'a str) -> Proof<'a> {
        match proof.split_once('/') {
            Some((id, signature)) => Proof::Signed { id, signature },
            None => Proof::Hmac(proof),
        }
    }
}

/// What the controller kept of an enrollment token before token keys: its SHA-256,
/// which older agents key their HMAC proof with (so the stored hash could make a proof).
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The agent's proof that it holds the token whose hash is `token_hash`: an HMAC keyed
/// with that hash over the enrollment transcript, hex. The controller, which keeps only
/// the hash, can check it; nobody can make one for another key or connection.
pub fn enrollment_proof(token_hash: &[u8; 32], transcript: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(token_hash).expect("HMAC takes keys of any length");
    mac.update(transcript);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `proof` is the proof for `token_hash` over `transcript` (constant time).
pub fn proof_matches(proof: &str, token_hash: &[u8; 32], transcript: &[u8]) -> bool {
    bool::from(enrollment_proof(token_hash, transcript).as_bytes().ct_eq(proof.as_bytes()))
}

/// What the controller signs in its welcome: the name and configuration it gives the
/// key on this connection, so a relay cannot rename a device, and its clock.
pub fn welcome_message(session: &str, device_key: &PublicKey, device: &str, config: &str, time: u64) -> Vec<u8> {
    format!("thymis/welcome/v1\n{session}\n{device_key}\n{device}\n{config}\n{time}").into_bytes()
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
