//! Systemd devices: nspawn containers booting a real systemd with a system D-Bus, the
//! agent as its unit; real units, real unit failures, real reboots.

use std::time::Duration;

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions, wait_for};

fn deploy(f: &Fleet, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json", "deploy", "--wait"];
    full.extend_from_slice(args);
    let out = f.controller.ctl(&full);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("deploy: {e}: {}\n{}", String::from_utf8_lossy(&out.stderr), f.diagnostics()))
}

#[test]
fn systemd_device_runs_real_units_names_failed_ones_and_rolls_back_after_an_unconfirmed_reboot() {
    let mut f = Fleet::new(FleetOptions { confirm_timeout: 60, ..Default::default() }).expect("fleet");
    f.add_systemd_device("s1", "alpha", true).expect("systemd device");
    f.wait_online("s1");
    let dev = f.device("s1");
    assert!(
        dev.exec("systemctl show -p Type --value thymis-agent").contains("notify"),
        "the repository's unit runs the agent"
    );
    let state = dev.exec("busctl get-property io.thymis.Agent1 /io/thymis/Agent1 io.thymis.Agent1 State");
    assert!(state.contains("idle"), "agent on the container's system bus: {state}");

    let t = deploy(&f, &["--device", "s1"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    assert_eq!(f.device("s1").exec("systemctl is-active web.service").trim(), "active");
    let activations = f.device("s1").exec("journalctl -o cat --no-pager | grep -c 'thymis-activate-' || true");
    assert!(activations.trim().parse::<u32>().unwrap_or(0) > 0, "activation did not run in a transient unit");

    // A unit that really fails: switched, named, with its journal lines.
    f.set_configs(&json!({
        "alpha": { "version": "2", "units": ["web.service", "api.service"], "failUnits": ["web.service"] },
        "beta": {}
    }))
    .expect("cfg");
    let t = deploy(&f, &["--device", "s1", "-m", "failing unit"]);
    let child = Fleet::child(&t, "s1");
    assert_eq!(child["result"], "succeeded-with-failed-units", "{child}\n{}", f.diagnostics());
    assert_eq!(child["failed_units"], json!(["web.service"]));
    let logs = child["unit_logs"]["web.service"].to_string();
    assert!(logs.contains("fails on purpose"), "no journal lines for the failed unit: {child}");
    assert_eq!(f.device("s1").exec("systemctl is-active api.service").trim(), "active");
    let v2 = child["system"].as_str().expect("system").to_owned();
    let key = std::fs::read(f.device("s1").state_dir().join("device.key")).expect("key");

    // Cut off after activating, then rebooted before any confirmation: the boot
    // default never changed, so the device comes up on v2 and says so.
    f.set_configs(&json!({ "alpha": { "version": "3", "units": ["web.service"], "cutoff": true }, "beta": {} }))
        .expect("cfg");
    let out = f.controller.ctl(&["--json", "deploy", "--device", "s1", "-m", "cut off"]);
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let pending = f.device("s1").state_dir().join("pending.json");
    wait_for("awaiting confirmation", Duration::from_secs(60), || {
        std::fs::read_to_string(&pending).ok()?.contains("awaiting-confirmation").then_some(())
    });
    f.device_mut("s1").reboot().expect("reboot");
    let t = f.wait_task(task["id"].as_i64().expect("id"), Duration::from_secs(90));
    let child = Fleet::child(&t, "s1");
    assert_eq!(child["result"], "rolled-back", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "rebooted-unconfirmed");
    let dev = f.device("s1");
    assert_eq!(dev.exec("readlink /run/current-system").trim(), v2, "not on the previous generation after the reboot");
    assert_eq!(dev.profile_system().as_deref(), Some(v2.as_str()));
    assert_eq!(std::fs::read(dev.state_dir().join("device.key")).expect("key"), key, "state directory lost");
    assert_eq!(f.device_row("s1")["system"], v2.as_str());
}

#[test]
fn reboot_deployments_boot_the_new_system_and_roll_back_by_rebooting_when_unconfirmed() {
    let mut f = Fleet::new(FleetOptions { confirm_timeout: 10, ..Default::default() }).expect("fleet");
    f.add_systemd_device("s1", "alpha", true).expect("systemd device");
    f.wait_online("s1");
    let t = deploy(&f, &["--device", "s1"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());

    // Asked to reboot: the device reboots into v2 and confirms from there.
    f.set_configs(&json!({ "alpha": { "version": "2", "units": ["web.service"] }, "beta": {} })).expect("cfg");
    let boot0 = f.device("s1").boot_id();
    let t = deploy(&f, &["--device", "s1", "--reboot", "-m", "v2 with a reboot"]);
    let child = Fleet::child(&t, "s1");
    assert_eq!(child["result"], "succeeded", "{child}\n{}", f.diagnostics());
    let v2 = child["system"].as_str().expect("system").to_owned();
    let dev = f.device("s1");
    let boot1 = dev.boot_id();
    assert_ne!(boot0, boot1, "the device did not reboot");
    assert_eq!(dev.exec("readlink /run/current-system").trim(), v2);
    assert_eq!(dev.generations().len(), 2, "confirming a reboot deployment added another generation");
    let logs = f.controller.task_logs(t["id"].as_i64().expect("id")).join("\n");
    assert!(logs.contains("no one-shot entry"), "the agent did not say it set the default before rebooting:\n{logs}");

    // Unconfirmed after rebooting into v3: the device reboots back into v2 by itself,
    // even after a `nix-collect-garbage -d` while v3 awaited confirmation (then only
    // the agent's root keeps v2, no longer the profile's current generation).
    f.set_configs(&json!({ "alpha": { "version": "3", "units": ["web.service"], "cutoff": true }, "beta": {} }))
        .expect("cfg");
    let out = f.controller.ctl(&["--json", "deploy", "--device", "s1", "--reboot", "-m", "v3 cut off"]);
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let task = task["id"].as_i64().expect("id").to_string();
    let v3 = f.controller.ctl_json(&["build", "alpha", "--wait"])["system"].as_str().expect("v3").to_owned();
    wait_for("s1 to run v3", Duration::from_secs(120), || {
        (f.device("s1").exec("readlink /run/current-system").trim() == v3).then_some(())
    });
    let gc = f.device("s1").exec("nix-collect-garbage -d 2>&1 | tail -1");
    assert!(gc.contains("freed") || gc.contains("deleted"), "the collector did not run: {gc}");
    let t = wait_for("the v3 deployment to end", Duration::from_secs(180), || {
        let t = f.controller.ctl_json(&["task", &task]);
        (!Fleet::child(&t, "s1")["result"].is_null()).then_some(t)
    });
    let child = Fleet::child(&t, "s1");
    assert_eq!(child["result"], "rolled-back", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "unconfirmed");
    let dev = f.device("s1");
    assert_ne!(dev.boot_id(), boot1, "no reboot happened");
    assert_eq!(dev.exec("readlink /run/current-system").trim(), v2, "not back on v2");
    assert_eq!(dev.profile_system().as_deref(), Some(v2.as_str()));
    assert_eq!(f.device_row("s1")["system"], v2.as_str());
    // The failed generation left the profile (and the boot menu with it).
    let gens = dev.generations();
    assert!(gens.iter().all(|(_, target)| *target != v3), "v3 is still a generation: {gens:?}");
}

#[test]
fn a_confirmed_system_with_another_agent_restarts_the_agent_into_it() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_systemd_device("s1", "alpha", true).expect("systemd device");
    f.wait_online("s1");
    let exe = |f: &Fleet| f.device("s1").exec("readlink /proc/$(systemctl show -p MainPID --value thymis-agent)/exe");
    assert_eq!(exe(&f).trim(), "/opt/thymis/thymis-agent");
    f.set_configs(&json!({ "alpha": { "version": "2", "newAgent": true }, "beta": {} })).expect("cfg");
    let t = deploy(&f, &["--device", "s1", "-m", "new agent"]);
    assert_eq!(Fleet::child(&t, "s1")["result"], "succeeded", "{t}\n{}", f.diagnostics());
    // The unit does not restart on activation (restartIfChanged = false): the agent does, once confirmed.
    wait_for("the agent to restart into the new binary", Duration::from_secs(30), || {
        (exe(&f).trim() == "/run/thymis-agent-new").then_some(())
    });
    assert!(f.device("s1").log().contains("runs another agent: restarting"), "{}", f.diagnostics());
    f.wait_online("s1");
}

/// Health checks on a real systemd: a service that really crashes a second after it
/// started fails its required check, and the device goes back to the generation it ran;
/// after a reboot deployment the checks run in the new boot.
#[test]
fn a_service_that_crashes_after_starting_fails_its_check_and_checks_run_after_a_reboot() {
    let mut f = Fleet::new(FleetOptions { confirm_timeout: 60, ..Default::default() }).expect("fleet");
    f.add_systemd_device("s1", "alpha", true).expect("systemd device");
    f.wait_online("s1");
    let t = deploy(&f, &["--device", "s1"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let v1 = Fleet::child(&t, "s1")["system"].as_str().expect("system").to_owned();

    f.set_configs(&json!({
        "alpha": { "version": "2", "units": ["web.service", "sensor.service"], "crashUnits": ["sensor.service"],
                   "healthChecks": { "required": { "sensor": "sleep 2; systemctl is-active sensor.service" }, "deadline": 6 } },
        "beta": {}
    }))
    .expect("cfg");
    let t = deploy(&f, &["--device", "s1", "-m", "a crashing sensor"]);
    let child = Fleet::child(&t, "s1");
    assert_eq!(child["result"], "rolled-back", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "health-check-failed", "{child}");
    let error = child["error"].as_str().unwrap_or_default();
    assert!(error.contains("sensor") && error.contains("failed"), "the check's output (systemctl's word): {child}");
    let dev = f.device("s1");
    assert_eq!(dev.exec("readlink /run/current-system").trim(), v1, "not back on v1");
    assert_eq!(dev.exec("systemctl is-active web.service").trim(), "active", "v1's units are not back");

    // A reboot deployment: its checks run after the boot into the new system.
    f.set_configs(&json!({
        "alpha": { "version": "3", "units": ["web.service"], "healthChecks": { "required": {
            "booted": "mkdir -p /run/thymis-check && cat /proc/sys/kernel/random/boot_id > /run/thymis-check/boot && systemctl is-active --quiet web.service"
        } } },
        "beta": {}
    }))
    .expect("cfg");
    let boot0 = f.device("s1").boot_id();
    let t = deploy(&f, &["--device", "s1", "--reboot", "-m", "v3 with a reboot"]);
    let child = Fleet::child(&t, "s1");
    assert_eq!(child["result"], "succeeded", "{child}\n{}", f.diagnostics());
    let dev = f.device("s1");
    let boot1 = dev.boot_id();
    assert_ne!(boot0, boot1, "the device did not reboot");
    assert_eq!(dev.exec("cat /run/thymis-check/boot").trim(), boot1.trim(), "the checks did not run in the new boot");
}

/// A system whose switch inhibitors changed cannot switch live (NixOS refuses to): the
/// deployment becomes a reboot deployment, staged with "reboot needed" until its window
/// opens, and the device reboots into it inside the window.
#[test]
fn changed_switch_inhibitors_reboot_in_the_window() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let mut f = Fleet::new(FleetOptions { confirm_timeout: 20, ..Default::default() }).expect("fleet");
    f.add_systemd_device("s1", "alpha", true).expect("systemd device");
    f.wait_online("s1");
    let inhibited = |version: &str, dbus: &str| {
        json!({ "alpha": { "version": version, "units": ["web.service"],
                           "switchInhibitors": { "dbus-implementation": dbus } }, "beta": {} })
    };
    f.set_configs(&inhibited("1", "dbus")).expect("cfg");
    let t = deploy(&f, &["--device", "s1"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());

    // The window opens in a little while: the copy happens now, the reboot then.
    f.set_configs(&inhibited("2", "broker")).expect("cfg");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    let opens = now + 30;
    let hms = |s: u64| format!("{:02}:{:02}:{:02}", s % 86_400 / 3600, s / 60 % 60, s % 60);
    let window = format!("daily {}-{} UTC", hms(opens), hms(opens + 900));
    let boot0 = f.device("s1").boot_id();
    let t = deploy(&f, &["--device", "s1", "--window", &window, "-m", "v2: another D-Bus"]);
    let child = Fleet::child(&t, "s1");
    assert_eq!(child["state"], "staged", "{child}\n{}", f.diagnostics());
    let why = child["reboot_needed"].as_str().unwrap_or_default();
    assert!(why.contains("switch inhibitors changed (dbus-implementation)"), "{child}");
    assert_eq!(f.device("s1").boot_id(), boot0, "rebooted outside the window");
    let id = t["id"].as_i64().expect("id");

    let done = wait_for("the window to open and the device to reboot", Duration::from_secs(180), || {
        let t = f.controller.ctl_json(&["task", &id.to_string()]);
        (t["state"] == "finished").then_some(t)
    });
    let child = Fleet::child(&done, "s1");
    assert_eq!(child["result"], "succeeded", "{child}\n{}", f.diagnostics());
    let new = child["system"].as_str().expect("system");
    let dev = f.device("s1");
    assert_ne!(dev.boot_id(), boot0, "the new system was switched live, not booted");
    assert_eq!(dev.exec("readlink /run/current-system").trim(), new);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    assert!(now >= opens, "rebooted before the window opened");
    let logs = f.controller.task_logs(id).join("\n");
    assert!(logs.contains("needs a reboot: switch inhibitors changed"), "{logs}");
}
