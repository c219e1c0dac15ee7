//! Images for U-Boot boards (aarch64), in the layout of NixOS's SD images:
//!
//! ```text
//! MBR: 8 MiB gap | FIRMWARE (FAT32, bootable flag) | NIXOS_SD (ext4, the root)
//! FIRMWARE: boot.scr (the Thymis boot script), thymis/boot-state, the board's firmware
//!           files and config.txt where it has them
//! root:     as for every image, plus boot/extlinux/extlinux.conf, boot/nixos/<kernel,
//!           initrd, dtbs>, boot/firmware (where the FAT partition is mounted)
//! ```
//! Only the FAT partition is flagged bootable, so U-Boot's distro boot runs the boot
//! script (which then boots the root's extlinux.conf, a try at most once) rather than
//! taking extlinux.conf directly, as it would from a NixOS SD image. See docs/boards.md.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use thymis_store::StorePath;
use thymis_uboot::{ExtlinuxEntry, TryState};

use crate::tools::run;

const MIB: u64 = 1 << 20;

/// A board: what its FAT partition holds, and where.
#[derive(Debug)]
pub struct Board {
    pub name: &'static str,
    pub description: &'static str,
    /// Files the board's boot firmware needs on the FAT partition, taken from
    /// `--firmware DIR` or the system's `firmware/` directory.
    pub firmware: &'static [&'static str],
    /// The firmware's config.txt, for boards that read one.
    pub config_txt: Option<&'static str>,
    pub fat_offset_mib: u64,
    pub fat_mib: u64,
}

/// The root file system's partition number (what the boot script boots from).
pub const ROOT_PART: u32 = 2;

pub const BOARDS: &[Board] = &[
    Board {
        name: "qemu-virt",
        description: "QEMU's aarch64 virt machine with U-Boot as its firmware (-bios u-boot.bin): the test board",
        firmware: &[],
        config_txt: None,
        fat_offset_mib: 8,
        fat_mib: 32,
    },
    Board {
        name: "raspberry-pi-4",
        description: "Raspberry Pi 4 Model B: its firmware starts U-Boot (u-boot-rpi4.bin), which runs the boot script",
        firmware: &["start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb", "armstub8-gic.bin", "u-boot-rpi4.bin"],
        // The Pi firmware's settings as NixOS's SD image has them for a Pi 4.
        config_txt: Some(
            "[pi4]\nkernel=u-boot-rpi4.bin\nenable_gic=1\narmstub=armstub8-gic.bin\ndisable_overscan=1\narm_boost=1\n\n\
             [all]\narm_64bit=1\nenable_uart=1\navoid_warning=1\n",
        ),
        fat_offset_mib: 8,
        fat_mib: 30,
    },
];

pub fn by_name(name: &str) -> Result<&'static Board> {
    BOARDS.iter().find(|b| b.name == name).with_context(|| {
        let names: Vec<_> = BOARDS.iter().map(|b| b.name).collect();
        format!("no board {name:?}; the boards are {}", names.join(", "))
    })
}

impl Board {
    /// Where the root partition starts.
    pub fn root_offset(&self) -> u64 {
        (self.fat_offset_mib + self.fat_mib) * MIB
    }

    /// The image's size around a root file system of `root_size` bytes.
    pub fn total(&self, root_size: u64) -> u64 {
        self.root_offset() + root_size
    }

    /// The MBR partition table (fixed disk id, from the system).
    pub fn partition(&self, raw: &Path, disk_id: &str, root_size: u64) -> Result<()> {
        let sectors = |b: u64| b / 512;
        let script = format!(
            "label: dos\nlabel-id: 0x{disk_id}\nunit: sectors\n\
             start={}, size={}, type=c, bootable\n\
             start={}, size={}, type=83\n",
            sectors(self.fat_offset_mib * MIB),
            sectors(self.fat_mib * MIB),
            sectors(self.root_offset()),
            sectors(root_size),
        );
        crate::tools::sfdisk(raw, &script)
    }

    /// The firmware files' source: `--firmware DIR`, else the system's `firmware/`.
    fn firmware_dir(&self, given: Option<&Path>, sys: &Path) -> Result<Option<PathBuf>> {
        if self.firmware.is_empty() {
            return Ok(None);
        }
        let dir = given.map(Path::to_owned).unwrap_or_else(|| sys.join("firmware"));
        let missing: Vec<_> = self.firmware.iter().filter(|f| !dir.join(f).is_file()).collect();
        if !missing.is_empty() {
            bail!(
                "the {} board needs {} on its FAT partition; {} lacks {missing:?} (give --firmware DIR)",
                self.name,
                self.firmware.join(", "),
                dir.display()
            );
        }
        Ok(Some(dir))
    }

    /// The FAT partition: the boot script, an empty boot-once state, the firmware.
    pub fn make_firmware(&self, raw: &Path, firmware: Option<&Path>, sys: &Path) -> Result<()> {
        let offset = self.fat_offset_mib * MIB;
        // The FAT type is named: mkfs.vfat would pick it from the size of the whole image
        // file and fail on a small partition in a large image.
        let fat_bits = if self.fat_mib < 256 { "16" } else { "32" };
        run(Command::new("mkfs.vfat")
            .args(["--invariant", "-F", fat_bits, "-n", "FIRMWARE", "-i", "2178694e"])
            .args(["--offset", &(offset / 512).to_string()])
            .arg(raw)
            .arg((self.fat_mib * MIB / 1024).to_string()))?;
        let img = format!("{}@@{offset}", raw.display());
        let fat_time = "946684800";
        let tmp = tempfile::tempdir()?;
        let mcopy = |src: &Path, dest: &str| {
            run(Command::new("mcopy")
                .args(["-D", "o", "-i", &img])
                .arg(src)
                .arg(dest)
                .env("SOURCE_DATE_EPOCH", fat_time))
        };
        run(Command::new("mmd").args(["-D", "s", "-i", &img, "::/thymis"]).env("SOURCE_DATE_EPOCH", fat_time))?;
        fs::write(tmp.path().join("boot.scr"), thymis_uboot::boot_script(ROOT_PART))?;
        fs::write(tmp.path().join("boot-state"), TryState::default().encode().map_err(anyhow::Error::msg)?)?;
        mcopy(&tmp.path().join("boot.scr"), &format!("::/{}", thymis_uboot::SCRIPT_FILE))?;
        mcopy(&tmp.path().join("boot-state"), &format!("::/{}", thymis_uboot::STATE_FILE))?;
        if let Some(dir) = self.firmware_dir(firmware, sys)? {
            for f in self.firmware {
                mcopy(&dir.join(f), &format!("::/{f}"))?;
            }
        }
        if let Some(text) = self.config_txt {
            fs::write(tmp.path().join("config.txt"), text)?;
            mcopy(&tmp.path().join("config.txt"), "::/config.txt")?;
        }
        Ok(())
    }
}

/// The root's `/boot`: extlinux.conf naming the system as the default and generation 1,
/// its kernel, initrd and device trees under `/boot/nixos`, and the FAT partition's
/// mount point. Fails where the system has no kernel or initrd: a board image must boot.
pub fn stage_boot(root: &Path, system: &StorePath) -> Result<String> {
    let sys = root.join("nix/store").join(system.base_name());
    let staged = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let nixos = root.join("boot/nixos");
    fs::create_dir_all(&nixos)?;
    fs::create_dir_all(root.join("boot/extlinux"))?;
    fs::create_dir_all(root.join("boot/firmware"))?;
    let mut names = vec![];
    for f in ["kernel", "initrd"] {
        let target = fs::read_link(sys.join(f))
            .with_context(|| format!("{system} has no {f}: a board image needs a system that boots"))?;
        let name = thymis_uboot::boot_file_name(&target.to_string_lossy());
        fs::copy(staged(&target), nixos.join(&name)).with_context(|| format!("copying {}", target.display()))?;
        names.push(name);
    }
    let fdtdir = match fs::read_link(sys.join("dtbs")) {
        Ok(target) => {
            let name = thymis_uboot::boot_file_name(&target.to_string_lossy());
            run(Command::new("cp").arg("-r").arg(staged(&target)).arg(nixos.join(&name)))?;
            Some(name)
        }
        Err(_) => None,
    };
    let entry = ExtlinuxEntry {
        system: system.to_absolute(),
        kernel: names[0].clone(),
        initrd: names[1].clone(),
        params: fs::read_to_string(sys.join("kernel-params")).unwrap_or_default(),
        fdtdir,
    };
    let conf = thymis_uboot::extlinux_conf(&entry, &[(1, entry.clone())], 10);
    fs::write(root.join("boot/extlinux/extlinux.conf"), conf)?;
    Ok("nixos-default".into())
}
