//! Signed payloads: deployment offers and confirmations.
//!
//! The payload travels as the exact JSON text that was signed, so no re-serialisation
//! can change the bytes under the signature. Each kind of payload is signed under its
//! own context string, so a signature on one kind never validates another.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use thymis_store::StorePath;
use thymis_store::signing::{PublicKey, SecretKey, verify_any};

/// A payload with its identity-key signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub payload: String,
    pub signature: String,
}

/// Why a signed payload was refused.
#[derive(Debug, Error)]
pub enum SignedError {
    #[error("{kind} is not signed by a pinned controller identity key")]
    BadSignature { kind: &'static str },
    #[error("{kind} payload is malformed")]
    Malformed {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// Something that can be signed, with its context string.
pub trait SignedKind: Serialize + DeserializeOwned {
    const KIND: &'static str;
}

fn message(kind: &str, payload: &str) -> Vec<u8> {
    format!("thymis/{kind}/v1\n{payload}").into_bytes()
}

impl Signed {
    pub fn sign<T: SignedKind>(value: &T, key: &SecretKey) -> Self {
        // Serialising these plain structs cannot fail.
        let payload = serde_json::to_string(value).unwrap_or_default();
        let signature = key.sign(&message(T::KIND, &payload));
        Signed { payload, signature }
    }

    /// Checks the signature against `trusted`, then parses the payload.
    pub fn verify<T: SignedKind>(&self, trusted: &[PublicKey]) -> Result<T, SignedError> {
        if !verify_any(&message(T::KIND, &self.payload), std::slice::from_ref(&self.signature), trusted) {
            return Err(SignedError::BadSignature { kind: T::KIND });
        }
        serde_json::from_str(&self.payload).map_err(|source| SignedError::Malformed { kind: T::KIND, source })
    }
}

/// A deployment offer: what the controller asks one device to run (docs/protocol.md,
/// "A deployment"). The agent acts only on an offer for itself whose sequence is
/// above the last it applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub device: String,
    pub deployment_id: String,
    pub config: String,
    pub system: StorePath,
    pub commit: Option<String>,
    /// From one controller-wide counter that only grows.
    pub sequence: u64,
    /// Unix seconds; enforced by the agent only when its clock is synchronised.
    pub expires: u64,
    /// Reboot into the new system (boot it once) instead of switching live.
    #[serde(default)]
    pub reboot: bool,
    /// The connection (handshake session) the offer was made for: the agent refuses it
    /// on any other, so a captured offer (cancelled, superseded) cannot be replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The device's secrets for this deployment: a [`crate::secrets::Secrets`] sealed
    /// to the device's key under [`crate::secrets::context`] (base64). Signed with the
    /// offer, so it cannot be moved to another device or deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<String>,
}

impl SignedKind for Offer {
    const KIND: &'static str = "offer";
}

/// The controller's confirmation that a device reached it after activating, bound to
/// the deployment and to the connection (session) it arrived on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    pub device: String,
    pub deployment_id: String,
    pub system: StorePath,
    pub sequence: u64,
    pub session: String,
}

impl SignedKind for Confirmation {
    const KIND: &'static str = "confirmation";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer {
            device: "dev1".into(),
            deployment_id: "d1".into(),
            config: "kiosk".into(),
            system: "/nix/store/wipdr80wxxrlc00qzxc0qi5s6wwdkais-system".parse().expect("path"),
            commit: None,
            sequence: 3,
            expires: 10,
            reboot: false,
            session: Some("s-1".into()),
            secrets: None,
        }
    }

    #[test]
    fn signature_binds_payload_key_and_kind() {
        let k = SecretKey::generate("thymis-controller").expect("key");
        let s = Signed::sign(&offer(), &k);
        assert_eq!(s.verify::<Offer>(&[k.public()]).expect("valid"), offer());

        let other = SecretKey::generate("thymis-controller").expect("key");
        assert!(s.verify::<Offer>(&[other.public()]).is_err(), "foreign key accepted");

        let mut tampered = s.clone();
        tampered.payload = tampered.payload.replace("\"sequence\":3", "\"sequence\":4");
        assert!(tampered.verify::<Offer>(&[k.public()]).is_err(), "tampered payload accepted");

        // An offer's signature never passes as a confirmation's.
        assert!(s.verify::<Confirmation>(&[k.public()]).is_err());
    }
}
