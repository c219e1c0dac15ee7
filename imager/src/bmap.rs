//! The bmap file (bmap-tools' XML, format 2.0): which blocks of an image hold data, with
//! a sha256 per range, so flashing writes only those and checks each.

use std::fs::File;
use std::os::unix::io::AsFd;
use std::path::Path;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

pub const BLOCK: u64 = 4096;

/// A run of mapped blocks, inclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub first: u64,
    pub last: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub ranges: Vec<Range>,
}

/// A sparse file's size and its mapped blocks, as inclusive runs of [`BLOCK`]s (found
/// with SEEK_DATA/SEEK_HOLE, without reading the data).
pub fn mapped(path: &Path) -> Result<(u64, Vec<(u64, u64)>)> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(f.as_fd(), rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e).context("SEEK_DATA"),
        };
        let hole = rustix::fs::seek(f.as_fd(), rustix::fs::SeekFrom::Hole(data)).context("SEEK_HOLE")?;
        let first = data / BLOCK;
        let last = (hole.min(size) - 1) / BLOCK;
        // Merge with the previous range when block rounding makes them touch.
        if let Some(prev) = ranges.last_mut().filter(|r| r.1 + 1 >= first) {
            prev.1 = last.max(prev.1);
        } else {
            ranges.push((first, last));
        }
        pos = hole;
    }
    Ok((size, ranges))
}

impl Bmap {
    pub fn mapped_blocks(&self) -> u64 {
        self.ranges.iter().map(|r| r.last - r.first + 1).sum()
    }

    pub fn to_xml(&self) -> String {
        let blocks = self.image_size.div_ceil(BLOCK);
        let mut s = String::from("<?xml version=\"1.0\" ?>\n<bmap version=\"2.0\">\n");
        s.push_str(&format!("    <ImageSize> {} </ImageSize>\n", self.image_size));
        s.push_str(&format!("    <BlockSize> {BLOCK} </BlockSize>\n"));
        s.push_str(&format!("    <BlocksCount> {blocks} </BlocksCount>\n"));
        s.push_str(&format!("    <MappedBlocksCount> {} </MappedBlocksCount>\n", self.mapped_blocks()));
        s.push_str("    <ChecksumType> sha256 </ChecksumType>\n");
        // bmap-tools checks the file's own checksum with this field zeroed.
        s.push_str(&format!("    <BmapFileChecksum> {} </BmapFileChecksum>\n", "0".repeat(64)));
        s.push_str("    <BlockMap>\n");
        for r in &self.ranges {
            let range = if r.first == r.last { r.first.to_string() } else { format!("{}-{}", r.first, r.last) };
            s.push_str(&format!("        <Range chksum=\"{}\"> {range} </Range>\n", r.sha256));
        }
        s.push_str("    </BlockMap>\n</bmap>\n");
        let sum = hex(&Sha256::digest(s.as_bytes()));
        s.replacen(&"0".repeat(64), &sum, 1)
    }

    /// Parses what [`Bmap::to_xml`] (or bmaptool) writes, checking its own checksum.
    pub fn parse(xml: &str) -> Result<Bmap> {
        let field = |name: &str| -> Result<String> {
            let open = format!("<{name}>");
            let start = xml.find(&open).with_context(|| format!("bmap has no {name}"))? + open.len();
            let end = xml[start..].find('<').context("bmap is cut")? + start;
            Ok(xml[start..end].trim().to_owned())
        };
        let image_size: u64 = field("ImageSize")?.parse().context("ImageSize")?;
        if field("BlockSize")? != BLOCK.to_string() {
            bail!("bmap block size is not {BLOCK}");
        }
        let declared = field("BmapFileChecksum")?;
        let zeroed = xml.replacen(&declared, &"0".repeat(declared.len()), 1);
        if hex(&Sha256::digest(zeroed.as_bytes())) != declared {
            bail!("the bmap file is corrupted (its checksum does not match)");
        }
        let mut ranges = Vec::new();
        for part in xml.split("<Range").skip(1) {
            let sum =
                part.split("chksum=\"").nth(1).and_then(|r| r.split('"').next()).context("range without chksum")?;
            let body = part.split('>').nth(1).and_then(|r| r.split('<').next()).context("range")?.trim();
            let (first, last) = match body.split_once('-') {
                Some((a, b)) => (a.trim().parse()?, b.trim().parse()?),
                None => (body.parse()?, body.parse()?),
            };
            if last < first || last * BLOCK >= image_size.div_ceil(BLOCK) * BLOCK {
                bail!("bmap range {first}-{last} is outside the image");
            }
            ranges.push(Range { first, last, sha256: sum.to_owned() });
        }
        Ok(Bmap { image_size, ranges })
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
