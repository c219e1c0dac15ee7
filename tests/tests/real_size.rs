//! A closure of a real system's size (over a thousand paths, most of them small) copies
//! to devices whose links fail in every way mid-copy, and every copy finishes: a link
//! silently dropped and restored, an agent killed with SIGKILL, and an agent frozen
//! until the controller gives up on it and closes the connection. No completed path is
//! sent twice.

use std::time::Duration;

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions, wait_for};

/// Small paths, plus base, app and the system itself.
const SMALL: i64 = 1050;
const PATHS: i64 = SMALL + 3;

fn child(f: &Fleet, task: i64, device: &str) -> serde_json::Value {
    let t = f.controller.ctl_json(&["task", &task.to_string()]);
    Fleet::child(&t, device).clone()
}

fn sent(f: &Fleet, task: i64, device: &str) -> i64 {
    child(f, task, device)["paths_sent"].as_i64().unwrap_or(0)
}

/// The number of paths each copy attempt found missing ("d1: lacks N of M paths").
fn lacking(logs: &[String], device: &str) -> Vec<i64> {
    let prefix = format!("{device}: lacks ");
    logs.iter().filter_map(|l| l.strip_prefix(&prefix)?.split_whitespace().next()?.parse().ok()).collect()
}

#[test]
fn a_thousand_path_closure_survives_a_dropped_link_a_killed_agent_and_a_frozen_one() {
    let mut f = Fleet::new(FleetOptions { dead_after: 3, ..Default::default() }).expect("fleet");
    for d in ["d1", "d2", "d3"] {
        f.add_device(d, "alpha", true).expect("device");
    }
    for d in ["d1", "d2", "d3"] {
        f.wait_online(d);
        // Slow enough that each fault lands in the middle of the copy.
        f.device(d).shape("3mbit").expect("tc");
    }
    f.set_configs(&json!({ "alpha": { "version": "2", "small": SMALL }, "beta": {} })).expect("cfg");
    let out = f.controller.ctl(&["--json", "deploy", "--config", "alpha", "-m", "a real-sized system"]);
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let task = t["id"].as_i64().expect("id");

    // d1: its link goes silent; both sides must notice by themselves.
    midway(&f, task, "d1");
    f.device("d1").black_hole(true).expect("drop");
    // d2: the agent dies and comes back.
    midway(&f, task, "d2");
    f.device_mut("d2").kill9();
    std::thread::sleep(Duration::from_millis(300));
    f.device_mut("d2").start().expect("restart d2");
    // d3: the agent freezes; the controller's sends stall until it closes the connection.
    midway(&f, task, "d3");
    let frozen = f.device("d3").agent_pid().expect("d3's agent");
    signal(frozen, "STOP");
    let gave_up = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        f.controller.log().lines().any(|l| l.contains("d3") && l.contains("connection declared dead"))
    });
    assert!(gave_up, "the controller did not give up on the frozen d3\n{}", f.diagnostics());
    f.wait_offline("d3");
    signal(frozen, "CONT");

    f.wait_offline("d1");
    wait_for("d1's agent to notice the silence", Duration::from_secs(30), || {
        f.device("d1").log().contains("connection declared dead").then_some(())
    });
    f.device("d1").black_hole(false).expect("restore");

    let t = f.wait_task(task, Duration::from_secs(120));
    let logs = f.controller.task_logs(task);
    for d in ["d1", "d2", "d3"] {
        let c = Fleet::child(&t, d);
        assert_eq!(c["result"], "succeeded", "{d}: {c}\n{}", f.diagnostics());
        assert_eq!(c["paths_sent"], PATHS, "{d}: a path was counted twice or not at all: {c}");
        // Each new attempt asked only for what was still missing: the first found the
        // whole closure missing, the later ones less each time.
        let lacks = lacking(&logs, d);
        assert!(lacks.len() >= 2, "{d} never resumed: {lacks:?}\n{}", logs.join("\n"));
        assert_eq!(lacks[0], PATHS, "{d}: {lacks:?}");
        assert!(lacks.windows(2).all(|w| w[1] < w[0]), "{d}: a resumed copy sent completed paths again: {lacks:?}");
        // The device holds the whole closure, registered.
        let system = c["system"].as_str().expect("system");
        let listed = f.device(d).exec(&format!("nix-store -qR {system} | wc -l"));
        assert_eq!(listed.trim(), PATHS.to_string(), "{d}'s store lacks part of the closure");
    }
    // The frozen agent reconnected by itself after the controller had closed on it.
    let d3 = f.device("d3").log();
    assert!(d3.matches("connected to the controller").count() >= 2, "{d3}");
}

/// Waits until `d` has some paths, and checks its copy is not over yet.
fn midway(f: &Fleet, task: i64, d: &str) {
    wait_for(&format!("{d} to receive some paths"), Duration::from_secs(60), || (sent(f, task, d) >= 20).then_some(()));
    assert!(sent(f, task, d) < PATHS, "{d}'s copy finished before the fault; make it slower");
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status();
    assert!(ok.is_ok_and(|s| s.success()), "kill -{sig} {pid}");
}
