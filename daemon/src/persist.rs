//! Atomic writes: a reader (or the agent after a crash) sees the old file or the new
//! one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Writes `bytes` to `path` via a temporary file, fsync and rename, then fsyncs the
/// directory so the rename itself survives a power cut.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// [`write_atomic`] of a value as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    write_atomic(path, &bytes, 0o600)
}

/// Reads JSON written by [`write_json`]; `None` when the file does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_reads_absence_as_none() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("state.json");
        assert_eq!(read_json::<u32>(&p).expect("read"), None);
        write_json(&p, &1u32).expect("write");
        write_json(&p, &2u32).expect("write");
        assert_eq!(read_json::<u32>(&p).expect("read"), Some(2));
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1, "temporary file left behind");
        fs::write(&p, "{").expect("corrupt");
        assert!(read_json::<u32>(&p).is_err());
    }
}
