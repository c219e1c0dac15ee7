//! Sealed boxes: a message only the holder of one ed25519 key can open (a device's
//! secrets, sealed to its key; the controller's secrets at rest, sealed to its own).
//!
//! The construction is the one of age's `ssh-ed25519` recipients and of libsodium's
//! sealed boxes: the recipient's ed25519 key as its X25519 equivalent, an ephemeral
//! X25519 key per message, HKDF-SHA256 over the shared secret (salted with both public
//! keys, and bound to a context string) for a one-time ChaCha20-Poly1305 key, the
//! context as associated data. The context says what the message is for (a device and a
//! deployment), so a box opened under another context fails.
//!
//! ```text
//! "thymis-sealed-v1\n" | ephemeral public key (32) | ciphertext | tag (16)
//! ```

use curve25519_dalek::montgomery::MontgomeryPoint;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};

use crate::signing::{PublicKey, SecretKey};

const MAGIC: &[u8] = b"thymis-sealed-v1\n";
const INFO: &[u8] = b"thymis/sealed/v1\n";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("no randomness from the operating system")]
    Random,
    #[error("not a sealed box (or one of another version)")]
    Format,
    #[error("the sealed box does not open with this key and context (another recipient, or altered)")]
    Open,
}

fn key_for(
    shared: &MontgomeryPoint,
    eph: &[u8; 32],
    recipient: &[u8; 32],
    context: &str,
) -> Result<LessSafeKey, SealError> {
    // An all-zero shared secret means a low-order point: refused.
    if shared.to_bytes() == [0; 32] {
        return Err(SealError::Open);
    }
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph);
    salt[32..].copy_from_slice(recipient);
    let info = [INFO, context.as_bytes()];
    let prk = Salt::new(HKDF_SHA256, &salt).extract(&shared.to_bytes());
    let okm = prk.expand(&info, &CHACHA20_POLY1305).map_err(|_| SealError::Open)?;
    let mut key = [0u8; 32];
    okm.fill(&mut key).map_err(|_| SealError::Open)?;
    Ok(LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).map_err(|_| SealError::Open)?))
}

/// Seals `plaintext` for the holder of `to`'s secret key, under `context`.
pub fn seal(to: &PublicKey, context: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut eph = [0u8; 32];
    getrandom::fill(&mut eph).map_err(|_| SealError::Random)?;
    let eph_pub = MontgomeryPoint::mul_base_clamped(eph).to_bytes();
    let recipient = to.montgomery();
    let shared = recipient.mul_clamped(eph);
    let key = key_for(&shared, &eph_pub, &recipient.to_bytes(), context)?;
    let mut out = Vec::with_capacity(MAGIC.len() + 32 + plaintext.len() + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&eph_pub);
    let mut body = plaintext.to_vec();
    // A key is used for one message only: the nonce may be fixed.
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(context.as_bytes()), &mut body)
        .map_err(|_| SealError::Random)?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens a box sealed for `key` under `context`.
pub fn open(key: &SecretKey, context: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    let rest = sealed.strip_prefix(MAGIC).ok_or(SealError::Format)?;
    if rest.len() < 32 + 16 {
        return Err(SealError::Format);
    }
    let (eph_pub, body) = rest.split_at(32);
    let eph_pub: [u8; 32] = eph_pub.try_into().map_err(|_| SealError::Format)?;
    let shared = MontgomeryPoint(eph_pub).mul_clamped(key.scalar_bytes());
    let aead = key_for(&shared, &eph_pub, &key.public().montgomery().to_bytes(), context)?;
    let mut body = body.to_vec();
    let plain = aead
        .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(context.as_bytes()), &mut body)
        .map_err(|_| SealError::Open)?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_recipient_under_the_same_context_opens_it() {
        let device = SecretKey::generate("thymis-device").expect("key");
        let other = SecretKey::generate("thymis-device").expect("key");
        let sealed = seal(&device.public(), "kiosk-1/dp-1", b"wifi passphrase").expect("seal");
        assert!(!sealed.windows(4).any(|w| w == b"wifi"), "the plaintext shows through");
        assert_eq!(open(&device, "kiosk-1/dp-1", &sealed).expect("open"), b"wifi passphrase");
        assert_eq!(open(&other, "kiosk-1/dp-1", &sealed), Err(SealError::Open), "another key opened it");
        assert_eq!(open(&device, "kiosk-1/dp-2", &sealed), Err(SealError::Open), "another context opened it");
        // Every byte matters.
        for i in MAGIC.len()..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(open(&device, "kiosk-1/dp-1", &bad).is_err(), "a change at byte {i} went unnoticed");
        }
        assert_eq!(open(&device, "kiosk-1/dp-1", &sealed[..40]), Err(SealError::Format));
        assert_eq!(open(&device, "kiosk-1/dp-1", b"plain text"), Err(SealError::Format));
        // Two seals of one message differ (a fresh ephemeral key each).
        assert_ne!(sealed, seal(&device.public(), "kiosk-1/dp-1", b"wifi passphrase").expect("seal"));
        // A low-order ephemeral key is refused, not used.
        let mut low = sealed.clone();
        low[MAGIC.len()..MAGIC.len() + 32].copy_from_slice(&[0; 32]);
        assert_eq!(open(&device, "kiosk-1/dp-1", &low), Err(SealError::Open));
    }
}
