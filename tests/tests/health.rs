//! Health checks that ship with a configuration (docs/agent.md, "Health checks"): a
//! system that activates cleanly but whose required check keeps failing is rolled back
//! with its check's name and output; a failing wanted check is named while the system
//! stays; a check that hangs is killed at its timeout; one that passes after a few
//! seconds (a service coming up) lets the deployment succeed.

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions};

fn deploy(f: &Fleet, args: &[&str]) -> (i32, serde_json::Value) {
    f.deploy_wait(args)
}

#[test]
fn required_checks_roll_back_wanted_ones_are_named_and_hung_ones_are_killed() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("h1", "alpha", true).expect("device");
    f.wait_online("h1");
    let (code, first) = deploy(&f, &["--device", "h1"]);
    assert_eq!(code, 0, "{first}\n{}", f.diagnostics());
    let good = Fleet::child(&first, "h1")["system"].as_str().expect("system").to_owned();

    // Activation succeeds, the application does not: a required check fails until its
    // deadline, and the device goes back.
    f.set_configs(&json!({
        "alpha": { "version": "2", "units": ["web.service"], "healthChecks": {
            "required": { "kiosk-page": "echo 'the kiosk page is blank'; exit 1" },
            "deadline": 4
        } },
        "beta": { "version": "1" }
    }))
    .expect("configs");
    let (code, bad) = deploy(&f, &["--device", "h1", "-m", "a blank kiosk"]);
    assert_eq!(code, 2, "a rolled-back deployment must not exit 0: {bad}");
    let child = Fleet::child(&bad, "h1");
    assert_eq!(child["result"], "rolled-back", "{child}\n{}", f.diagnostics());
    assert_eq!(child["reason"], "health-check-failed", "{child}");
    let error = child["error"].as_str().unwrap_or_default();
    assert!(error.contains("kiosk-page") && error.contains("the kiosk page is blank"), "{child}");
    let dev = f.device("h1");
    assert_eq!(dev.running_system(), good, "not back on the previous system");
    assert_eq!(dev.units(), "web.service=alpha-1", "the previous generation's state was not restored");
    let logs = f.controller.task_logs(child["id"].as_i64().expect("child id")).join("\n");
    assert!(logs.contains("health check kiosk-page failed"), "{logs}");

    // A check that hangs is killed at its timeout and counts as failed.
    f.set_configs(&json!({
        "alpha": { "version": "3", "units": ["web.service"], "healthChecks": {
            "required": { "hangs": "sleep 1000" },
            "timeouts": { "hangs": 1 },
            "deadline": 2
        } },
        "beta": { "version": "1" }
    }))
    .expect("configs");
    let started = std::time::Instant::now();
    let (code, hung) = deploy(&f, &["--device", "h1", "-m", "a check that hangs"]);
    assert_eq!(code, 2, "{hung}");
    let child = Fleet::child(&hung, "h1");
    assert_eq!(child["reason"], "health-check-failed", "{child}\n{}", f.diagnostics());
    assert!(child["error"].as_str().unwrap_or_default().contains("timed out"), "{child}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "the hung check held the deployment");
    assert_eq!(f.device("h1").running_system(), good);

    // A wanted check that fails is named; the new system stays. A required one that
    // passes only once its service is up (the second run) holds nothing back.
    f.set_configs(&json!({
        "alpha": { "version": "4", "units": ["web.service"], "healthChecks": {
            "required": { "comes-up": "[ -e /run/thymis-test/up ] || { touch /run/thymis-test/up; exit 1; }" },
            "wanted": { "sensor": "echo 'no reading' >&2; exit 1" },
            "deadline": 6
        } },
        "beta": { "version": "1" }
    }))
    .expect("configs");
    let (code, done) = deploy(&f, &["--device", "h1", "-m", "the sensor is flaky"]);
    assert_eq!(code, 0, "a deployment whose wanted checks failed succeeded: {done}");
    let child = Fleet::child(&done, "h1");
    assert_eq!(child["result"], "succeeded-with-failed-checks", "{child}\n{}", f.diagnostics());
    assert_eq!(child["failed_checks"], json!(["sensor"]), "{child}");
    let new = child["system"].as_str().expect("system").to_owned();
    assert_ne!(new, good);
    assert_eq!(f.device("h1").running_system(), new);
    assert_eq!(f.device("h1").profile_system().as_deref(), Some(new.as_str()), "the new system was not kept");
    let human = f.controller.ctl(&["task", &done["id"].to_string()]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("failed health checks: sensor"), "{text}");
}
