//! Per-device secrets (docs/controller.md, "Secrets"): set for a tag, a configuration
//! or a device, they reach each device sealed to its key and land in its secrets_dir
//! with their owner, group and mode; a device's own value wins; a changed value needs
//! no build; a removed one disappears; a rollback puts the previous value back; and the
//! value is nowhere in clear on the controller, in its logs, or in the API.

use std::io::Write as _;
use std::process::Stdio;

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions};

/// `thymisctl secret set NAME ARGS` with `value` on standard input: the deployments
/// that carry it.
fn set(f: &Fleet, name: &str, args: &[&str], value: &str) -> Vec<i64> {
    let mut cmd = f.controller.ctl_command(&["--json", "secret", "set", name]);
    let mut child =
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("ctl");
    child.stdin.take().expect("stdin").write_all(value.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "secret set {name}: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    serde_json::from_value(v["tasks"].clone()).expect("tasks")
}

/// Waits for deployments to finish; each must have succeeded.
fn succeeded(f: &Fleet, tasks: &[i64]) {
    for id in tasks {
        let t = f.wait_task(*id, std::time::Duration::from_secs(120));
        assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    }
}

/// `mode owner group value` of a secret on a device.
fn on_device(f: &Fleet, device: &str, name: &str) -> String {
    f.device(device)
        .exec(&format!("f=/run/thymis/secrets/{name}; [ -e $f ] && echo \"$(stat -c '%a %U %G' $f) $(cat $f)\""))
        .trim()
        .to_owned()
}

fn builds(f: &Fleet) -> i64 {
    let (_, stats) = f.controller.api("/stats", None);
    stats["builds"].as_i64().unwrap_or(-1)
}

#[test]
fn secrets_reach_their_devices_sealed_and_nowhere_in_clear() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    for (d, config) in [("s1", "alpha"), ("s2", "alpha"), ("b1", "beta")] {
        f.add_device(d, config, true).expect("device");
        f.wait_online(d);
    }
    // A value no one could guess, so finding it anywhere means it leaked.
    let wifi = format!("psk-{:016x}", (std::process::id() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    // Never deployed yet: no deployment for it now; the first one carries it.
    let tasks =
        set(&f, "wifi", &["--tag", "lobby", "--owner", "nobody", "--group", "nogroup", "--mode", "0440"], &wifi);
    assert!(tasks.is_empty(), "{tasks:?}");
    let listed = f.controller.ctl_json(&["secret", "list"]);
    assert_eq!(listed[0]["name"], "wifi", "{listed}");
    assert_eq!(listed[0]["scope"], json!({ "tag": "lobby" }), "{listed}");
    assert!(!listed.to_string().contains(&wifi), "the list shows the value: {listed}");

    let (code, t) = f.deploy_wait(&["--device", "s1", "--device", "s2", "--device", "b1", "-m", "with secrets"]);
    assert_eq!(code, 0, "{t}\n{}", f.diagnostics());
    for d in ["s1", "s2"] {
        assert_eq!(on_device(&f, d, "wifi"), format!("440 nobody nogroup {wifi}"), "{d}\n{}", f.diagnostics());
    }
    assert_eq!(on_device(&f, "b1", "wifi"), "", "b1 (not in the tag) got the lobby's secret");
    // A restart with an empty /run (as after a boot): the agent puts them back.
    f.device_mut("s1").kill9();
    f.device_mut("s1").start().expect("start s1");
    f.wait_online("s1");
    assert_eq!(on_device(&f, "s1", "wifi"), format!("440 nobody nogroup {wifi}"), "{}", f.diagnostics());

    // A device's own value wins; a changed value is its own small deployment, with no
    // build.
    let before = builds(&f);
    let tasks = set(&f, "wifi", &["--device", "s2"], "s2-only");
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    succeeded(&f, &tasks);
    let t = f.controller.ctl_json(&["task", &tasks[0].to_string()]);
    assert_eq!(t["children"].as_array().map(Vec::len), Some(1), "only s2 is deployed to: {t}");
    assert_eq!(on_device(&f, "s2", "wifi"), "400 root root s2-only");
    assert_eq!(on_device(&f, "s1", "wifi"), format!("440 nobody nogroup {wifi}"));
    assert_eq!(builds(&f), before, "a changed secret rebuilt the system");

    // A rollback puts the previous value back.
    set(&f, "wifi", &["--device", "s2", "--no-deploy"], "doomed");
    f.set_configs(&json!({ "alpha": { "version": "2", "activationFails": true }, "beta": {} })).expect("cfg");
    let (_, t) = f.deploy_wait(&["--device", "s2", "-m", "fails"]);
    assert_eq!(Fleet::child(&t, "s2")["result"], "rolled-back", "{t}\n{}", f.diagnostics());
    assert_eq!(on_device(&f, "s2", "wifi"), "400 root root s2-only", "the rollback left the new secret");

    // Removed: gone from the device at its next deployment.
    let out = f.controller.ctl(&["secret", "rm", "wifi", "--device", "s2", "--no-deploy"]);
    assert!(out.status.success(), "{out:?}");
    let removed = f.controller.ctl_json(&["secret", "rm", "wifi", "--tag", "lobby"]);
    let tasks: Vec<i64> = serde_json::from_value(removed["tasks"].clone()).expect("tasks");
    succeeded(&f, &tasks);
    assert_eq!(on_device(&f, "s1", "wifi"), "", "a removed secret stayed");
    assert_eq!(on_device(&f, "s2", "wifi"), "", "a removed secret stayed");

    // Nowhere in clear: the controller's state directory (its database included), its
    // log, the agents' logs and stores, the task logs, the API.
    let grep = |path: &std::path::Path| {
        std::process::Command::new("grep").args(["-r", "-l", "-a", "-F", &wifi]).arg(path).output().expect("grep")
    };
    let mut places = vec![f.controller.state_dir.clone(), f.device("s1").dir.clone(), f.device("s2").dir.clone()];
    // On PostgreSQL, its files too (its write-ahead log holds every row written).
    if let Some(pg) = &f.postgres {
        places.push(pg.data_dir().to_owned());
    }
    for place in places {
        let out = grep(&place);
        assert!(out.stdout.is_empty(), "the value is in clear in {}", String::from_utf8_lossy(&out.stdout));
    }
    assert!(!f.controller.log().contains(&wifi), "the controller logged the value");
    for id in 1..=6 {
        assert!(!f.controller.task_logs(id).join("\n").contains(&wifi), "task {id} logged the value");
    }
    let (_, tasks) = f.controller.api("/tasks", None);
    assert!(!tasks.to_string().contains(&wifi), "the API shows the value");

    // A revoked device is deployed nothing, so it gets nothing.
    assert!(f.controller.ctl(&["device", "revoke", "b1"]).status.success());
    let tasks = set(&f, "token", &["--config", "beta"], "for-beta");
    assert!(tasks.is_empty(), "a revoked device was deployed its secret: {tasks:?}");
}

/// On a systemd device, a service reads its secret from the path the agent writes it to
/// (as the module's `secrets.NAME.path`), in place before the service starts.
#[test]
fn a_service_on_a_systemd_device_reads_its_secret() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_systemd_device("sd1", "alpha", true).expect("systemd device");
    f.wait_online("sd1");
    set(&f, "wifi", &["--device", "sd1", "--mode", "0400", "--no-deploy"], "PSK=0123456789\n");
    f.set_configs(&json!({
        "alpha": { "version": "2", "units": ["reader.service"], "secretEnv": "/run/thymis/secrets/wifi" },
        "beta": {}
    }))
    .expect("cfg");
    let (code, t) = f.deploy_wait(&["--device", "sd1", "-m", "a reader of the secret"]);
    assert_eq!(code, 0, "{t}\n{}", f.diagnostics());
    let seen = f.device("sd1").exec("systemctl is-active reader.service; journalctl -u reader.service --no-pager -n 5");
    assert!(seen.starts_with("active") && seen.contains("the secret has 10 bytes"), "{seen}\n{}", f.diagnostics());
}

/// An offline bundle made for one device carries that device's secrets (sealed to its
/// key); installed on the device, they are in place.
#[test]
fn a_device_bundle_carries_its_secrets() {
    let bus = thymis_fleet_tests::SystemBus::start().expect("bus");
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device_on_bus("d1", "alpha", true, Some(&bus)).expect("device");
    f.wait_online("d1");
    let (code, t) = f.deploy_wait(&["--device", "d1", "-m", "first"]);
    assert_eq!(code, 0, "{t}");
    set(&f, "api-token", &["--device", "d1", "--no-deploy"], "token-for-d1");
    let file = f.tmp.path().join("d1.tar");
    let b = f.controller.ctl_json(&["bundle", "--device", "d1", "--out", &file.to_string_lossy()]);
    assert_eq!(b["result"], "succeeded", "{b}");
    let bytes = std::fs::read(&file).expect("bundle");
    assert!(!bytes.windows(12).any(|w| w == b"token-for-d1"), "the bundle holds the secret in clear");
    let out = std::process::Command::new(thymis_fleet_tests::bin("thymisctl"))
        .args(["--json", "install-bundle"])
        .arg(&file)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .output()
        .expect("install");
    assert!(
        out.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        f.diagnostics()
    );
    assert_eq!(on_device(&f, "d1", "api-token"), "400 root root token-for-d1");
}
