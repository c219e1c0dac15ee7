//! An aarch64 U-Boot board in QEMU (`-M virt`, Debian's U-Boot as its firmware), its
//! disk an image from `thymis-imager build --board qemu-virt`, booted with
//! [`crate::vm::Vm::boot_board`]. Its agent is the aarch64 build of thymis-agent
//! (scripts/agent-aarch64.sh), inside the board's system.
//!
//! While the board is off, a test can look at its disk: the root (ext4) is loop-mounted
//! read-write; the FAT partition (this machine's kernel has no FAT driver) is read with
//! mtools.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// QEMU's aarch64 U-Boot (Debian's u-boot-qemu).
pub const UBOOT: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";

/// The aarch64 agent that scripts/agent-aarch64.sh builds (`make test` runs it).
pub fn aarch64_agent() -> Result<PathBuf> {
    let inputs = std::env::var("THYMIS_TEST_INPUTS").unwrap_or_else(|_| "/var/cache/thymis-test-inputs".into());
    let agent = Path::new(&inputs).join("arm64/thymis-agent");
    if !agent.exists() {
        bail!("{} is missing: run scripts/agent-aarch64.sh (make test does)", agent.display());
    }
    Ok(agent)
}

#[derive(Debug)]
pub struct BoardDisk {
    pub raw: PathBuf,
    /// Where the root is mounted (`root`) and the FAT partition's files copied (`firmware`).
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
    /// The disk of an image set (`NAME.img.zst`), decompressed to `dir/disk.img`.
    pub fn from_image(zst: &Path, dir: &Path) -> Result<BoardDisk> {
        std::fs::create_dir_all(dir.join("root"))?;
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

    /// The FAT partition as mtools names it (`DISK@@OFFSET`), for reading and writing
    /// its files while the board is off.
    pub fn fat(&self) -> Result<String> {
        let (start, _) = *self.partitions()?.first().context("no FAT partition")?;
        Ok(format!("{}@@{start}", self.raw.display()))
    }

    /// Mounts the root and copies the FAT partition's files out (the board must be off).
    pub fn mount(&mut self) -> Result<()> {
        if self.mounted {
            return Ok(());
        }
        let parts = self.partitions()?;
        let [_, (root_start, root_size)] = parts[..] else { bail!("expected two partitions") };
        let fw = self.dir.join("firmware");
        let _ = std::fs::remove_dir_all(&fw);
        std::fs::create_dir_all(&fw)?;
        run(Command::new("mcopy").args(["-s", "-n", "-m", "-i", &self.fat()?, "::/"]).arg(&fw))?;
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", &format!("loop,offset={root_start},sizelimit={root_size}")])
            .arg(&self.raw)
            .arg(self.dir.join("root")))?;
        self.mounted = true;
        Ok(())
    }

    pub fn unmount(&mut self) -> Result<()> {
        if self.mounted {
            run(Command::new("umount").arg(self.dir.join("root")))?;
            self.mounted = false;
        }
        Ok(())
    }

    /// Powers the board on (unmounted first); its console and QEMU's files go to `dir`.
    pub fn boot(&mut self, dir: &Path) -> Result<crate::vm::Vm> {
        self.unmount()?;
        crate::vm::Vm::boot_board(&self.raw, dir)
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

    /// A file on the root file system (mounted), written for the next boot.
    pub fn write_root_file(&self, path: &str, text: Option<&str>) -> Result<()> {
        let p = self.dir.join("root").join(path.trim_start_matches('/'));
        match text {
            Some(t) => std::fs::write(&p, t)?,
            None => {
                let _ = std::fs::remove_file(&p);
            }
        }
        Ok(())
    }
}

/// The system a board's console says it booted (`THYMIS-BOOTED SYSTEM/init`).
pub fn booted_system(console: &str) -> Option<String> {
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix("THYMIS-BOOTED ").map(|s| s.trim().trim_end_matches("/init").to_owned()))
}

impl Drop for BoardDisk {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}
