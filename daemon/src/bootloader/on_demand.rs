//! File systems the boot loader lives on that the device mounts only on demand: NixOS's
//! SD images list the FAT partition at `/boot/firmware` with `noauto`, so on a running
//! board it is usually not mounted, and the U-Boot state and boot script would be
//! written to the root file system's empty directory instead. The agent mounts such a
//! file system itself (as `mount DIR` would, from /etc/fstab) before it reads the boot
//! loader, and leaves it mounted.

use std::path::Path;
use std::process::Command;

use tracing::{info, warn};

/// The options of `dir`'s entry in an fstab, if it has one.
fn fstab_options(fstab: &str, dir: &Path) -> Option<String> {
    fstab.lines().map(str::trim).filter(|l| !l.starts_with('#')).find_map(|l| {
        let mut fields = l.split_whitespace();
        let (_, at, _) = (fields.next()?, fields.next()?, fields.next()?);
        (Path::new(&unescape(at)) == dir).then(|| fields.next().unwrap_or("defaults").to_owned())
    })
}

/// fstab and mountinfo write spaces and such in octal (`\040`).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|c| u8::from_str_radix(c, 8).ok());
        match code {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether `dir` is a mount point (in this mount namespace).
fn is_mounted(mountinfo: &str, dir: &Path) -> bool {
    mountinfo.lines().any(|l| l.split_whitespace().nth(4).is_some_and(|at| Path::new(&unescape(at)) == dir))
}

/// Mounts `dir` when /etc/fstab lists it `noauto` and it is not mounted yet.
pub fn mount(dir: &Path) {
    let Ok(fstab) = std::fs::read_to_string("/etc/fstab") else { return };
    let Some(options) = fstab_options(&fstab, dir) else { return };
    if !options.split(',').any(|o| o == "noauto") {
        return;
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if is_mounted(&mountinfo, dir) {
        return;
    }
    match Command::new("mount").arg(dir).output() {
        Ok(out) if out.status.success() => info!("mounted {} (noauto in /etc/fstab)", dir.display()),
        Ok(out) => warn!("mount {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => warn!("mount {}: {e}", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_firmware_entry_of_an_sd_image_is_found_and_a_mount_point_recognised() {
        let fstab = "# comment\n/dev/disk/by-label/NIXOS_SD / ext4 x-initrd.mount 0 1\n\
                     /dev/disk/by-label/FIRMWARE /boot/firmware vfat noauto,x-systemd.automount 0 2\n\
                     /dev/sda3 /mnt/with\\040space ext4 defaults 0 0\n";
        assert_eq!(fstab_options(fstab, Path::new("/boot/firmware")).as_deref(), Some("noauto,x-systemd.automount"));
        assert_eq!(fstab_options(fstab, Path::new("/mnt/with space")).as_deref(), Some("defaults"));
        assert_eq!(fstab_options(fstab, Path::new("/boot")), None);
        let mountinfo = "22 1 254:2 / / rw,relatime shared:1 - ext4 /dev/vda2 rw\n\
                         40 22 254:1 / /boot/firmware rw,relatime shared:20 - vfat /dev/vda1 rw\n";
        assert!(is_mounted(mountinfo, Path::new("/boot/firmware")));
        assert!(!is_mounted(mountinfo, Path::new("/boot")));
    }
}
