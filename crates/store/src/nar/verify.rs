//! Checking a NAR against its expected hash and size while passing it on.

use std::io::{self, Read, Write};

use super::{DecodeLimits, NarError, decode_with_limits};
use crate::hash::NarHash;

/// Copies the NAR read from `reader` to `out`, checking its structure (strictly, as
/// [`super::decode`] does) and that it has exactly `expected_size` bytes and hash
/// `expected_hash`. On error, `out` holds an unusable prefix that the caller discards.
pub fn copy_verified<R: Read, W: Write>(
    reader: R,
    out: &mut W,
    expected_hash: &NarHash,
    expected_size: u64,
) -> Result<(), NarError> {
    let mut tee = Tee { r: reader, w: out, write_error: None };
    let result = decode_with_limits(&mut tee, &mut (), DecodeLimits { max_nar_size: expected_size });
    if let Some(source) = tee.write_error.take() {
        return Err(NarError::Write(source));
    }
    let (hash, size) = result?;
    if size != expected_size {
        return Err(NarError::SizeMismatch { expected: expected_size, got: size });
    }
    if hash != *expected_hash {
        return Err(NarError::HashMismatch { expected: *expected_hash, got: hash });
    }
    Ok(())
}

struct Tee<'a, R, W> {
    r: R,
    w: &'a mut W,
    write_error: Option<io::Error>,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        if let Err(e) = self.w.write_all(&buf[..n]) {
            let msg = e.to_string();
            self.write_error = Some(e);
            return Err(io::Error::other(msg));
        }
        Ok(n)
    }
}
