//! The web UI in a real browser (Debian's Chromium driven by playwright-core) against a
//! real controller and devices. Screenshots of each view go to `artifacts/ui/`.

use std::path::Path;
use std::process::Command;

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions};

/// base64 of the sha256 of the controller's public key (what Chromium pins).
fn spki_sha256(f: &Fleet) -> String {
    let cert = f.controller.ca_file().expect("the controller serves TLS");
    let out = Command::new("sh")
        .arg("-c")
        .arg("openssl x509 -in \"$0\" -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64")
        .arg(cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn ui(f: &Fleet, phase: &str, expect: serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../artifacts/ui");
    std::fs::create_dir_all(&shots).expect("artifacts dir");
    assert!(dir.join("node_modules/playwright-core").exists(), "run scripts/setup.sh (npm ci in tests/ui)");
    // The browser in its own network namespace: see ClientNet.
    let client = f.client_net().expect("the browser's network namespace");
    let out = client
        .command("node")
        .arg(dir.join("ui-test.mjs"))
        .arg(phase)
        .env("THYMIS_URL", f.controller.base_url())
        .env("THYMIS_SPKI", spki_sha256(f))
        .env("THYMIS_TOKEN", f.controller.token())
        .env("SHOTS", &shots)
        .env("EXPECT", expect.to_string())
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "UI phase {phase} failed:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        f.diagnostics()
    );
}

#[test]
fn the_web_ui_logs_in_shows_devices_and_commit_and_deploys_live() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    for (name, config) in [("a1", "alpha"), ("a2", "alpha"), ("b1", "beta")] {
        f.add_device(name, config, true).expect("device");
    }
    for name in ["a1", "a2", "b1"] {
        f.wait_online(name);
    }
    let t = f.controller.ctl_json(&["deploy", "--tag", "screens", "--wait"]);
    assert_eq!(t["result"], "succeeded");
    let head = f.controller.project_head();

    // A change to the project; deploy it to a tag from the UI.
    // (With a package it did not have: the preview names it.)
    f.set_configs(&json!({
        "alpha": { "version": "2", "units": ["web.service"], "blob": { "kib": 16, "versioned": true } },
        "beta": { "version": "1" },
    }))
    .expect("cfg");
    ui(
        &f,
        "tag",
        json!({
            "devices": { "a1": head, "a2": head, "b1": head },
            "changed": "configs.json",
            "tag": "screens",
            "preview": ["a1", "a2", "b1"],
            "dryRun": "a1",
            "dryRunPackage": "added thymis-test-blob-alpha 2",
            "results": { "a1": "succeeded", "a2": "succeeded", "b1": "succeeded" },
        }),
    );
    let deployed = f.controller.project_head();
    assert_ne!(deployed, head, "Commit & Deploy did not commit");
    assert_eq!(f.device_row("a1")["commit"], deployed.as_str());

    // A secret for a tag, set from the secrets page.
    ui(
        &f,
        "secrets",
        json!({ "devices": { "a1": deployed }, "secret": { "name": "wifi", "tag": "lobby", "value": "ui-secret-6f1d" } }),
    );
    let listed = f.controller.ctl_json(&["secret", "list"]);
    assert_eq!(listed[0]["scope"], json!({ "tag": "lobby" }), "{listed}");
    assert!(!listed.to_string().contains("ui-secret-6f1d"), "{listed}");

    // Stage only: the task says the device waits for activation; Activate switches it.
    f.set_configs(&json!({ "alpha": { "version": "2s", "units": ["web.service"] }, "beta": { "version": "1" } }))
        .expect("cfg");
    ui(
        &f,
        "staged",
        json!({
            "devices": { "a1": deployed },
            "changed": "configs.json",
            "targets": ["a1"],
            "preview": ["a1"],
            "stageOnly": true,
            "state": "waiting",
            "results": { "a1": "staged: waiting for activation" },
            "activate": { "a1": "succeeded" },
        }),
    );
    let staged = f.controller.project_head();
    assert_eq!(f.device_row("a1")["commit"], staged.as_str(), "Activate did not switch a1");

    // A configuration whose activation fails shows the rollback and its reason.
    f.set_configs(&json!({ "alpha": { "version": "3", "activationFails": true }, "beta": { "version": "1" } }))
        .expect("cfg");
    ui(
        &f,
        "failing",
        json!({
            "devices": { "a1": staged },
            "changed": "configs.json",
            "targets": ["a1"],
            "preview": ["a1"],
            "results": { "a1": "rolled back: activation-failed" },
        }),
    );

    // Someone sets b1's profile by hand (a system it never ran): the table says what it
    // boots next.
    let b1 = f.device("b1");
    let v = b1.profile_system().expect("b1's profile");
    let other = b1.exec(&format!("readlink -f {v}/bin/app | cut -d/ -f1-4")).trim().to_owned();
    b1.exec(&format!("nix-env -p /nix/var/nix/profiles/system --set {other}"));
    let dev = f.device_mut("b1");
    dev.kill9();
    dev.start().expect("start b1");
    thymis_fleet_tests::wait_for("b1 to report what it boots next", std::time::Duration::from_secs(60), || {
        (f.device_row("b1")["boots_next"] == other.as_str()).then_some(())
    });

    // A canary rollout to the tag, still broken: the canary rolls back, the rollout halts
    // by itself, the other devices are offered nothing.
    f.set_configs(&json!({ "alpha": { "version": "4", "activationFails": true }, "beta": { "version": "2" } }))
        .expect("cfg");
    ui(
        &f,
        "canary",
        json!({
            "devices": { "a1": staged },
            "changed": "configs.json",
            "tag": "screens",
            "preview": ["a1", "a2", "b1"],
            "canary": "1",
            "wavePlan": "first: a1",
            "head": { "a2": "behind HEAD by" },
            "state": "halted",
            "rollout": "halted in wave 1 of 2",
            "halted": "a1 rolled-back",
            "bootsNext": { "b1": "thymis-test-app-beta" },
            "results": { "a1": "rolled back: activation-failed", "a2": "rollout halted", "b1": "rollout halted" },
        }),
    );
    assert_eq!(f.device_row("b1")["commit"], deployed.as_str(), "b1 was deployed to after the canary failed");
}

#[test]
fn the_device_page_shows_its_deployments_its_journal_and_a_working_terminal() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    let t = f.systemd_device_with_web_unit("s1", "5").expect("s1 with web.service");
    // A process device (no journald, terminal not allowed), and one never started.
    f.add_device("p1", "beta", true).expect("p1");
    f.wait_online("p1");
    f.add_device("new1", "beta", false).expect("new1");
    ui(
        &f,
        "device",
        json!({
            "devices": { "s1": f.controller.project_head() },
            "head": { "s1": "HEAD" },
            "refusing": "p1",
            "unenrolled": "new1",
            "device": "s1",
            "task": t["id"],
            "result": "succeeded",
            "unit": "web.service",
            "journal": "alpha version 5 is up",
        }),
    );
    let tasks = f.controller.ctl_json(&["tasks"]);
    let terminal = tasks.as_array().expect("tasks").iter().find(|t| t["kind"] == "terminal").expect("a terminal task");
    assert_eq!(terminal["result"], "failed", "{terminal}");
    assert!(terminal["message"].as_str().is_some_and(|m| m.contains("web UI session")), "{terminal}");
}
