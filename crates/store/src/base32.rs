//! Nix's base32: its own alphabet (no `e o u t`) and its own, reversed, bit order.

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a nix-base32 string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Base32Error {
    #[error("character {0:?} is not in Nix's base32 alphabet")]
    BadChar(char),
    #[error("nix-base32 string of {got} characters, expected {expected}")]
    BadLength { got: usize, expected: usize },
    #[error("nix-base32 string has bits set beyond its length")]
    Overflow,
}

/// Length of the nix-base32 encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 { 0 } else { (n * 8 - 1) / 5 + 1 }
}

/// Encodes bytes the way Nix prints hashes and store path digests.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let lo = u16::from(bytes[i]) >> j;
        let hi = bytes.get(i + 1).map_or(0, |&x| u16::from(x) << (8 - j));
        out.push(char::from(ALPHABET[usize::from((lo | hi) as u8 & 0x1f)]));
    }
    out
}

/// Decodes a nix-base32 string into exactly `N` bytes.
pub fn decode<const N: usize>(s: &str) -> Result<[u8; N], Base32Error> {
    let expected = encoded_len(N);
    if s.len() != expected {
        return Err(Base32Error::BadLength { got: s.len(), expected });
    }
    let mut out = [0u8; N];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = ALPHABET.iter().position(|&a| a == c).ok_or(Base32Error::BadChar(char::from(c)))? as u16;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        if let Some(next) = out.get_mut(i + 1) {
            *next |= carry as u8;
        } else if carry != 0 {
            return Err(Base32Error::Overflow);
        }
    }
    Ok(out)
}

/// Whether every character of `s` is in the alphabet (for store path digests).
pub fn is_valid_char(c: u8) -> bool {
    ALPHABET.contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_value_from_nix() {
        // `nix hash to-base32 sha256:` of the empty string's sha256, as printed by Nix.
        let empty_sha256 = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae,
            0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
        ];
        assert_eq!(encode(&empty_sha256), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
    }

    #[test]
    fn refuses_bad_input() {
        assert_eq!(decode::<1>("e0"), Err(Base32Error::BadChar('e')));
        assert!(matches!(decode::<2>("0"), Err(Base32Error::BadLength { .. })));
        // 2 chars carry 10 bits; a 1-byte value may use only 8.
        assert_eq!(decode::<1>("z0"), Err(Base32Error::Overflow));
    }

    proptest! {
        #[test]
        fn roundtrip(bytes in proptest::array::uniform32(any::<u8>())) {
            prop_assert_eq!(decode::<32>(&encode(&bytes)).ok(), Some(bytes));
        }
    }
}
