//! U-Boot boards: the boot script that gives extlinux a boot-once try with a fallback,
//! and the files it shares with the agent. Pure functions, no I/O: the imager puts them
//! in images, the agent updates them on devices.
//!
//! U-Boot's distro boot runs `boot.scr` from the board's bootable FAT partition (the
//! root partition, which holds NixOS's `/boot/extlinux/extlinux.conf`, is not flagged
//! bootable, so distro boot does not take the extlinux.conf directly). The script:
//! 1. reads [`STATE_FILE`] next to it, a U-Boot environment with a CRC32 (what
//!    `env import -c` checks): `thymis_try`, a label of extlinux.conf, and
//!    `thymis_count`, the attempts made;
//! 2. when a try is set and not attempted yet, writes the count 1 back first, and only
//!    if that write succeeded boots that label once (`pxe_label_override`);
//! 3. otherwise boots extlinux.conf's `DEFAULT`, the confirmed generation.
//!
//! A state file that is missing, torn or fails its checksum means no try: the default
//! boots. The script never reads anything a try generation writes. The agent sets a
//! try ([`TryState`], count 0) before a reboot deployment's reboot, and clears it when
//! the deployment ends (committed: its `switch-to-configuration boot` made the new
//! generation the default first; rolled back: the previous one is the default).

/// The state file, relative to the FAT partition.
pub const STATE_FILE: &str = "thymis/boot-state";
/// The state file's size: a CRC32 and the environment, zero-padded.
pub const STATE_SIZE: usize = 4096;
/// The boot script, relative to the FAT partition.
pub const SCRIPT_FILE: &str = "boot.scr";
/// Where the script finds extlinux.conf on the root partition.
pub const EXTLINUX_CONF: &str = "/boot/extlinux/extlinux.conf";
/// Marks the script as this project's (the agent updates only its own).
pub const SCRIPT_MARKER: &str = "# Thymis boot script";
/// Bumped when the script changes: the agent replaces an older one.
pub const SCRIPT_VERSION: u32 = 1;

/// CRC-32 (IEEE 802.3, as zlib and U-Boot compute it).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A label U-Boot may boot: what NixOS's extlinux builder writes (`nixos-42-default`),
/// nothing that could end a variable in the environment or a word in the script.
pub fn valid_label(label: &str) -> bool {
    !label.is_empty() && label.len() <= 64 && label.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// The try the boot script is to make, and the attempts made at it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TryState {
    pub label: Option<String>,
    pub attempts: u32,
}

impl TryState {
    /// A try of `label`, not attempted yet.
    pub fn try_once(label: &str) -> TryState {
        TryState { label: Some(label.to_owned()), attempts: 0 }
    }

    /// The state file's bytes: [`STATE_SIZE`] bytes, the CRC32 (little-endian) of the
    /// rest, then `name=value` entries each ended by a zero byte, in name order, then
    /// zeros (U-Boot's binary environment, as `env export -c -s 0x1000` writes it).
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut data = format!("thymis_count={}\0", self.attempts).into_bytes();
        if let Some(label) = &self.label {
            if !valid_label(label) {
                return Err(format!("{label:?} is not a boot label"));
            }
            data.extend_from_slice(format!("thymis_try={label}\0").as_bytes());
        }
        data.resize(STATE_SIZE - 4, 0);
        let mut out = crc32(&data).to_le_bytes().to_vec();
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// Reads a state file; an error for one the boot script would not trust either.
    pub fn decode(bytes: &[u8]) -> Result<TryState, String> {
        if bytes.len() < 5 {
            return Err("the boot state is too short".into());
        }
        let (crc, data) = bytes.split_at(4);
        if u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) != crc32(data) {
            return Err("the boot state fails its checksum".into());
        }
        let mut state = TryState::default();
        for entry in data.split(|b| *b == 0).take_while(|e| !e.is_empty()) {
            let entry = std::str::from_utf8(entry).map_err(|_| "the boot state is not text")?;
            match entry.split_once('=') {
                Some(("thymis_try", v)) if valid_label(v) => state.label = Some(v.to_owned()),
                Some(("thymis_count", v)) => state.attempts = v.parse().map_err(|_| format!("count {v:?}"))?,
                _ => {}
            }
        }
        Ok(state)
    }
}

/// The boot script's text for a board whose root partition is `root_part`.
pub fn script_text(root_part: u32) -> String {
    format!(
        r#"{SCRIPT_MARKER} (version {SCRIPT_VERSION}): boots {EXTLINUX_CONF} of partition {root_part},
# a generation to try at most once (the agent sets it in {STATE_FILE}).
setenv thymis_try
setenv thymis_count
setenv pxe_label_override
if load ${{devtype}} ${{devnum}}:${{distro_bootpart}} ${{scriptaddr}} /{STATE_FILE}; then
  if env import -c ${{scriptaddr}} ${{filesize}} thymis_try thymis_count; then
    true
  else
    echo "thymis: the boot state fails its checksum: booting the default"
    setenv thymis_try
  fi
fi
if test -n "${{thymis_try}}"; then
  if test "${{thymis_count}}" = "0"; then
    setenv thymis_count 1
    env export -c -s 0x{size:x} ${{scriptaddr}} thymis_count thymis_try
    if fatwrite ${{devtype}} ${{devnum}}:${{distro_bootpart}} ${{scriptaddr}} /{STATE_FILE} 0x{size:x}; then
      echo "thymis: trying ${{thymis_try}} once"
      setenv pxe_label_override ${{thymis_try}}
    else
      echo "thymis: cannot count the attempt: booting the default"
    fi
  else
    echo "thymis: ${{thymis_try}} was tried already: booting the default"
  fi
fi
sysboot ${{devtype}} ${{devnum}}:{root_part} any ${{pxefile_addr_r}} {EXTLINUX_CONF}
"#,
        size = STATE_SIZE
    )
}

/// `text` as U-Boot runs a script: a legacy image (type script, no compression, for
/// arm64) holding one part, as `mkimage -A arm64 -T script -C none` makes it with
/// `SOURCE_DATE_EPOCH=0`.
pub fn script_image(text: &str, name: &str) -> Vec<u8> {
    let mut data = (text.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(&0u32.to_be_bytes());
    data.extend_from_slice(text.as_bytes());
    let mut header = Vec::with_capacity(64);
    header.extend_from_slice(&0x2705_1956u32.to_be_bytes()); // magic
    header.extend_from_slice(&0u32.to_be_bytes()); // header CRC, set below
    header.extend_from_slice(&0u32.to_be_bytes()); // time: reproducible
    header.extend_from_slice(&(data.len() as u32).to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes()); // load address
    header.extend_from_slice(&0u32.to_be_bytes()); // entry point
    header.extend_from_slice(&crc32(&data).to_be_bytes());
    header.extend_from_slice(&[5, 22, 6, 0]); // Linux, arm64, script, no compression
    let mut n = [0u8; 32];
    let name = &name.as_bytes()[..name.len().min(31)];
    n[..name.len()].copy_from_slice(name);
    header.extend_from_slice(&n);
    let hcrc = crc32(&header);
    header[4..8].copy_from_slice(&hcrc.to_be_bytes());
    header.extend_from_slice(&data);
    header
}

/// The boot script image a board with its root on `root_part` gets.
pub fn boot_script(root_part: u32) -> Vec<u8> {
    script_image(&script_text(root_part), "Thymis boot script")
}

/// Whether `image` is a boot script of this project, and its version.
pub fn script_version(image: &[u8]) -> Option<u32> {
    let text = String::from_utf8_lossy(image.get(72..)?);
    let rest = text.strip_prefix(SCRIPT_MARKER)?.strip_prefix(" (version ")?;
    rest.split(')').next()?.parse().ok()
}

/// The root partition a boot script of this project boots from.
pub fn script_root_part(image: &[u8]) -> Option<u32> {
    let text = String::from_utf8_lossy(image.get(72..)?);
    let first = text.lines().next()?;
    first.split(" of partition ").nth(1)?.trim_end_matches(',').parse().ok()
}

/// The label of extlinux.conf's entry that boots `system` (its `APPEND` has
/// `init=SYSTEM/init`), other than the `DEFAULT` one.
pub fn label_of(extlinux_conf: &str, system: &str) -> Option<String> {
    let init = format!("init={system}/init");
    let default = extlinux_conf.lines().find_map(|l| l.trim().strip_prefix("DEFAULT ").map(|d| d.trim().to_owned()));
    let mut label: Option<&str> = None;
    for line in extlinux_conf.lines().map(str::trim) {
        if let Some(l) = line.strip_prefix("LABEL ") {
            label = Some(l.trim());
        } else if let (Some(l), Some(append)) = (label, line.strip_prefix("APPEND ")) {
            if Some(l) != default.as_deref() && append.split_whitespace().any(|w| w == init) {
                return Some(l.to_owned());
            }
        }
    }
    None
}

/// One system's boot files, as extlinux.conf names them (relative to its directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtlinuxEntry {
    /// The system (`APPEND init=SYSTEM/init`).
    pub system: String,
    pub kernel: String,
    pub initrd: String,
    pub params: String,
    pub fdtdir: Option<String>,
}

/// The name NixOS's extlinux builder gives a boot file in `/boot/nixos`: its store path
/// without `/nix/store/`, slashes as dashes (`HASH-linux-6.1-Image`).
pub fn boot_file_name(store_file: &str) -> String {
    store_file.trim_start_matches("/nix/store/").replace('/', "-")
}

/// extlinux.conf as NixOS's generic-extlinux-compatible builder writes it: `DEFAULT
/// nixos-default` booting `default`, then one `nixos-N-default` entry per generation,
/// newest first.
pub fn extlinux_conf(default: &ExtlinuxEntry, generations: &[(u64, ExtlinuxEntry)], timeout_tenths: u32) -> String {
    let entry = |label: &str, menu: &str, e: &ExtlinuxEntry| {
        let mut s = format!(
            "LABEL {label}\n  MENU LABEL {menu}\n  LINUX ../nixos/{}\n  INITRD ../nixos/{}\n  APPEND init={}/init {}\n",
            e.kernel,
            e.initrd,
            e.system,
            e.params.trim()
        );
        if let Some(f) = &e.fdtdir {
            s.push_str(&format!("  FDTDIR ../nixos/{f}\n"));
        }
        s.push('\n');
        s
    };
    let mut out = format!(
        "# Generated file, all changes will be lost on nixos-rebuild!\n\n\
         # Change this to e.g. nixos-42 to temporarily boot to an older configuration.\n\
         DEFAULT nixos-default\n\n\
         MENU TITLE ------------------------------------------------------------\n\
         TIMEOUT {timeout_tenths}\n\n"
    );
    out.push_str(&entry("nixos-default", "NixOS - Default", default));
    let mut gens: Vec<_> = generations.iter().collect();
    gens.sort_by_key(|g| std::cmp::Reverse(g.0));
    for (g, e) in gens {
        out.push_str(&entry(&format!("nixos-{g}-default"), &format!("NixOS - Configuration {g}-default"), e));
    }
    out
}

/// The label extlinux.conf boots by default.
pub fn default_label(extlinux_conf: &str) -> Option<String> {
    extlinux_conf.lines().find_map(|l| l.trim().strip_prefix("DEFAULT ").map(|d| d.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn the_state_reads_back_and_a_torn_one_is_refused() {
        let s = TryState::try_once("nixos-2-default");
        let bytes = s.encode().expect("encode");
        assert_eq!(bytes.len(), STATE_SIZE);
        assert!(bytes[4..].starts_with(b"thymis_count=0\0thymis_try=nixos-2-default\0\0"));
        assert_eq!(TryState::decode(&bytes), Ok(s));
        let mut torn = bytes.clone();
        torn[20] ^= 1;
        assert!(TryState::decode(&torn).is_err());
        assert!(TryState::decode(&[0; STATE_SIZE]).is_err(), "zeros are not a state");
        assert_eq!(TryState::decode(&TryState::default().encode().expect("encode")), Ok(TryState::default()));
        assert!(TryState::try_once("a\0b").encode().is_err());
        assert!(TryState::try_once("x; reset").encode().is_err());
    }

    #[test]
    fn the_script_image_is_what_mkimage_makes() {
        let text = script_text(2);
        let ours = script_image(&text, "Thymis boot script");
        assert_eq!(script_version(&ours), Some(SCRIPT_VERSION));
        assert_eq!(script_root_part(&ours), Some(2));
        let dir = tempfile::tempdir().expect("tmp");
        let (cmd, scr) = (dir.path().join("boot.cmd"), dir.path().join("boot.scr"));
        std::fs::write(&cmd, &text).expect("write");
        let made = std::process::Command::new("mkimage")
            .args(["-A", "arm64", "-O", "linux", "-T", "script", "-C", "none", "-n", "Thymis boot script", "-d"])
            .arg(&cmd)
            .arg(&scr)
            .env("SOURCE_DATE_EPOCH", "0")
            .output();
        match made {
            Ok(out) if out.status.success() => assert_eq!(std::fs::read(&scr).expect("read"), ours),
            // u-boot-tools is installed by scripts/setup.sh; without it, only the rest is checked.
            _ => eprintln!("mkimage unavailable: the byte comparison was skipped"),
        }
    }

    const CONF: &str = "# Generated file, all changes will be lost on nixos-rebuild!

# Change this to e.g. nixos-42 to temporarily boot to an older configuration.
DEFAULT nixos-default

MENU TITLE ------------------------------------------------------------
TIMEOUT 50

LABEL nixos-default
  MENU LABEL NixOS - Default
  LINUX ../nixos/k-Image
  INITRD ../nixos/k-initrd
  APPEND init=/nix/store/bbbb-new/init loglevel=4

LABEL nixos-2-default
  MENU LABEL NixOS - Configuration 2-default (2026-12-02)
  LINUX ../nixos/k-Image
  INITRD ../nixos/k-initrd
  APPEND init=/nix/store/bbbb-new/init loglevel=4

LABEL nixos-1-default
  MENU LABEL NixOS - Configuration 1-default (2026-12-01)
  LINUX ../nixos/k-Image
  INITRD ../nixos/k-initrd
  APPEND init=/nix/store/aaaa-old/init loglevel=4
";

    #[test]
    fn a_written_extlinux_conf_reads_back() {
        let e = |s: &str| ExtlinuxEntry {
            system: format!("/nix/store/{s}"),
            kernel: boot_file_name("/nix/store/kkkk-linux/Image"),
            initrd: "iiii-initrd-initrd".into(),
            params: "console=ttyAMA0".into(),
            fdtdir: None,
        };
        let conf = extlinux_conf(&e("bbbb-new"), &[(1, e("aaaa-old")), (2, e("bbbb-new"))], 10);
        assert!(conf.contains("LINUX ../nixos/kkkk-linux-Image\n"));
        assert_eq!(default_label(&conf).as_deref(), Some("nixos-default"));
        assert_eq!(label_of(&conf, "/nix/store/bbbb-new").as_deref(), Some("nixos-2-default"));
        assert_eq!(label_of(&conf, "/nix/store/aaaa-old").as_deref(), Some("nixos-1-default"));
        assert!(conf.find("nixos-2-default") < conf.find("nixos-1-default"), "newest first");
    }

    #[test]
    fn labels_are_found_by_the_system_they_boot_besides_the_default() {
        assert_eq!(label_of(CONF, "/nix/store/bbbb-new").as_deref(), Some("nixos-2-default"));
        assert_eq!(label_of(CONF, "/nix/store/aaaa-old").as_deref(), Some("nixos-1-default"));
        assert_eq!(label_of(CONF, "/nix/store/cccc-none"), None);
        assert_eq!(default_label(CONF).as_deref(), Some("nixos-default"));
    }
}
