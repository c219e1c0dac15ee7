//! systemd-boot's EFI variables through efivarfs, the way `bootctl` writes them: four
//! bytes of attributes, then a NUL-terminated UTF-16LE string. Written by the agent so
//! that a device needs no `bootctl` (nor its search for the ESP) to deploy safely.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::IFlags;

/// The vendor GUID of the Boot Loader Interface's variables.
const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// Non-volatile, boot-service and runtime access: what the loader reads at boot.
const ATTRIBUTES: u32 = 0x7;

/// The loader's variables in an efivarfs directory (`/sys/firmware/efi/efivars`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EfiVars {
    pub dir: PathBuf,
}

impl EfiVars {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-{LOADER_GUID}"))
    }

    /// A variable's string value; `None` when it is not set (or not a string).
    pub fn get(&self, name: &str) -> Option<String> {
        decode(&std::fs::read(self.path(name)).ok()?)
    }

    /// A list variable's strings (`LoaderEntries`: NUL-separated UTF-16, ending in two NULs).
    pub fn get_list(&self, name: &str) -> Option<Vec<String>> {
        decode_list(&std::fs::read(self.path(name)).ok()?)
    }

    /// Writes a list variable (the loader's job; tests stand in for it).
    pub fn set_list(&self, name: &str, values: &[&str]) -> Result<()> {
        self.set(name, &values.join("\0"))
    }

    /// Sets a variable in one write (efivarfs takes nothing else).
    pub fn set(&self, name: &str, value: &str) -> Result<()> {
        let path = self.path(name);
        let _ = set_immutable(&path, false);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the EFI variable {}", path.display()))?;
        f.write_all(&encode(value)).with_context(|| format!("writing the EFI variable {}", path.display()))?;
        Ok(())
    }

    /// Removes a variable; one that is not set is fine.
    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        let _ = set_immutable(&path, false);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing the EFI variable {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

/// efivarfs marks variables immutable so that a stray `rm -rf` cannot brick firmware;
/// writing or removing one needs the flag off. Elsewhere (a test directory) there may
/// be no flags at all.
fn set_immutable(path: &Path, on: bool) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    let flags = rustix::fs::ioctl_getflags(&f)?;
    let wanted = if on { flags | IFlags::IMMUTABLE } else { flags - IFlags::IMMUTABLE };
    if wanted != flags {
        rustix::fs::ioctl_setflags(&f, wanted)?;
    }
    Ok(())
}

fn encode(value: &str) -> Vec<u8> {
    let mut out = ATTRIBUTES.to_le_bytes().to_vec();
    for unit in value.encode_utf16().chain([0]) {
        out.extend_from_slice(&unit.to_le_bytes());
    }
    out
}

fn decode(bytes: &[u8]) -> Option<String> {
    let data = bytes.get(4..)?;
    if data.len() % 2 != 0 {
        return None;
    }
    let units: Vec<u16> =
        data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
    String::from_utf16(&units).ok()
}

fn decode_list(bytes: &[u8]) -> Option<Vec<String>> {
    let data = bytes.get(4..)?;
    if data.len() % 2 != 0 {
        return None;
    }
    let units: Vec<u16> = data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    let text = String::from_utf16(&units).ok()?;
    Some(text.split('\0').filter(|s| !s.is_empty()).map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_attributes_then_nul_terminated_utf16() {
        let bytes = encode("nixos-generation-7.conf");
        assert_eq!(&bytes[..4], &[7, 0, 0, 0]);
        assert_eq!(&bytes[4..8], &[b'n', 0, b'i', 0]);
        assert_eq!(&bytes[bytes.len() - 2..], &[0, 0]);
        assert_eq!(decode(&bytes).as_deref(), Some("nixos-generation-7.conf"));
        assert_eq!(decode(&[7, 0, 0]), None, "too short");
        assert_eq!(decode(&[7, 0, 0, 0, b'a']), None, "odd length");
        let list = encode("a.conf\0b.efi\0");
        assert_eq!(decode_list(&list), Some(vec!["a.conf".to_owned(), "b.efi".to_owned()]));
    }

    #[test]
    fn set_get_and_remove_in_a_directory() {
        let tmp = tempfile::tempdir().expect("tmp");
        let vars = EfiVars { dir: tmp.path().to_owned() };
        assert_eq!(vars.get("LoaderEntryOneShot"), None);
        vars.set("LoaderEntryOneShot", "nixos-generation-12.conf").expect("set");
        vars.set("LoaderEntryOneShot", "nixos-generation-3.conf").expect("overwrite");
        assert_eq!(vars.get("LoaderEntryOneShot").as_deref(), Some("nixos-generation-3.conf"));
        vars.remove("LoaderEntryOneShot").expect("remove");
        vars.remove("LoaderEntryOneShot").expect("removing an unset variable is fine");
        assert_eq!(vars.get("LoaderEntryOneShot"), None);
    }
}
