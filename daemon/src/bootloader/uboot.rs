//! U-Boot boards with this project's boot script (`thymis_uboot`): extlinux.conf on the
//! root partition as NixOS's extlinux builder writes it, and on the board's FAT
//! partition the script and its boot-once state. The agent names the label to try in
//! the state; the script counts the attempt before it boots it, so any later boot comes
//! back to extlinux.conf's default.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use thymis_uboot::{SCRIPT_FILE, SCRIPT_VERSION, STATE_FILE, STATE_SIZE, TryState};

use crate::persist;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UBoot {
    /// Where the FAT partition is mounted (NixOS's SD images: `/boot/firmware`).
    pub firmware: PathBuf,
    /// `/boot/extlinux/extlinux.conf`.
    pub extlinux: PathBuf,
}

impl UBoot {
    /// The loader, if the FAT partition holds this project's boot script and the root
    /// an extlinux.conf.
    pub fn detect(firmware: &Path, boot_dir: &Path) -> Option<UBoot> {
        let u = UBoot { firmware: firmware.to_owned(), extlinux: boot_dir.join("extlinux/extlinux.conf") };
        (u.extlinux.exists() && u.script_version().is_some()).then_some(u)
    }

    fn script(&self) -> PathBuf {
        self.firmware.join(SCRIPT_FILE)
    }

    fn state_path(&self) -> PathBuf {
        self.firmware.join(STATE_FILE)
    }

    pub fn script_version(&self) -> Option<u32> {
        std::fs::read(self.script()).ok().and_then(|b| thymis_uboot::script_version(&b))
    }

    /// Replaces an older version of the script with this agent's (same root partition).
    /// A new file renamed over the old one: the old script stays whole until then.
    pub fn update_script(&self) -> Result<bool> {
        let old = std::fs::read(self.script()).with_context(|| format!("reading {}", self.script().display()))?;
        let Some(version) = thymis_uboot::script_version(&old) else {
            bail!("{} is not a Thymis boot script", self.script().display())
        };
        if version >= SCRIPT_VERSION {
            return Ok(false);
        }
        let part = thymis_uboot::script_root_part(&old).context("the boot script names no root partition")?;
        persist::write_atomic(&self.script(), &thymis_uboot::boot_script(part), 0o644)
            .with_context(|| format!("writing {}", self.script().display()))?;
        self.flush()?;
        Ok(true)
    }

    /// The try the script will make (none when the state is missing or fails its
    /// checksum: the script boots the default then, too).
    pub fn state(&self) -> TryState {
        std::fs::read(self.state_path()).ok().and_then(|b| TryState::decode(&b).ok()).unwrap_or_default()
    }

    /// Writes the state. An existing state file is overwritten in place (on FAT, which has
    /// no journal, that changes no metadata; a torn write fails the checksum, and the
    /// script then boots the default), then the file system is flushed.
    pub fn set_state(&self, state: &TryState) -> Result<()> {
        let bytes = state.encode().map_err(anyhow::Error::msg)?;
        let path = self.state_path();
        let context = || format!("writing {}", path.display());
        match OpenOptions::new().write(true).open(&path) {
            Ok(mut f) if f.metadata().with_context(context)?.len() == STATE_SIZE as u64 => {
                f.write_all(&bytes).with_context(context)?;
                f.sync_all().with_context(context)?;
            }
            _ => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).with_context(context)?;
                }
                persist::write_atomic(&path, &bytes, 0o644).with_context(context)?;
            }
        }
        self.flush()
    }

    fn flush(&self) -> Result<()> {
        let dir = File::open(&self.firmware).with_context(|| format!("opening {}", self.firmware.display()))?;
        rustix::fs::syncfs(&dir).with_context(|| format!("flushing the file system of {}", self.firmware.display()))
    }

    /// The extlinux.conf label that boots `system` (not the default's).
    pub fn label_of(&self, system: &Path) -> Result<String> {
        let conf =
            std::fs::read_to_string(&self.extlinux).with_context(|| format!("reading {}", self.extlinux.display()))?;
        thymis_uboot::label_of(&conf, &system.display().to_string())
            .with_context(|| format!("{} has no entry that boots {}", self.extlinux.display(), system.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_try_is_written_in_place_and_an_old_script_is_replaced() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (fw, boot) = (tmp.path().join("firmware"), tmp.path().join("boot"));
        std::fs::create_dir_all(boot.join("extlinux")).expect("mkdir");
        std::fs::create_dir_all(&fw).expect("mkdir");
        assert!(UBoot::detect(&fw, &boot).is_none(), "no script, no extlinux.conf");
        std::fs::write(boot.join("extlinux/extlinux.conf"), "DEFAULT nixos-default\n").expect("conf");
        assert!(UBoot::detect(&fw, &boot).is_none(), "extlinux alone has no fallback");
        let old = thymis_uboot::script_text(2).replace("(version 1)", "(version 0)");
        std::fs::write(fw.join(SCRIPT_FILE), thymis_uboot::script_image(&old, "old")).expect("script");
        let u = UBoot::detect(&fw, &boot).expect("the script is there");
        assert_eq!(u.script_version(), Some(0));
        assert!(u.update_script().expect("update"));
        assert_eq!(std::fs::read(fw.join(SCRIPT_FILE)).expect("read"), thymis_uboot::boot_script(2));
        assert!(!u.update_script().expect("current"), "a current script stays");

        assert_eq!(u.state(), TryState::default());
        u.set_state(&TryState::try_once("nixos-2-default")).expect("set");
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(u.state_path()).expect("stat"));
        assert_eq!(u.state(), TryState::try_once("nixos-2-default"));
        u.set_state(&TryState::default()).expect("clear");
        let after = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(u.state_path()).expect("stat"));
        assert_eq!(ino, after, "overwritten in place");
        std::fs::write(u.state_path(), b"torn").expect("tear");
        assert_eq!(u.state(), TryState::default(), "a torn state is no try");
    }
}
