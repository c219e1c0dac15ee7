//! Running the outside tools the imager builds on (sfdisk, mkfs.vfat, mtools,
//! mkfs.ext4, nix-store), with argument vectors and checked exit statuses.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs a command; fails with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {:?} (is it installed?)", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{:?} failed ({}): {}", cmd.get_program(), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `512M`, `2G`, `1048576` -> bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("size {s:?} is not a number with K, M or G"))?;
    n.checked_mul(mult).context("size too large")
}

/// Writes a partition table from an sfdisk script.
pub(crate) fn sfdisk(raw: &Path, script: &str) -> Result<()> {
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(raw)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running sfdisk")?;
    child.stdin.take().context("stdin")?.write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("sfdisk failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("512M").expect("size"), 512 << 20);
        assert_eq!(super::parse_size("2G").expect("size"), 2 << 30);
        assert!(super::parse_size("big").is_err());
    }
}
