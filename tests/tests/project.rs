//! The project side of deployments: targeting and preview, the deployed commit (never
//! the dirty work tree, earlier commits on purpose), file editing through the API, and
//! live task events.

use std::process::Command;

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions};

fn git(f: &Fleet, args: &[&str]) -> String {
    let out = Command::new("git").arg("-C").arg(f.controller.project_dir()).args(args).output().expect("git");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn preview_resolves_devices_configurations_and_tags() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("a1", "alpha", true).expect("device");
    f.add_device("a2", "alpha", false).expect("device");
    f.add_device("b1", "beta", false).expect("device");
    f.wait_online("a1");
    let p = f.controller.ctl_json(&["deploy", "--tag", "lobby", "--preview"]);
    assert_eq!(p["configs"], json!(["alpha"]), "{p}");
    let names: Vec<(&str, bool)> = p["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| (d["name"].as_str().unwrap_or(""), d["online"] == true))
        .collect();
    assert_eq!(names, [("a1", true), ("a2", false)]);
    assert_eq!(p["commit"], f.controller.project_head().as_str());

    let p = f.controller.ctl_json(&["deploy", "--config", "beta", "--device", "a1", "--preview"]);
    assert_eq!(p["configs"], json!(["alpha", "beta"]), "{p}");
    assert_eq!(p["devices"].as_array().map(Vec::len), Some(2));

    // Uncommitted changes: the preview says they would be committed first.
    std::fs::write(f.controller.project_dir().join("extra.txt"), "x").expect("write");
    let p = f.controller.ctl_json(&["deploy", "--tag", "screens", "--preview"]);
    assert!(p["commit"].is_null() && p["uncommitted_changes"] == 1, "{p}");

    let out = f.controller.ctl(&["deploy", "--tag", "nonexistent", "--preview"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no configuration carries tag \"nonexistent\""));
    let out = f.controller.ctl(&["deploy", "--device", "ghost"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no device \"ghost\""));
}

#[test]
fn the_deployed_commit_is_never_the_dirty_work_tree_and_earlier_commits_deploy_on_purpose() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let v1 = f.controller.project_head();

    // Commit v2 through the API's file editing, deploy it.
    let (code, _) = f.controller.api("/project/status", None);
    assert_eq!(code, 200);
    f.set_configs(&json!({ "alpha": { "version": "2", "units": ["web.service"] }, "beta": {} })).expect("cfg");
    let st = f.controller.ctl_json(&["project", "status"]);
    assert_eq!(st["changes"], json!([{ "path": "configs.json", "status": "modified" }]), "{st}");
    let (_, diff) = f.controller.api("/project/diff?path=configs.json", None);
    assert!(diff["diff"].as_str().unwrap_or("").contains("+  \"alpha\": {"), "{diff}");
    let commit = f.controller.ctl_json(&["project", "commit", "-m", "alpha v2"]);
    let v2 = commit["commit"].as_str().expect("commit").to_owned();
    assert_eq!(git(&f, &["log", "-1", "--format=%s"]), "alpha v2");

    // Dirty work tree (v9), deploy HEAD explicitly: v2 is built, the change stays uncommitted.
    f.set_configs(&json!({ "alpha": { "version": "9", "units": ["web.service"] }, "beta": {} })).expect("cfg");
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "--commit", "HEAD", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    assert_eq!(t["commit"], v2.as_str());
    assert_eq!(f.device("d1").units(), "web.service=alpha-2", "the dirty work tree was built");
    assert!(!git(&f, &["status", "--porcelain"]).is_empty(), "the dirty change was committed");

    // An earlier commit on purpose: a new offer with a new sequence, accepted.
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "--commit", &v1, "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    assert_eq!(t["commit"], v1.as_str());
    assert_eq!(f.device("d1").units(), "web.service=alpha-1", "not back on v1");
    assert_eq!(f.device_row("d1")["commit"], v1.as_str());
}

#[test]
fn task_events_stream_live_until_the_task_ends() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let t = f.controller.ctl_json(&["deploy", "--device", "d1"]);
    let id = t["id"].as_i64().expect("id");
    let out = f
        .controller
        .curl()
        .args(["-sN", "--max-time", "60", "-H", &format!("Authorization: Bearer {}", f.controller.token())])
        .arg(format!("{}/api/v1/tasks/{id}/events", f.controller.base_url()))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("event: log"), "{text}");
    assert!(text.contains("d1: activating"), "{text}");
    let last_task = text.lines().rfind(|l| l.starts_with("data: {")).expect("a task event");
    let v: serde_json::Value = serde_json::from_str(&last_task["data: ".len()..]).expect("json");
    assert_eq!(v["state"], "finished", "the stream ended before the task: {v}");
    assert_eq!(v["result"], "succeeded");
}
