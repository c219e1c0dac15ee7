//! GRUB as NixOS installs it: `grub.cfg` loads `grubenv` and boots `next_entry` once
//! (clearing it first), else its default, the "NixOS - Default" entry of the system
//! that last ran `switch-to-configuration boot`. The agent sets `next_entry` itself (what
//! `grub-reboot` does), naming the entry by its titles, which do not shift when the
//! menu grows.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::persist;

/// GRUB's environment block: exactly this many bytes, padded with `#`.
const BLOCK: usize = 1024;
const HEADER: &str = "# GRUB Environment Block\n";

/// GRUB's files under the boot directory (`/boot/grub`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grub {
    pub dir: PathBuf,
}

impl Grub {
    pub fn config(&self) -> PathBuf {
        self.dir.join("grub.cfg")
    }

    fn env_path(&self) -> PathBuf {
        self.dir.join("grubenv")
    }

    /// The environment's variables in order (an absent block is empty).
    pub fn env(&self) -> Result<Vec<(String, String)>> {
        match std::fs::read_to_string(self.env_path()) {
            Ok(text) => parse_env(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.env_path().display())),
        }
    }

    /// Sets (`Some`) or unsets a variable, keeping the others. An existing block is
    /// overwritten in place, as GRUB's own `save_env` does: on FAT (an ESP), which has no
    /// journal, that changes no metadata, where a new file and a rename could leave a
    /// broken cluster chain after a power loss. Then the whole file system is flushed.
    pub fn set_env(&self, key: &str, value: Option<&str>) -> Result<()> {
        let mut vars = self.env()?;
        vars.retain(|(k, _)| k != key);
        if let Some(v) = value {
            vars.push((key.to_owned(), v.to_owned()));
        }
        let block = format_env(&vars)?;
        let path = self.env_path();
        let context = || format!("writing {}", path.display());
        match OpenOptions::new().write(true).open(&path) {
            Ok(mut f) if f.metadata().with_context(context)?.len() == BLOCK as u64 => {
                f.write_all(&block).with_context(context)?;
                f.sync_all().with_context(context)?;
            }
            _ => persist::write_atomic(&path, &block, 0o644).with_context(context)?,
        }
        let dir = File::open(&self.dir).with_context(|| format!("opening {}", self.dir.display()))?;
        rustix::fs::syncfs(&dir).with_context(|| format!("flushing the file system of {}", self.dir.display()))
    }

    /// The `next_entry` path ("submenu title>entry title") of the menu entry that boots
    /// `system` (its `init=` names it), outside "NixOS - Default".
    pub fn entry_of(&self, system: &Path) -> Result<String> {
        let text =
            std::fs::read_to_string(self.config()).with_context(|| format!("reading {}", self.config().display()))?;
        let init = format!("init={}/init", system.display());
        find_entry(&text, &init)
            .with_context(|| format!("{} has no menu entry that boots {}", self.config().display(), system.display()))
    }
}

fn parse_env(text: &str) -> Result<Vec<(String, String)>> {
    let Some(body) = text.strip_prefix(HEADER) else { bail!("not a GRUB environment block") };
    let mut vars = vec![];
    for line in body.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else { bail!("malformed line in the GRUB environment: {line:?}") };
        vars.push((k.to_owned(), v.to_owned()));
    }
    Ok(vars)
}

fn format_env(vars: &[(String, String)]) -> Result<Vec<u8>> {
    let mut text = HEADER.to_owned();
    for (k, v) in vars {
        // GRUB would read a newline as the end of the value.
        if k.contains(['=', '\n']) || v.contains(['\n', '\\']) {
            bail!("cannot store {k}={v:?} in the GRUB environment");
        }
        text.push_str(&format!("{k}={v}\n"));
    }
    if text.len() > BLOCK {
        bail!("the GRUB environment would exceed {BLOCK} bytes");
    }
    let mut bytes = text.into_bytes();
    bytes.resize(BLOCK, b'#');
    Ok(bytes)
}

/// The title path of the first menu entry (inside a submenu, not at the top where
/// "NixOS - Default" is) whose body contains `needle`.
fn find_entry(cfg: &str, needle: &str) -> Option<String> {
    let mut stack: Vec<Option<String>> = vec![];
    let mut current: Option<(String, bool)> = None; // (path, found)
    for line in cfg.lines() {
        let t = line.trim_start();
        let title = |kw: &str| {
            t.strip_prefix(kw)
                .and_then(|r| r.trim_start().strip_prefix('"'))
                .and_then(|r| r.split('"').next())
                .map(str::to_owned)
        };
        if let Some(name) = title("submenu") {
            stack.push(Some(name));
        } else if let Some(name) = title("menuentry") {
            let mut parts: Vec<String> = stack.iter().flatten().cloned().collect();
            parts.push(name);
            current = Some((parts.join(">"), stack.iter().flatten().next().is_some()));
        } else if t.starts_with('}') {
            if current.is_some() {
                current = None;
            } else {
                stack.pop();
            }
        } else if let Some((path, nested)) = &current
            && *nested
            && t.split_whitespace().any(|w| w == needle)
        {
            return Some(path.clone());
        } else if t.ends_with('{') {
            // Another block (an `if` in the header): its `}` is not a submenu's.
            stack.push(None);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of NixOS's grub.cfg: the default entry, then every generation in a submenu.
    const CFG: &str = r#"# Automatically generated.  DO NOT EDIT THIS FILE!
if [ -s $prefix/grubenv ]; then
  load_env
fi
if [ "${next_entry}" ]; then
  set default="${next_entry}"
  set next_entry=
  save_env next_entry
else
  set default=0
fi
menuentry "NixOS - Default" --class nixos --unrestricted {
search --set=drive1 --fs-uuid 1234-ABCD
  linux ($drive1)//kernels/k-bzImage init=/nix/store/bbbb-new/init console=ttyS0
  initrd ($drive1)//kernels/k-initrd
}
submenu "NixOS - All configurations" --class submenu {
menuentry "NixOS - Configuration 2 (2026-12-02 - 1)" --class nixos {
  linux ($drive1)//kernels/k-bzImage init=/nix/store/bbbb-new/init console=ttyS0
  initrd ($drive1)//kernels/k-initrd
}
menuentry "NixOS - Configuration 1 (2026-12-01 - 1)" --class nixos {
  linux ($drive1)//kernels/k-bzImage init=/nix/store/aaaa-old/init console=ttyS0
  initrd ($drive1)//kernels/k-initrd
}
}
"#;

    #[test]
    fn entries_are_found_by_the_system_they_boot_in_the_generations_submenu() {
        assert_eq!(
            find_entry(CFG, "init=/nix/store/bbbb-new/init").as_deref(),
            Some("NixOS - All configurations>NixOS - Configuration 2 (2026-12-02 - 1)")
        );
        assert_eq!(
            find_entry(CFG, "init=/nix/store/aaaa-old/init").as_deref(),
            Some("NixOS - All configurations>NixOS - Configuration 1 (2026-12-01 - 1)")
        );
        assert_eq!(find_entry(CFG, "init=/nix/store/cccc-none/init"), None);
    }

    #[test]
    fn the_environment_block_is_1024_bytes_and_keeps_other_variables() {
        let tmp = tempfile::tempdir().expect("tmp");
        let grub = Grub { dir: tmp.path().to_owned() };
        assert!(grub.env().expect("absent is empty").is_empty());
        grub.set_env("saved_entry", Some("0")).expect("set");
        grub.set_env("next_entry", Some("NixOS - All configurations>NixOS - Configuration 2 (x)")).expect("set");
        let bytes = std::fs::read(tmp.path().join("grubenv")).expect("read");
        assert_eq!(bytes.len(), BLOCK);
        assert!(bytes.starts_with(HEADER.as_bytes()) && bytes.ends_with(b"###"));
        grub.set_env("next_entry", None).expect("unset");
        assert_eq!(grub.env().expect("env"), vec![("saved_entry".to_owned(), "0".to_owned())]);
        assert!(grub.set_env("x", Some(&"y".repeat(BLOCK))).is_err(), "too long for the block");
        assert!(grub.set_env("x", Some("a\nb")).is_err());
    }
}
