//! What makes a reboot into an unconfirmed generation safe, read from the systems
//! themselves: which changes only a reboot applies, whether a generation that hangs
//! resets by itself, and whether GRUB can write its one-shot back.

use std::path::Path;

pub use thymis_store::system::{boot_changes, has_kernel, switch_inhibitors_changed};

/// Whether a generation that hangs at boot ends in a reset by itself: a panic timeout
/// with `boot.panic_on_fail` in its kernel parameters (stage 1 failures panic, the
/// panic resets), or a hardware watchdog that its systemd arms (`RuntimeWatchdogSec`).
/// Says what is missing otherwise. Systems without a kernel boot no kernel: fine.
pub fn hang_protection(new: &Path) -> Result<(), String> {
    if !has_kernel(new) {
        return Ok(());
    }
    let params = std::fs::read_to_string(new.join("kernel-params")).unwrap_or_default();
    let words: Vec<&str> = params.split_whitespace().collect();
    let panic_resets = words
        .iter()
        .filter_map(|w| w.strip_prefix("panic="))
        .next_back()
        .and_then(|v| v.parse::<i64>().ok())
        .is_some_and(|n| n != 0);
    let panics_on_fail = words.iter().any(|w| *w == "boot.panic_on_fail" || *w == "boot.panic_on_fail=1");
    if panic_resets && panics_on_fail {
        return Ok(());
    }
    let conf = std::fs::read_to_string(new.join("etc/systemd/system.conf")).unwrap_or_default();
    if watchdog_armed(&conf) {
        return Ok(());
    }
    let missing = match (panic_resets, panics_on_fail) {
        (false, false) => "neither panic=SECONDS nor boot.panic_on_fail",
        (false, true) => "no panic=SECONDS",
        _ => "no boot.panic_on_fail",
    };
    Err(format!(
        "the new system's kernel parameters have {missing} and its systemd arms no hardware watchdog \
         (RuntimeWatchdogSec): a generation that hangs at boot would stay until someone power-cycles the \
         device (services.thymis-agent.hangProtection sets both)"
    ))
}

/// `RuntimeWatchdogSec=` set to a time (not 0, off or empty) in a systemd system.conf.
fn watchdog_armed(conf: &str) -> bool {
    conf.lines().filter_map(|l| l.trim().strip_prefix("RuntimeWatchdogSec=")).next_back().is_some_and(|v| {
        let v = v.trim();
        !(v.is_empty() || v == "off" || v.trim_start_matches('0').trim_start_matches(['s', 'm', 'i', 'n']).is_empty())
    })
}

/// File systems GRUB's `save_env` writes to: it overwrites grubenv's blocks in place,
/// which works only where a file's blocks sit plainly on the disk.
const GRUB_WRITABLE: [(i64, &str); 3] = [(0xEF53, "ext2/3/4"), (0x4d44, "FAT"), (0x5846_5342, "XFS")];

/// Whether GRUB, at boot, can clear the one-shot `next_entry` in `dir`'s grubenv:
/// the file system must be one it writes, on a plain partition (not device-mapper,
/// LUKS or mdraid). Otherwise the try would become permanent.
pub fn grub_can_write(dir: &Path) -> Result<(), String> {
    let fs = rustix::fs::statfs(dir).map_err(|e| format!("cannot tell the file system of {}: {e}", dir.display()))?;
    let dev = std::fs::metadata(dir).map(|m| std::os::unix::fs::MetadataExt::dev(&m)).unwrap_or(0);
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let sys = Path::new("/sys/dev/block").join(format!("{major}:{minor}"));
    let stacked = ["dm", "md"].into_iter().find(|d| sys.join(d).exists());
    grub_writable(fs.f_type as i64, stacked).map_err(|why| format!("{}: {why}", dir.display()))
}

fn grub_writable(fs_type: i64, stacked: Option<&str>) -> Result<(), String> {
    let Some((_, name)) = GRUB_WRITABLE.iter().find(|(t, _)| *t == fs_type) else {
        return Err(format!(
            "GRUB cannot write its environment on this file system (type {fs_type:#x}; it writes ext2/3/4, FAT \
             and XFS, not btrfs, ZFS or others), so a one-shot boot would become permanent"
        ));
    };
    match stacked {
        Some(kind) => Err(format!(
            "{name} on a {} device: GRUB cannot write its environment there, so a one-shot boot would become \
             permanent",
            if kind == "dm" { "device-mapper (LUKS, LVM)" } else { "md RAID" }
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system(dir: &Path, name: &str, kernel: &str, params: &str) -> std::path::PathBuf {
        let s = dir.join(name);
        std::fs::create_dir_all(s.join("etc/systemd")).expect("mkdir");
        std::os::unix::fs::symlink(format!("/nix/store/{kernel}-linux/bzImage"), s.join("kernel")).expect("link");
        std::os::unix::fs::symlink("/nix/store/i-initrd/initrd", s.join("initrd")).expect("link");
        std::fs::write(s.join("kernel-params"), params).expect("params");
        std::fs::write(s.join("init-interface-version"), "systemd 1").expect("iiv");
        s
    }

    #[test]
    fn switch_inhibitors_compare_as_nixos_does() {
        let dir = tempfile::tempdir().expect("tmp");
        let sys = |name: &str, json: Option<&str>| {
            let s = dir.path().join(name);
            std::fs::create_dir_all(&s).expect("mkdir");
            if let Some(j) = json {
                std::fs::write(s.join("switch-inhibitors"), j).expect("write");
            }
            s
        };
        let a = sys("a", Some(r#"{"dbus-implementation":"dbus","kernel":"6.1"}"#));
        let b = sys("b", Some(r#"{"dbus-implementation":"broker","new-key":"x"}"#));
        let c = sys("c", None);
        let d = sys("d", Some("not json"));
        assert_eq!(switch_inhibitors_changed(&a, &b), vec!["dbus-implementation".to_owned()]);
        assert_eq!(switch_inhibitors_changed(&a, &a), Vec::<String>::new());
        // A key only one side has, a missing or unreadable file: no change.
        assert_eq!(switch_inhibitors_changed(&a, &c), Vec::<String>::new());
        assert_eq!(switch_inhibitors_changed(&c, &b), Vec::<String>::new());
        assert_eq!(switch_inhibitors_changed(&d, &b), Vec::<String>::new());
    }

    #[test]
    fn every_part_a_boot_applies_counts_as_a_change() {
        let tmp = tempfile::tempdir().expect("tmp");
        let a = system(tmp.path(), "a", "k1", "console=ttyS0 panic=10");
        let same = system(tmp.path(), "same", "k1", "console=ttyS0 panic=10");
        assert!(boot_changes(&a, &same).is_empty());
        let params = system(tmp.path(), "params", "k1", "console=ttyS0 panic=10 quiet");
        assert_eq!(boot_changes(&a, &params), ["kernel-params"]);
        let kernel = system(tmp.path(), "kernel", "k2", "console=ttyS0 panic=10");
        assert_eq!(boot_changes(&a, &kernel), ["kernel"]);
        std::os::unix::fs::symlink("/nix/store/d-dtbs", same.join("dtbs")).expect("link");
        assert_eq!(boot_changes(&a, &same), ["dtbs"], "device trees added");
        std::fs::write(params.join("init-interface-version"), "systemd 2").expect("iiv");
        assert_eq!(boot_changes(&a, &params), ["kernel-params", "init-interface-version"]);
        let none = tmp.path().join("container");
        std::fs::create_dir_all(&none).expect("mkdir");
        assert!(boot_changes(&a, &none).is_empty(), "a system without a kernel is never booted by one");
    }

    #[test]
    fn a_hang_resets_by_panic_with_panic_on_fail_or_by_a_watchdog() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ok = system(tmp.path(), "ok", "k", "console=ttyS0 panic=10 boot.panic_on_fail");
        assert_eq!(hang_protection(&ok), Ok(()));
        let bare = system(tmp.path(), "bare", "k", "console=ttyS0 loglevel=4");
        assert!(hang_protection(&bare).expect_err("nothing").contains("neither panic=SECONDS nor boot.panic_on_fail"));
        let zero = system(tmp.path(), "zero", "k", "panic=10 panic=0 boot.panic_on_fail");
        assert!(hang_protection(&zero).expect_err("panic=0 waits").contains("no panic=SECONDS"));
        let no_fail = system(tmp.path(), "nofail", "k", "panic=-1");
        assert!(hang_protection(&no_fail).expect_err("stage 1 waits for a key").contains("no boot.panic_on_fail"));
        std::fs::write(bare.join("etc/systemd/system.conf"), "[Manager]\nRuntimeWatchdogSec=off\n").expect("conf");
        assert!(hang_protection(&bare).is_err(), "a watchdog turned off");
        std::fs::write(bare.join("etc/systemd/system.conf"), "[Manager]\nRuntimeWatchdogSec=0\n").expect("conf");
        assert!(hang_protection(&bare).is_err(), "a watchdog of 0 s");
        std::fs::write(bare.join("etc/systemd/system.conf"), "[Manager]\nRuntimeWatchdogSec=30s\n").expect("conf");
        assert_eq!(hang_protection(&bare), Ok(()));
        assert_eq!(hang_protection(tmp.path()), Ok(()), "no kernel, no boot");
    }

    #[test]
    fn grub_writes_only_plain_ext_fat_and_xfs() {
        assert_eq!(grub_writable(0xEF53, None), Ok(()));
        assert_eq!(grub_writable(0x4d44, None), Ok(()));
        let btrfs = grub_writable(0x9123_683E, None).expect_err("btrfs");
        assert!(btrfs.contains("type 0x9123683e"), "{btrfs}");
        assert!(grub_writable(0x2fc1_2fc1, None).is_err(), "ZFS");
        assert!(grub_writable(0xEF53, Some("dm")).expect_err("LUKS").contains("device-mapper"));
        assert!(grub_writable(0xEF53, Some("md")).expect_err("RAID").contains("md RAID"));
    }
}
