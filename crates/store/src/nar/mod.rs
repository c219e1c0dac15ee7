//! NAR, the Nix Archive: the canonical serialisation of a store path.
//!
//! Written here rather than taken from `nix-nar` (byte-exact too)
//! because a device must refuse hostile archives before anything reaches its store, and
//! that crate neither checks entry order, duplicates, padding nor trailing bytes, nor
//! accepts non-UTF-8 names, and reports errors as strings. The format is small:
//!
//! ```text
//! nar   = str("nix-archive-1") node
//! node  = str("(") str("type") ( regular | symlink | directory ) str(")")
//! regular   = str("regular") [ str("executable") str("") ] str("contents") str(bytes)
//! symlink   = str("symlink") str("target") str(target)
//! directory = str("directory") { str("entry") str("(") str("name") str(name)
//!             str("node") node str(")") }          // names strictly ascending
//! str(s) = u64-le(len s) s zero-padding-to-8
//! ```
//!
//! Both directions stream: memory use is bounded by the tree depth, never the size.

mod decode;
mod encode;
mod restore;
mod tree;
mod verify;

pub use decode::{DecodeLimits, NarVisitor, decode, decode_with_limits};
pub use encode::{encode_path, hash_path, write_str as encode_str};
pub use restore::restore;
pub use tree::{Node, TreeBuilder};
pub use verify::copy_verified;

use std::path::PathBuf;

use thiserror::Error;

pub(crate) const MAGIC: &[u8] = b"nix-archive-1";
/// Longest entry name Linux file systems accept.
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target Linux accepts (PATH_MAX less the NUL).
pub const MAX_TARGET_LEN: usize = 4095;
/// Deepest directory nesting accepted; far beyond any real store path.
pub const MAX_DEPTH: usize = 256;

/// Why a NAR was refused or could not be written or unpacked. `offset` is the byte
/// position in the NAR where the problem was found.
#[derive(Debug, Error)]
pub enum NarError {
    #[error("NAR truncated at byte {offset}")]
    Truncated { offset: u64 },
    #[error("reading NAR at byte {offset}")]
    Read {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("not a NAR (bad magic)")]
    BadMagic,
    #[error("NAR byte {offset}: expected {expected:?}, found {found:?}")]
    UnexpectedToken { offset: u64, expected: &'static str, found: String },
    #[error("NAR byte {offset}: {what} of {len} bytes exceeds the limit of {max}")]
    TooLong { offset: u64, what: &'static str, len: u64, max: u64 },
    #[error("NAR byte {offset}: non-zero padding")]
    BadPadding { offset: u64 },
    #[error("NAR byte {offset}: entry name {name:?} refused: {why}")]
    BadEntryName { offset: u64, name: String, why: &'static str },
    #[error("NAR byte {offset}: entry {name:?} is not after {previous:?} (unsorted or duplicate)")]
    Unsorted { offset: u64, previous: String, name: String },
    #[error("NAR byte {offset}: symlink target refused: {why}")]
    BadTarget { offset: u64, why: &'static str },
    #[error("NAR nests deeper than {MAX_DEPTH} directories")]
    TooDeep,
    #[error("NAR has {extra}+ bytes after its end at byte {offset}")]
    TrailingBytes { offset: u64, extra: u64 },
    #[error("unpacking NAR to {path}")]
    Unpack {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unpack target {0} already exists")]
    TargetExists(PathBuf),
    #[error("encoding {path} as NAR")]
    Encode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("NAR is {got} bytes, expected {expected}")]
    SizeMismatch { expected: u64, got: u64 },
    #[error("NAR hash is {got}, expected {expected}")]
    HashMismatch { expected: crate::hash::NarHash, got: crate::hash::NarHash },
    #[error("writing the verified NAR")]
    Write(#[source] std::io::Error),
    #[error("{path}: unsupported file type (only files, directories and symlinks)")]
    UnsupportedFileType { path: PathBuf },
}

#[cfg(test)]
mod tests;
