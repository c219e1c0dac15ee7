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

/// A PostgreSQL server over the network (here the fleet's host address, not loopback)
/// only over TLS checked against its CA: without `sslmode=verify-full` the controller
/// refuses to start and says what to add; with another CA it refuses the server's
/// certificate; with its CA it runs, and its connections to the server are encrypted.
#[test]
fn a_remote_postgresql_server_is_reached_only_over_verified_tls() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    let host = f.host_address();
    let mut pg = thymis_fleet_tests::postgres::Postgres::start().expect("postgres");
    let ca = pg.serve_tls(&host).expect("tls");
    pg.psql("postgres", "CREATE DATABASE thymis").expect("database");
    let url = format!("postgres://postgres@{host}:{}/thymis", pg.port);
    let starts = |database: &str| {
        let state = tempfile::tempdir().expect("tmp");
        std::process::Command::new(bin("thymis-controller"))
            .arg("--state-dir")
            .arg(state.path())
            .args(["--listen", "127.0.0.1:0", "--database", database])
            .output()
            .expect("thymis-controller")
    };
    let out = starts(&url);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("sslmode=verify-full"), "{err}");
    let other_ca = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(other_ca.path(), std::fs::read(f.controller.state_dir.join("tls.crt")).expect("cert"))
        .expect("write");
    let out = starts(&format!("{url}?sslmode=verify-full&sslrootcert={}", other_ca.path().display()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.to_lowercase().contains("certificate"), "{err}");

    let verified = format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
    f.controller.restart_with(vec!["--database".into(), verified]).expect("controller on PostgreSQL over TLS");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let t = deploy(&f, "v1");
    assert_eq!(Fleet::child(&t, "d1")["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let ssl = pg
        .psql("postgres", &format!("SELECT DISTINCT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.client_addr = '{host}'"))
        .expect("psql");
    assert_eq!(ssl.trim(), "t", "the controller's connections are not encrypted: {ssl:?}");
}
