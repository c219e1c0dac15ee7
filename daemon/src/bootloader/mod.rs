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
pub mod exec;
pub mod grub;
pub mod on_demand;
pub mod safety;
pub mod systemd_boot;
pub mod uboot;

use std::path::Path;

pub use efivars::EfiVars;
pub use grub::Grub;
pub use systemd_boot::SystemdBoot;
pub use uboot::UBoot;

/// The loader this device boots with, as far as reboot deployments care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loader {
    /// systemd-boot (it announces itself in the `LoaderInfo` EFI variable): loader.conf
    /// names the default entry; the `LoaderEntryOneShot` variable boots an entry once.
    SystemdBoot(SystemdBoot),
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

    /// Whether this loader can boot a new generation once while the previous one stays
    /// the default (systemd-boot only where the agent may write EFI variables).
    pub fn has_one_shot(&self) -> bool {
        match self {
            Loader::SystemdBoot(sb) => sb.can_touch_efi_variables,
            Loader::Grub(_) | Loader::UBoot(_) => true,
            Loader::Extlinux | Loader::Unknown => false,
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
    /// Generations beyond the configured limit leave the profile (and so the ESP).
    Prune,
    /// This system's `switch-to-configuration boot`: the loader's entries follow the
    /// profile and its default names this system.
    InstallBoot(Which),
    /// The menu just written has the way back (the previous generation, as the
    /// default) and the try (the new one); else the reboot is refused as unsafe.
    CheckWayBack,
    /// Boot the new generation once (`LoaderEntryOneShot`, grubenv `next_entry`, the
    /// U-Boot state).
    TryNewOnce,
    /// Forget a one-shot boot of the new generation that did not happen.
    ClearTryOnce,
}

/// The steps of one operation, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan(pub Vec<Step>);

impl Plan {
    /// Before a reboot into the new system: it boots once, and any other boot (a power
    /// loss, a kernel that panics) comes up on the previous one. The previous system's
    /// `boot` writes the menu with the new generation in it and itself as the default,
    /// so the way back is in the loader's own files, never in an EFI variable. `None`
    /// where the loader cannot boot once: the new generation could only be the default.
    pub fn try_once(loader: &Loader) -> Option<Plan> {
        use Step::*;
        loader
            .has_one_shot()
            .then(|| Plan(vec![SetProfile(Which::New), InstallBoot(Which::Previous), CheckWayBack, TryNewOnce]))
    }

    /// What a loader without a one-shot boot can do: make the new system the default.
    pub fn unsafe_reboot() -> Plan {
        Plan(vec![Step::SetProfile(Which::New), Step::InstallBoot(Which::New)])
    }

    /// After confirmation: the new system is the default from now on.
    pub fn commit(loader: &Loader) -> Plan {
        use Step::*;
        let mut steps = vec![SetProfile(Which::New), Prune, InstallBoot(Which::New)];
        if loader.has_one_shot() {
            steps.push(ClearTryOnce);
        }
        Plan(steps)
    }

    /// After a failure: the previous system is the default again and the failed
    /// generations are gone. A one-shot boot that did not happen goes first.
    pub fn roll_back(loader: &Loader) -> Plan {
        use Step::*;
        let back = [SetProfile(Which::Previous), DeleteFailed, InstallBoot(Which::Previous)];
        Plan(if loader.has_one_shot() { [&[ClearTryOnce][..], &back].concat() } else { back.to_vec() })
    }
}

/// Reads which loader boots this device: systemd-boot from its EFI variable, GRUB and
/// extlinux from their configuration files under `boot_dir`, U-Boot from this project's
/// boot script in `firmware_dir` beside an extlinux.conf.
/// systemd-boot's ESP is `boot_dir` (NixOS's default `efiSysMountPoint`).
/// A `noauto` file system at `firmware_dir` is mounted first ([`on_demand`]).
pub fn detect(boot_dir: &Path, efivars_dir: &Path, firmware_dir: &Path, can_touch_efi_variables: bool) -> Loader {
    let vars = EfiVars { dir: efivars_dir.to_owned() };
    if vars.get("LoaderInfo").is_some_and(|info| info.starts_with("systemd-boot")) {
        return Loader::SystemdBoot(SystemdBoot { vars, esp: boot_dir.to_owned(), can_touch_efi_variables });
    }
    let grub = Grub { dir: boot_dir.join("grub") };
    if grub.config().exists() {
        return Loader::Grub(grub);
    }
    if boot_dir.join("extlinux/extlinux.conf").exists() {
        on_demand::mount(firmware_dir);
    }
    if let Some(u) = UBoot::detect(firmware_dir, boot_dir) {
        return Loader::UBoot(u);
    }
    if boot_dir.join("extlinux/extlinux.conf").exists() {
        return Loader::Extlinux;
    }
    Loader::Unknown
}

#[cfg(test)]
mod model;
