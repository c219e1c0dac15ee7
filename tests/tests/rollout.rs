//! The controller's side of a device deployment: ids that fit any device name, an
//! activation the controller could not record is never sent; staged rollouts in waves
//! that halt by themselves, resume, and survive a restart.

use std::time::Duration;

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions, wait_for};

fn deploy(f: &Fleet, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json", "deploy", "--wait"];
    full.extend_from_slice(args);
    let out = f.controller.ctl(&full);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("deploy {args:?}: {e}: {}\n{}", String::from_utf8_lossy(&out.stderr), f.diagnostics())
    })
}

#[test]
fn a_device_with_the_longest_name_allowed_deploys() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    let name = format!("kiosk-{}", "x".repeat(58));
    assert_eq!(name.len(), 64);
    f.add_device(&name, "alpha", true).expect("device");
    f.wait_online(&name);
    let task = deploy(&f, &["--device", &name]);
    let child = Fleet::child(&task, &name);
    assert_eq!(child["result"], "succeeded", "{child}\n{}", f.diagnostics());
    let id = child["deployment_id"].as_str().expect("id");
    assert!(id.len() <= 32 && !id.contains("kiosk"), "deployment id {id:?} is built from the device name");
}

#[test]
fn an_activation_the_controller_could_not_record_is_never_sent() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let first = deploy(&f, &["--device", "d1", "-m", "v1"]);
    assert_eq!(first["result"], "succeeded", "{first}");
    let v1 = f.device("d1").profile_system().expect("profile");
    let generations = f.device("d1").generations();

    // The database refuses to record the next activation (as a full disk would).
    if let Some(pg) = &f.postgres {
        pg.psql(
            "thymis",
            "CREATE FUNCTION no_activation() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'could not extend file: No space left on device (injected)'; END $$;
             CREATE TRIGGER no_activation BEFORE UPDATE OF stage ON children FOR EACH ROW
             WHEN (NEW.stage = 'activated' AND OLD.stage = 'copying') EXECUTE FUNCTION no_activation();",
        )
        .expect("trigger");
    } else {
        let db = rusqlite::Connection::open(f.controller.state_dir.join("db.sqlite")).expect("db");
        db.busy_timeout(std::time::Duration::from_secs(10)).expect("busy timeout");
        db.execute_batch(
            "CREATE TRIGGER no_activation BEFORE UPDATE OF stage ON children
             WHEN NEW.stage = 'activated' AND OLD.stage = 'copying'
             BEGIN SELECT RAISE(ABORT, 'database or disk is full (injected)'); END;",
        )
        .expect("trigger");
    }

    f.set_configs(&json!({ "alpha": { "version": "2" }, "beta": {} })).expect("cfg");
    let task = deploy(&f, &["--device", "d1", "-m", "v2"]);
    let child = Fleet::child(&task, "d1");
    assert_eq!(child["result"], "failed", "{child}\n{}", f.diagnostics());
    let error = child["error"].as_str().unwrap_or_default();
    assert!(error.contains("recording the activation failed") && error.contains("injected"), "{child}");
    let dev = f.device("d1");
    assert_eq!(dev.running_system(), v1, "the device activated what the controller never recorded");
    assert_eq!(dev.profile_system().as_deref(), Some(v1.as_str()));
    assert_eq!(dev.generations(), generations);
}

fn fleet_of(f: &mut Fleet, devices: &[(&str, &str)]) {
    for (name, config) in devices {
        f.add_device(name, config, true).expect("device");
    }
    for (name, _) in devices {
        f.wait_online(name);
    }
}

/// Index of the first log line of a task that starts with `prefix`.
fn first_line(f: &Fleet, task: i64, prefix: &str) -> Option<usize> {
    f.controller.task_logs(task).iter().position(|l| l.starts_with(prefix))
}

#[test]
fn a_canary_then_waves_of_two_reach_all_six_devices_one_wave_after_another() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    let names = ["a1", "a2", "a3", "a4", "a5", "a6"];
    fleet_of(&mut f, &names.map(|n| (n, "alpha")));
    let json = deploy(&f, &["--config", "alpha", "--canary", "1", "--wave-size", "2"]);
    let task = Fleet::typed_task(&json);
    assert!(task.all_succeeded(), "{json}\n{}", f.diagnostics());
    let waves: Vec<usize> = names.iter().map(|n| task.child(n).expect("child").wave).collect();
    assert_eq!(waves, [1, 2, 2, 3, 3, 4]);
    assert_eq!(task.rollout.as_ref().map(|r| (r.wave, r.plan.canary)), Some((4, Some(thymis_api::Count::Devices(1)))));
    let id = task.id;
    let logs = f.controller.task_logs(id);
    assert!(logs.iter().any(|l| l == "wave 1 of 4 (canary): a1"), "{logs:#?}");
    // Each wave finished before the next one's devices were offered anything.
    for (done, next) in [("a1", "a2"), ("a3", "a4"), ("a5", "a6")] {
        let finished = first_line(&f, id, &format!("{done}: succeeded")).expect("finished");
        let started = first_line(&f, id, &format!("{next}: ")).expect("started");
        assert!(finished < started, "{next} started before {done} finished:\n{logs:#?}");
    }
}

#[test]
fn a_canary_that_fails_halts_the_rollout_and_no_other_device_is_offered() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    let names = ["a1", "a2", "a3", "a4", "a5", "a6"];
    fleet_of(&mut f, &names.map(|n| (n, "alpha")));
    let good = deploy(&f, &["--config", "alpha", "-m", "v1"]);
    assert_eq!(good["result"], "succeeded", "{good}");
    let v1 = f.device("a2").profile_system().expect("profile");

    f.set_configs(&json!({ "alpha": { "version": "2", "activationFails": true }, "beta": {} })).expect("cfg");
    let out = f.controller.ctl(&["--json", "deploy", "--wait", "--config", "alpha", "--canary", "1", "-m", "v2"]);
    assert_eq!(out.status.code(), Some(2), "a halted rollout is not a success");
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(task["state"], "halted", "{task}\n{}", f.diagnostics());
    assert_eq!(task["result"], "halted");
    let error = task["error"].as_str().unwrap_or_default();
    assert!(error.contains("halted after wave 1") && error.contains("a1 rolled-back"), "{task}");
    assert_eq!(Fleet::child(&task, "a1")["result"], "rolled-back");
    for n in &names[1..] {
        let c = Fleet::child(&task, n);
        assert_eq!((c["result"].as_str(), c["reason"].as_str()), (Some("cancelled"), Some("halted")), "{c}");
        assert!(c["sequence"].is_null(), "{n} was offered the deployment: {c}");
        assert_eq!(f.device(n).profile_system().as_deref(), Some(v1.as_str()));
    }
}

#[test]
fn a_rollout_halted_by_its_second_wave_is_resumed_after_the_fix() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    let devices = [("a1", "alpha"), ("a2", "alpha"), ("a3", "alpha"), ("b1", "beta"), ("b2", "beta"), ("b3", "beta")];
    fleet_of(&mut f, &devices);
    f.set_configs(&json!({ "alpha": { "version": "2" }, "beta": { "version": "2", "activationFails": true } }))
        .expect("cfg");
    let args = ["--json", "deploy", "--wait", "--tag", "screens", "--canary", "1", "--wave-size", "3"];
    let out = f.controller.ctl(&[&args[..], &["--max-failures", "0", "-m", "beta broken"]].concat());
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(task["state"], "halted", "{task}\n{}", f.diagnostics());
    let result = |t: &serde_json::Value, n: &str| Fleet::child(t, n)["result"].as_str().unwrap_or_default().to_owned();
    for n in ["a1", "a2", "a3"] {
        assert_eq!(result(&task, n), "succeeded", "{task}");
    }
    assert_ne!(result(&task, "b1"), "succeeded", "{task}");
    for n in ["b2", "b3"] {
        assert_eq!(Fleet::child(&task, n)["reason"], "halted", "{task}");
    }

    // Fixed; the rollout goes on with the devices that did not succeed, staged alike.
    f.set_configs(&json!({ "alpha": { "version": "2" }, "beta": { "version": "3" } })).expect("cfg");
    let id = task["id"].as_i64().expect("id").to_string();
    let out = f.controller.ctl(&["--json", "resume", &id, "--wait"]);
    let next: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("resume: {e}: {}\n{}", String::from_utf8_lossy(&out.stderr), f.diagnostics()));
    assert_eq!(next["result"], "succeeded", "{next}\n{}", f.diagnostics());
    assert_ne!(next["id"], task["id"]);
    let devices: Vec<&str> =
        next["children"].as_array().expect("children").iter().filter_map(|c| c["device"].as_str()).collect();
    assert_eq!(devices, ["b1", "b2", "b3"]);
    assert_eq!(next["rollout"]["canary"], 1, "{next}");
    assert!(f.controller.task_logs(task["id"].as_i64().expect("id")).iter().any(|l| l.contains("resumed as task")));
}

#[test]
fn a_soak_survives_a_controller_restart_and_resume_ends_it() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    fleet_of(&mut f, &[("a1", "alpha"), ("a2", "alpha"), ("a3", "alpha")]);
    let out = f.controller.ctl(&["--json", "deploy", "--config", "alpha", "--canary", "1", "--soak", "600"]);
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = task["id"].as_i64().expect("id");
    let soaking = wait_for("the canary's soak", Duration::from_secs(60), || {
        let t = f.controller.ctl_json(&["task", &id.to_string()]);
        t["rollout"]["soak_until"].as_i64().map(|_| t)
    });
    assert_eq!(Fleet::child(&soaking, "a1")["result"], "succeeded", "{soaking}");

    f.controller.restart().expect("restart");
    std::thread::sleep(Duration::from_secs(3));
    let t = f.controller.ctl_json(&["task", &id.to_string()]);
    assert_eq!(t["rollout"]["soak_until"], soaking["rollout"]["soak_until"], "{t}");
    for n in ["a2", "a3"] {
        assert_eq!(Fleet::child(&t, n)["state"], "pending", "{n} left its wave during the soak: {t}");
    }
    // Resumed: the next wave goes at once, and the rollout ends.
    let r = f.controller.ctl_json(&["resume", &id.to_string()]);
    assert_eq!(r["id"], id);
    let done = f.wait_task(id, Duration::from_secs(60));
    assert_eq!(done["result"], "succeeded", "{done}\n{}", f.diagnostics());
    assert!(f.controller.task_logs(id).iter().any(|l| l.contains("soak ended early")));
}
