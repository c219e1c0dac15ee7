//! `manifest.json` of an image set, and `verify`.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bmap::{BLOCK, Bmap, hex};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub format: u32,
    pub name: String,
    pub system: String,
    pub commit: Option<String>,
    pub configuration: Option<String>,
    /// Whether the image has a boot entry (the closure has a kernel and an initrd).
    pub boots: bool,
    pub boot_entry: Option<String>,
    /// The U-Boot board whose layout the image has (none: x86-64 UEFI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub board: Option<String>,
    pub image_size: u64,
    pub image_sha256: String,
    pub compressed_size: u64,
    pub compressed_sha256: String,
    pub mapped_bytes: u64,
    pub created: u64,
}

impl ImageManifest {
    pub fn image_file(&self) -> String {
        format!("{}.img.zst", self.name)
    }
}

/// `SOURCE_DATE_EPOCH` when set (reproducible builds), else now.
pub fn now() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    })
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Checks an image set: the compressed file's checksum (manifest and `.sha256`), the
/// raw image's size and checksum, and every bmap range.
pub fn verify(dir: &Path) -> Result<ImageManifest> {
    let m: ImageManifest = serde_json::from_slice(
        &std::fs::read(dir.join("manifest.json"))
            .with_context(|| format!("reading {}/manifest.json", dir.display()))?,
    )
    .context("manifest.json is not valid")?;
    let zst = dir.join(m.image_file());
    let sum = sha256_file(&zst)?;
    if sum != m.compressed_sha256 {
        bail!("{} has sha256 {sum}, the manifest says {}", zst.display(), m.compressed_sha256);
    }
    let side = std::fs::read_to_string(dir.join(format!("{}.sha256", m.image_file())))?;
    if side.split_whitespace().next() != Some(sum.as_str()) {
        bail!("{}.sha256 does not match the image", m.image_file());
    }
    let bmap = Bmap::parse(&std::fs::read_to_string(dir.join(format!("{}.bmap", m.name)))?)?;
    if bmap.image_size != m.image_size {
        bail!("the bmap's image size {} differs from the manifest's {}", bmap.image_size, m.image_size);
    }
    let mut raw = zstd::stream::read::Decoder::new(BufReader::new(File::open(&zst)?))?;
    let (size, digest, bad) = hash_stream(&mut raw, &bmap)?;
    if let Some(r) = bad {
        bail!("bmap range {r} does not match the image data");
    }
    if size != m.image_size || digest != m.image_sha256 {
        bail!("the decompressed image ({size} bytes, sha256 {digest}) does not match the manifest");
    }
    Ok(m)
}

/// Reads a whole image, returning its size, sha256 and the first bmap range whose
/// checksum does not match.
pub fn hash_stream(r: &mut dyn Read, bmap: &Bmap) -> Result<(u64, String, Option<String>)> {
    let mut whole = Sha256::new();
    let mut ranges = bmap.ranges.iter().peekable();
    let mut current: Option<Sha256> = None;
    let mut pos = 0u64;
    let mut bad = None;
    let mut buf = vec![0u8; BLOCK as usize];
    loop {
        let n = read_full(r, &mut buf)?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        let block = pos / BLOCK;
        if let Some(rg) = ranges.peek() {
            if block >= rg.first && block <= rg.last {
                current.get_or_insert_with(Sha256::new).update(&buf[..n]);
            }
            if block == rg.last || n < buf.len() {
                if let Some(h) = current.take()
                    && hex(&h.finalize()) != rg.sha256
                    && bad.is_none()
                {
                    bad = Some(format!("{}-{}", rg.first, rg.last));
                }
                if block >= rg.last {
                    ranges.next();
                }
            }
        }
        pos += n as u64;
    }
    Ok((pos, hex(&whole.finalize()), bad))
}

pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}
