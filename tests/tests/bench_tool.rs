//! `make bench` keeps working: its load generators speak the agent protocol by hand and
//! its clients call the API over the controller's TLS, so a change to either could
//! leave the benchmark hanging or crashing while every other test passes (it did, once:
//! the load generators opened more handshakes from one address than the controller
//! lets one address hold, and the benchmark waited for them without end). A small
//! load-generator run must finish with every copy checked.

use std::process::Command;

#[test]
fn the_load_generator_benchmark_runs_to_the_end_with_every_copy_checked() {
    let devices = 100;
    // Bounded: a benchmark that hangs fails here instead of holding the suite.
    let out = Command::new("timeout")
        .arg("600")
        .arg(env!("CARGO_BIN_EXE_thymis-bench"))
        .env("THYMIS_BENCH_ONLY", "load")
        .env("THYMIS_BENCH_LOAD_DEVICES", devices.to_string())
        .env("THYMIS_BENCH_RUNS", "1")
        .output()
        .expect("thymis-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the benchmark failed:\n{stdout}\n{stderr}");
    let row = stdout.lines().find(|l| l.starts_with(&format!("| {devices} |"))).unwrap_or_default();
    assert!(
        row.contains(&format!("| {devices} of {devices} in ")),
        "not every copy finished and checked:\n{stdout}\n{stderr}"
    );
    assert!(!stderr.contains("failed"), "{stderr}");
}
