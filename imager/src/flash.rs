//! `thymis-imager flash`: writes only the mapped ranges of the image (per its bmap),
//! checks each range's sha256 as it streams out of the decompressor, then reads every
//! range back from the target. Refuses targets that are mounted, hold the running
//! system, or are too small.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::bmap::{BLOCK, Bmap, hex};
use crate::manifest::read_full;

/// `NAME.img.zst` -> `NAME.bmap` beside it.
fn bmap_path(image: &Path) -> Result<PathBuf> {
    let name = image.file_name().and_then(|n| n.to_str()).context("image path")?;
    let stem = name.strip_suffix(".img.zst").with_context(|| format!("{name} is not a NAME.img.zst image"))?;
    Ok(image.with_file_name(format!("{stem}.bmap")))
}

/// (major, minor) of a device number.
fn dev_numbers(rdev: u64) -> (u64, u64) {
    (rustix::fs::major(rdev) as u64, rustix::fs::minor(rdev) as u64)
}

/// Block devices mounted now, as "major:minor".
fn mounted_devices() -> Result<Vec<String>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned)).collect())
}

/// The block devices that stand for `target`: itself (or the loop devices backed by it)
/// and their partitions, as "major:minor".
fn devices_of(target: &Path, meta: &std::fs::Metadata) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    if meta.file_type().is_block_device() {
        let (ma, mi) = dev_numbers(meta.rdev());
        if let Ok(link) = std::fs::read_link(format!("/sys/dev/block/{ma}:{mi}"))
            && let Some(n) = link.file_name()
        {
            names.push(n.to_string_lossy().into_owned());
        }
    } else if let Ok(canon) = std::fs::canonicalize(target) {
        for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
            let backing = e.path().join("loop/backing_file");
            if std::fs::read_to_string(&backing).is_ok_and(|b| Path::new(b.trim()) == canon) {
                names.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    let mut devs = Vec::new();
    for n in names {
        let sys = Path::new("/sys/class/block").join(&n);
        let mut all = vec![sys.clone()];
        for e in std::fs::read_dir(&sys).into_iter().flatten().flatten() {
            if e.path().join("partition").exists() {
                all.push(e.path());
            }
        }
        for p in all {
            if let Ok(d) = std::fs::read_to_string(p.join("dev")) {
                devs.push(d.trim().to_owned());
            }
        }
    }
    devs
}

fn check_target(target: &Path, yes: bool, image_size: u64) -> Result<bool> {
    let meta = match std::fs::metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("{}", target.display())),
    };
    let block = meta.file_type().is_block_device();
    if block && !yes {
        bail!("{} is a block device: everything on it will be overwritten; pass --yes", target.display());
    }
    if !block && !meta.is_file() {
        bail!("{} is neither a block device nor a regular file", target.display());
    }
    let ours = devices_of(target, &meta);
    let mounted = mounted_devices()?;
    if let Some(d) = ours.iter().find(|d| mounted.contains(d)) {
        bail!("{} is mounted (device {d}): unmount it first", target.display());
    }
    let root = std::fs::metadata("/")?;
    let (ma, mi) = dev_numbers(root.dev());
    if ours.contains(&format!("{ma}:{mi}")) {
        bail!("{} holds the running system", target.display());
    }
    let size = if block { File::open(target)?.seek(SeekFrom::End(0))? } else { meta.len() };
    if size < image_size && (block || size > 0) {
        bail!("{} has {size} bytes, the image needs {image_size}", target.display());
    }
    Ok(true)
}

pub fn flash(image: &Path, target: &Path, yes: bool) -> Result<()> {
    let bmap = Bmap::parse(
        &std::fs::read_to_string(bmap_path(image)?)
            .with_context(|| format!("reading the bmap of {}", image.display()))?,
    )?;
    let existed = check_target(target, yes, bmap.image_size)?;
    let mut out = OpenOptions::new().write(true).read(true).create(true).truncate(false).open(target)?;
    if !existed || out.metadata()?.len() < bmap.image_size && out.metadata()?.is_file() {
        out.set_len(bmap.image_size)?;
    }
    let mut raw = zstd::stream::read::Decoder::new(BufReader::new(File::open(image)?))?;
    let total = bmap.mapped_blocks() * BLOCK;
    let mut written = 0u64;
    let mut pos = 0u64;
    // Large reads: the decompressor and the target both do better with them.
    let mut buf = vec![0u8; 1 << 20];
    let chunk = buf.len() as u64;
    let bar = crate::progress::bytes("writing", total);
    for r in &bmap.ranges {
        // Skip (decompress and drop) the hole before the range.
        while pos < r.first * BLOCK {
            let n = read_full(&mut raw, &mut buf[..(r.first * BLOCK - pos).min(chunk) as usize])?;
            if n == 0 {
                bail!("the image ends before the bmap says");
            }
            pos += n as u64;
        }
        out.seek(SeekFrom::Start(pos))?;
        let mut h = Sha256::new();
        let end = ((r.last + 1) * BLOCK).min(bmap.image_size);
        while pos < end {
            let n = read_full(&mut raw, &mut buf[..(end - pos).min(chunk) as usize])?;
            if n == 0 {
                bail!("the image ends inside range {}-{}", r.first, r.last);
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            pos += n as u64;
            written += n as u64;
            bar.inc(n as u64);
        }
        if hex(&h.finalize()) != r.sha256 {
            bail!("range {}-{} of the image does not match its checksum: the image is corrupted", r.first, r.last);
        }
    }
    out.sync_all()?;
    bar.finish_and_clear();
    drop(out);
    // Read every range back from the target.
    let mut back = File::open(target)?;
    let bar = crate::progress::bytes("reading back", total);
    for r in &bmap.ranges {
        back.seek(SeekFrom::Start(r.first * BLOCK))?;
        let mut left = ((r.last + 1) * BLOCK).min(bmap.image_size) - r.first * BLOCK;
        let mut h = Sha256::new();
        while left > 0 {
            let n = (left as usize).min(buf.len());
            back.read_exact(&mut buf[..n])?;
            h.update(&buf[..n]);
            left -= n as u64;
            bar.inc(n as u64);
        }
        if hex(&h.finalize()) != r.sha256 {
            bail!(
                "read-back of range {}-{} from {} does not match: the target is faulty",
                r.first,
                r.last,
                target.display()
            );
        }
    }
    bar.finish_and_clear();
    eprintln!("thymis-imager: wrote {} MiB to {}, verified", written >> 20, target.display());
    Ok(())
}
