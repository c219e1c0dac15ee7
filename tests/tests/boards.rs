//! An aarch64 U-Boot board in QEMU, its disk made by `thymis-imager build --board
//! qemu-virt`, taking reboot deployments through the Thymis boot script: a system whose
//! kernel panics is tried once and the board comes back by itself; a good one is tried,
//! confirmed, made the default and stays. The agent cannot run inside the aarch64 VM (this
//! toolchain has no aarch64 standard library): it runs on this machine against the
//! board's partitions while the board is off (`Kind::Board`), and each boot happens in
//! QEMU with Debian's U-Boot, arm64 kernel and busybox.

use std::time::Duration;

use serde_json::json;
use thymis_fleet_tests::board::{BoardDisk, booted_system};
use thymis_fleet_tests::{Fleet, FleetOptions, bin, wait_for};

/// Deploys `configs` to the board with a reboot and waits for the agent's reboot.
fn deploy_with_reboot(f: &Fleet, message: &str) -> i64 {
    let t = f.controller.ctl_json(&["deploy", "--device", "b1", "--reboot", "-m", message]);
    let requested = f.device("b1").dir.join("reboot-requested");
    wait_for("the agent to reboot the board", Duration::from_secs(120), || requested.exists().then_some(()));
    std::fs::remove_file(&requested).expect("rm");
    t["id"].as_i64().expect("task id")
}

#[test]
fn a_board_tries_a_new_generation_once_comes_back_from_a_panic_and_keeps_a_confirmed_one() {
    let mut f = Fleet::new(FleetOptions { confirm_timeout: 60, ..Default::default() }).expect("fleet");
    let arm = |version: &str, panics: bool| json!({ "version": version, "arm": { "panics": panics } });
    f.set_configs(&json!({ "alpha": arm("1", false), "beta": {} })).expect("cfg");
    f.controller.ctl(&["project", "commit", "-m", "an arm board"]);
    let built = f.controller.ctl_json(&["build", "alpha", "--wait"]);
    let first = built["system"].as_str().expect("system").to_owned();

    // The board's image, as a user would make it.
    let images = f.tmp.path().join("images");
    let out = std::process::Command::new(bin("thymis-imager"))
        .args(["build", "--board", "qemu-virt", "--size", "384M", "--name", "board", "--system", &first])
        .arg("--out")
        .arg(&images)
        .output()
        .expect("imager");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    f.add_board_device("b1", "alpha").expect("device");
    let mut disk =
        BoardDisk::from_image(&images.join("board.img.zst"), &f.device("b1").dir.join("disk")).expect("disk");

    let console = disk.boot().expect("boot");
    assert_eq!(booted_system(&console).as_deref(), Some(first.as_str()), "the image does not boot:\n{console}");
    disk.mount().expect("mount");
    f.device("b1").booted(&first).expect("boot");
    f.device_mut("b1").start().expect("agent");
    f.wait_online("b1");
    assert_eq!(f.device_row("b1")["system"], first.as_str());

    // A generation whose kernel panics: tried once, then the board is back by itself.
    f.set_configs(&json!({ "alpha": arm("2", true), "beta": {} })).expect("cfg");
    let task = deploy_with_reboot(&f, "panics");
    assert_eq!(disk.try_state().and_then(|s| s.label).as_deref(), Some("nixos-2-default"), "{}", disk.extlinux_conf());
    f.device_mut("b1").kill9();
    let console = disk.boot().expect("boot");
    assert!(console.contains("trying nixos-2-default once") && console.contains("Kernel panic"), "{console}");
    let console = disk.boot().expect("boot");
    assert!(console.contains("was tried already"), "{console}");
    assert_eq!(booted_system(&console).as_deref(), Some(first.as_str()), "not back on the first system:\n{console}");
    disk.mount().expect("mount");
    f.device("b1").booted(&first).expect("boot");
    f.device_mut("b1").start().expect("agent");
    let t = f.wait_task(task, Duration::from_secs(120));
    let child = Fleet::child(&t, "b1");
    assert_eq!(child["result"], "rolled-back", "{child}\n{}", f.diagnostics());
    assert!(child["error"].as_str().is_some_and(|e| e.contains("did not come up after the reboot")), "{child}");
    f.wait_online("b1");
    assert_eq!(disk.try_state().and_then(|s| s.label), None, "the try was not cleared");
    assert!(!disk.extlinux_conf().contains("nixos-2-default"), "the failed generation is still offered");

    // A good generation: tried, confirmed, made the default, and it stays.
    f.set_configs(&json!({ "alpha": arm("3", false), "beta": {} })).expect("cfg");
    let task = deploy_with_reboot(&f, "good");
    f.device_mut("b1").kill9();
    let console = disk.boot().expect("boot");
    let third = booted_system(&console).expect("a system booted");
    assert_ne!(third, first, "the new generation was not tried:\n{console}");
    disk.mount().expect("mount");
    f.device("b1").booted(&third).expect("boot");
    f.device_mut("b1").start().expect("agent");
    let t = f.wait_task(task, Duration::from_secs(120));
    assert_eq!(Fleet::child(&t, "b1")["result"], "succeeded", "{t}\n{}", f.diagnostics());
    assert_eq!(Fleet::child(&t, "b1")["system"], third.as_str());
    wait_for("the try to be cleared", Duration::from_secs(30), || disk.try_state()?.label.is_none().then_some(()));
    f.device_mut("b1").kill9();
    for _ in 0..2 {
        let console = disk.boot().expect("boot");
        assert_eq!(booted_system(&console).as_deref(), Some(third.as_str()), "{console}");
    }
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
