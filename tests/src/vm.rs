//! VM devices: QEMU under software emulation (never `-accel kvm`: there is none here)
//! booting a disk image through OVMF's UEFI and the image's own systemd-boot, with the
//! serial console in a file the test reads and a hardware watchdog (i6300esb). Debian's `qemu-system-x86`, `ovmf` and
//! `linux-image-amd64` (for the kernel packed into test closures; `scripts/setup.sh`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The version of the Debian kernel installed for test closures (the newest one in
/// `/boot` whose modules are present).
pub fn kernel_version() -> Result<String> {
    let mut versions: Vec<String> = std::fs::read_dir("/boot")
        .context("reading /boot")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("vmlinuz-").map(str::to_owned))
        .filter(|v| Path::new("/lib/modules").join(v).join("modules.dep").exists())
        .collect();
    versions.sort();
    versions.pop().context("no kernel in /boot with its modules (Debian: linux-image-amd64; make setup)")
}

/// A running VM; killed when dropped.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    console: PathBuf,
}

impl Vm {
    /// Boots `disk` (a raw image, written to by the VM) with a virtio disk and, with
    /// `network`, QEMU's user network (the guest reaches the host's addresses via 10.0.2.2).
    /// The EFI variables live in `dir`: booting again with the same `dir` is the same
    /// machine powered on again (a reboot ends QEMU: `-no-reboot`).
    pub fn boot(disk: &Path, dir: &Path, network: bool) -> Result<Vm> {
        Vm::boot_disks(&[disk], dir, network)
    }

    /// [`Vm::boot`] with more disks after the first (`/dev/vdb`, ...).
    pub fn boot_disks(disks: &[&Path], dir: &Path, network: bool) -> Result<Vm> {
        std::fs::create_dir_all(dir)?;
        let vars = dir.join("OVMF_VARS.fd");
        if !vars.exists() {
            std::fs::copy(OVMF_VARS, &vars).with_context(|| format!("copying {OVMF_VARS} (Debian: ovmf)"))?;
        }
        let console = dir.join("console.log");
        // The last boot's console stays beside it (and is never read as this one's).
        let _ = std::fs::rename(&console, dir.join("console.previous.log"));
        let mut cmd = Command::new("qemu-system-x86_64");
        // A hardware watchdog (Intel 6300ESB), as many boards have: its reset ends QEMU too.
        cmd.args(["-machine", "q35", "-m", "512", "-smp", "1", "-display", "none", "-monitor", "none", "-no-reboot"])
            .args(["-device", "i6300esb"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()))
            .args(
                disks.iter().flat_map(|d| ["-drive".to_owned(), format!("file={},format=raw,if=virtio", d.display())]),
            );
        if network {
            cmd.args(["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"]);
        } else {
            cmd.args(["-nic", "none"]);
        }
        Vm::spawn(cmd, dir, console)
    }

    /// Boots an aarch64 U-Boot board (QEMU's `virt` machine with Debian's U-Boot as its
    /// firmware, [`crate::board::UBOOT`]) from `disk`, with QEMU's user network as
    /// [`Vm::boot`] has it. A reset (a panic with `panic=-1`, the watchdog, a reboot)
    /// ends QEMU.
    pub fn boot_board(disk: &Path, dir: &Path) -> Result<Vm> {
        std::fs::create_dir_all(dir)?;
        let console = dir.join("console.log");
        let _ = std::fs::rename(&console, dir.join("console.previous.log"));
        let mut cmd = Command::new("qemu-system-aarch64");
        cmd.args([
            "-M",
            "virt",
            "-cpu",
            "cortex-a57",
            "-m",
            "512",
            "-smp",
            "1",
            "-display",
            "none",
            "-monitor",
            "none",
        ])
        .args(["-no-reboot", "-bios", crate::board::UBOOT])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-drive")
        .arg(format!("if=virtio,file={},format=raw", disk.display()))
        .args(["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"]);
        Vm::spawn(cmd, dir, console)
    }

    fn spawn(mut cmd: Command, dir: &Path, console: PathBuf) -> Result<Vm> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.stderr"))?)
            .spawn()
            .with_context(|| format!("starting {program} (Debian: qemu-system-x86, qemu-system-arm)"))?;
        Ok(Vm { child, console })
    }

    /// What the VM printed on its serial console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Waits until the console shows the whole line holding `text` (QEMU writes the
    /// console file as it comes, so a line can be caught half-written); fails with the
    /// console's tail when the VM stops first or `timeout` passes.
    pub fn wait_for_console(&mut self, text: &str, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            let console = self.console();
            if console.find(text).is_some_and(|at| console[at..].contains('\n')) {
                return Ok(console);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the VM stopped ({status}) before printing {text:?}; console:\n{}", crate::tail(&console, 40));
            }
            if start.elapsed() > timeout {
                bail!("no {text:?} on the VM's console after {timeout:?}; console:\n{}", crate::tail(&console, 40));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for the VM to power off by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > timeout {
                bail!("the VM did not power off within {timeout:?}; console:\n{}", crate::tail(&self.console(), 40));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
