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

/// Largest NAR used as the base of a delta: both sides hold it in memory.
pub const DELTA_BASE_MAX: u64 = 64 << 20;
/// Largest window a delta frame may declare: it must reach back over the base.
pub const DELTA_WINDOW_LOG_MAX: u32 = 27;

/// The window (log2) a delta of a `new_size`-byte NAR against a `base_size`-byte base
/// needs, or `None` when the base is too large to be worth holding in memory.
pub fn delta_window_log(base_size: u64, new_size: u64) -> Option<u32> {
    if base_size > DELTA_BASE_MAX {
        return None;
    }
    let need = (base_size + new_size).max(1 << 10).next_power_of_two().trailing_zeros();
    (need <= DELTA_WINDOW_LOG_MAX).then_some(need)
}

/// A zstd encoder for a delta: the base NAR is the reference prefix (zstd's
/// "patch-from"), so what the new NAR shares with it costs almost nothing.
pub fn delta_encoder<'a, W: Write>(
    w: W,
    base: &'a [u8],
    window_log: u32,
) -> io::Result<zstd::stream::write::Encoder<'a, W>> {
    let mut e = zstd::stream::write::Encoder::with_ref_prefix(w, LEVEL, base)?;
    e.long_distance_matching(true)?;
    e.window_log(window_log)?;
    Ok(e)
}

/// A zstd decoder for a delta against `base`, with the delta window cap applied.
pub fn delta_decoder<'a, R: BufRead + 'a>(r: R, base: &'a [u8]) -> io::Result<zstd::stream::read::Decoder<'a, R>> {
    let mut d = zstd::stream::read::Decoder::with_ref_prefix(r, base)?;
    d.window_log_max(DELTA_WINDOW_LOG_MAX)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_delta_against_the_previous_version_is_small_and_decodes_only_with_it() {
        let base = noise(4 << 20, 1);
        let mut new = base.clone();
        new[1000..1100].copy_from_slice(&noise(100, 2));
        new.extend_from_slice(&noise(5000, 3));
        let log = delta_window_log(base.len() as u64, new.len() as u64).expect("within bounds");
        let mut e = delta_encoder(Vec::new(), &base, log).expect("encoder");
        e.write_all(&new).expect("compress");
        let delta = e.finish().expect("finish");
        assert!(delta.len() < 20_000, "a 4 MiB path with 5 KiB changed took {} bytes", delta.len());
        let mut out = Vec::new();
        delta_decoder(&delta[..], &base).expect("decoder").read_to_end(&mut out).expect("decode");
        assert_eq!(out, new);
        // Against another base it does not decode to the new NAR.
        let other = noise(4 << 20, 9);
        let mut wrong = Vec::new();
        let decoded = delta_decoder(&delta[..], &other).and_then(|mut d| d.read_to_end(&mut wrong));
        assert!(decoded.is_err() || wrong != new);
        // A plain decoder, capped, refuses it (its window reaches over the base).
        assert!(decoder(&delta[..]).and_then(|mut d| d.read_to_end(&mut Vec::new())).is_err());
    }

    #[test]
    fn bases_too_large_for_memory_are_not_used() {
        assert_eq!(delta_window_log(DELTA_BASE_MAX + 1, 10), None);
        assert_eq!(delta_window_log(1 << 20, 1 << 20), Some(21));
        assert_eq!(delta_window_log(DELTA_BASE_MAX, DELTA_BASE_MAX), Some(27));
    }
}
