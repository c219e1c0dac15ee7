//! zstd settings shared by every writer and reader of compressed NARs.

use std::io::{self, BufRead, Read, Write};

/// Compression level for NARs on the wire and in bundles: fast, and within a few
/// percent of much slower levels on store paths.
pub const LEVEL: i32 = 3;
/// Largest window a decoder accepts (2^WINDOW_LOG_MAX bytes), so a hostile frame cannot
/// make a small device allocate hundreds of megabytes. Level 3 uses at most 2^21.
pub const WINDOW_LOG_MAX: u32 = 24;

/// A zstd decoder with the window cap applied.
pub fn decoder<'a, R: BufRead + 'a>(r: R) -> io::Result<zstd::stream::read::Decoder<'a, R>> {
    let mut d = zstd::stream::read::Decoder::with_buffer(r)?;
    d.window_log_max(WINDOW_LOG_MAX)?;
    Ok(d)
}

/// A zstd encoder at [`LEVEL`], with one worker so output is reproducible.
pub fn encoder<'a, W: Write>(w: W) -> io::Result<zstd::stream::write::Encoder<'a, W>> {
    zstd::stream::write::Encoder::new(w, LEVEL)
}

/// Compresses a whole reader into a writer.
pub fn compress<R: Read, W: Write>(mut r: R, w: W) -> io::Result<W> {
    let mut e = encoder(w)?;
    io::copy(&mut r, &mut e)?;
    e.finish()
}
