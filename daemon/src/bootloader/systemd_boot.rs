//! systemd-boot as NixOS installs it: one entry per profile generation on the ESP
//! (`loader/entries/nixos-generation-N.conf` from NixOS's builder, or a unified kernel
//! image `EFI/Linux/nixos-generation-N-HASH.efi` from lanzaboote), `loader/loader.conf`
//! naming the default entry, and the `LoaderEntryOneShot` EFI variable to boot an
//! entry once. The way back never depends on an EFI variable persisting: the previous
//! generation stays loader.conf's default; only the one-shot try is a variable, and a
//! lost one boots the previous generation.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::EfiVars;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemdBoot {
    pub vars: EfiVars,
    /// Where the ESP is mounted (NixOS: `boot.loader.efi.efiSysMountPoint`, `/boot`).
    pub esp: PathBuf,
    /// NixOS's `boot.loader.efi.canTouchEfiVariables`: without it the agent writes no
    /// EFI variable, so it has no one-shot boot.
    pub can_touch_efi_variables: bool,
}

impl SystemdBoot {
    fn loader_conf(&self) -> PathBuf {
        self.esp.join("loader/loader.conf")
    }

    /// The entry id that boots profile generation `generation`: NixOS's builder's
    /// entry file, else exactly one lanzaboote image of that generation (not one of
    /// its specialisations).
    pub fn entry_of(&self, generation: u64) -> Option<String> {
        let conf = format!("nixos-generation-{generation}.conf");
        if self.esp.join("loader/entries").join(&conf).is_file() {
            return Some(conf);
        }
        let prefix = format!("nixos-generation-{generation}-");
        let mut images: Vec<String> = std::fs::read_dir(self.esp.join("EFI/Linux"))
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| {
                n.strip_prefix(&prefix)
                    .and_then(|rest| rest.strip_suffix(".efi"))
                    .is_some_and(|hash| !hash.is_empty() && !hash.contains('-'))
            })
            .collect();
        (images.len() == 1).then(|| images.remove(0))
    }

    fn entry_exists(&self, id: &str) -> bool {
        self.esp.join("loader/entries").join(id).is_file() || self.esp.join("EFI/Linux").join(id).is_file()
    }

    /// The entry the loader boots when no one-shot is set: `LoaderEntryDefault`, else
    /// loader.conf's `default` (`None` when neither names one).
    fn default_entry(&self) -> Result<Option<String>> {
        if let Some(v) = self.vars.get("LoaderEntryDefault") {
            return Ok(Some(v));
        }
        let text = match std::fs::read_to_string(self.loader_conf()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.loader_conf().display())),
        };
        Ok(text.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("default")).then(|| words.next().map(str::to_owned)).flatten()
        }))
    }

    /// After the previous system's `boot` wrote the menu: the way back and the try
    /// exist. Says why not otherwise (then the reboot is not safe).
    pub fn check_way_back(&self, previous: u64, new: u64) -> Result<(), String> {
        let esp = self.esp.display();
        let Some(back) = self.entry_of(previous) else {
            return Err(format!(
                "the ESP at {esp} has no boot entry for the running generation {previous} after its \
                 `switch-to-configuration boot` (a configurationLimit of 1 deletes it)"
            ));
        };
        let Some(try_entry) = self.entry_of(new) else {
            return Err(format!(
                "the ESP at {esp} has no boot entry for the new generation {new} (neither \
                 loader/entries/nixos-generation-{new}.conf nor one EFI/Linux/nixos-generation-{new}-*.efi)"
            ));
        };
        if try_entry == back {
            return Err(format!("generations {previous} and {new} have the same boot entry {back}"));
        }
        match self.default_entry().map_err(|e| format!("{e:#}"))? {
            Some(d) if d == back => {}
            Some(d) if self.vars.get("LoaderEntryDefault").as_deref() == Some(d.as_str()) => {
                return Err(format!(
                    "the EFI variable LoaderEntryDefault (set by someone else: {d}) overrides the \
                     boot default, so the previous generation's entry {back} would not be the way back"
                ));
            }
            other => {
                return Err(format!(
                    "{} names {} as the default, not the previous generation's entry {back}",
                    self.loader_conf().display(),
                    other.as_deref().unwrap_or("no entry")
                ));
            }
        }
        // The loader lists what it found at this boot: if none of it is on this ESP, the
        // firmware boots from another one, which the builder never touches.
        if let Some(seen) = self.vars.get_list("LoaderEntries")
            && !seen.is_empty()
            && !seen.iter().any(|id| self.entry_exists(id))
        {
            return Err(format!("none of the entries systemd-boot found at this boot is on the ESP at {esp}"));
        }
        Ok(())
    }

    /// Boots `generation` once (by NixOS's entry name where the ESP has none of it: a
    /// system without a kernel, which [`Self::check_way_back`] does not cover).
    pub fn try_once(&self, generation: u64) -> Result<()> {
        let entry = self.entry_of(generation).unwrap_or_else(|| format!("nixos-generation-{generation}.conf"));
        self.vars.set("LoaderEntryOneShot", &entry)
    }

    /// Forgets a try of `generation` that did not happen; a one-shot that someone else
    /// set stays.
    pub fn clear_try(&self, generation: u64) -> Result<()> {
        let ours = |v: &str| {
            v.strip_prefix(&format!("nixos-generation-{generation}"))
                .is_some_and(|rest| rest == ".conf" || (rest.starts_with('-') && rest.ends_with(".efi")))
        };
        match self.vars.get("LoaderEntryOneShot") {
            Some(v) if ours(&v) => self.vars.remove("LoaderEntryOneShot"),
            _ => Ok(()),
        }
    }

    /// The entry the loader booted this time (`LoaderEntrySelected`).
    pub fn selected(&self) -> Option<String> {
        self.vars.get("LoaderEntrySelected")
    }

    /// NixOS's builder writes loader.conf through `loader/loader.tmp`, opened exclusively:
    /// one left by a power cut makes every later `boot` fail. Removed before each.
    pub fn remove_stale_tmp(&self) -> Result<bool> {
        remove_if_present(&self.esp.join("loader/loader.tmp"))
    }
}

fn remove_if_present(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esp() -> (tempfile::TempDir, SystemdBoot) {
        let tmp = tempfile::tempdir().expect("tmp");
        for d in ["esp/loader/entries", "esp/EFI/Linux", "vars"] {
            std::fs::create_dir_all(tmp.path().join(d)).expect("mkdir");
        }
        let sb = SystemdBoot {
            vars: EfiVars { dir: tmp.path().join("vars") },
            esp: tmp.path().join("esp"),
            can_touch_efi_variables: true,
        };
        (tmp, sb)
    }

    fn put(sb: &SystemdBoot, rel: &str, text: &str) {
        std::fs::write(sb.esp.join(rel), text).expect("write");
    }

    #[test]
    fn the_way_back_is_the_previous_entry_as_loader_conf_default() {
        let (_tmp, sb) = esp();
        put(&sb, "loader/entries/nixos-generation-1.conf", "title NixOS\n");
        put(&sb, "loader/entries/nixos-generation-2.conf", "title NixOS\n");
        put(&sb, "loader/loader.conf", "timeout 3\ndefault nixos-generation-1.conf\n");
        assert_eq!(sb.check_way_back(1, 2), Ok(()));
        sb.try_once(2).expect("one-shot");
        assert_eq!(sb.vars.get("LoaderEntryOneShot").as_deref(), Some("nixos-generation-2.conf"));
        sb.clear_try(2).expect("clear");
        assert_eq!(sb.vars.get("LoaderEntryOneShot"), None);

        // The loader saw entries at this boot, none of them here: another ESP.
        sb.vars.set("LoaderEntries", "other-1.conf").expect("set");
        assert!(sb.check_way_back(1, 2).expect_err("another ESP").contains("none of the entries"));
        sb.vars.set_list("LoaderEntries", &["nixos-generation-1.conf", "auto-efi-shell"]).expect("set");
        assert_eq!(sb.check_way_back(1, 2), Ok(()));

        // Someone else's default overrides loader.conf.
        sb.vars.set("LoaderEntryDefault", "windows.conf").expect("set");
        assert!(sb.check_way_back(1, 2).expect_err("pinned elsewhere").contains("set by someone else: windows.conf"));
        sb.vars.remove("LoaderEntryDefault").expect("rm");

        // configurationLimit = 1: the builder kept only the newest generation.
        std::fs::remove_file(sb.esp.join("loader/entries/nixos-generation-1.conf")).expect("rm");
        assert!(sb.check_way_back(1, 2).expect_err("no way back").contains("configurationLimit"));
    }

    #[test]
    fn lanzaboote_images_are_entries_and_its_default_must_be_the_previous_generation() {
        let (_tmp, sb) = esp();
        put(&sb, "EFI/Linux/nixos-generation-4-aaaa.efi", "uki");
        put(&sb, "EFI/Linux/nixos-generation-4-specialisation-x-bbbb.efi", "uki");
        put(&sb, "EFI/Linux/nixos-generation-5-cccc.efi", "uki");
        assert_eq!(sb.entry_of(4).as_deref(), Some("nixos-generation-4-aaaa.efi"));
        assert_eq!(sb.entry_of(5).as_deref(), Some("nixos-generation-5-cccc.efi"));
        assert_eq!(sb.entry_of(6), None);
        // Without a default naming generation 4, systemd-boot picks the newest: no way back.
        assert!(sb.check_way_back(4, 5).expect_err("newest wins").contains("names no entry as the default"));
        put(&sb, "loader/loader.conf", "default nixos-generation-4-aaaa.efi\n");
        assert_eq!(sb.check_way_back(4, 5), Ok(()));
        sb.try_once(5).expect("one-shot");
        assert_eq!(sb.vars.get("LoaderEntryOneShot").as_deref(), Some("nixos-generation-5-cccc.efi"));
        // Someone else's one-shot is theirs.
        sb.vars.set("LoaderEntryOneShot", "memtest.conf").expect("set");
        sb.clear_try(5).expect("clear");
        assert_eq!(sb.vars.get("LoaderEntryOneShot").as_deref(), Some("memtest.conf"));
    }

    #[test]
    fn a_stale_loader_tmp_is_removed() {
        let (_tmp, sb) = esp();
        assert!(!sb.remove_stale_tmp().expect("none"));
        put(&sb, "loader/loader.tmp", "timeout 3\n");
        assert!(sb.remove_stale_tmp().expect("removed"));
        assert!(!sb.esp.join("loader/loader.tmp").exists());
    }
}
