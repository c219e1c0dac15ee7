//! Secrets, nonces and ids from the OS's random generator. A generator that fails is an
//! error, never a buffer of zeros (a handshake nonce once ignored the failure).

use anyhow::{Result, anyhow};

pub fn bytes<const N: usize>() -> Result<[u8; N]> {
    filled(getrandom::fill)
}

/// `N` random bytes as lower-case hex.
pub fn hex<const N: usize>() -> Result<String> {
    Ok(bytes::<N>()?.iter().map(|b| format!("{b:02x}")).collect())
}

fn filled<const N: usize>(fill: impl FnOnce(&mut [u8]) -> Result<(), getrandom::Error>) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    fill(&mut b).map_err(|e| anyhow!("the OS random generator failed: {e}"))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_generator_is_an_error_not_zeros() {
        let failed = filled::<32>(|_| Err(getrandom::Error::UNSUPPORTED));
        assert!(failed.expect_err("zeros").to_string().contains("random generator failed"));
        assert_ne!(bytes::<32>().expect("random"), [0u8; 32]);
        assert_eq!(hex::<8>().expect("random").len(), 16);
    }
}
