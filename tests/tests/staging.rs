//! Staging, maintenance windows and holds (docs/controller.md, "Staging, windows and
//! holds"): a deployment's copy happens at once, its switch only when the device may
//! switch. A stage-only deployment leaves the new system in the device's store (kept
//! from the garbage collector) and its profile untouched until `thymisctl activate`,
//! across restarts of the agent and the controller; a window that does not include now
//! stages the devices and they switch when it opens; a device held by an application
//! is staged, shown held, and switches once the hold is released.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use thymis_fleet_tests::{Fleet, FleetOptions, SystemBus, wait_for};

fn configs(f: &Fleet, version: &str) {
    f.set_configs(&json!({ "alpha": { "version": version, "units": ["web.service"] }, "beta": { "version": "1" } }))
        .expect("configs");
}

fn task(f: &Fleet, id: i64) -> Value {
    f.controller.ctl_json(&["task", &id.to_string()])
}

/// Whether `path` is in the device's store.
fn in_store(f: &Fleet, device: &str, path: &str) -> bool {
    let name = path.trim_start_matches("/nix/store/");
    f.device(device).nix_dir().join("store").join(name).exists()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

/// `HH:MM:SS` (UTC) of unix seconds.
fn hms(secs: u64) -> String {
    let s = secs % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[test]
fn stage_only_waits_for_activate_across_restarts() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    for d in ["s1", "s2"] {
        f.add_device(d, "alpha", true).expect("device");
        f.wait_online(d);
    }
    let (code, first) = f.deploy_wait(&["--device", "s1", "--device", "s2", "-m", "v1"]);
    assert_eq!(code, 0, "{first}\n{}", f.diagnostics());
    let old = Fleet::child(&first, "s1")["system"].as_str().expect("system").to_owned();

    configs(&f, "2");
    let (code, staged) = f.deploy_wait(&["--stage-only", "--device", "s1", "--device", "s2", "-m", "v2 staged"]);
    assert_eq!(code, 0, "a stage-only deployment whose devices are all staged did well: {staged}");
    let id = staged["id"].as_i64().expect("id");
    assert_eq!(staged["state"], "waiting", "{staged}");
    let new = Fleet::child(&staged, "s1")["system"].as_str().expect("system").to_owned();
    assert_ne!(new, old);
    for d in ["s1", "s2"] {
        let c = Fleet::child(&staged, d);
        assert_eq!(c["state"], "staged", "{c}\n{}", f.diagnostics());
        assert_eq!(c["waiting"], json!({ "for": "activation" }), "{c}");
        assert!(c["result"].is_null(), "{c}");
        assert!(in_store(&f, d, &new), "{d}: the staged system is not in the device's store");
        let dev = f.device(d);
        assert_eq!(dev.profile_system().as_deref(), Some(old.as_str()), "{d}: the profile moved before activation");
        assert_eq!(dev.running_system(), old, "{d} switched before activation");
    }
    // The staged system is kept from the garbage collector.
    let gc = f.device("s1").exec("nix-store --gc 2>&1 | tail -n 1");
    assert!(in_store(&f, "s1", &new), "a garbage collection removed the staged system ({gc})");

    // Restarts lose nothing: the agent (whose /run starts empty, as after a reboot) and
    // the controller.
    f.device_mut("s2").kill9();
    f.device_mut("s2").start().expect("start s2");
    f.controller.restart().expect("controller restart");
    f.wait_online("s1");
    f.wait_online("s2");
    let after = task(&f, id);
    for d in ["s1", "s2"] {
        assert_eq!(Fleet::child(&after, d)["state"], "staged", "{after}\n{}", f.diagnostics());
    }
    // The device's page says so too.
    let shown = f.controller.ctl_json(&["device", "show", "s2"]);
    assert_eq!(shown["history"][0]["waiting"], json!({ "for": "activation" }), "{shown}");
    let text = String::from_utf8_lossy(&f.controller.ctl(&["device", "show", "s2"]).stdout).into_owned();
    assert!(text.contains("staged: waiting for thymisctl activate"), "{text}");

    // One device now: it switches through the normal path; the other stays staged.
    let out = f.controller.ctl(&["--json", "activate", &id.to_string(), "--device", "s1", "--wait"]);
    let t: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("activate: {e}: {}\n{}", String::from_utf8_lossy(&out.stderr), f.diagnostics()));
    assert_eq!(out.status.code(), Some(0), "{t}");
    let s1 = Fleet::child(&t, "s1");
    assert_eq!(s1["result"], "succeeded", "{t}\n{}", f.diagnostics());
    assert!(s1["waiting"].is_null(), "{s1}");
    assert_eq!(f.device("s1").running_system(), new);
    assert_eq!(f.device("s1").profile_system().as_deref(), Some(new.as_str()));
    assert_eq!(Fleet::child(&t, "s2")["state"], "staged", "{t}");
    assert_eq!(f.device("s2").profile_system().as_deref(), Some(old.as_str()));
    let logs = f.controller.task_logs(id).join("\n");
    assert!(logs.contains("s1: told to activate"), "{logs}");

    // The rest; nothing was sent again (the copy of a staged device is empty).
    let bytes_before = Fleet::child(&task(&f, id), "s2")["bytes_sent"].as_i64().expect("bytes");
    let out = f.controller.ctl(&["--json", "activate", &id.to_string(), "--wait"]);
    let t: Value = serde_json::from_slice(&out.stdout).expect("activate json");
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    assert_eq!(Fleet::child(&t, "s2")["bytes_sent"].as_i64(), Some(bytes_before), "{t}");
    assert_eq!(f.device("s2").profile_system().as_deref(), Some(new.as_str()));

    // Nothing left to activate: said so.
    let out = f.controller.ctl(&["activate", &id.to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no device of task") || err.contains("already"), "{err}");

    // A staged rollout counts a staged device as not yet deployed: the canary's wave
    // waits for its real result, and the next wave is offered nothing until then.
    configs(&f, "3");
    let (code, t) = f.deploy_wait(&["--stage-only", "--canary", "1", "--device", "s1", "--device", "s2", "-m", "v3"]);
    assert_eq!(code, 0, "{t}");
    let id = t["id"].as_i64().expect("id");
    assert_eq!(Fleet::child(&t, "s1")["state"], "staged", "{t}\n{}", f.diagnostics());
    std::thread::sleep(Duration::from_secs(3));
    let t = task(&f, id);
    let s2 = Fleet::child(&t, "s2");
    assert_eq!((&s2["state"], &s2["bytes_sent"]), (&json!("pending"), &json!(0)), "the next wave went on: {t}");
    let out = f.controller.ctl(&["--json", "activate", &id.to_string(), "--device", "s1", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    let t = wait_for("the second wave to be staged", Duration::from_secs(60), || {
        let t = task(&f, id);
        (Fleet::child(&t, "s2")["state"] == "staged").then_some(t)
    });
    assert_eq!(Fleet::child(&t, "s1")["result"], "succeeded", "{t}");
}

#[test]
fn windows_stage_devices_until_they_open() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("w1", "alpha", true).expect("device");
    f.wait_online("w1");
    let (code, first) = f.deploy_wait(&["--device", "w1", "-m", "v1"]);
    assert_eq!(code, 0, "{first}\n{}", f.diagnostics());
    let old = Fleet::child(&first, "w1")["system"].as_str().expect("system").to_owned();

    // A window that opens in a few seconds (after the build and copy) and stays open.
    configs(&f, "2");
    let opens = unix_now() + 25;
    let window = format!("daily {}-{} UTC", hms(opens), hms(opens + 600));
    let (code, staged) = f.deploy_wait(&["--device", "w1", "--window", &window, "-m", "v2 in the window"]);
    assert_eq!(code, 0, "{staged}\n{}", f.diagnostics());
    let id = staged["id"].as_i64().expect("id");
    let c = Fleet::child(&staged, "w1");
    assert_eq!(c["state"], "staged", "the device switched outside its window: {c}\n{}", f.diagnostics());
    assert_eq!(c["waiting"]["for"], "window", "{c}");
    assert_eq!(c["waiting"]["opens"].as_u64(), Some(opens), "{c}");
    assert_eq!(f.device("w1").running_system(), old);
    let shown = String::from_utf8_lossy(&f.controller.ctl(&["task", &id.to_string()]).stdout).into_owned();
    assert!(shown.contains("waiting for window") && shown.contains("opens"), "{shown}");

    let done = wait_for("the window to open and the device to switch", Duration::from_secs(90), || {
        let t = task(&f, id);
        (t["state"] == "finished").then_some(t)
    });
    assert_eq!(done["result"], "succeeded", "{done}\n{}", f.diagnostics());
    assert!(unix_now() >= opens, "switched before the window opened");
    let new = Fleet::child(&done, "w1")["system"].as_str().expect("system").to_owned();
    assert_eq!(f.device("w1").running_system(), new);

    // A tag's window in thymis.toml (one that is closed now) stages the next deployment;
    // `thymisctl activate` switches it anyway.
    let closed = format!("daily {}-{} UTC", hms(unix_now() + 3 * 3600), hms(unix_now() + 4 * 3600));
    let toml_file = f.controller.project_dir().join("thymis.toml");
    let toml = std::fs::read_to_string(&toml_file).expect("thymis.toml");
    std::fs::write(&toml_file, format!("{toml}\n[tags.lobby]\nwindow = \"{closed}\"\n")).expect("write");
    configs(&f, "3");
    let (code, staged) = f.deploy_wait(&["--device", "w1", "-m", "v3, lobby window"]);
    assert_eq!(code, 0, "{staged}");
    let c = Fleet::child(&staged, "w1");
    assert_eq!(c["waiting"]["window"], closed.as_str(), "the tag's window was not applied: {c}\n{}", f.diagnostics());
    let id = staged["id"].as_i64().expect("id");
    let out = f.controller.ctl(&["--json", "activate", &id.to_string(), "--wait"]);
    let t: Value = serde_json::from_slice(&out.stdout).expect("activate json");
    assert_eq!(t["result"], "succeeded", "activate did not override the window: {t}\n{}", f.diagnostics());

    // A window that closes before the device could switch (it was offline) leaves it
    // staged for the next opening, not failed.
    let short = unix_now() + 8;
    let window = format!("daily {}-{} UTC", hms(unix_now()), hms(short));
    f.device_mut("w1").kill9();
    f.wait_offline("w1");
    configs(&f, "4");
    let t = f.controller.ctl_json(&["deploy", "--device", "w1", "--window", &window, "-m", "v4, a short window"]);
    let id = t["id"].as_i64().expect("id");
    wait_for("the window to close", Duration::from_secs(30), || (unix_now() > short).then_some(()));
    f.device_mut("w1").start().expect("start w1");
    f.wait_online("w1");
    let t = wait_for("w1 staged", Duration::from_secs(60), || {
        let t = task(&f, id);
        (Fleet::child(&t, "w1")["state"] == "staged").then_some(t)
    });
    let c = Fleet::child(&t, "w1");
    assert_eq!(c["waiting"]["for"], "window", "{c}");
    assert!(c["waiting"]["opens"].as_u64().unwrap_or(0) > unix_now() + 3600, "{c}");
    assert!(c["result"].is_null(), "{c}");

    // A window that does not parse is refused before anything happens.
    let out = f.controller.ctl(&["deploy", "--device", "w1", "--window", "whenever"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("for example"), "{out:?}");
}

#[test]
fn held_devices_are_staged_and_switch_once_released() {
    let bus = SystemBus::start_with_hold_group("nogroup").expect("bus");
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    // h1 holds by its hold file; h2 over D-Bus, where the group `nogroup` may too.
    f.add_device("h1", "alpha", false).expect("device");
    let hold_file = f.device("h1").dir.join("hold");
    f.add_agent_config("h1", &format!("hold_file = {:?}\nhold_max_age = 3600\n", hold_file.display().to_string()))
        .expect("config");
    f.device_mut("h1").start().expect("start");
    f.add_device_on_bus("h2", "alpha", false, Some(&bus)).expect("device");
    f.add_agent_config("h2", "hold_group = \"nogroup\"\n").expect("config");
    f.device_mut("h2").start().expect("start");
    for d in ["h1", "h2"] {
        f.wait_online(d);
    }
    let (code, first) = f.deploy_wait(&["--device", "h1", "--device", "h2", "-m", "v1"]);
    assert_eq!(code, 0, "{first}\n{}", f.diagnostics());
    let old = Fleet::child(&first, "h1")["system"].as_str().expect("system").to_owned();

    // The holds: a file with its reason, and D-Bus from a member of the hold group.
    std::fs::write(&hold_file, "printing a label\n").expect("hold file");
    let thymisctl_as_nobody = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--groups=65534"])
            .arg(thymis_fleet_tests::bin("thymisctl"))
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
            .output()
            .expect("thymisctl")
    };
    wait_for("the agent on the bus", Duration::from_secs(20), || {
        bus.busctl(&["introspect", "io.thymis.Agent1", "/io/thymis/Agent1"]).0.then_some(())
    });
    let out = thymisctl_as_nobody(&["hold", "an order is being taken"]);
    assert!(out.status.success(), "a member of the hold group was refused: {out:?}");
    // Outside the group (nobody, with the group `users` only): refused.
    let refused = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=100", "--clear-groups", "busctl"])
        .arg(format!("--address={}", bus.address))
        .args(["call", "io.thymis.Agent1", "/io/thymis/Agent1", "io.thymis.Agent1", "Release"])
        .output()
        .expect("busctl");
    let text = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(!refused.status.success() && text.contains("denied"), "outside the hold group: {text}");
    for (d, reason) in [("h1", "printing a label"), ("h2", "an order is being taken")] {
        wait_for(&format!("{d} reported held"), Duration::from_secs(20), || {
            (f.device_row(d)["hold"]["reason"] == reason).then_some(())
        });
    }
    let listed = String::from_utf8_lossy(&f.controller.ctl(&["devices"]).stdout).into_owned();
    assert!(listed.contains("held: printing a label"), "{listed}");
    let shown = String::from_utf8_lossy(&f.controller.ctl(&["device", "show", "h2"]).stdout).into_owned();
    assert!(shown.contains("updates       held: an order is being taken"), "{shown}");

    configs(&f, "2");
    let (code, staged) = f.deploy_wait(&["--device", "h1", "--device", "h2", "-m", "v2 while held"]);
    assert_eq!(code, 0, "{staged}");
    let id = staged["id"].as_i64().expect("id");
    let new = Fleet::child(&staged, "h1")["system"].as_str().expect("system").to_owned();
    for (d, reason) in [("h1", "printing a label"), ("h2", "an order is being taken")] {
        let c = Fleet::child(&staged, d);
        assert_eq!(c["state"], "staged", "{d} switched while held: {c}\n{}", f.diagnostics());
        assert_eq!(c["waiting"]["for"], "hold", "{c}");
        assert_eq!(c["waiting"]["reason"], reason, "{c}");
        assert!(in_store(&f, d, &new), "{d}: the copy waits for no hold");
        assert_eq!(f.device(d).running_system(), old);
    }
    // `thymisctl activate` does not override a hold.
    let a = f.controller.ctl_json(&["activate", &id.to_string()]);
    assert_eq!(a["held"], json!(["h1", "h2"]), "{a}");

    // Released: each switches by itself.
    std::fs::remove_file(&hold_file).expect("release the file");
    let h1 = wait_for("h1 to switch once released", Duration::from_secs(60), || {
        let t = task(&f, id);
        Fleet::child(&t, "h1")["result"].as_str().map(str::to_owned)
    });
    assert_eq!(h1, "succeeded", "{}", f.diagnostics());
    assert_eq!(Fleet::child(&task(&f, id), "h2")["state"], "staged", "h2 is still held");
    let out = thymisctl_as_nobody(&["release"]);
    assert!(out.status.success(), "{out:?}");
    let t = wait_for("h2 to switch once released", Duration::from_secs(60), || {
        let t = task(&f, id);
        (t["state"] == "finished").then_some(t)
    });
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    assert_eq!(f.device("h2").running_system(), new);
    assert!(f.device_row("h2")["hold"].is_null(), "{}", f.device_row("h2"));

    // A hold older than the device's maximum is reported and no longer obeyed.
    std::fs::write(&hold_file, "forgotten\n").expect("hold file");
    let old_enough = SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&hold_file).and_then(|h| h.set_modified(old_enough)).expect("age it");
    wait_for("h1 reported an overdue hold", Duration::from_secs(20), || {
        (f.device_row("h1")["hold"]["overdue"] == true).then_some(())
    });
    configs(&f, "3");
    let (code, done) = f.deploy_wait(&["--device", "h1", "-m", "v3 despite a stale hold"]);
    assert_eq!(code, 0, "{done}\n{}", f.diagnostics());
    assert_eq!(Fleet::child(&done, "h1")["result"], "succeeded", "{done}");
    let listed = String::from_utf8_lossy(&f.controller.ctl(&["devices"]).stdout).into_owned();
    assert!(listed.contains("no longer obeyed"), "{listed}");
}
