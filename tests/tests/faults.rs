//! Faults around a deployment: controller crash with a device awaiting confirmation,
//! agent killed after activating, offline devices, cancel, replayed sequences.

use std::time::Duration;

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions, wait_for};

fn start_deploy(f: &Fleet, args: &[&str]) -> i64 {
    let mut full = vec!["--json", "deploy"];
    full.extend_from_slice(args);
    let out = f.controller.ctl(&full);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("deploy: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    v["id"].as_i64().expect("task id")
}

fn child_of(f: &Fleet, task: i64, device: &str) -> serde_json::Value {
    let t = f.controller.ctl_json(&["task", &task.to_string()]);
    Fleet::child(&t, device).clone()
}

#[test]
fn controller_restart_while_a_device_awaits_confirmation_confirms_it() {
    let mut f = Fleet::new(FleetOptions { confirm_timeout: 20, ..Default::default() }).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.add_device("d2", "beta", false).expect("offline device");
    f.wait_online("d1");
    f.set_configs(&json!({ "alpha": { "version": "2", "delay": 2 }, "beta": { "version": "1" } })).expect("configs");
    let task = start_deploy(&f, &["--tag", "screens", "-m", "slow activation"]);
    wait_for("d1 to activate", Duration::from_secs(60), || {
        (child_of(&f, task, "d1")["phase"] == "activate").then_some(())
    });
    // Crash the controller mid-activation; bring it back before the device's deadline.
    f.controller.kill();
    std::thread::sleep(Duration::from_secs(4));
    f.controller.restart().expect("restart");
    let t = f.wait_task(task, Duration::from_secs(60));
    let d1 = Fleet::child(&t, "d1");
    assert_eq!(d1["result"], "succeeded", "a controller restart rolled the device back: {d1}\n{}", f.diagnostics());
    // The offline device had not activated: it ends interrupted, not running forever.
    assert_eq!(Fleet::child(&t, "d2")["result"], "interrupted", "{t}");
    assert_eq!(t["state"], "finished");
    let system = d1["system"].as_str().expect("system");
    assert_eq!(f.device("d1").profile_system().as_deref(), Some(system));
}

#[test]
fn agent_killed_after_activation_still_rolls_back_at_the_deadline() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let first = start_deploy(&f, &["--device", "d1"]);
    let t = f.wait_task(first, Duration::from_secs(60));
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let good = f.device("d1").profile_system().expect("profile");

    f.set_configs(&json!({ "alpha": { "version": "2", "cutoff": true }, "beta": { "version": "1" } })).expect("cfg");
    let task = start_deploy(&f, &["--device", "d1", "-m", "cut off"]);
    let pending = f.device("d1").state_dir().join("pending.json");
    wait_for("the agent to await confirmation", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&pending).ok()?;
        text.contains("awaiting-confirmation").then_some(())
    });
    f.device_mut("d1").kill9();
    std::thread::sleep(Duration::from_millis(500));
    f.device_mut("d1").start().expect("restart agent");
    let t = f.wait_task(task, Duration::from_secs(60));
    let child = Fleet::child(&t, "d1");
    assert_eq!(child["result"], "rolled-back", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "unconfirmed");
    assert_eq!(f.device("d1").profile_system(), Some(good.clone()));
    assert_eq!(f.device("d1").running_system(), good);
    assert!(!pending.exists(), "pending state left behind");
}

#[test]
fn offline_device_gets_its_deployment_on_connect_and_cancel_stops_a_queued_one() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("late", "alpha", false).expect("device");
    f.add_device("never", "beta", false).expect("device");
    let out = f.controller.ctl(&["--json", "deploy", "--device", "late", "--wait"]);
    assert_eq!(out.status.code(), Some(2), "waiting on an offline device is not success");
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(t["state"], "waiting", "{t}");
    assert_eq!(Fleet::child(&t, "late")["state"], "queued");
    let task = t["id"].as_i64().expect("id");

    f.device_mut("late").start().expect("start");
    let late = wait_for("the late device's result", Duration::from_secs(60), || {
        let c = child_of(&f, task, "late");
        (!c["result"].is_null()).then_some(c)
    });
    assert_eq!(late["result"], "succeeded", "{late}\n{}", f.diagnostics());

    let queued = start_deploy(&f, &["--device", "never"]);
    wait_for("queued", Duration::from_secs(30), || (child_of(&f, queued, "never")["state"] == "queued").then_some(()));
    let c = f.controller.ctl_json(&["cancel", &queued.to_string()]);
    assert_eq!(c["state"], "cancelled", "{c}");
    assert_eq!(Fleet::child(&c, "never")["result"], "cancelled");
}

#[test]
fn a_restored_controller_database_cannot_replay_an_old_sequence() {
    // The SQLite file restored from a copy (a PostgreSQL server's backups are its own).
    let mut f = Fleet::new(FleetOptions { postgres: false, ..Default::default() }).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let first = start_deploy(&f, &["--device", "d1"]);
    assert_eq!(f.wait_task(first, Duration::from_secs(60))["result"], "succeeded", "{}", f.diagnostics());

    // Back up the database, deploy again, then go back to the backup: the next offer
    // reuses a sequence number the device has already applied.
    let db = f.controller.state_dir.join("db.sqlite");
    let backup = f.tmp.path().join("db-backup.sqlite");
    f.controller.kill();
    let _ = std::fs::remove_file(db.with_extension("sqlite-shm"));
    std::fs::copy(&db, &backup).expect("backup");
    let wal = db.with_extension("sqlite-wal");
    if wal.exists() {
        std::fs::copy(&wal, backup.with_extension("sqlite-wal")).expect("backup wal");
    }
    f.controller.restart().expect("restart");
    f.wait_online("d1");
    f.set_configs(&json!({ "alpha": { "version": "2" }, "beta": { "version": "1" } })).expect("cfg");
    let second = start_deploy(&f, &["--device", "d1", "-m", "v2"]);
    assert_eq!(f.wait_task(second, Duration::from_secs(60))["result"], "succeeded", "{}", f.diagnostics());
    let running = f.device("d1").profile_system();

    f.controller.kill();
    for ext in ["sqlite", "sqlite-wal", "sqlite-shm"] {
        let _ = std::fs::remove_file(db.with_extension(ext));
        if backup.with_extension(ext).exists() {
            std::fs::copy(backup.with_extension(ext), db.with_extension(ext)).expect("restore");
        }
    }
    f.controller.restart().expect("restart");
    f.wait_online("d1");
    f.set_configs(&json!({ "alpha": { "version": "3" }, "beta": { "version": "1" } })).expect("cfg");
    let third = start_deploy(&f, &["--device", "d1", "-m", "v3 from an old database"]);
    let t = f.wait_task(third, Duration::from_secs(60));
    let child = Fleet::child(&t, "d1");
    assert_eq!(child["result"], "failed", "{child}\n{}", f.diagnostics());
    assert!(child["error"].as_str().unwrap_or("").contains("not above the last applied"), "{child}");
    assert_eq!(f.device("d1").profile_system(), running, "the device changed system on a replayed sequence");
}

/// The agent cannot start its activation helper (here its activations directory is a
/// file): the device still reports an outcome, naming why, instead of staying silent in
/// "activating" until the deployment expires and the controller calls it unreachable.
#[test]
fn an_activation_that_cannot_start_still_ends_with_the_devices_outcome() {
    let mut f = Fleet::new(FleetOptions { deployment_ttl: 300, ..Default::default() }).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let first = start_deploy(&f, &["--device", "d1", "-m", "v1"]);
    assert_eq!(f.wait_task(first, Duration::from_secs(60))["result"], "succeeded");
    let activations = f.device("d1").state_dir().join("activations");
    std::fs::remove_dir_all(&activations).expect("rm");
    std::fs::write(&activations, "not a directory").expect("file");

    f.set_configs(&json!({ "alpha": { "version": "2" }, "beta": {} })).expect("cfg");
    let task = start_deploy(&f, &["--device", "d1", "-m", "v2"]);
    let t = f.wait_task(task, Duration::from_secs(200));
    let child = Fleet::child(&t, "d1");
    assert_ne!(child["result"], "unreachable", "the device never reported: {child}\n{}", f.diagnostics());
    assert!(matches!(child["result"].as_str(), Some("rolled-back" | "rollback-failed")), "{child}");
    assert!(child["error"].as_str().unwrap_or_default().contains("did not start"), "{child}");
}
