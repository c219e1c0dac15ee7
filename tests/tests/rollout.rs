//! The controller's side of a device deployment: ids that fit any device name, and an
//! activation the controller could not record is never sent.

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions};

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
    let db = rusqlite::Connection::open(f.controller.state_dir.join("db.sqlite")).expect("db");
    db.busy_timeout(std::time::Duration::from_secs(10)).expect("busy timeout");
    db.execute_batch(
        "CREATE TRIGGER no_activation BEFORE UPDATE OF stage ON children
         WHEN NEW.stage = 'activated' AND OLD.stage = 'copying'
         BEGIN SELECT RAISE(ABORT, 'database or disk is full (injected)'); END;",
    )
    .expect("trigger");

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
