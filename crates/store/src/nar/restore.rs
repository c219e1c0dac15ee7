//! Unpacks a NAR into a new directory tree that nothing outside it can be written through.

use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{DecodeLimits, NarError, NarVisitor, decode_with_limits};
use crate::hash::NarHash;

/// Unpacks the NAR read from `reader` at `target`, which must not exist yet.
///
/// Safe against hostile archives: names were validated by the decoder (no `/`, `.`,
/// `..`, NUL), entries are strictly sorted so no name repeats, and every entry is
/// created fresh (`O_EXCL`, `mkdir`), so no symlink from the archive is ever followed.
pub fn restore<R: Read>(reader: R, target: &Path, limits: DecodeLimits) -> Result<(NarHash, u64), NarError> {
    if fs::symlink_metadata(target).is_ok() {
        return Err(NarError::TargetExists(target.to_owned()));
    }
    decode_with_limits(reader, &mut Restorer { root: target.to_owned() }, limits)
}

struct Restorer {
    root: PathBuf,
}

impl Restorer {
    fn dest(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() { self.root.clone() } else { self.root.join(rel) }
    }
}

impl NarVisitor for Restorer {
    fn directory(&mut self, path: &Path) -> Result<(), NarError> {
        let dest = self.dest(path);
        fs::create_dir(&dest).map_err(|source| NarError::Unpack { path: dest, source })
    }

    fn file(&mut self, path: &Path, executable: bool, _size: u64, contents: &mut dyn Read) -> Result<(), NarError> {
        let dest = self.dest(path);
        let unpack = |source| NarError::Unpack { path: dest.clone(), source };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if executable { 0o755 } else { 0o644 })
            .open(&dest)
            .map_err(unpack)?;
        io::copy(contents, &mut f).map_err(unpack)?;
        Ok(())
    }

    fn symlink(&mut self, path: &Path, target: &[u8]) -> Result<(), NarError> {
        let dest = self.dest(path);
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &dest)
            .map_err(|source| NarError::Unpack { path: dest, source })
    }
}
