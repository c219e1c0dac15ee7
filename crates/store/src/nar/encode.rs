//! Streaming NAR encoder for a file system tree, byte-identical to `nix-store --dump`.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{MAGIC, NarError};
use crate::hash::{NarHash, NarHasher};

/// Writes the NAR of `path` (a file, symlink or directory) to `out`.
pub fn encode_path<W: Write>(path: &Path, out: &mut W) -> Result<(), NarError> {
    let mut w = io::BufWriter::with_capacity(64 * 1024, out);
    let err = |source| NarError::Encode { path: path.to_owned(), source };
    write_str(&mut w, MAGIC).map_err(err)?;
    node(path, &mut w)?;
    w.flush().map_err(err)
}

/// The NAR hash and size of `path`, as `nix-store -q --hash` reports for a store path.
pub fn hash_path(path: &Path) -> Result<(NarHash, u64), NarError> {
    let mut hasher = NarHasher::new();
    encode_path(path, &mut hasher)?;
    Ok(hasher.finish())
}

/// Writes one NAR string: length, bytes, zero padding to 8. Also used by the export format.
pub fn write_str<W: Write>(w: &mut W, s: &[u8]) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s)?;
    write_padding(w, s.len() as u64)
}

pub(crate) fn write_padding<W: Write>(w: &mut W, len: u64) -> io::Result<()> {
    w.write_all(&[0u8; 8][..((8 - len % 8) % 8) as usize])
}

pub(crate) fn write_tokens<W: Write>(w: &mut W, tokens: &[&str]) -> io::Result<()> {
    tokens.iter().try_for_each(|t| write_str(w, t.as_bytes()))
}

fn node<W: Write>(path: &Path, w: &mut W) -> Result<(), NarError> {
    let err = |source| NarError::Encode { path: path.to_owned(), source };
    let meta = fs::symlink_metadata(path).map_err(err)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(err)?;
        write_tokens(w, &["(", "type", "symlink", "target"]).map_err(err)?;
        write_str(w, target.as_os_str().as_bytes()).map_err(err)?;
        write_tokens(w, &[")"]).map_err(err)
    } else if ft.is_file() {
        let executable = meta.permissions().mode() & 0o100 != 0;
        write_tokens(w, &["(", "type", "regular"]).map_err(err)?;
        if executable {
            write_tokens(w, &["executable", ""]).map_err(err)?;
        }
        write_tokens(w, &["contents"]).map_err(err)?;
        let file = fs::File::open(path).map_err(err)?;
        let size = meta.len();
        w.write_all(&size.to_le_bytes()).map_err(err)?;
        // A file that changes size while we read it must not give a malformed NAR.
        let copied = io::copy(&mut file.take(size), w).map_err(err)?;
        if copied != size {
            return Err(err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being read")));
        }
        write_padding(w, size).map_err(err)?;
        write_tokens(w, &[")"]).map_err(err)
    } else if ft.is_dir() {
        write_tokens(w, &["(", "type", "directory"]).map_err(err)?;
        let mut names: Vec<_> = fs::read_dir(path)
            .map_err(err)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        // Nix orders entries by their bytes, whatever order the file system lists them in.
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            write_tokens(w, &["entry", "(", "name"]).map_err(err)?;
            write_str(w, name.as_bytes()).map_err(err)?;
            write_tokens(w, &["node"]).map_err(err)?;
            node(&path.join(&name), w)?;
            write_tokens(w, &[")"]).map_err(err)?;
        }
        write_tokens(w, &[")"]).map_err(err)
    } else {
        Err(NarError::UnsupportedFileType { path: path.to_owned() })
    }
}
