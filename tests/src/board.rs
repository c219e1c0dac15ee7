//! An aarch64 U-Boot board in QEMU (`-M virt`, Debian's U-Boot as its firmware), its
//! disk an image from `thymis-imager build --board qemu-virt`. While the board is off,
//! the disk's partitions are there for the board's agent, which runs on this machine
//! ([`crate::Kind::Board`]); a boot puts them back, runs QEMU until the board powers off
//! or resets, and gives its console. The root (ext4) is loop-mounted. This machine's
//! kernel has no FAT driver: the FAT partition's files are copied out with mtools to a
//! directory standing in for its mount, and copied back before each boot.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// QEMU's aarch64 U-Boot (Debian's u-boot-qemu).
pub const UBOOT: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";

#[derive(Debug)]
pub struct BoardDisk {
    pub raw: PathBuf,
    /// Where the partitions are mounted: `root` (ext4) and `firmware` (FAT).
    pub dir: PathBuf,
    mounted: bool,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl BoardDisk {
    /// The disk of an image set (`NAME.img.zst`), decompressed to `dir/disk.img`;
    /// `dir` is where its partitions get mounted.
    pub fn from_image(zst: &Path, dir: &Path) -> Result<BoardDisk> {
        std::fs::create_dir_all(dir.join("root"))?;
        std::fs::create_dir_all(dir.join("firmware"))?;
        let raw = dir.join("disk.img");
        run(Command::new("zstd").args(["-dqf"]).arg(zst).arg("-o").arg(&raw))?;
        Ok(BoardDisk { raw, dir: dir.to_owned(), mounted: false })
    }

    /// (start, size) in bytes of each partition.
    fn partitions(&self) -> Result<Vec<(u64, u64)>> {
        let out = run(Command::new("sfdisk").arg("-J").arg(&self.raw))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let parts = v["partitiontable"]["partitions"].as_array().context("no partitions")?;
        Ok(parts
            .iter()
            .map(|p| (p["start"].as_u64().unwrap_or(0) * 512, p["size"].as_u64().unwrap_or(0) * 512))
            .collect())
    }

    pub fn mount(&mut self) -> Result<()> {
        if self.mounted {
            return Ok(());
        }
        let parts = self.partitions()?;
        let [(fw_start, fw_size), (root_start, root_size)] = parts[..] else { bail!("expected two partitions") };
        let mount = |fs: &str, start: u64, size: u64, at: &str| {
            run(Command::new("mount")
                .args(["-t", fs, "-o", &format!("loop,offset={start},sizelimit={size}")])
                .arg(&self.raw)
                .arg(self.dir.join(at)))
        };
        let _ = fw_size;
        let fw = self.dir.join("firmware");
        let _ = std::fs::remove_dir_all(&fw);
        std::fs::create_dir_all(&fw)?;
        run(Command::new("mcopy")
            .args(["-s", "-n", "-m", "-i", &format!("{}@@{fw_start}", self.raw.display()), "::/"])
            .arg(&fw))?;
        mount("ext4", root_start, root_size, "root")?;
        self.mounted = true;
        Ok(())
    }

    pub fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        run(Command::new("umount").arg(self.dir.join("root")))?;
        let parts = self.partitions()?;
        let fw_start = parts.first().context("no FAT partition")?.0;
        let fw = self.dir.join("firmware");
        let mut files = vec![];
        for e in std::fs::read_dir(&fw)? {
            files.push(e?.path());
        }
        run(Command::new("mcopy")
            .args(["-s", "-o", "-m", "-i", &format!("{}@@{fw_start}", self.raw.display())])
            .args(&files)
            .arg("::/"))?;
        self.mounted = false;
        Ok(())
    }

    /// Boots the board once (unmounted first): its console until it powered off or
    /// reset (a kernel panic resets it with `panic=-1`).
    pub fn boot(&mut self) -> Result<String> {
        self.unmount()?;
        let out = Command::new("timeout")
            .args(["120", "qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", "-m", "512"])
            .args(["-nographic", "-no-reboot", "-bios", UBOOT, "-drive"])
            .arg(format!("if=virtio,file={},format=raw", self.raw.display()))
            .stdin(std::process::Stdio::null())
            .output()
            .context("running qemu-system-aarch64")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The extlinux.conf the board boots (mounted).
    pub fn extlinux_conf(&self) -> String {
        std::fs::read_to_string(self.dir.join("root/boot/extlinux/extlinux.conf")).unwrap_or_default()
    }

    /// The boot-once state the boot script reads (mounted).
    pub fn try_state(&self) -> Option<thymis_uboot::TryState> {
        std::fs::read(self.dir.join("firmware").join(thymis_uboot::STATE_FILE))
            .ok()
            .and_then(|b| thymis_uboot::TryState::decode(&b).ok())
    }
}

/// The system a board's console says it booted (`THYMIS-BOOTED SYSTEM/init`).
pub fn booted_system(console: &str) -> Option<String> {
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix("THYMIS-BOOTED ").map(|s| s.trim_end_matches("/init").to_owned()))
}

impl Drop for BoardDisk {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}
