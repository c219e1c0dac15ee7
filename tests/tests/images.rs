//! Images and bundles from the controller: a device flashed from its image enrolls,
//! reports the image's commit and system before any deployment, and takes deployments;
//! bundles carry a sequence number from the controller's counter.

use std::process::Command;

use serde_json::json;
use std::time::Duration;

use thymis_fleet_tests::vm::{self, Vm};
use thymis_fleet_tests::{Fleet, FleetOptions, bin};
use thymis_store::bundle::{self, Target};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_device_flashed_from_its_image_enrolls_reports_the_image_and_takes_deployments() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    let out = f.controller.ctl(&["--json", "device", "add", "fresh", "--config", "alpha"]);
    assert!(out.status.success());
    // A secret for it: the image carries it, sealed to the key the image carries.
    let secret_file = f.tmp.path().join("token.txt");
    std::fs::write(&secret_file, "image-secret-5e3a").expect("write");
    let out = f.controller.ctl(&[
        "secret",
        "set",
        "api-token",
        "--device",
        "fresh",
        "--file",
        &secret_file.to_string_lossy(),
    ]);
    assert!(out.status.success(), "{out:?}");
    // Through the imager: the controller makes the device's image, the imager fetches it.
    let set = f.tmp.path().join("image-set");
    let manifest = run(Command::new(bin("thymis-imager"))
        .args(["build", "--device", "fresh", "--controller", &f.controller.base_url()])
        .env("THYMIS_CONFIG_DIR", f.controller.thymisctl_config_dir())
        .arg("--token-file")
        .arg(f.controller.state_dir.join("admin-token"))
        .arg("--out")
        .arg(&set));
    let manifest: serde_json::Value = serde_json::from_str(&manifest).expect("the image's manifest");
    let system = manifest["system"].as_str().expect("system").to_owned();
    run(Command::new(bin("thymis-imager")).arg("verify").arg(&set));

    // "Flash" it, then give a process device the image's /nix, its agent configuration
    // and its state directory.
    let disk = f.tmp.path().join("disk.img");
    run(Command::new(bin("thymis-imager")).arg("flash").arg(set.join("fresh.img.zst")).arg(&disk));
    let found = Command::new("grep").args(["-c", "-a", "-F", "image-secret-5e3a"]).arg(&disk).output().expect("grep");
    assert!(!found.status.success(), "the image holds the secret in clear");
    let root = format!("{}?offset={}", disk.display(), 65u64 << 20);
    let config = run(Command::new("debugfs").args(["-R", "cat /etc/thymis/agent.toml", &root]));
    assert!(config.contains("enrollment_token"), "{config}");
    f.add_raw_device("fresh", &config, false).expect("device");
    let dev_dir = f.device("fresh").dir.clone();
    std::fs::remove_dir_all(dev_dir.join("nix")).expect("rm");
    std::fs::remove_dir_all(dev_dir.join("state")).expect("rm");
    run(Command::new("debugfs").args(["-R", &format!("rdump /nix {}", dev_dir.display()), &root]));
    let state_parent = f.tmp.path().join("rdump-state");
    std::fs::create_dir_all(&state_parent).expect("mkdir");
    run(Command::new("debugfs").args([
        "-R",
        &format!("rdump /var/lib/thymis-agent {}", state_parent.display()),
        &root,
    ]));
    std::fs::rename(state_parent.join("thymis-agent"), dev_dir.join("state")).expect("state");
    f.device_mut("fresh").start().expect("start");
    f.wait_online("fresh");
    let row = thymis_fleet_tests::wait_for("fresh's first report", Duration::from_secs(20), || {
        Some(f.device_row("fresh")).filter(|r| !r["system"].is_null())
    });
    assert_eq!(row["system"], system.as_str(), "a flashed device shows the image's system: {row}");
    assert_eq!(row["commit"], f.controller.project_head().as_str(), "and its commit: {row}");
    // Its secret was in place at its first start, before it even connected.
    let secret = f.device("fresh").exec("cat /run/thymis/secrets/api-token");
    assert_eq!(secret, "image-secret-5e3a", "{}", f.diagnostics());
    let log = f.device("fresh").log();
    let (placed, connected) = (log.find("1 secrets in place"), log.find("connected to the controller"));
    assert!(placed.is_some() && placed < connected, "the secrets were not in place before it connected:\n{log}");

    // It takes deployments like any device; the image's generation is the rollback point.
    f.set_configs(&json!({ "alpha": { "version": "2" }, "beta": {} })).expect("cfg");
    let t = f.controller.ctl_json(&["deploy", "--device", "fresh", "-m", "v2", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    assert_eq!(f.device("fresh").generations().len(), 2);
    assert_eq!(f.device_row("fresh")["enrolled"], true, "enrolled with the token the image carried");
}

#[test]
fn bundles_from_the_controller_take_the_next_sequence_number() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "--wait"]);
    assert_eq!(t["result"], "succeeded");
    let used = t["children"][0]["sequence"].as_i64().expect("sequence");
    let file = f.tmp.path().join("alpha.tar");
    let b = f.controller.ctl_json(&["bundle", "--config", "alpha", "--out", &file.to_string_lossy()]);
    assert_eq!(b["result"], "succeeded", "{b}");
    let key = |name: &str| -> thymis_store::signing::SecretKey {
        std::fs::read_to_string(f.controller.state_dir.join(name)).expect("key").trim().parse().expect("parse")
    };
    let scratch = tempfile::tempdir().expect("tmp");
    let (m, _) = bundle::read(
        std::fs::File::open(&file).expect("bundle"),
        &[key("identity.key").public()],
        &[key("nix-signing.key").public()],
        scratch.path(),
        |_| Ok(Default::default()),
    )
    .expect("a valid bundle");
    assert_eq!(m.target, Target::Config("alpha".into()));
    assert!(m.sequence as i64 > used, "bundle sequence {} not above the deployment's {used}", m.sequence);
    assert_eq!(m.system.to_string(), b["system"].as_str().expect("system"));
}

/// A closure that boots like a NixOS one (Debian's kernel, a busybox initrd).
fn bootable_closure(kernel: &str) -> String {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/bootable.nix");
    run(Command::new("nix-build").args([fixture, "--argstr", "kernelVersion", kernel, "--no-out-link"]))
        .trim()
        .to_owned()
}

fn sha256(path: &std::path::Path) -> String {
    run(Command::new("sha256sum").arg(path)).split_whitespace().next().unwrap_or_default().to_owned()
}

/// Built twice, from the store and inside a Nix build from a `closureInfo`: the same
/// image; which boots in QEMU (OVMF, then the image's systemd-boot and the entry the
/// imager derived from the closure).
#[test]
fn an_image_built_inside_a_nix_build_is_the_same_and_boots_in_qemu() {
    let tmp = tempfile::tempdir().expect("tmp");
    let kernel = vm::kernel_version().expect("kernel");
    let system = bootable_closure(&kernel);
    let set = tmp.path().join("set");
    let out =
        run(Command::new(bin("thymis-imager")).args(["build", "--system", &system, "--name", "vm", "--out"]).arg(&set));
    let m: serde_json::Value = serde_json::from_str(&out).expect("manifest");
    assert_eq!(m["boots"], true, "{m}");
    assert_eq!(m["boot_entry"], "nixos-generation-1.conf", "{m}");

    let imager = bin("thymis-imager");
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/image-in-nix-build.nix");
    let nix_set = run(Command::new("nix-build")
        .arg(fixture)
        .args(["--argstr", "kernelVersion", &kernel, "--argstr", "imager"])
        .arg(&imager)
        .args(["--argstr", "imagerStamp", &sha256(&imager), "--no-out-link"]));
    let nix_set = std::path::PathBuf::from(nix_set.trim());
    run(Command::new(&imager).arg("verify").arg(&nix_set));
    let nm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(nix_set.join("manifest.json")).expect("manifest")).expect("json");
    assert_eq!(nm["system"], system.as_str());
    assert_eq!(nm["image_sha256"], m["image_sha256"], "built from a closureInfo inside Nix: the same image");

    let disk = tmp.path().join("disk.img");
    run(Command::new(&imager).arg("flash").arg(nix_set.join("vm.img.zst")).arg(&disk));
    let mut machine = Vm::boot(&disk, &tmp.path().join("vm"), false).expect("qemu");
    // The initrd finds the root by its label and runs the closure's init, which runs a
    // program of the closure.
    let console = machine.wait_for_console("THYMIS-BOOT-OK", Duration::from_secs(180)).expect("boot");
    assert!(console.contains(&format!("stage 1: root /dev/vda2, init {system}/init")), "{console}");
    machine.wait_exit(Duration::from_secs(60)).expect("power off");
    let console = machine.console();
    assert!(console.contains(&format!("THYMIS-BOOT-OK system={system}")), "{console}");
}

/// The project's configurations, with "vm" booting in QEMU (`vm` settings) plus `extra`.
fn vm_configs(vm: &serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    let mut config = json!({ "vm": vm });
    for (k, v) in extra.as_object().into_iter().flatten() {
        config[k] = v.clone();
    }
    json!({
        "alpha": { "version": "1", "units": ["web.service"] },
        "beta": { "version": "1", "units": ["db.service"] },
        "vm": config,
    })
}

/// A fleet whose configuration "vm" boots in QEMU and a device of it flashed from its
/// image: (fleet, the vm settings, the disk, the image's system).
fn vm_device(device: &str) -> (Fleet, serde_json::Value, std::path::PathBuf, String) {
    // Deployments expire late: a VM under emulation on a busy machine takes minutes
    // where a process device takes seconds (what expiry does is tested elsewhere).
    let f = Fleet::new(FleetOptions { deployment_ttl: 900, ..Default::default() }).expect("fleet");
    let kernel = vm::kernel_version().expect("kernel");
    let agent = bin("thymis-agent");
    let vm = json!({
        "kernelVersion": kernel,
        "agent": agent,
        "agentStamp": sha256(&agent),
        "nixStamp": sha256(std::path::Path::new("/usr/bin/nix")),
    });
    f.set_configs(&vm_configs(&vm, json!({}))).expect("configs");
    let toml = f.controller.project_dir().join("thymis.toml");
    let mut text = std::fs::read_to_string(&toml).expect("thymis.toml");
    text.push_str("\n[configs.vm]\ntags = [\"vms\"]\n");
    std::fs::write(&toml, text).expect("thymis.toml");
    assert!(f.controller.ctl(&["project", "commit", "-m", "a configuration that boots"]).status.success());

    assert!(f.controller.ctl(&["--json", "device", "add", device, "--config", "vm"]).status.success());
    let set = f.tmp.path().join(format!("{device}-set"));
    let t = f.controller.ctl_json(&["image", device, "--out", &set.to_string_lossy()]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let system = t["system"].as_str().expect("system").to_owned();
    let disk = f.tmp.path().join(format!("{device}-disk.img"));
    run(Command::new(bin("thymis-imager")).arg("flash").arg(set.join(format!("{device}.img.zst"))).arg(&disk));
    (f, vm, disk, system)
}

#[test]
fn a_vm_booted_from_its_controller_image_enrolls_and_takes_deployments() {
    let (f, vm, disk, system) = vm_device("vm1");
    let configs = |extra: serde_json::Value| vm_configs(&vm, extra);

    let mut machine = Vm::boot(&disk, &f.tmp.path().join("vm"), true).expect("qemu");
    machine.wait_for_console("stage 2: starting the agent", Duration::from_secs(180)).expect("boot");
    // Online first, then its first report names what it runs.
    thymis_fleet_tests::wait_for("the VM's agent to come online and report", Duration::from_secs(120), || {
        let row = f.device_row("vm1");
        (row["online"] == true && !row["system"].is_null()).then_some(())
    });
    let row = f.device_row("vm1");
    assert_eq!(row["enrolled"], true, "enrolled with the token its image carried: {row}");
    assert_eq!(row["system"], system.as_str(), "it runs the image's system: {row}\n{}", machine.console());
    assert_eq!(row["commit"], f.controller.project_head().as_str(), "{row}");
    assert!(machine.console().contains("connected to the controller"), "{}", machine.console());

    // Over the air into the running VM: a new version is copied, activated and
    // confirmed; one whose activation fails is rolled back by the VM's agent.
    f.set_configs(&configs(json!({ "version": "2" }))).expect("configs");
    let t = f.controller.ctl_json(&["deploy", "--device", "vm1", "-m", "v2", "--wait"]);
    let child = &t["children"][0];
    assert_eq!(child["result"], "succeeded", "{t}\n{}\n{}", f.diagnostics(), machine.console());
    let v2 = child["system"].as_str().expect("system").to_owned();
    assert_ne!(v2, system);
    assert!(machine.console().contains("activating vm version 2"), "{}", machine.console());
    assert_eq!(f.device_row("vm1")["system"], v2.as_str());
    f.set_configs(&configs(json!({ "version": "3", "activationFails": true }))).expect("configs");
    let t = f.controller.ctl_json(&["deploy", "--device", "vm1", "-m", "v3 fails", "--wait"]);
    let child = &t["children"][0];
    assert_eq!(child["result"], "rolled-back", "{t}\n{}", machine.console());
    assert_eq!(child["reason"], "activation-failed", "{t}");
    thymis_fleet_tests::wait_for("the VM to report the system it went back to", Duration::from_secs(30), || {
        (f.device_row("vm1")["system"] == v2.as_str()).then_some(())
    });
}

#[test]
fn the_imager_builds_a_configuration_through_the_controller() {
    let f = Fleet::new(FleetOptions::default()).expect("fleet");
    let set = f.tmp.path().join("alpha-set");
    let imager = |config: &str, out: &std::path::Path| {
        Command::new(bin("thymis-imager"))
            .args(["build", "--config", config, "--name", "alpha", "--controller", &f.controller.base_url()])
            .env("THYMIS_CONFIG_DIR", f.controller.thymisctl_config_dir())
            .arg("--token-file")
            .arg(f.controller.state_dir.join("admin-token"))
            .arg("--out")
            .arg(out)
            .output()
            .expect("thymis-imager")
    };
    let out = imager("alpha", &set);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).expect("manifest");
    let built = f.controller.ctl_json(&["build", "alpha", "--wait"]);
    assert_eq!(m["system"], built["system"], "the controller's build of alpha: {built}");
    assert_eq!(m["commit"], f.controller.project_head().as_str());
    assert_eq!(m["configuration"], "alpha");
    run(Command::new(bin("thymis-imager")).arg("verify").arg(&set));
    let leftovers: Vec<_> = std::fs::read_dir(&set).expect("set").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(leftovers.len(), 4, "only the image set stays behind: {leftovers:?}");

    let out = imager("no-such-config", &f.tmp.path().join("nothing"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-config"), "the error names the configuration: {err}");
}

/// Reboot deployments under a real systemd-boot (OVMF, its EFI variables kept across
/// boots; the fixture's `switch-to-configuration boot` writes entries as NixOS's builder
/// does): a confirmed one stays the default through two more power cycles; one whose
/// system panics at boot comes back on the previous generation by itself, rolled back.
#[test]
fn reboot_deployments_under_systemd_boot_stay_when_confirmed_and_come_back_when_the_system_panics() {
    reboot_deployments_keep_a_way_back(false);
}

/// The same under a real GRUB (Debian's grub-efi-amd64-bin as the ESP's loader, a
/// grub.cfg written as NixOS's installer writes it, the agent setting grubenv's next_entry).
#[test]
fn reboot_deployments_under_grub_stay_when_confirmed_and_come_back_when_the_system_panics() {
    reboot_deployments_keep_a_way_back(true);
}

/// Makes a flashed image boot with GRUB instead of systemd-boot: the system's own GRUB
/// builder writes the first menu (from outside, for generation 1), and a GRUB EFI image
/// replaces the ESP's loader.
/// The system a VM says it booted (its stage 2's marker line), once it has.
fn booted(machine: &mut Vm) -> String {
    let console = machine.wait_for_console("THYMIS-BOOT-OK", Duration::from_secs(240)).expect("boot");
    let line = console.lines().find(|l| l.contains("THYMIS-BOOT-OK")).unwrap_or_default();
    line.split("system=").nth(1).unwrap_or_default().trim().to_owned()
}

/// The system's own GRUB builder (what its `switch-to-configuration boot` runs).
fn grub_builder(system: &str) -> String {
    let stc =
        std::fs::read_to_string(format!("{system}/bin/switch-to-configuration")).expect("switch-to-configuration");
    stc.split_whitespace().find(|w| w.ends_with("/bin/grub-builder")).expect("the system's GRUB builder").to_owned()
}

fn switch_to_grub(disk: &std::path::Path, system: &str, work: &std::path::Path) {
    let builder = grub_builder(system);
    let (profiles, esp) = (work.join("profiles"), work.join("esp"));
    std::fs::create_dir_all(&profiles).expect("mkdir");
    std::os::unix::fs::symlink(system, profiles.join("system-1-link")).expect("link");
    run(Command::new(&builder).arg(system).env("ESP", &esp).env("PROFILES", &profiles));
    run(Command::new("grub-mkimage")
        .args(["-O", "x86_64-efi", "-p", "/grub", "-o"])
        .arg(esp.join("BOOTX64.EFI"))
        .args([
            "part_gpt",
            "fat",
            "normal",
            "linux",
            "configfile",
            "loadenv",
            "echo",
            "test",
            "search",
            "boot",
            "minicmd",
        ]));
    let img = format!("{}@@1M", disk.display());
    run(Command::new("mdeltree").args(["-i", &img, "::/loader", "::/EFI/systemd"]));
    run(Command::new("mcopy").args(["-o", "-i", &img]).arg(esp.join("BOOTX64.EFI")).arg("::/EFI/BOOT/BOOTX64.EFI"));
    run(Command::new("mcopy").args(["-s", "-i", &img]).arg(esp.join("grub")).arg(esp.join("kernels")).arg("::/"));
}

/// GRUB with /boot on btrfs, as NixOS installs it on a btrfs root: the VM boots through
/// GRUB reading its menu, grubenv and kernels from the btrfs of a second disk, and its
/// agent refuses a reboot deployment before anything changes (GRUB's `save_env` does not
/// write to btrfs, so the one-shot would stay for good): the VM keeps running v1, and
/// grubenv and the menu are as they were.
#[test]
fn grub_with_boot_on_btrfs_boots_in_qemu_and_refuses_reboot_deployments() {
    let name = "gb1";
    let (f, vm, disk, v1) = vm_device(name);
    let work = f.tmp.path().join("btrfs");
    let (mnt, profiles) = (work.join("mnt"), work.join("profiles"));
    std::fs::create_dir_all(&mnt).expect("mkdir");
    std::fs::create_dir_all(&profiles).expect("mkdir");
    std::os::unix::fs::symlink(&v1, profiles.join("system-1-link")).expect("link");
    let boot_disk = f.tmp.path().join("boot-btrfs.img");
    let uuid = "6a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    run(Command::new("truncate").args(["-s", "256M"]).arg(&boot_disk));
    run(Command::new("mkfs.btrfs").args(["-q", "-U", uuid]).arg(&boot_disk));
    let btrfs_boot = || -> String {
        run(Command::new("mount").args(["-o", "loop"]).arg(&boot_disk).arg(&mnt));
        mnt.display().to_string()
    };
    let unmount = || run(Command::new("umount").arg(&mnt));
    let esp = btrfs_boot();
    run(Command::new(grub_builder(&v1)).arg(&v1).env("ESP", &esp).env("PROFILES", &profiles));
    run(Command::new("grub-editenv").arg(mnt.join("grub/grubenv")).arg("create"));
    unmount();
    // GRUB's EFI image on the ESP finds /boot by its file system's UUID.
    let early = work.join("early.cfg");
    std::fs::write(&early, format!("search --no-floppy --fs-uuid --set=root {uuid}\nset prefix=($root)/grub\n"))
        .expect("write");
    run(Command::new("grub-mkimage")
        .args(["-O", "x86_64-efi", "-p", "/grub", "-c"])
        .arg(&early)
        .arg("-o")
        .arg(work.join("BOOTX64.EFI"))
        .args(["part_gpt", "fat", "btrfs", "normal", "linux", "configfile", "loadenv", "echo", "test", "search"])
        .args(["search_fs_uuid", "boot", "minicmd"]));
    let img = format!("{}@@1M", disk.display());
    run(Command::new("mdeltree").args(["-i", &img, "::/loader", "::/EFI/systemd"]));
    run(Command::new("mcopy").args(["-o", "-i", &img]).arg(work.join("BOOTX64.EFI")).arg("::/EFI/BOOT/BOOTX64.EFI"));

    let mut machine =
        Vm::boot_disks(&[disk.as_path(), boot_disk.as_path()], &f.tmp.path().join("gb1-vm"), true).expect("qemu");
    assert_eq!(booted(&mut machine), v1, "GRUB did not boot v1 from btrfs:\n{}", machine.console());
    f.wait_online(name);
    f.set_configs(&vm_configs(&vm, json!({ "version": "2" }))).expect("configs");
    let t = f.controller.ctl_json(&["deploy", "--device", name, "--reboot", "-m", "v2 with a reboot", "--wait"]);
    let child = Fleet::child(&t, name);
    assert_eq!(child["result"], "failed", "{child}\n{}\n{}", f.diagnostics(), machine.console());
    assert_eq!(child["reason"], "no-safe-reboot", "{child}");
    let error = child["error"].as_str().unwrap_or_default();
    assert!(error.contains("GRUB cannot write its environment") && error.contains("0x9123683e"), "{child}");
    assert!(machine.wait_exit(Duration::from_secs(5)).is_err(), "the VM rebooted:\n{}", machine.console());
    assert_eq!(f.device_row(name)["system"], v1.as_str());
    drop(machine);
    btrfs_boot();
    let env = run(Command::new("grub-editenv").arg(mnt.join("grub/grubenv")).arg("list"));
    let menu = std::fs::read_to_string(mnt.join("grub/grub.cfg")).expect("grub.cfg");
    unmount();
    assert!(!env.contains("next_entry=NixOS"), "a one-shot was set: {env}");
    let default = menu.split("menuentry ").nth(1).unwrap_or_default();
    assert!(default.starts_with("\"NixOS - Default\"") && default.contains(&v1), "the default changed:\n{menu}");
}

fn reboot_deployments_keep_a_way_back(grub: bool) {
    let name = if grub { "gr1" } else { "sb1" };
    let (f, vm, disk, v1) = vm_device(name);
    if grub {
        switch_to_grub(&disk, &v1, &f.tmp.path().join("grub"));
    }
    let dir = f.tmp.path().join(format!("{name}-vm"));
    let boot = || Vm::boot(&disk, &dir, true).expect("qemu");
    let start_deploy = |message: &str| -> String {
        let out = f.controller.ctl(&["--json", "deploy", "--device", name, "--reboot", "-m", message]);
        let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        task["id"].as_i64().expect("task id").to_string()
    };
    // The agent reboots the VM for the deployment (QEMU ends: -no-reboot).
    let wait_rebooted = |machine: &mut Vm, task: &str| {
        if let Err(e) = machine.wait_exit(Duration::from_secs(300)) {
            let t = f.controller.ctl_json(&["task", task]);
            let child = Fleet::child(&t, name);
            let logs = f.controller.task_logs(child["id"].as_i64().unwrap_or_default()).join("\n");
            let console: Vec<_> =
                machine.console().lines().filter(|l| !l.contains("D-Bus")).map(str::to_owned).collect();
            panic!("the agent did not reboot the VM: {e:#}\n{child}\n{logs}\n{}", console.join("\n"));
        }
    };
    let wait_result = |task: &str| -> serde_json::Value {
        let t = thymis_fleet_tests::wait_for("the deployment to end", Duration::from_secs(300), || {
            let t = f.controller.ctl_json(&["task", task]);
            (!Fleet::child(&t, name)["result"].is_null()).then_some(t)
        });
        Fleet::child(&t, name).clone()
    };
    let mut machine = boot();
    assert_eq!(booted(&mut machine), v1);
    f.wait_online(name);

    // v2 with a reboot: tried once, confirmed from there, and the default from then on.
    f.set_configs(&vm_configs(&vm, json!({ "version": "2" }))).expect("configs");
    let task = start_deploy("v2 with a reboot");
    wait_rebooted(&mut machine, &task);
    let mut machine = boot();
    let v2 = booted(&mut machine);
    assert_ne!(v2, v1, "the reboot did not boot the new system:\n{}", machine.console());
    let child = wait_result(&task);
    assert_eq!(child["result"], "succeeded", "{child}\n{}\n{}", f.diagnostics(), machine.console());
    assert_eq!(child["system"], v2.as_str());
    let ids = [task.parse().unwrap_or_default(), child["id"].as_i64().unwrap_or_default()];
    let logs = ids.map(|id| f.controller.task_logs(id).join("\n")).join("\n");
    let loader = if grub { "GRUB" } else { "systemd-boot" };
    assert!(logs.contains(&format!("({loader}) boots the new system once")), "{logs}");
    for cycle in 1..=2 {
        drop(machine);
        machine = boot();
        assert_eq!(
            booted(&mut machine),
            v2,
            "power cycle {cycle} after the confirmation left v2:\n{}",
            machine.console()
        );
    }
    f.wait_online(name);

    // v3 panics at boot: the one-shot is used up, the next boot is v2 again, whose
    // agent rolls back (and the failed generation leaves the boot menu).
    f.set_configs(&vm_configs(&vm, json!({ "version": "3", "bootFails": true }))).expect("configs");
    let task = start_deploy("v3 does not boot");
    wait_rebooted(&mut machine, &task);
    let mut machine = boot();
    machine.wait_exit(Duration::from_secs(240)).expect("v3's boot ends in a panic and a reset");
    let console = machine.console();
    assert!(console.contains("fails to boot on purpose"), "the VM did not try v3:\n{console}");
    let v3 = console
        .lines()
        .find(|l| l.contains("THYMIS-BOOT-OK"))
        .and_then(|l| l.split("system=").nth(1))
        .unwrap_or_default()
        .trim()
        .to_owned();
    assert_ne!(v3, v2);
    let mut machine = boot();
    assert_eq!(booted(&mut machine), v2, "after the panic the VM did not come back on v2:\n{}", machine.console());
    let child = wait_result(&task);
    assert_eq!(child["result"], "rolled-back", "{child}\n{}\n{}", f.diagnostics(), machine.console());
    assert_eq!(child["reason"], "activation-failed", "{child}");
    thymis_fleet_tests::wait_for("the VM to report v2", Duration::from_secs(60), || {
        (f.device_row(name)["system"] == v2.as_str()).then_some(())
    });
    drop(machine);
    let mut machine = boot();
    assert_eq!(booted(&mut machine), v2, "a power cycle after the rollback left v2:\n{}", machine.console());
    drop(machine);
    let esp = format!("{}@@1M", disk.display());
    let menu = if grub {
        vec![run(Command::new("mtype").args(["-i", &esp, "::/grub/grub.cfg"]))]
    } else {
        let entries = run(Command::new("mdir").args(["-b", "-i", &esp, "::/loader/entries"]));
        let names =
            entries.lines().filter(|l| l.ends_with(".conf")).map(|e| e.rsplit('/').next().unwrap_or(e).to_owned());
        names.map(|n| run(Command::new("mtype").args(["-i", &esp, &format!("::/loader/entries/{n}")]))).collect()
    };
    assert!(menu.iter().all(|e| !e.contains(&v3)), "v3 is still in the boot menu: {menu:?}");
    assert!(menu.iter().any(|e| e.contains(&v2)), "{menu:?}");
}

/// Real devices, not test kernels that reset on every panic: a generation tried once
/// that hangs with nothing to reset it is refused before the reboot; one that hangs
/// with the hardware watchdog armed (no `panic=` on its command line) is reset by the
/// watchdog and comes back on the confirmed generation by itself; and where the boot
/// loader's own builder drops the previous generation (systemd-boot's
/// `configurationLimit = 1`), the reboot is refused and the menu put back.
#[test]
fn a_generation_that_hangs_comes_back_by_the_watchdog_and_unsafe_reboots_are_refused() {
    let name = "wd1";
    let (f, vm, disk, v1) = vm_device(name);
    let dir = f.tmp.path().join(format!("{name}-vm"));
    let boot = || Vm::boot(&disk, &dir, true).expect("qemu");
    let deploy = |extra: serde_json::Value, args: &[&str]| -> (String, serde_json::Value) {
        f.set_configs(&vm_configs(&vm, extra)).expect("configs");
        let mut full = vec!["--json", "deploy", "--device", name];
        full.extend_from_slice(args);
        let out = f.controller.ctl(&full);
        let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let id = task["id"].as_i64().expect("task id").to_string();
        let t = thymis_fleet_tests::wait_for("the deployment to end", Duration::from_secs(300), || {
            let t = f.controller.ctl_json(&["task", &id]);
            (!Fleet::child(&t, name)["result"].is_null()).then_some(t)
        });
        (id, Fleet::child(&t, name).clone())
    };
    let esp = format!("{}@@1M", disk.display());
    let mut machine = boot();
    assert_eq!(booted(&mut machine), v1);
    f.wait_online(name);

    // The preview says which changes take a reboot, and why: a rebuilt kernel, a kernel
    // command line.
    thymis_fleet_tests::wait_for("the device's report of what it runs", Duration::from_secs(60), || {
        (f.device_row(name)["system"] == v1.as_str()).then_some(())
    });
    let mut rebuilt = vm.clone();
    rebuilt["kernelStamp"] = json!("rebuilt");
    f.set_configs(&vm_configs(&rebuilt, json!({}))).expect("configs");
    let d = f.controller.ctl_json(&["deploy", "--device", name, "--dry-run"]);
    assert_eq!(d["configs"][0]["reboot"], "kernel changed", "{d}");
    f.set_configs(&vm_configs(&vm, json!({ "version": "2", "panicOnFail": false }))).expect("configs");
    let d = f.controller.ctl_json(&["deploy", "--device", name, "--dry-run"]);
    assert_eq!(d["configs"][0]["reboot"], "kernel-params changed", "{d}");

    // Neither panic= with boot.panic_on_fail nor a watchdog: refused, nothing changes.
    let (_, child) =
        deploy(json!({ "version": "2", "panicOnFail": false }), &["--reboot", "-m", "v2, no hang protection"]);
    assert_eq!(child["result"], "failed", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "no-safe-reboot", "{child}");
    assert!(
        child["error"].as_str().unwrap_or_default().contains("neither panic=SECONDS nor boot.panic_on_fail"),
        "{child}"
    );

    // A system whose builder keeps one generation (no reboot needed to switch to it).
    let (_, child) = deploy(json!({ "version": "3", "configurationLimit": 1 }), &["-m", "v3 keeps one generation"]);
    assert_eq!(child["result"], "succeeded", "{child}\n{}", f.diagnostics());
    let v3 = child["system"].as_str().expect("v3").to_owned();
    // Its `boot` for a trial would drop its own entry: refused, and its menu put back.
    let (_, child) = deploy(json!({ "version": "4" }), &["--reboot", "-m", "v4 with a reboot"]);
    assert_eq!(child["result"], "failed", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "no-safe-reboot", "{child}");
    assert!(child["error"].as_str().unwrap_or_default().contains("configurationLimit"), "{child}");
    f.wait_online(name);
    let (_, child) = deploy(json!({ "version": "5" }), &["-m", "v5, the default builder"]);
    assert_eq!(child["result"], "succeeded", "{child}\n{}", f.diagnostics());
    let v5 = child["system"].as_str().expect("v5").to_owned();
    assert_ne!(v5, v3);

    // v6 hangs in stage 2 with the watchdog armed and no panic= on its command line.
    f.set_configs(&vm_configs(&vm, json!({ "version": "6", "panicOnFail": false, "watchdog": "10s", "hangs": true })))
        .expect("configs");
    let out = f.controller.ctl(&["--json", "deploy", "--device", name, "--reboot", "-m", "v6 hangs"]);
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let task = task["id"].as_i64().expect("task id").to_string();
    machine.wait_exit(Duration::from_secs(300)).expect("the agent reboots the VM for v6");
    let mut machine = boot();
    machine.wait_for_console("hangs on purpose", Duration::from_secs(240)).expect("v6 boots and hangs");
    assert!(machine.console().contains("hardware watchdog armed"), "{}", machine.console());
    // Nobody touches it: the watchdog resets the VM (and QEMU ends: -no-reboot).
    machine.wait_exit(Duration::from_secs(180)).expect("the watchdog resets the hung VM");
    let mut machine = boot();
    assert_eq!(booted(&mut machine), v5, "after the watchdog's reset the VM did not come back on v5");
    let child = thymis_fleet_tests::wait_for("the rollback report", Duration::from_secs(300), || {
        let t = f.controller.ctl_json(&["task", &task]);
        let c = Fleet::child(&t, name).clone();
        (!c["result"].is_null()).then_some(c)
    });
    assert_eq!(child["result"], "rolled-back", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "activation-failed", "{child}");
    drop(machine);
    let conf = run(Command::new("mtype").args(["-i", &esp, "::/loader/loader.conf"]));
    let default = conf.lines().find_map(|l| l.strip_prefix("default ")).unwrap_or_default().trim().to_owned();
    let entry = run(Command::new("mtype").args(["-i", &esp, &format!("::/loader/entries/{default}")]));
    assert!(entry.contains(&v5), "the boot default is not v5: {conf}\n{entry}");
}

/// Where a power-cut test cuts: after step `step` of the agent's `plan` (docs/agent.md,
/// "Boot loaders").
#[derive(Debug, Clone, Copy)]
struct Cut {
    plan: &'static str,
    step: usize,
}

/// The crash-window table with real power cuts: the agent holds after a step of a plan
/// (`THYMIS_TEST_CRASH_AFTER=PLAN:N:hold`, read from the ESP by the test system's stage
/// 2), QEMU is killed (whatever the guest had not written is lost), the VM is powered on
/// again, and the test checks which generation runs and how the deployment ends.
fn power_cuts_leave_a_confirmed_generation(grub: bool, cuts: &[Cut]) {
    let name = if grub { "pcg" } else { "pcs" };
    let (f, vm, disk, v1) = vm_device(name);
    if grub {
        switch_to_grub(&disk, &v1, &f.tmp.path().join("grub"));
    }
    let dir = f.tmp.path().join(format!("{name}-vm"));
    let esp = format!("{}@@1M", disk.display());
    let marker = f.tmp.path().join("crash-after");
    // Powers the VM on, the agent holding at `cut` in this boot.
    let boot = |cut: Option<Cut>| -> Vm {
        let _ = Command::new("mdel").args(["-i", &esp, "::/thymis-test-crash-after"]).output();
        if let Some(c) = cut {
            std::fs::write(&marker, format!("{}:{}:hold", c.plan, c.step)).expect("write");
            run(Command::new("mcopy").args(["-o", "-i", &esp]).arg(&marker).arg("::/thymis-test-crash-after"));
        }
        Vm::boot(&disk, &dir, true).expect("qemu")
    };
    let hold = |machine: &mut Vm, c: Cut| {
        let text = format!("{}:{}:hold: holding here", c.plan, c.step);
        machine.wait_for_console(&text, Duration::from_secs(300)).expect("the agent holds at the cut");
    };
    let child = |task: &str| -> serde_json::Value {
        thymis_fleet_tests::wait_for("the deployment to end", Duration::from_secs(300), || {
            let t = f.controller.ctl_json(&["task", task]);
            let c = Fleet::child(&t, name).clone();
            (!c["result"].is_null()).then_some(c)
        })
    };
    let mut version = 1;
    let mut deploy = |extra: serde_json::Value| -> String {
        version += 1;
        let mut config = json!({ "version": version.to_string() });
        for (k, v) in extra.as_object().into_iter().flatten() {
            config[k] = v.clone();
        }
        f.set_configs(&vm_configs(&vm, config)).expect("configs");
        let out = f.controller.ctl(&["--json", "deploy", "--device", name, "--reboot", "-m", "power cut"]);
        let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        task["id"].as_i64().expect("task id").to_string()
    };

    let mut confirmed = v1;
    let mut machine = boot(cuts.first().filter(|c| c.plan == "try-once").copied());
    assert_eq!(booted(&mut machine), confirmed);
    for (i, &cut) in cuts.iter().enumerate() {
        f.wait_online(name);
        let next = cuts.get(i + 1).filter(|c| c.plan == "try-once").copied();
        let (task, expected) = match cut.plan {
            "try-once" => {
                let task = deploy(json!({}));
                hold(&mut machine, cut);
                drop(machine); // the power cut
                machine = boot(next);
                if cut.step == 4 {
                    // The one-shot boots the new system once; its agent goes back by
                    // rebooting into the previous one.
                    assert_ne!(booted(&mut machine), confirmed, "the one-shot was lost:\n{}", machine.console());
                    machine.wait_exit(Duration::from_secs(300)).expect("the agent reboots back");
                    machine = boot(next);
                }
                (task, ("rolled-back", "rebooted-unconfirmed"))
            }
            "commit" => {
                let task = deploy(json!({}));
                machine.wait_exit(Duration::from_secs(300)).expect("the agent reboots for the trial");
                machine = boot(Some(cut));
                let tried = booted(&mut machine);
                assert_ne!(tried, confirmed, "the trial did not boot the new system");
                hold(&mut machine, cut);
                drop(machine);
                machine = boot(next);
                // Before the new system's `boot` (step 3) its default is still the previous one.
                if cut.step >= 3 {
                    confirmed = tried;
                    (task, ("succeeded", ""))
                } else {
                    (task, ("rolled-back", "rebooted-unconfirmed"))
                }
            }
            _ => {
                let task = deploy(json!({ "bootFails": true }));
                machine.wait_exit(Duration::from_secs(300)).expect("the agent reboots for the trial");
                let mut panics = boot(None);
                panics.wait_exit(Duration::from_secs(240)).expect("the trial panics and resets");
                drop(panics);
                machine = boot(Some(cut));
                assert_eq!(booted(&mut machine), confirmed);
                hold(&mut machine, cut);
                drop(machine);
                machine = boot(next);
                (task, ("rolled-back", "activation-failed"))
            }
        };
        assert_eq!(booted(&mut machine), confirmed, "after the cut at {cut:?}:\n{}", machine.console());
        let c = child(&task);
        assert_eq!(c["result"], expected.0, "cut at {cut:?}: {c}\n{}", f.diagnostics());
        if !expected.1.is_empty() {
            assert_eq!(c["reason"], expected.1, "cut at {cut:?}: {c}");
        }
        thymis_fleet_tests::wait_for("the VM to report", Duration::from_secs(60), || {
            (f.device_row(name)["system"] == confirmed.as_str()).then_some(())
        });
    }
    // And it stays there at the next power cycle.
    drop(machine);
    let mut machine = boot(None);
    assert_eq!(booted(&mut machine), confirmed, "a power cycle after the cuts:\n{}", machine.console());
}

/// Every step of every plan is cut on one of the two loaders (their plans have the same
/// steps); the one-shot (step 4 of "try-once") on both, as it is theirs alone.
#[test]
fn power_cuts_under_systemd_boot_leave_a_confirmed_generation() {
    let cut = |plan, step| Cut { plan, step };
    power_cuts_leave_a_confirmed_generation(
        false,
        &[
            cut("try-once", 1),
            cut("try-once", 2),
            cut("try-once", 4),
            cut("commit", 2),
            cut("commit", 3),
            cut("rollback", 1),
            cut("rollback", 3),
        ],
    );
}

#[test]
fn power_cuts_under_grub_leave_a_confirmed_generation() {
    let cut = |plan, step| Cut { plan, step };
    power_cuts_leave_a_confirmed_generation(
        true,
        &[
            cut("try-once", 3),
            cut("try-once", 4),
            cut("commit", 1),
            cut("commit", 4),
            cut("rollback", 2),
            cut("rollback", 4),
        ],
    );
}
