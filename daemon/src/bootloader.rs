//! The boot loader side of reboot deployments: systemd-boot's one-shot entry, so that a
//! new generation boots once and the previous one stays the default until the
//! deployment is confirmed.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use thymis_store::StorePath;

/// Whether `bootctl` can set a one-shot entry here (UEFI with systemd-boot installed).
pub fn one_shot_supported() -> bool {
    Path::new("/sys/firmware/efi").exists()
        && Command::new("bootctl").arg("is-installed").output().map(|o| o.status.success()).unwrap_or(false)
}

/// Whether the device boots with extlinux (NixOS's generic-extlinux-compatible loader,
/// common on ARM boards): it has no one-shot entry and no fallback.
pub fn is_extlinux(boot_dir: &Path) -> bool {
    boot_dir.join("extlinux/extlinux.conf").exists()
}

/// NixOS's systemd-boot entry name of a system profile generation.
pub fn entry(generation: u64) -> String {
    format!("nixos-generation-{generation}.conf")
}

fn bootctl(args: &[&str]) -> Result<()> {
    let out = Command::new("bootctl").args(args).output().context("running bootctl")?;
    if !out.status.success() {
        bail!("bootctl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub fn set_default(generation: u64) -> Result<()> {
    bootctl(&["set-default", &entry(generation)])
}

pub fn set_oneshot(generation: u64) -> Result<()> {
    bootctl(&["set-oneshot", &entry(generation)])
}

/// Whether going from `old` to `new` changes the kernel, initrd or kernel modules,
/// which only a reboot applies. Systems without a kernel (test systems) never do.
pub fn kernel_changed(old: &StorePath, new: &StorePath) -> bool {
    ["kernel", "initrd", "kernel-modules"].iter().any(|f| {
        let link = |s: &StorePath| std::fs::read_link(Path::new(&s.to_absolute()).join(f)).ok();
        match (link(old), link(new)) {
            (Some(a), Some(b)) => a != b,
            _ => false,
        }
    })
}
