//! An aarch64 U-Boot board in QEMU, its disk made by `thymis-imager build --board
//! qemu-virt`, running its own agent: the aarch64 build of thymis-agent
//! (scripts/agent-aarch64.sh) with Debian's arm64 Nix, started by the board's init and
//! talking to the controller over QEMU's user network. It enrolls with the token its
//! image carries and takes reboot deployments through the Thymis boot script, whose
//! state (and, when older, the script itself) it writes through Linux's vfat on the
//! board, mounting the `noauto` FAT partition itself: a new generation is tried once;
//! one whose kernel panics, or that hangs until the watchdog resets the board, comes
//! back by itself and the board's agent reports it rolled back; a good one is
//! confirmed over a fresh connection, made the default and stays; a power cut right
//! after the agent wrote the boot state leaves a board that boots.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use thymis_fleet_tests::board::{BoardDisk, aarch64_agent, booted_system};
use thymis_fleet_tests::vm::Vm;
use thymis_fleet_tests::{Fleet, FleetOptions, bin, wait_for};

const NAME: &str = "b1";

/// A fleet whose configuration "alpha" is an aarch64 system carrying the board's agent,
/// and the board "b1" made from its image (powered off).
struct Board {
    f: Fleet,
    disk: BoardDisk,
    vm_dir: PathBuf,
    agent: serde_json::Value,
    version: u32,
}

impl Board {
    /// The board and the system its image holds.
    fn new() -> (Board, String) {
        // A boot under emulation takes tens of seconds; the confirmation waits for it.
        let f = Fleet::new(FleetOptions { confirm_timeout: 300, dead_after: 15, ..Default::default() }).expect("fleet");
        let agent_bin = aarch64_agent().expect("the aarch64 agent");
        let stamp = run(Command::new("sha256sum").arg(&agent_bin));
        let agent = json!({ "agent": agent_bin, "agentStamp": stamp.split_whitespace().next() });
        f.set_configs(&configs(&agent, 1, json!({}))).expect("configs");
        assert!(f.controller.ctl(&["project", "commit", "-m", "an arm board"]).status.success());
        let first = f.controller.ctl_json(&["build", "alpha", "--wait"])["system"].as_str().expect("system").to_owned();

        // The board's image, as a user would make it: with the agent's configuration
        // (its enrollment token) from `device add`.
        let added = f.controller.ctl_json(&["device", "add", NAME, "--config", "alpha"]);
        let mut config = added["agent_config"].as_str().expect("agent_config").to_owned();
        config.push_str("dbus = false\nreconnect_min = 0.5\nreconnect_max = 2.0\nconnect_timeout = 10\n");
        let config_file = f.tmp.path().join("agent.toml");
        std::fs::write(&config_file, config).expect("write");
        let images = f.tmp.path().join("images");
        run(Command::new(bin("thymis-imager"))
            .args(["build", "--board", "qemu-virt", "--size", "512M", "--name", "board", "--system", &first])
            .args(["--commit", &f.controller.project_head()])
            .arg("--agent-config")
            .arg(&config_file)
            .arg("--out")
            .arg(&images));
        let disk = BoardDisk::from_image(&images.join("board.img.zst"), &f.tmp.path().join("disk")).expect("disk");
        let vm_dir = f.tmp.path().join("vm");
        (Board { f, disk, vm_dir, agent, version: 1 }, first)
    }

    /// Powers the board on; with `crash_after`, its agent holds there
    /// (`THYMIS_TEST_CRASH_AFTER`, read by the test system's stage 2).
    fn boot(&mut self, crash_after: Option<&str>) -> Vm {
        self.disk.mount().expect("mount");
        self.disk.write_root_file("etc/thymis-test-crash-after", crash_after).expect("crash point");
        self.disk.boot(&self.vm_dir).expect("qemu")
    }

    /// Puts an older version of the boot script on the FAT partition (the board off),
    /// which the agent replaces before it sets a try.
    fn put_old_script(&self) {
        let old = thymis_uboot::script_text(2).replacen(
            &format!("(version {})", thymis_uboot::SCRIPT_VERSION),
            "(version 0)",
            1,
        );
        let file = self.f.tmp.path().join("old-boot.scr");
        std::fs::write(&file, thymis_uboot::script_image(&old, "Thymis boot script")).expect("write");
        run(Command::new("mcopy")
            .args(["-o", "-i", &self.disk.fat().expect("partitions")])
            .arg(&file)
            .arg("::/boot.scr"));
    }

    /// Commits the next version of alpha (with `arm` settings `extra`) and deploys it
    /// with a reboot; the task's id.
    fn deploy(&mut self, extra: serde_json::Value, message: &str) -> String {
        self.version += 1;
        self.f.set_configs(&configs(&self.agent, self.version, extra)).expect("configs");
        let t = self.f.controller.ctl_json(&["deploy", "--device", NAME, "--reboot", "-m", message]);
        t["id"].as_i64().expect("task id").to_string()
    }

    /// The board's deployment in task `task`, once it has a result.
    fn result(&self, task: &str) -> serde_json::Value {
        wait_for("the deployment to end", Duration::from_secs(400), || {
            let t = self.f.controller.ctl_json(&["task", task]);
            let c = Fleet::child(&t, NAME).clone();
            (!c["result"].is_null()).then_some(c)
        })
    }

    /// Waits until the board's agent, in this boot, connected and the controller shows it
    /// online on `system`.
    fn wait_reports(&self, system: &str, machine: &mut Vm) {
        machine.wait_for_console("connected to the controller", Duration::from_secs(300)).expect("the agent connects");
        wait_for("the board's agent to report", Duration::from_secs(300), || {
            let row = self.f.device_row(NAME);
            (row["online"] == true && row["system"] == system).then_some(())
        });
    }

    /// Waits for the board to end this boot by itself (its agent reboots it, a panic or
    /// the watchdog resets it); fails at once when deployment `task` ends first with
    /// anything but `ends_with`.
    fn wait_reset(&self, machine: &mut Vm, why: &str, task: Option<&str>) {
        let start = std::time::Instant::now();
        while machine.wait_exit(Duration::from_secs(2)).is_err() {
            let ended = task.map(|t| Fleet::child(&self.f.controller.ctl_json(&["task", t]), NAME).clone());
            let ended = ended.filter(|c| !c["result"].is_null() && c["result"] != "rolled-back");
            if ended.is_some() || start.elapsed() > Duration::from_secs(400) {
                panic!("{why}: {ended:?}\n{}\n{}", self.f.diagnostics(), machine.console());
            }
        }
    }
}

/// The project: alpha, the board's system (`arm` settings: the agent plus `extra`).
fn configs(agent: &serde_json::Value, version: u32, extra: serde_json::Value) -> serde_json::Value {
    let mut arm = agent.clone();
    for (k, v) in extra.as_object().into_iter().flatten() {
        arm[k] = v.clone();
    }
    json!({ "alpha": { "version": version.to_string(), "arm": arm }, "beta": {} })
}

/// The system the board booted, once its console says.
fn booted(machine: &mut Vm) -> String {
    let console = machine.wait_for_console("THYMIS-BOOTED", Duration::from_secs(300)).expect("the board boots");
    booted_system(&console).expect("a system")
}

#[test]
fn the_boards_agent_enrolls_tries_a_generation_once_comes_back_from_a_panic_and_keeps_a_confirmed_one() {
    let (mut b, first) = Board::new();
    // An older boot script than this agent's: the agent replaces it before its first try.
    b.put_old_script();

    let mut machine = b.boot(None);
    assert_eq!(booted(&mut machine), first, "the image does not boot:\n{}", machine.console());
    machine.wait_for_console("stage 2: starting the agent", Duration::from_secs(120)).expect("stage 2");
    b.wait_reports(&first, &mut machine);
    let row = b.f.device_row(NAME);
    assert_eq!(row["enrolled"], true, "enrolled with the token its image carried: {row}");
    assert_eq!(row["commit"], b.f.controller.project_head().as_str(), "{row}");

    // A generation whose kernel panics: tried once, then the board is back by itself.
    let task = b.deploy(json!({ "panics": true }), "panics");
    b.wait_reset(&mut machine, "the agent did not reboot the board", Some(&task));
    let console = machine.console();
    assert!(console.contains("mounted /boot/firmware"), "the agent did not mount the FAT partition:\n{console}");
    assert!(console.contains("stage 2: rebooting"), "{console}");
    drop(machine);
    let scr = run(Command::new("mtype").args(["-i", &b.disk.fat().expect("partitions"), "::/boot.scr"]));
    assert!(scr.contains(&format!("(version {})", thymis_uboot::SCRIPT_VERSION)), "boot.scr was not updated");
    let mut machine = b.boot(None);
    b.wait_reset(&mut machine, "the panicking generation did not reset the board", None);
    let console = machine.console();
    assert!(console.contains("trying nixos-2-default once") && console.contains("Kernel panic"), "{console}");
    drop(machine);
    let mut machine = b.boot(None);
    assert_eq!(booted(&mut machine), first, "not back on the first system:\n{}", machine.console());
    assert!(machine.console().contains("was tried already"), "{}", machine.console());
    let child = b.result(&task);
    assert_eq!(child["result"], "rolled-back", "{child}\n{}\n{}", b.f.diagnostics(), machine.console());
    b.wait_reports(&first, &mut machine);
    let ids = [task.parse().unwrap_or_default(), child["id"].as_i64().unwrap_or_default()];
    let logs = ids.map(|id| b.f.controller.task_logs(id).join("\n")).join("\n");
    assert!(logs.contains("updated the U-Boot boot script"), "{logs}");
    machine.wait_for_console("deployment finished", Duration::from_secs(60)).expect("the agent finishes");
    drop(machine);
    b.disk.mount().expect("mount");
    assert_eq!(b.disk.try_state().and_then(|s| s.label), None, "the try was not cleared");
    assert!(!b.disk.extlinux_conf().contains("nixos-2-default"), "the failed generation is still offered");

    // A good generation: tried, confirmed over a fresh connection, made the default, and it stays.
    let mut machine = b.boot(None);
    assert_eq!(booted(&mut machine), first);
    b.wait_reports(&first, &mut machine);
    let task = b.deploy(json!({}), "good");
    b.wait_reset(&mut machine, "the agent did not reboot the board", Some(&task));
    drop(machine);
    let mut machine = b.boot(None);
    let third = booted(&mut machine);
    assert_ne!(third, first, "the new generation was not tried:\n{}", machine.console());
    assert!(machine.console().contains("once"), "{}", machine.console());
    let child = b.result(&task);
    assert_eq!(child["result"], "succeeded", "{child}\n{}\n{}", b.f.diagnostics(), machine.console());
    assert_eq!(child["system"], third.as_str());
    machine.wait_for_console("deployment finished", Duration::from_secs(60)).expect("the agent finishes");
    drop(machine);
    b.disk.mount().expect("mount");
    assert_eq!(b.disk.try_state().and_then(|s| s.label), None, "the try was not cleared");
    for cycle in 1..=2 {
        let mut machine = b.boot(None);
        assert_eq!(booted(&mut machine), third, "power cycle {cycle}:\n{}", machine.console());
    }
}

#[test]
fn a_hang_comes_back_by_the_watchdog_and_power_cuts_after_the_boot_state_is_written_leave_a_board_that_boots() {
    let (mut b, first) = Board::new();
    let mut machine = b.boot(None);
    assert_eq!(booted(&mut machine), first);
    b.wait_reports(&first, &mut machine);

    // A generation whose stage 2 hangs with the watchdog armed: the watchdog resets it.
    let task = b.deploy(json!({ "hangs": true, "watchdog": 10 }), "hangs");
    b.wait_reset(&mut machine, "the agent did not reboot the board", Some(&task));
    drop(machine);
    let mut machine = b.boot(None);
    b.wait_reset(&mut machine, "the watchdog did not reset the hanging board", None);
    let console = machine.console();
    assert!(console.contains("watchdog armed") && console.contains("hangs on purpose"), "{console}");
    drop(machine);
    let mut machine = b.boot(None);
    assert_eq!(booted(&mut machine), first, "not back on the first system:\n{}", machine.console());
    let child = b.result(&task);
    assert_eq!(child["result"], "rolled-back", "{child}\n{}", b.f.diagnostics());
    b.wait_reports(&first, &mut machine);
    drop(machine);

    // A power cut right after the agent replaced the boot script and wrote the try (step
    // 4 of "try-once"): the board boots the new generation once, with the new script,
    // and that generation's agent takes it back to the confirmed one.
    b.put_old_script();
    let mut machine = b.boot(Some("try-once:4:hold"));
    assert_eq!(booted(&mut machine), first);
    b.wait_reports(&first, &mut machine);
    let task = b.deploy(json!({}), "cut after the try is written");
    machine.wait_for_console("try-once:4:hold: holding here", Duration::from_secs(400)).expect("the agent holds");
    drop(machine); // the power cut
    let scr = run(Command::new("mtype").args(["-i", &b.disk.fat().expect("partitions"), "::/boot.scr"]));
    assert!(scr.contains(&format!("(version {})", thymis_uboot::SCRIPT_VERSION)), "boot.scr was not replaced");
    let mut machine = b.boot(None);
    assert_ne!(booted(&mut machine), first, "the try was lost:\n{}", machine.console());
    b.wait_reset(&mut machine, "the unconfirmed generation's agent did not reboot back", None);
    drop(machine);
    let mut machine = b.boot(None);
    assert_eq!(booted(&mut machine), first, "{}", machine.console());
    let child = b.result(&task);
    assert_eq!(
        (child["result"].as_str(), child["reason"].as_str()),
        (Some("rolled-back"), Some("rebooted-unconfirmed")),
        "{child}"
    );
    b.wait_reports(&first, &mut machine);

    // A power cut right after the confirmed generation's agent cleared the try (step 4
    // of "commit"): the board boots the confirmed generation.
    let task = b.deploy(json!({}), "cut after the try is cleared");
    b.wait_reset(&mut machine, "the agent did not reboot the board", Some(&task));
    drop(machine);
    let mut machine = b.boot(Some("commit:4:hold"));
    let tried = booted(&mut machine);
    assert_ne!(tried, first);
    machine.wait_for_console("commit:4:hold: holding here", Duration::from_secs(400)).expect("the agent holds");
    drop(machine); // the power cut
    let mut machine = b.boot(None);
    assert_eq!(booted(&mut machine), tried, "{}", machine.console());
    assert_eq!(b.result(&task)["result"], "succeeded");
    b.wait_reports(&tried, &mut machine);
}

/// Runs a command; its stdout, or a panic with its stderr.
fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_raspberry_pi_4_image_has_the_sd_image_layout_and_is_reproducible() {
    let f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.set_configs(&json!({ "alpha": { "arm": {} }, "beta": {} })).expect("cfg");
    f.controller.ctl(&["project", "commit", "-m", "an arm board"]);
    let system = f.controller.ctl_json(&["build", "alpha", "--wait"])["system"].as_str().expect("system").to_owned();
    // Stand-ins for the Raspberry Pi firmware's files (not bootable here: the layout is what is checked).
    let firmware = f.tmp.path().join("rpi-firmware");
    std::fs::create_dir_all(&firmware).expect("mkdir");
    let imager = |out: &str, firmware: Option<&std::path::Path>| {
        let mut c = std::process::Command::new(bin("thymis-imager"));
        c.args(["build", "--board", "raspberry-pi-4", "--size", "256M", "--name", "pi", "--system", &system]);
        c.arg("--out").arg(f.tmp.path().join(out));
        if let Some(dir) = firmware {
            c.arg("--firmware").arg(dir);
        }
        c.env("SOURCE_DATE_EPOCH", "1").output().expect("imager")
    };
    let out = imager("missing", Some(&firmware));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("start4.elf"), "the missing firmware is not named");
    for name in ["start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb", "armstub8-gic.bin", "u-boot-rpi4.bin"] {
        std::fs::write(firmware.join(name), format!("stand-in for {name}\n")).expect("write");
    }
    assert!(imager("a", Some(&firmware)).status.success());
    assert!(imager("b", Some(&firmware)).status.success());
    let manifest = |dir: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(f.tmp.path().join(dir).join("manifest.json")).expect("manifest"))
            .expect("json")
    };
    let (a, b) = (manifest("a"), manifest("b"));
    assert_eq!(a["image_sha256"], b["image_sha256"], "two builds differ");
    assert_eq!(a["board"], "raspberry-pi-4");
    run(std::process::Command::new(bin("thymis-imager")).arg("verify").arg(f.tmp.path().join("a")));

    let raw = f.tmp.path().join("pi.img");
    run(std::process::Command::new("zstd").arg("-dqf").arg(f.tmp.path().join("a/pi.img.zst")).arg("-o").arg(&raw));
    // Flashed like any image (every range checked, then read back), it is the image.
    let card = f.tmp.path().join("sd-card.img");
    run(std::process::Command::new(bin("thymis-imager"))
        .arg("flash")
        .arg(f.tmp.path().join("a/pi.img.zst"))
        .arg(&card));
    assert!(std::fs::read(&card).expect("card") == std::fs::read(&raw).expect("image"), "the flashed card differs");
    let table: serde_json::Value =
        serde_json::from_str(&run(std::process::Command::new("sfdisk").arg("-J").arg(&raw))).expect("sfdisk");
    let parts = &table["partitiontable"]["partitions"];
    assert_eq!(table["partitiontable"]["label"], "dos");
    assert_eq!(
        (parts[0]["start"].as_u64(), parts[0]["type"].as_str(), parts[0]["bootable"].as_bool()),
        (Some(16384), Some("c"), Some(true))
    );
    assert_eq!(parts[1]["type"], "83");
    run(std::process::Command::new("sfdisk").arg("--verify").arg(&raw));
    let part = |i: usize, name: &str| {
        let p = f.tmp.path().join(name);
        let (start, size) = (parts[i]["start"].as_u64().expect("start"), parts[i]["size"].as_u64().expect("size"));
        run(std::process::Command::new("dd")
            .arg(format!("if={}", raw.display()))
            .arg(format!("of={}", p.display()))
            .args(["bs=512", &format!("skip={start}"), &format!("count={size}"), "status=none"]));
        p
    };
    let fat = part(0, "firmware.img");
    run(std::process::Command::new("fsck.vfat").arg("-n").arg(&fat));
    let listing = run(std::process::Command::new("mdir").args(["-b", "-i"]).arg(&fat).arg("::/"));
    for name in ["boot.scr", "config.txt", "start4.elf", "u-boot-rpi4.bin", "bcm2711-rpi-4-b.dtb", "thymis"] {
        assert!(listing.contains(name), "{name} not on the FAT partition:\n{listing}");
    }
    let config = run(std::process::Command::new("mtype").arg("-i").arg(&fat).arg("::/config.txt"));
    assert!(config.contains("kernel=u-boot-rpi4.bin") && config.contains("arm_64bit=1"), "{config}");
    let root = part(1, "root.img");
    run(std::process::Command::new("e2fsck").arg("-fn").arg(&root));
    let conf = run(std::process::Command::new("debugfs").arg("-R").arg("cat /boot/extlinux/extlinux.conf").arg(&root));
    assert!(conf.contains("DEFAULT nixos-default") && conf.contains(&format!("init={system}/init")), "{conf}");
    let label = run(std::process::Command::new("e2label").arg(&root));
    assert_eq!(label.trim(), "NIXOS_SD");
}
