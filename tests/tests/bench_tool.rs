//! `make bench` keeps working: its load generators speak the agent protocol by hand and
//! its clients call the API over the controller's TLS, so a change to either could
//! leave the benchmark hanging or crashing while every other test passes (it did, once:
//! the load generators opened more handshakes from one address than the controller
//! lets one address hold, and the benchmark waited for them without end). A small
//! load-generator run must finish with every copy checked, and the site-cache run must
//! take every path from the cache.

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

/// The site-cache comparison with load generators: with the cache, the controller counts
/// every path as substituted and sends none; without it, it sends them all.
#[test]
fn the_site_cache_benchmark_moves_every_path_through_the_cache() {
    let devices = 10;
    let out = Command::new("timeout")
        .arg("600")
        .arg(env!("CARGO_BIN_EXE_thymis-bench"))
        .env("THYMIS_BENCH_ONLY", "loadcache")
        .env("THYMIS_BENCH_CACHE_DEVICES", devices.to_string())
        .output()
        .expect("thymis-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the benchmark failed:\n{stdout}\n{stderr}");
    let row = |name: &str| {
        let r = stdout.lines().find(|l| l.starts_with(&format!("| {name} |"))).unwrap_or_default();
        r.split('|').map(str::trim).map(str::to_owned).collect::<Vec<_>>()
    };
    let (alone, cached) = (row("controller alone"), row("controller + site cache"));
    // | name | devices | done | sent | from the cache | cpu |
    assert!(alone.len() > 5 && cached.len() > 5, "{stdout}\n{stderr}");
    let all_done = format!("{devices} of {devices} in ");
    assert!(alone[3].starts_with(&all_done) && cached[3].starts_with(&all_done), "{stdout}\n{stderr}");
    assert!(alone[5].ends_with("(0 paths)") && !alone[4].ends_with("(0 paths)"), "{stdout}");
    assert!(cached[4] == "0.0 kB (0 paths)" && !cached[5].ends_with("(0 paths)"), "{stdout}");
    assert!(!stderr.contains("failed"), "{stderr}");
}
