//! The boot loader side of reboot deployments, one backend per loader NixOS ships.
//!
//! Each backend answers two questions with a [`Plan`], a list of [`Step`]s the agent
//! performs in order: how to boot a new generation once while a confirmed one stays
//! the default ([`Plan::try_once`]), and how to make a generation the default
//! ([`Plan::commit`], [`Plan::roll_back`]). The steps are ordered so that a power
//! loss between any two of them boots a confirmed generation; the tests below check
//! every prefix of every plan against a model of each loader, and docs/agent.md has
//! the table.

pub mod efivars;
pub mod grub;
pub mod uboot;

use std::path::Path;

use thymis_store::StorePath;

pub use efivars::EfiVars;
pub use grub::Grub;
pub use uboot::UBoot;

/// The loader this device boots with, as far as reboot deployments care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loader {
    /// systemd-boot (it announces itself in the `LoaderInfo` EFI variable): the
    /// `LoaderEntryOneShot` variable boots an entry once; `LoaderEntryDefault`
    /// overrides loader.conf's `default`.
    SystemdBoot(EfiVars),
    /// GRUB as NixOS installs it: grubenv's `next_entry` boots once.
    Grub(Grub),
    /// U-Boot with this project's boot script on the board's FAT partition: its state
    /// file names an extlinux.conf label to try once (`thymis_uboot`).
    UBoot(UBoot),
    /// extlinux (NixOS's generic-extlinux-compatible, on ARM boards): only a default,
    /// no one-shot and no fallback.
    Extlinux,
    /// None of these (no boot loader files the agent knows, or no EFI variables).
    Unknown,
}

impl Loader {
    pub fn name(&self) -> &'static str {
        match self {
            Loader::SystemdBoot(_) => "systemd-boot",
            Loader::Grub(_) => "GRUB",
            Loader::UBoot(_) => "U-Boot",
            Loader::Extlinux => "extlinux",
            Loader::Unknown => "unknown",
        }
    }
}

/// Which of a deployment's two systems a step is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    New,
    Previous,
}

/// One thing the agent does to the profile or the boot loader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The system profile names this system (a new generation when it does not).
    SetProfile(Which),
    /// The failed deployment's generations leave the profile.
    DeleteFailed,
    /// This system's `switch-to-configuration boot`: the loader's entries follow the
    /// profile and its default names this system.
    InstallBoot(Which),
    /// systemd-boot: `LoaderEntryDefault` names the previous generation, overriding
    /// the default that `InstallBoot(New)` writes.
    PinPrevious,
    /// systemd-boot: `LoaderEntryDefault` removed, so loader.conf's default applies.
    Unpin,
    /// Boot the new generation once (`LoaderEntryOneShot`, grubenv `next_entry`).
    TryNewOnce,
    /// Forget a one-shot boot that did not happen.
    ClearTryOnce,
}

/// The steps of one operation, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan(pub Vec<Step>);

impl Plan {
    /// Before a reboot into the new system: it boots once, and any other boot (a power
    /// loss, a kernel that panics) comes up on the previous one. `None` where the loader
    /// cannot do that (extlinux, unknown): the new generation could only be the default.
    pub fn try_once(loader: &Loader) -> Option<Plan> {
        use Step::*;
        match loader {
            Loader::SystemdBoot(_) => {
                Some(Plan(vec![PinPrevious, SetProfile(Which::New), InstallBoot(Which::New), TryNewOnce]))
            }
            // The previous system's `boot` writes the menu with the new generation in
            // it and itself as the default.
            Loader::Grub(_) | Loader::UBoot(_) => {
                Some(Plan(vec![SetProfile(Which::New), InstallBoot(Which::Previous), TryNewOnce]))
            }
            Loader::Extlinux | Loader::Unknown => None,
        }
    }

    /// What a loader without a one-shot boot can do: make the new system the default.
    pub fn unsafe_reboot() -> Plan {
        Plan(vec![Step::SetProfile(Which::New), Step::InstallBoot(Which::New)])
    }

    /// After confirmation: the new system is the default from now on.
    pub fn commit(loader: &Loader) -> Plan {
        use Step::*;
        match loader {
            // Unpinned first: loader.conf's default is the new system after a reboot
            // deployment's preparation, or the previous one otherwise, both confirmed.
            Loader::SystemdBoot(_) => Plan(vec![SetProfile(Which::New), Unpin, InstallBoot(Which::New), ClearTryOnce]),
            Loader::Grub(_) | Loader::UBoot(_) => {
                Plan(vec![SetProfile(Which::New), InstallBoot(Which::New), ClearTryOnce])
            }
            Loader::Extlinux | Loader::Unknown => Plan(vec![SetProfile(Which::New), InstallBoot(Which::New)]),
        }
    }

    /// After a failure: the previous system is the default again and the failed
    /// generations are gone. A one-shot boot that did not happen goes first; the pin
    /// last, so until then it still boots the previous system.
    pub fn roll_back(loader: &Loader) -> Plan {
        use Step::*;
        let back = [SetProfile(Which::Previous), DeleteFailed, InstallBoot(Which::Previous)];
        Plan(match loader {
            Loader::SystemdBoot(_) => [&[ClearTryOnce][..], &back, &[Unpin]].concat(),
            Loader::Grub(_) | Loader::UBoot(_) => [&[ClearTryOnce][..], &back].concat(),
            Loader::Extlinux | Loader::Unknown => back.to_vec(),
        })
    }
}

/// Reads which loader boots this device: systemd-boot from its EFI variable, GRUB and
/// extlinux from their configuration files under `boot_dir`, U-Boot from this project's
/// boot script in `firmware_dir` beside an extlinux.conf.
pub fn detect(boot_dir: &Path, efivars_dir: &Path, firmware_dir: &Path) -> Loader {
    let vars = EfiVars { dir: efivars_dir.to_owned() };
    if vars.get("LoaderInfo").is_some_and(|info| info.starts_with("systemd-boot")) {
        return Loader::SystemdBoot(vars);
    }
    let grub = Grub { dir: boot_dir.join("grub") };
    if grub.config().exists() {
        return Loader::Grub(grub);
    }
    if let Some(u) = UBoot::detect(firmware_dir, boot_dir) {
        return Loader::UBoot(u);
    }
    if boot_dir.join("extlinux/extlinux.conf").exists() {
        return Loader::Extlinux;
    }
    Loader::Unknown
}

/// NixOS's systemd-boot entry name of a system profile generation.
pub fn entry(generation: u64) -> String {
    format!("nixos-generation-{generation}.conf")
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

#[cfg(test)]
mod model;
