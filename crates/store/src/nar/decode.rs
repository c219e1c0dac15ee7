//! Streaming, strict NAR decoder: every byte is checked before the visitor sees it.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::{MAGIC, MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN, NarError};
use crate::hash::{NarHash, NarHasher};

/// Receives the entries of a NAR in archive order. Paths are relative to the root
/// (the root itself is the empty path) and built only from validated names.
pub trait NarVisitor {
    fn directory(&mut self, path: &Path) -> Result<(), NarError>;
    /// `contents` yields exactly `size` bytes; whatever the visitor leaves unread is
    /// skipped (and still hashed).
    fn file(&mut self, path: &Path, executable: bool, size: u64, contents: &mut dyn Read) -> Result<(), NarError>;
    fn symlink(&mut self, path: &Path, target: &[u8]) -> Result<(), NarError>;
}

/// A visitor that only checks the archive (hash and structure).
impl NarVisitor for () {
    fn directory(&mut self, _: &Path) -> Result<(), NarError> {
        Ok(())
    }
    fn file(&mut self, _: &Path, _: bool, _: u64, _: &mut dyn Read) -> Result<(), NarError> {
        Ok(())
    }
    fn symlink(&mut self, _: &Path, _: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
}

/// Bounds on what a decoder accepts beyond the format's own limits.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Total NAR size accepted; a file declaring more contents is refused before
    /// anything of it is read. Set it to the expected `narSize`.
    pub max_nar_size: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_nar_size: u64::MAX }
    }
}

/// Decodes exactly one NAR from `reader`, which must end where the NAR ends.
/// Returns the NAR's hash and size.
pub fn decode<R: Read, V: NarVisitor>(reader: R, visitor: &mut V) -> Result<(NarHash, u64), NarError> {
    decode_with_limits(reader, visitor, DecodeLimits::default())
}

/// [`decode`] with explicit limits.
pub fn decode_with_limits<R: Read, V: NarVisitor>(
    reader: R,
    visitor: &mut V,
    limits: DecodeLimits,
) -> Result<(NarHash, u64), NarError> {
    let mut d = Decoder { r: reader, hasher: NarHasher::new(), limits };
    let magic = d.read_str(MAGIC.len(), "magic")?;
    if magic != MAGIC {
        return Err(NarError::BadMagic);
    }
    d.node(&mut PathBuf::new(), 0, visitor)?;
    // Anything after the closing token means the sender and we disagree on the data.
    let offset = d.offset();
    let mut probe = [0u8; 64];
    let extra = read_some(&mut d.r, &mut probe).map_err(|source| NarError::Read { offset, source })?;
    if extra > 0 {
        return Err(NarError::TrailingBytes { offset, extra: extra as u64 });
    }
    Ok(d.hasher.finish())
}

fn read_some<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

struct Decoder<R> {
    r: R,
    hasher: NarHasher,
    limits: DecodeLimits,
}

impl<R: Read> Decoder<R> {
    fn offset(&self) -> u64 {
        self.hasher.len()
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), NarError> {
        let offset = self.offset();
        self.r.read_exact(buf).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                NarError::Truncated { offset }
            } else {
                NarError::Read { offset, source }
            }
        })?;
        self.hasher.update(buf);
        if self.offset() > self.limits.max_nar_size {
            return Err(NarError::TooLong { offset, what: "NAR", len: self.offset(), max: self.limits.max_nar_size });
        }
        Ok(())
    }

    fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = ((8 - len % 8) % 8) as usize;
        let offset = self.offset();
        let mut b = [0u8; 8];
        self.read_exact(&mut b[..pad])?;
        if b.iter().any(|&x| x != 0) {
            return Err(NarError::BadPadding { offset });
        }
        Ok(())
    }

    /// Reads a length-prefixed string of at most `max` bytes.
    fn read_str(&mut self, max: usize, what: &'static str) -> Result<Vec<u8>, NarError> {
        let offset = self.offset();
        let len = self.read_u64()?;
        if len > max as u64 {
            return Err(NarError::TooLong { offset, what, len, max: max as u64 });
        }
        let mut buf = vec![0u8; len as usize];
        self.read_exact(&mut buf)?;
        self.read_padding(len)?;
        Ok(buf)
    }

    fn expect(&mut self, token: &'static str) -> Result<(), NarError> {
        let offset = self.offset();
        let got = self.read_str(16, "token")?;
        if got != token.as_bytes() {
            return Err(NarError::UnexpectedToken { offset, expected: token, found: lossy(&got) });
        }
        Ok(())
    }

    fn node<V: NarVisitor>(&mut self, path: &mut PathBuf, depth: usize, v: &mut V) -> Result<(), NarError> {
        if depth > MAX_DEPTH {
            return Err(NarError::TooDeep);
        }
        self.expect("(")?;
        self.expect("type")?;
        let offset = self.offset();
        match self.read_str(16, "type")?.as_slice() {
            b"regular" => self.regular(path, v)?,
            b"symlink" => {
                self.expect("target")?;
                let offset = self.offset();
                let target = self.read_str(MAX_TARGET_LEN, "symlink target")?;
                if target.is_empty() {
                    return Err(NarError::BadTarget { offset, why: "empty" });
                }
                if target.contains(&0) {
                    return Err(NarError::BadTarget { offset, why: "contains NUL" });
                }
                v.symlink(path, &target)?;
                self.expect(")")?;
            }
            b"directory" => {
                v.directory(path)?;
                self.directory(path, depth, v)?;
            }
            other => {
                return Err(NarError::UnexpectedToken {
                    offset,
                    expected: "regular, symlink or directory",
                    found: lossy(other),
                });
            }
        }
        Ok(())
    }

    fn regular<V: NarVisitor>(&mut self, path: &Path, v: &mut V) -> Result<(), NarError> {
        let offset = self.offset();
        let executable = match self.read_str(16, "token")?.as_slice() {
            b"executable" => {
                self.expect("")?;
                self.expect("contents")?;
                true
            }
            b"contents" => false,
            other => {
                return Err(NarError::UnexpectedToken {
                    offset,
                    expected: "executable or contents",
                    found: lossy(other),
                });
            }
        };
        let offset = self.offset();
        let size = self.read_u64()?;
        let budget = self.limits.max_nar_size.saturating_sub(self.offset());
        if size > budget {
            return Err(NarError::TooLong { offset, what: "file contents", len: size, max: budget });
        }
        let mut contents = ContentReader { d: self, remaining: size, error: None };
        let visited = v.file(path, executable, size, &mut contents);
        if let Some(e) = contents.error.take() {
            return Err(e);
        }
        visited?;
        // Drain what the visitor left so that the hash covers every byte.
        let drained = io::copy(&mut contents, &mut io::sink());
        if let Some(e) = contents.error.take() {
            return Err(e);
        }
        drained.map_err(|source| NarError::Read { offset, source })?;
        self.read_padding(size)?;
        self.expect(")")
    }

    fn directory<V: NarVisitor>(&mut self, path: &mut PathBuf, depth: usize, v: &mut V) -> Result<(), NarError> {
        let mut previous: Option<Vec<u8>> = None;
        loop {
            let offset = self.offset();
            match self.read_str(16, "token")?.as_slice() {
                b")" => return Ok(()),
                b"entry" => {}
                other => {
                    return Err(NarError::UnexpectedToken { offset, expected: "entry or )", found: lossy(other) });
                }
            }
            self.expect("(")?;
            self.expect("name")?;
            let offset = self.offset();
            let name = self.read_str(MAX_NAME_LEN, "entry name")?;
            check_name(&name).map_err(|why| NarError::BadEntryName { offset, name: lossy(&name), why })?;
            if let Some(prev) = &previous
                && name.as_slice() <= prev.as_slice()
            {
                return Err(NarError::Unsorted { offset, previous: lossy(prev), name: lossy(&name) });
            }
            self.expect("node")?;
            path.push(os_str(&name));
            self.node(path, depth + 1, v)?;
            path.pop();
            self.expect(")")?;
            previous = Some(name);
        }
    }
}

/// Gives the visitor a file's contents straight from the stream, hashed on the way.
struct ContentReader<'a, R> {
    d: &'a mut Decoder<R>,
    remaining: u64,
    /// A truncation or read error, kept as a [`NarError`] with its offset.
    error: Option<NarError>,
}

impl<R: Read> Read for ContentReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        if let Err(e) = self.d.read_exact(&mut buf[..n]) {
            let msg = e.to_string();
            self.error = Some(e);
            return Err(io::Error::other(msg));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Entry names become file names: anything that could escape or alias is refused.
fn check_name(name: &[u8]) -> Result<(), &'static str> {
    match name {
        [] => Err("empty"),
        b"." | b".." => Err("'.' or '..'"),
        _ if name.contains(&b'/') => Err("contains '/'"),
        _ if name.contains(&0) => Err("contains NUL"),
        _ => Ok(()),
    }
}

fn os_str(bytes: &[u8]) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(bytes)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
