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
