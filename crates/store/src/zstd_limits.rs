//! zstd settings shared by every writer and reader of compressed NARs.

use std::io::{self, BufRead, Read, Write};

/// Compression level for NARs on the wire and in bundles. Each path is compressed once
/// for the whole fleet (right after a build), so a level well above zstd's default pays:
/// on the benchmark closure (docs/benchmarks.md), level 9 with long-distance matching
/// over a 16 MiB window makes 223 MB of NARs about 52 MB instead of level 3's 67 MB,
/// at about 80 MB/s per core (level 3: 480 MB/s).
pub const LEVEL: i32 = 9;
/// Largest window a decoder accepts (2^WINDOW_LOG_MAX bytes), so a hostile frame cannot
/// make a small device allocate hundreds of megabytes. The encoder uses exactly this
/// window: store paths repeat themselves at long distances (translations of the same
/// messages, libraries built from the same sources).
pub const WINDOW_LOG_MAX: u32 = 24;

/// A zstd decoder with the window cap applied.
pub fn decoder<'a, R: BufRead + 'a>(r: R) -> io::Result<zstd::stream::read::Decoder<'a, R>> {
    let mut d = zstd::stream::read::Decoder::with_buffer(r)?;
    d.window_log_max(WINDOW_LOG_MAX)?;
    Ok(d)
}

/// A zstd encoder at [`LEVEL`] with long-distance matching over the largest window
/// decoders accept, with one worker so output is reproducible.
pub fn encoder<'a, W: Write>(w: W) -> io::Result<zstd::stream::write::Encoder<'a, W>> {
    let mut e = zstd::stream::write::Encoder::new(w, LEVEL)?;
    e.long_distance_matching(true)?;
    e.window_log(WINDOW_LOG_MAX)?;
    Ok(e)
}

/// Compresses a whole reader into a writer.
pub fn compress<R: Read, W: Write>(mut r: R, w: W) -> io::Result<W> {
    let mut e = encoder(w)?;
    io::copy(&mut r, &mut e)?;
    e.finish()
}
