//! Copies cut midway resume: no completed path is sent twice.

use std::time::Duration;

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions, wait_for};

/// base + app + payloads + system.
const PAYLOADS: usize = 10;
const PATHS: i64 = PAYLOADS as i64 + 3;

fn child(f: &Fleet, task: i64) -> serde_json::Value {
    let t = f.controller.ctl_json(&["task", &task.to_string()]);
    Fleet::child(&t, "d1").clone()
}

fn start(f: &Fleet) -> i64 {
    f.set_configs(&json!({
        "alpha": { "version": "2", "payloads": PAYLOADS, "payloadKiB": 512 },
        "beta": { "version": "1" }
    }))
    .expect("cfg");
    let out = f.controller.ctl(&["--json", "deploy", "--device", "d1", "-m", "big"]);
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    t["id"].as_i64().expect("id")
}

#[test]
fn a_silently_dropped_link_mid_copy_resumes_over_a_new_connection() {
    let mut f = Fleet::new(FleetOptions { dead_after: 3, ..Default::default() }).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    // 5 MB at 8 Mbit/s: about 5 s of copying, time enough to cut it.
    f.device("d1").shape("8mbit").expect("tc");
    let task = start(&f);
    wait_for("some paths to arrive", Duration::from_secs(60), || {
        let c = child(&f, task);
        (c["paths_sent"].as_i64().unwrap_or(0) >= 2).then_some(())
    });
    f.device("d1").black_hole(true).expect("drop");
    let before = child(&f, task)["paths_sent"].as_i64().unwrap_or(0);
    assert!(before < PATHS, "the copy finished before the link was cut; make it bigger");
    // Both sides must declare the connection dead by themselves.
    f.wait_offline("d1");
    wait_for("the agent to notice", Duration::from_secs(30), || {
        let log = f.device("d1").log();
        (log.contains("connection declared dead") || log.contains("timed out")).then_some(())
    });
    f.device("d1").black_hole(false).expect("restore");
    let done = wait_for("the deployment to finish", Duration::from_secs(120), || {
        let c = child(&f, task);
        (!c["result"].is_null()).then_some(c)
    });
    assert_eq!(done["result"], "succeeded", "{done}\n{}", f.diagnostics());
    assert_eq!(done["paths_sent"], PATHS, "a completed path was sent twice, or one was not counted: {done}");
    let logs = f.controller.task_logs(task).join("\n");
    assert!(logs.contains("connection lost; will resume"), "{logs}");
}

#[test]
fn an_agent_killed_mid_copy_resumes_with_what_is_still_missing() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    f.device("d1").shape("8mbit").expect("tc");
    let task = start(&f);
    wait_for("some paths to arrive", Duration::from_secs(60), || {
        (child(&f, task)["paths_sent"].as_i64().unwrap_or(0) >= 2).then_some(())
    });
    f.device_mut("d1").kill9();
    std::thread::sleep(Duration::from_millis(300));
    f.device_mut("d1").start().expect("restart");
    let done = wait_for("the deployment to finish", Duration::from_secs(120), || {
        let c = child(&f, task);
        (!c["result"].is_null()).then_some(c)
    });
    assert_eq!(done["result"], "succeeded", "{done}\n{}", f.diagnostics());
    assert_eq!(done["paths_sent"], PATHS, "{done}");
    // Nothing half-received was left behind or registered.
    let staging = std::fs::read_dir(f.device("d1").state_dir().join("staging")).expect("staging").count();
    assert_eq!(staging, 0);
}
