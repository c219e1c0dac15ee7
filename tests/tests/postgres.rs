//! The controller on PostgreSQL (`--database postgres://...`), a real server from
//! Debian's packages started by the harness: deployments, a database server that
//! restarts under a running controller, and one that cannot be reached. The deploy,
//! rollout and fault suites also run on PostgreSQL in `make test`
//! (`THYMIS_TEST_DATABASE=postgres`).

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions, bin};

fn deploy(f: &Fleet, message: &str) -> serde_json::Value {
    let out = f.controller.ctl(&["--json", "deploy", "--wait", "--device", "d1", "-m", message]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("deploy: {e}: {}\n{}", String::from_utf8_lossy(&out.stderr), f.diagnostics()))
}

#[test]
fn a_controller_on_postgresql_deploys_and_rides_out_a_database_restart() {
    let mut f = Fleet::new(FleetOptions { postgres: true, ..Default::default() }).expect("fleet");
    assert!(!f.controller.state_dir.join("db.sqlite").exists(), "the controller made an SQLite database");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let first = deploy(&f, "v1");
    assert_eq!(Fleet::child(&first, "d1")["result"], "succeeded", "{first}\n{}", f.diagnostics());
    let pg = f.postgres.as_ref().expect("postgres");
    let stored = pg.psql("thymis", "SELECT result FROM children ORDER BY id").expect("psql");
    assert_eq!(stored, "succeeded", "the deployment is not in PostgreSQL");

    // The server goes away: requests fail with an error that says so, nothing panics.
    f.postgres.as_mut().expect("postgres").kill();
    let (status, body) = f.controller.api("/devices", None);
    assert_eq!(status, 503, "{body}");
    assert!(body.to_string().contains("PostgreSQL"), "the error does not name the database: {body}");

    // Back: the controller reconnects by itself, its data is all there, and the next
    // deployment takes the next offer sequence.
    f.postgres.as_mut().expect("postgres").restart().expect("restart");
    f.set_configs(&json!({ "alpha": { "version": "2" }, "beta": {} })).expect("cfg");
    let second = deploy(&f, "v2");
    let child = Fleet::child(&second, "d1");
    assert_eq!(child["result"], "succeeded", "{second}\n{}", f.diagnostics());
    let (first_seq, second_seq) = (Fleet::child(&first, "d1")["sequence"].as_i64(), child["sequence"].as_i64());
    assert!(second_seq > first_seq, "sequence {second_seq:?} after {first_seq:?}");
    let tasks = f.controller.ctl_json(&["tasks"]);
    assert_eq!(tasks.as_array().map(Vec::len), Some(2), "{tasks}");
}

#[test]
fn a_database_that_cannot_be_reached_is_a_clear_error_at_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = std::process::Command::new(bin("thymis-controller"))
        .arg("--state-dir")
        .arg(tmp.path())
        .args(["--listen", "127.0.0.1:0", "--database", "postgres://thymis:hunter2@127.0.0.1:1/fleet"])
        .output()
        .expect("controller");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("connecting to PostgreSQL at postgres://thymis@127.0.0.1:1/fleet"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password was printed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
