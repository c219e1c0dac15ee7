//! The deploy loop end to end: commit & deploy to a tag, results in the task and the
//! devices table, the devices' profiles; no-op and incremental redeploys.

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions};

fn deploy(f: &Fleet, args: &[&str]) -> (i32, serde_json::Value) {
    f.deploy_wait(args)
}

#[test]
fn commit_and_deploy_to_a_tag_then_noop_then_only_changed_paths() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    for (name, config) in [("a1", "alpha"), ("a2", "alpha"), ("b1", "beta")] {
        f.add_device(name, config, true).expect("device");
    }
    for name in ["a1", "a2", "b1"] {
        f.wait_online(name);
    }
    // Without a target, the error says how to give one.
    let out = f.controller.ctl(&["deploy"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--device NAME") && err.contains("--tag TAG"), "{err}");

    // An uncommitted change (and a new file): Commit & Deploy commits both.
    f.set_configs(&json!({
        "alpha": { "version": "2", "units": ["web.service"] },
        "beta": { "version": "1", "units": ["db.service"] }
    }))
    .expect("configs");
    std::fs::write(f.controller.project_dir().join("notes.txt"), "new file\n").expect("new file");
    let (code, task) = deploy(&f, &["--tag", "screens", "-m", "alpha v2 for the screens"]);
    assert_eq!(code, 0, "deploy failed: {task}\n{}", f.diagnostics());
    assert_eq!(task["result"], "succeeded");
    let head = f.controller.project_head();
    assert_eq!(task["commit"], head.as_str(), "deployed commit is HEAD after committing");
    let status = f.controller.ctl_json(&["project", "status"]);
    assert_eq!(status["dirty"], false, "Commit & Deploy left changes uncommitted: {status}");
    // The task list has a header and the task's time.
    let tasks = String::from_utf8_lossy(&f.controller.ctl(&["tasks"]).stdout).into_owned();
    let mut lines = tasks.lines();
    assert!(lines.next().is_some_and(|h| h.contains("KIND") && h.contains("CREATED (UTC)")), "{tasks}");
    let today = String::from_utf8_lossy(
        &std::process::Command::new("date").args(["-u", "+%Y-%m-%d"]).output().expect("date").stdout,
    )
    .trim()
    .to_owned();
    assert!(lines.any(|l| l.contains("deployment") && l.contains(&today)), "{tasks}");
    // The devices table: header, when each was seen, whether it runs HEAD.
    let devices = String::from_utf8_lossy(&f.controller.ctl(&["devices"]).stdout).into_owned();
    let header = devices.lines().next().unwrap_or_default();
    assert!(header.contains("LAST SEEN (UTC)") && header.contains("HEAD"), "{devices}");
    let a1 = devices.lines().find(|l| l.starts_with("a1 ")).unwrap_or_default();
    assert!(a1.contains(" online ") && a1.contains(&today) && a1.contains(" HEAD "), "{devices}");
    // The task as the task page shows it: when, how long, what commit, each device's status.
    let id = task["id"].to_string();
    let shown = String::from_utf8_lossy(&f.controller.ctl(&["task", &id]).stdout).into_owned();
    assert!(shown.contains(&format!("started {today}")) && shown.contains(", took "), "{shown}");
    assert!(shown.contains("alpha v2 for the screens"), "the commit's subject is missing: {shown}");
    let header = shown.lines().find(|l| l.contains("DEVICE")).unwrap_or_default();
    assert!(["WAVE", "STATUS", "PATHS", "SENT", "RESULT"].iter().all(|h| header.contains(h)), "{shown}");
    let a1 = shown.lines().find(|l| l.trim_start().starts_with("a1 ")).unwrap_or_default();
    // Log files carry no colour codes.
    assert!(!f.controller.log().contains('\u{1b}'), "the controller's log file has escape codes");
    assert!(!f.device("a1").log().contains('\u{1b}'), "the agent's log file has escape codes");
    assert!(a1.contains(" done ") && a1.contains("succeeded") && (a1.contains(" B ") || a1.contains("iB ")), "{shown}");
    let log = std::process::Command::new("git")
        .arg("-C")
        .arg(f.controller.project_dir())
        .args(["show", "--stat", "--format=%s", "HEAD"])
        .output()
        .expect("git");
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(log.contains("alpha v2 for the screens") && log.contains("notes.txt"), "{log}");

    // Each configuration was built once, though two devices share alpha.
    let logs = f.controller.task_logs(task["id"].as_i64().expect("id"));
    assert_eq!(logs.iter().filter(|l| l.starts_with("building alpha at")).count(), 1, "{logs:#?}");
    assert_eq!(logs.iter().filter(|l| l.starts_with("building beta at")).count(), 1);

    for name in ["a1", "a2", "b1"] {
        let child = Fleet::child(&task, name);
        assert_eq!(child["result"], "succeeded", "{child}");
        assert_eq!(child["paths_sent"], 3, "a fresh device lacks base, app and system: {child}");
        assert!(child["bytes_sent"].as_i64().expect("bytes") > 0);
        let system = child["system"].as_str().expect("system").to_owned();
        let row = f.device_row(name);
        assert_eq!(row["commit"], head.as_str(), "devices table commit: {row}");
        assert_eq!(row["system"], system.as_str(), "devices table system: {row}");
        let dev = f.device(name);
        assert_eq!(dev.profile_system().as_deref(), Some(system.as_str()), "profile of {name}");
        assert_eq!(dev.running_system(), system, "running system of {name}");
        let boot_default =
            std::fs::read_to_string(dev.nix_dir().join("var/nix/thymis-test-boot-default")).unwrap_or_default();
        assert_eq!(boot_default.trim(), system, "switch-to-configuration boot did not run on {name}");
    }
    assert_eq!(f.device("a1").units(), "web.service=alpha-2");
    assert_eq!(f.device("b1").units(), "db.service=beta-1");
    // Each distinct path was compressed once, though three devices received them.
    let (_, stats) = f.controller.api("/stats", None);
    assert_eq!(stats["compressions"], 5, "base, two apps, two systems: {stats}");

    // Redeploy with no change: nothing to send.
    let (code, again) = deploy(&f, &["--tag", "screens"]);
    assert_eq!(code, 0, "{again}\n{}", f.diagnostics());
    for name in ["a1", "a2", "b1"] {
        let child = Fleet::child(&again, name);
        assert_eq!((child["paths_sent"].as_i64(), child["bytes_sent"].as_i64()), (Some(0), Some(0)), "{child}");
        assert_eq!(child["result"], "succeeded");
    }

    // One package changed: only the changed paths (app and system) go to alpha devices.
    f.set_configs(&json!({
        "alpha": { "version": "3", "units": ["web.service"] },
        "beta": { "version": "1", "units": ["db.service"] }
    }))
    .expect("configs");
    let (code, third) = deploy(&f, &["--tag", "screens", "-m", "alpha v3"]);
    assert_eq!(code, 0, "{third}\n{}", f.diagnostics());
    for name in ["a1", "a2"] {
        assert_eq!(Fleet::child(&third, name)["paths_sent"], 2, "{third}");
    }
    assert_eq!(Fleet::child(&third, "b1")["paths_sent"], 0, "{third}");
    assert_eq!(f.device("a2").units(), "web.service=alpha-3");
}

#[test]
fn failed_activation_rolls_back_and_failed_units_are_named() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let (code, first) = deploy(&f, &["--device", "d1"]);
    assert_eq!(code, 0, "{first}\n{}", f.diagnostics());
    let good = Fleet::child(&first, "d1")["system"].as_str().expect("system").to_owned();
    let gens = f.device("d1").generations().len();

    // Activation changes state, then fails: the agent re-activates the previous system.
    f.set_configs(&json!({
        "alpha": { "version": "2", "units": ["web.service", "extra.service"], "activationFails": true },
        "beta": { "version": "1" }
    }))
    .expect("configs");
    let (code, bad) = deploy(&f, &["--device", "d1", "-m", "broken alpha"]);
    assert_eq!(code, 2, "a rolled-back deployment must not exit 0: {bad}");
    let child = Fleet::child(&bad, "d1");
    assert_eq!(child["result"], "rolled-back", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "activation-failed");
    assert!(child["error"].as_str().unwrap_or("").contains("failed on purpose"), "{child}");
    let dev = f.device("d1");
    assert_eq!(dev.profile_system().as_deref(), Some(good.as_str()), "profile moved");
    assert_eq!(dev.generations().len(), gens, "a generation was added for a failed deployment");
    assert_eq!(dev.running_system(), good, "not running the previous system");
    assert_eq!(dev.units(), "web.service=alpha-1", "previous generation's state not restored");
    assert_eq!(f.device_row("d1")["system"], good.as_str(), "devices table shows what runs");

    // Exit 4: switched, a unit failed: not a failed deployment.
    f.set_configs(&json!({
        "alpha": { "version": "3", "units": ["web.service"], "failUnits": ["web.service"] },
        "beta": { "version": "1" }
    }))
    .expect("configs");
    let (code, units) = deploy(&f, &["--device", "d1", "-m", "alpha with a failing unit"]);
    assert_eq!(code, 0, "{units}\n{}", f.diagnostics());
    let child = Fleet::child(&units, "d1");
    assert_eq!(child["result"], "succeeded-with-failed-units", "{child}");
    assert_eq!(child["failed_units"], json!(["web.service"]));
    let new = child["system"].as_str().expect("system");
    assert_eq!(f.device("d1").profile_system().as_deref(), Some(new), "new generation committed");
    assert_eq!(f.device("d1").units(), "web.service=alpha-3");
}

#[test]
fn a_device_cut_off_after_activation_rolls_back_unconfirmed() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let (code, first) = deploy(&f, &["--device", "d1"]);
    assert_eq!(code, 0, "{first}\n{}", f.diagnostics());
    let good = Fleet::child(&first, "d1")["system"].as_str().expect("system").to_owned();

    f.set_configs(&json!({
        "alpha": { "version": "2", "units": ["web.service"], "cutoff": true },
        "beta": { "version": "1" }
    }))
    .expect("configs");
    let (code, cut) = deploy(&f, &["--device", "d1", "-m", "alpha that cuts the network"]);
    assert_eq!(code, 2, "{cut}");
    let child = Fleet::child(&cut, "d1");
    assert_eq!(child["result"], "rolled-back", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "unconfirmed");
    let dev = f.device("d1");
    assert_eq!(dev.profile_system().as_deref(), Some(good.as_str()));
    assert_eq!(dev.running_system(), good);
    // The previous generation's activation removed the rule: the device is back.
    f.wait_online("d1");
}

/// A reboot deployment to a device that boots with extlinux (no one-shot entry, no
/// fallback) is refused before anything changes on it.
#[test]
fn a_reboot_deployment_on_extlinux_is_refused_before_anything_changes() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("e1", "alpha", true).expect("device");
    f.wait_online("e1");
    let (_, first) = deploy(&f, &["--device", "e1", "-m", "v1"]);
    assert_eq!(first["result"], "succeeded", "{first}\n{}", f.diagnostics());
    let v1 = f.device("e1").profile_system().expect("profile");

    // The device boots with extlinux, as NixOS's generic-extlinux-compatible loader lays
    // it out (in the boot_dir the harness gives a process device).
    let boot = f.device("e1").dir.join("boot");
    std::fs::create_dir_all(boot.join("extlinux")).expect("mkdir");
    std::fs::write(boot.join("extlinux/extlinux.conf"), "DEFAULT nixos-default\n").expect("conf");
    let generations = f.device("e1").generations();

    f.set_configs(&json!({ "alpha": { "version": "2" }, "beta": {} })).expect("cfg");
    let (code, task) = deploy(&f, &["--device", "e1", "--reboot", "-m", "v2 with a reboot"]);
    assert_ne!(code, 0, "a refused deployment must not exit 0: {task}");
    let child = Fleet::child(&task, "e1");
    assert_eq!(child["result"], "failed", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "no-safe-reboot", "{child}");
    assert!(child["error"].as_str().unwrap_or_default().contains("extlinux"), "{child}");
    let dev = f.device("e1");
    assert_eq!(dev.profile_system().as_deref(), Some(v1.as_str()), "the profile changed");
    assert_eq!(dev.generations(), generations, "a generation was added");
    assert_eq!(f.device_row("e1")["system"], v1.as_str());
}

const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// `switch-to-configuration test` that exits 100 ("won't take effect until you reboot")
/// changed nothing: the deployment becomes a reboot deployment, not a failed activation.
/// Where the boot loader cannot try the new system once, it fails `no-safe-reboot` with
/// the device as it was; under systemd-boot (a stand-in loader for a process device,
/// whose reboot command fails) it prepares the trial boot and asks for the reboot.
#[test]
fn an_activation_that_needs_a_reboot_becomes_a_reboot_deployment() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    for name in ["n1", "n2"] {
        f.add_device(name, "alpha", false).expect("device");
    }
    // n2 boots with systemd-boot: its LoaderInfo variable says so.
    let vars = f.device("n2").dir.join("efivars");
    std::fs::create_dir_all(&vars).expect("mkdir");
    let mut info = 7u32.to_le_bytes().to_vec();
    "systemd-boot 252 (stand-in)".encode_utf16().chain([0]).for_each(|u| info.extend(u.to_le_bytes()));
    std::fs::write(vars.join(format!("LoaderInfo-{LOADER_GUID}")), info).expect("LoaderInfo");
    for name in ["n1", "n2"] {
        f.device_mut(name).start().expect("start");
        f.wait_online(name);
    }
    let (_, first) = deploy(&f, &["--device", "n1", "--device", "n2", "-m", "v1"]);
    assert_eq!(first["result"], "succeeded", "{first}\n{}", f.diagnostics());
    let v1 = f.device("n1").profile_system().expect("profile");
    let generations = f.device("n1").generations();

    f.set_configs(&json!({ "alpha": { "version": "2", "needsReboot": true }, "beta": {} })).expect("cfg");
    let (code, task) = deploy(&f, &["--device", "n1", "--device", "n2", "-m", "v2, a new init interface"]);
    assert_ne!(code, 0, "{task}");
    let logs = f.controller.task_logs(task["id"].as_i64().expect("id")).join("\n");
    assert!(logs.contains("takes effect only after a reboot"), "{logs}");

    let n1 = Fleet::child(&task, "n1");
    assert_eq!(n1["result"], "failed", "not a failed activation, not a rollback: {n1}\n{}", f.diagnostics());
    assert_eq!(n1["reason"], "no-safe-reboot", "{n1}");
    assert!(n1["error"].as_str().unwrap_or_default().contains("needs a reboot"), "{n1}");
    let dev = f.device("n1");
    assert_eq!(dev.profile_system().as_deref(), Some(v1.as_str()), "the profile changed");
    assert_eq!(dev.generations(), generations, "a generation stayed behind");
    assert_eq!(dev.running_system(), v1);

    let n2 = Fleet::child(&task, "n2");
    assert_eq!(n2["result"], "rolled-back", "{n2}\n{}", f.diagnostics());
    let error = n2["error"].as_str().unwrap_or_default();
    assert!(error.contains("the reboot into the new system did not happen"), "the trial boot was not prepared: {n2}");
    assert_eq!(f.device("n2").profile_system().as_deref(), Some(v1.as_str()));
    assert!(!vars.join(format!("LoaderEntryOneShot-{LOADER_GUID}")).exists(), "a one-shot stayed behind");
}

/// A person's own `nixos-rebuild boot` on the device (the profile names a system that
/// never ran) is never overridden: offers are refused, saying why, until it ran or the
/// profile is set back.
#[test]
fn a_profile_changed_by_hand_is_not_taken_as_the_way_back() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("h1", "alpha", true).expect("device");
    f.wait_online("h1");
    let (_, first) = deploy(&f, &["--device", "h1", "-m", "v1"]);
    assert_eq!(first["result"], "succeeded", "{first}\n{}", f.diagnostics());
    let v1 = f.device("h1").profile_system().expect("profile");

    // By hand: a generation of another store path (the app of v1) that never ran.
    let other = f.device("h1").exec(&format!("readlink -f {v1}/bin/app | cut -d/ -f1-4"));
    let other = other.trim().to_owned();
    assert!(other.starts_with("/nix/store/"), "{other}");
    f.device("h1").exec(&format!("nix-env -p /nix/var/nix/profiles/system --set {other}"));
    assert_eq!(f.device("h1").profile_system().as_deref(), Some(other.as_str()), "the hand-made generation");

    f.set_configs(&json!({ "alpha": { "version": "2" }, "beta": {} })).expect("cfg");
    let (code, task) = deploy(&f, &["--device", "h1", "-m", "v2"]);
    assert_ne!(code, 0, "{task}");
    let child = Fleet::child(&task, "h1");
    assert_eq!(child["result"], "failed", "{child}\n{}", f.diagnostics());
    assert!(child["error"].as_str().unwrap_or_default().contains("changed it by hand"), "{child}");
    assert_eq!(
        f.device("h1").profile_system().as_deref(),
        Some(other.as_str()),
        "the person's generation was replaced"
    );
    assert_eq!(f.device("h1").running_system(), v1);

    // Set back: deployments go through again.
    f.device("h1").exec(&format!("nix-env -p /nix/var/nix/profiles/system --set {v1}"));
    let (_, again) = deploy(&f, &["--device", "h1", "-m", "v2 again"]);
    assert_eq!(again["result"], "succeeded", "{again}\n{}", f.diagnostics());
}

/// Unmounts a test's file system when the test ends, however it ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// GRUB whose grubenv sits on btrfs cannot clear its one-shot at boot (its `save_env`
/// does not write there): the try would become permanent. A reboot deployment there is
/// refused before anything changes. (A real btrfs, loop-mounted as the device's /boot.)
#[test]
fn a_reboot_deployment_under_grub_on_btrfs_is_refused_before_anything_changes() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("g1", "alpha", false).expect("device");
    let boot = f.device("g1").dir.join("boot");
    let image = f.tmp.path().join("boot-btrfs.img");
    std::fs::create_dir_all(&boot).expect("mkdir");
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("run");
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(std::process::Command::new("truncate").args(["-s", "128M"]).arg(&image));
    run(std::process::Command::new("mkfs.btrfs").arg("-q").arg(&image));
    run(std::process::Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&boot));
    let _mounted = Mounted(boot.clone());
    // GRUB as NixOS installs it on /boot (the agent finds it by grub/grub.cfg).
    std::fs::create_dir_all(boot.join("grub")).expect("mkdir");
    std::fs::write(boot.join("grub/grub.cfg"), "# Automatically generated.  DO NOT EDIT THIS FILE!\n").expect("cfg");
    f.device_mut("g1").start().expect("start");
    f.wait_online("g1");
    let (_, first) = deploy(&f, &["--device", "g1", "-m", "v1"]);
    assert_eq!(first["result"], "succeeded", "{first}\n{}", f.diagnostics());
    let v1 = f.device("g1").profile_system().expect("profile");
    let generations = f.device("g1").generations();

    f.set_configs(&json!({ "alpha": { "version": "2" }, "beta": {} })).expect("cfg");
    let (code, task) = deploy(&f, &["--device", "g1", "--reboot", "-m", "v2 with a reboot"]);
    assert_ne!(code, 0, "{task}");
    let child = Fleet::child(&task, "g1");
    assert_eq!(child["result"], "failed", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "no-safe-reboot", "{child}");
    let error = child["error"].as_str().unwrap_or_default();
    assert!(error.contains("GRUB cannot write its environment") && error.contains("0x9123683e"), "{child}");
    assert_eq!(f.device("g1").profile_system().as_deref(), Some(v1.as_str()), "the profile changed");
    assert_eq!(f.device("g1").generations(), generations, "a generation was added");
    assert!(!boot.join("grub/grubenv").exists(), "grubenv was written");
}

/// A person's `nixos-rebuild boot` on the device while a deployment awaits confirmation:
/// the agent's rollback leaves their profile alone (it only takes the device off the
/// unconfirmed system), and says so in the result.
#[test]
fn a_profile_changed_by_hand_during_a_deployment_is_left_alone() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("h2", "alpha", true).expect("device");
    f.wait_online("h2");
    let (_, first) = deploy(&f, &["--device", "h2", "-m", "v1"]);
    assert_eq!(first["result"], "succeeded", "{first}\n{}", f.diagnostics());
    let v1 = f.device("h2").profile_system().expect("profile");

    // v2 cuts the device off, so it waits for a confirmation that cannot come.
    f.set_configs(&json!({ "alpha": { "version": "2", "cutoff": true }, "beta": {} })).expect("cfg");
    let out = f.controller.ctl(&["--json", "deploy", "--device", "h2", "-m", "v2 cuts the network"]);
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = task["id"].as_i64().expect("id");
    thymis_fleet_tests::wait_for("v2 to run", std::time::Duration::from_secs(60), || {
        (f.device("h2").running_system() != v1).then_some(())
    });
    let other = f.device("h2").exec(&format!("readlink -f {v1}/bin/app | cut -d/ -f1-4")).trim().to_owned();
    f.device("h2").exec(&format!("nix-env -p /nix/var/nix/profiles/system --set {other}"));

    let task = f.wait_task(id, std::time::Duration::from_secs(120));
    let child = Fleet::child(&task, "h2");
    assert_eq!(child["result"], "failed", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "changed-on-device", "{child}");
    assert!(child["error"].as_str().unwrap_or_default().contains(&other), "{child}");
    let dev = f.device("h2");
    assert_eq!(dev.profile_system().as_deref(), Some(other.as_str()), "the person's profile was replaced");
    assert_eq!(dev.running_system(), v1, "the device stayed on the unconfirmed system");
    // The devices table and the device's page say what it boots next.
    thymis_fleet_tests::wait_for("the report of what h2 boots next", std::time::Duration::from_secs(30), || {
        (f.device_row("h2")["boots_next"] == other.as_str()).then_some(())
    });
    let shown = f.controller.ctl(&["device", "show", "h2"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&format!("boots next    {other} (set on the device")), "{shown}");
}

/// `deploy --dry-run`: the update is built and described (packages changed with their
/// versions, sizes, whether it reboots, what each device lacks), and nothing is
/// committed, sent or switched.
#[test]
fn a_dry_run_says_what_changes_and_sends_nothing() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let blob = |v: &str| json!({ "alpha": { "version": v, "blob": { "kib": 64, "versioned": true } }, "beta": {} });
    f.set_configs(&blob("1")).expect("cfg");
    let (code, first) = deploy(&f, &["--device", "d1", "-m", "v1"]);
    assert_eq!(code, 0, "{first}");
    let head = f.controller.project_head();
    let runs = f.device("d1").running_system();

    f.set_configs(&blob("2")).expect("cfg");
    let d = f.controller.ctl_json(&["deploy", "--device", "d1", "--dry-run"]);
    let c = &d["configs"][0];
    assert_eq!(c["config"], "alpha", "{d}");
    assert!(
        c["changed"]
            .as_array()
            .is_some_and(|ch| ch.contains(&json!({ "name": "thymis-test-blob-alpha", "old": "1", "new": "2" }))),
        "{d}"
    );
    assert!(c["reboot"].is_null(), "{d}");
    assert!(c["closure_bytes"].as_u64().unwrap_or(0) > 64 << 10, "{d}");
    let dev = &d["devices"][0];
    assert_eq!((&dev["device"], &dev["known"]), (&json!("d1"), &json!(true)), "{d}");
    assert!(dev["paths"].as_u64().unwrap_or(0) >= 2 && dev["bytes"].as_u64().unwrap_or(0) > 64 << 10, "{d}");
    // The 64 KiB of incompressible data go as a delta against the version it runs.
    let sends = dev["send_bytes"].as_u64().unwrap_or(0);
    assert!(dev["deltas"].as_u64().unwrap_or(0) >= 1 && sends > 0 && sends < 32 << 10, "{d}");
    // Nothing committed, sent or switched.
    assert_eq!(f.controller.project_head(), head, "the dry run committed");
    assert_eq!(f.controller.ctl_json(&["project", "status"])["dirty"], true);
    assert_eq!(f.device("d1").running_system(), runs);
    let human =
        String::from_utf8_lossy(&f.controller.ctl(&["deploy", "--device", "d1", "--dry-run"]).stdout).into_owned();
    assert!(human.contains("changed  thymis-test-blob-alpha") && human.contains("1 -> 2"), "{human}");

    // Deployed, the task says what the device got, and the same dry run finds nothing
    // left to send.
    let (code, t) = deploy(&f, &["--device", "d1", "-m", "v2"]);
    assert_eq!(code, 0, "{t}");
    let sent = Fleet::child(&t, "d1")["bytes_sent"].as_u64().unwrap_or(0);
    assert!(sent.abs_diff(sends) * 10 <= sent, "the preview said {sends} bytes, the deployment sent {sent}");
    let got = &Fleet::child(&t, "d1")["packages"];
    assert!(
        got["changed"]
            .as_array()
            .is_some_and(|ch| ch.contains(&json!({ "name": "thymis-test-blob-alpha", "old": "1", "new": "2" }))),
        "{t}"
    );
    let shown = String::from_utf8_lossy(&f.controller.ctl(&["task", &t["id"].to_string()]).stdout).into_owned();
    assert!(shown.contains("packages: thymis-test-blob-alpha 1 -> 2"), "{shown}");
    let d = f.controller.ctl_json(&["deploy", "--device", "d1", "--dry-run"]);
    assert_eq!(d["devices"][0]["paths"], 0, "{d}");
    assert_eq!(d["configs"][0]["changed"], json!([]), "{d}");
}
