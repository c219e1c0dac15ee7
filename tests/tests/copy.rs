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

#[test]
fn a_changed_path_goes_as_a_delta_against_the_version_the_device_has() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    let blob = |version: &str| json!({ "alpha": { "version": version, "blob": { "kib": 2048 } }, "beta": {} });
    f.set_configs(&blob("1")).expect("cfg");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "-m", "v1", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}");
    let first = Fleet::child(&t, "d1")["bytes_sent"].as_i64().unwrap_or(0);
    assert!(first > 2_000_000, "2 MiB of incompressible data took {first} bytes");

    // Version 2 changes a few bytes of the 2 MiB path: the device has version 1 of it.
    f.set_configs(&blob("2")).expect("cfg");
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "-m", "v2", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let c = Fleet::child(&t, "d1");
    let second = c["bytes_sent"].as_i64().unwrap_or(0);
    assert!(second < 100_000, "the changed path was sent whole: {second} bytes");
    let (_, stats) = f.controller.api("/stats", None);
    assert!(stats["deltas"].as_u64().unwrap_or(0) >= 1, "{stats}");

    // Version 3's path has its version in its name (a package whose version moved): it
    // still goes as a delta against the device's earlier version of the package.
    f.set_configs(&json!({ "alpha": { "version": "3", "blob": { "kib": 2048, "versioned": true } }, "beta": {} }))
        .expect("cfg");
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "-m", "v3", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let c = Fleet::child(&t, "d1");
    let third = c["bytes_sent"].as_i64().unwrap_or(0);
    assert!(third < 100_000, "a path whose version moved was sent whole: {third} bytes");
    let system = c["system"].as_str().expect("system");
    let blob_path = std::fs::read_to_string(format!("{system}/blob")).expect("blob ref");
    assert!(blob_path.trim().ends_with("-thymis-test-blob-alpha-3"), "{blob_path}");

    // The device holds the new version, byte for byte (its import checked the hash).
    let system = c["system"].as_str().expect("system");
    let blob_path = std::fs::read_to_string(format!("{system}/blob")).expect("blob ref");
    let host = std::fs::read(blob_path.trim()).expect("host blob");
    let on_device = f.device("d1").nix_dir().join(blob_path.trim().trim_start_matches("/nix/"));
    assert_eq!(std::fs::read(&on_device).expect("device blob"), host);
}

/// One large path on a slow link: the copy's progress moves while it streams (in NAR
/// bytes), not only when the device acknowledges a whole path.
#[test]
fn a_large_path_shows_progress_while_it_streams() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    // 4 MiB that do not compress, at 8 Mbit/s: about 4 s for one path.
    f.device("d1").shape("8mbit").expect("tc");
    f.set_configs(&json!({ "alpha": { "version": "2", "blob": { "kib": 4096 } }, "beta": {} })).expect("cfg");
    let out = f.controller.ctl(&["--json", "deploy", "--device", "d1", "-m", "one large path"]);
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let task = t["id"].as_i64().expect("id");
    let mut seen = vec![];
    let done = wait_for("the copy to end", Duration::from_secs(120), || {
        let c = child(&f, task);
        if let (Some(d), Some(t)) = (c["copy"]["nar_bytes_done"].as_u64(), c["copy"]["nar_bytes_total"].as_u64()) {
            seen.push((d, t, c["paths_sent"].as_i64().unwrap_or(0), c["copy"]["bytes_streamed"].as_u64().unwrap_or(0)));
        }
        std::thread::sleep(Duration::from_millis(100));
        (!c["result"].is_null()).then_some(c)
    });
    assert_eq!(done["result"], "succeeded", "{done}\n{}", f.diagnostics());
    assert!(done["copy"].is_null(), "a finished copy still shows live progress: {done}");
    let midway: Vec<_> = seen.iter().filter(|(d, t, ..)| *d > *t / 10 && *d < *t * 9 / 10).collect();
    assert!(
        midway.len() >= 2 && midway.windows(2).any(|w| w[1].0 > w[0].0 && w[1].2 == w[0].2),
        "no progress seen within one path: {seen:?}"
    );
    assert!(seen.iter().all(|(.., streamed)| *streamed <= 6 << 20), "more streamed than the path: {seen:?}");
}

/// A nixpkgs bump: every path of the system rebuilt (new hashes, contents that differ in
/// the store paths they name), a package with a new version in its name, an app with new
/// content. Each device gets every path it has a version of as a delta against its own
/// version (one device on the system before, one on an older one), its store verifies,
/// and the preview said beforehand what each would receive.
#[test]
fn a_rebuilt_system_goes_as_deltas_against_what_each_device_runs() {
    use std::collections::HashSet;
    use thymis_store::StorePath;

    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    // Versions of this run only: every system is built now, from the same host files
    // (the small paths copy documentation files, which change as packages come and go).
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs();
    let version = |v: &str| format!("{v}.{run}");
    let cfg = |v: &str| json!({ "alpha": { "version": version(v), "small": 300, "blob": { "kib": 256, "versioned": true } }, "beta": {} });
    f.set_configs(&cfg("1")).expect("cfg");
    for d in ["d1", "d2"] {
        f.add_device(d, "alpha", true).expect("device");
        f.wait_online(d);
    }
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "--device", "d2", "-m", "v1", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}");
    f.set_configs(&cfg("2")).expect("cfg");
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "-m", "v2", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}");
    let runs: Vec<String> = ["d1", "d2"].iter().map(|d| f.device(d).running_system()).collect();
    assert_ne!(runs[0], runs[1]);

    // Built, v3's deltas are made against both systems the devices run, before any
    // copy asks for them: the preview and the deployment make none.
    f.set_configs(&cfg("3")).expect("cfg");
    assert!(f.controller.ctl(&["project", "commit", "-m", "v3"]).status.success());
    let deltas = || f.controller.api("/stats", None).1["deltas"].as_u64().unwrap_or(0);
    let before = deltas();
    let b = f.controller.ctl_json(&["build", "alpha", "--wait"]);
    assert_eq!(b["result"], "succeeded", "{b}");
    let made = deltas() - before;
    assert!(made > 2 * 300, "the build made {made} deltas");
    let preview = f.controller.ctl_json(&["deploy", "--device", "d1", "--device", "d2", "--dry-run"]);
    let changed = preview["configs"][0]["changed"].as_array().cloned().unwrap_or_default();
    assert!(
        changed.iter().any(|c| c["name"] == "thymis-test-blob-alpha"
            && c["new"] == version("3")
            && (c["old"] == version("2") || c["old"] == version("1"))),
        "the preview does not name the renamed package with both versions: {preview}"
    );
    let link = |f: &Fleet| ["d1", "d2"].map(|d| f.device(d).link_bytes());
    let link_before = link(&f);
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "--device", "d2", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let link_after = link(&f);
    assert_eq!(deltas() - before, made, "deltas were made after the build");
    let new = Fleet::child(&t, "d1")["system"].as_str().expect("system").to_owned();
    let closure = |s: &str| -> Vec<StorePath> {
        let out = std::process::Command::new("nix-store").args(["-qR", s]).output().expect("nix-store -qR");
        String::from_utf8_lossy(&out.stdout).lines().map(|l| l.parse().expect("store path")).collect()
    };
    let new_closure = closure(&new);
    let id = t["id"].as_i64().expect("id");
    let (_, logs) = f.controller.api(&format!("/tasks/{id}/logs"), None);
    for (n, (device, old)) in ["d1", "d2"].iter().zip(&runs).enumerate() {
        // The paths it lacks and, of those, the ones it has a version of (the same name,
        // or the same package with another version).
        let had = closure(old);
        let had_set: HashSet<&StorePath> = had.iter().collect();
        let lacking: Vec<&StorePath> = new_closure.iter().filter(|p| !had_set.contains(p)).collect();
        let names: HashSet<&str> = had.iter().map(|p| p.name()).collect();
        let packages: HashSet<String> = had.iter().map(|p| p.package()).collect();
        let with_base = lacking.iter().filter(|p| names.contains(p.name()) || packages.contains(&p.package())).count();
        assert!(lacking.len() > 300 && with_base == lacking.len(), "{device}: {with_base} of {} paths", lacking.len());
        let said = format!("{device}: sent {} paths in ", lacking.len());
        let line = logs
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["line"].as_str())
            .find(|l| l.starts_with(&said))
            .unwrap_or_else(|| panic!("no line \"{said}...\" in {logs}"));
        assert!(line.ends_with(&format!(", {with_base} of them as deltas against the versions it has")), "{line}");
        // Its store verifies, contents and all.
        let verified = f.device(device).exec("nix-store --verify --check-contents 2>&1 && echo store-verified");
        assert!(verified.contains("store-verified") && !verified.contains("error"), "{device}: {verified}");
        // The preview's figures were what the deployment sent, within 10 %.
        let sent = Fleet::child(&t, device)["bytes_sent"].as_u64().unwrap_or(0);
        let dev =
            preview["devices"].as_array().into_iter().flatten().find(|d| d["device"] == *device).expect("previewed");
        let sends = dev["send_bytes"].as_u64().unwrap_or(0);
        assert_eq!(dev["paths"].as_u64(), Some(lacking.len() as u64), "{dev}");
        assert_eq!(dev["deltas"].as_u64(), Some(with_base as u64), "{dev}");
        assert!(sent.abs_diff(sends) * 10 <= sent, "{device}: the preview said {sends} bytes, it was sent {sent}");
        // Far less than the paths' compressed size: 256 KiB of incompressible data alone.
        assert!(sent < 64 << 10, "{device}: {sent} bytes: {line}");
        // What crosses its link beyond the payload (messages, their framing, TCP) is a
        // few hundred bytes per path: the compact copy names paths by index, where naming
        // each path, its references, base and deployment in full took 1.46 kB per path.
        let wire = link_after[n] - link_before[n];
        let per_path = wire.saturating_sub(sent) / lacking.len() as u64;
        assert!(per_path < 900, "{device}: {wire} bytes on the link for {sent} of payload: {per_path} per path");
    }
}

/// A system the device rolled back from stays in its store, and the deployment that
/// fixes it is mostly that system's versions: they are bases too, though the device
/// runs the system before. Here the fix rebuilds a 256 KiB package under the failed
/// system's name for it: it goes as a delta against the failed system's version.
#[test]
fn the_versions_of_a_system_rolled_back_from_are_bases_for_its_fix() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs();
    let cfg = |v: &str, stamp: &str, fails: bool| {
        json!({ "alpha": {
            "version": format!("{v}.{run}"),
            "blob": { "kib": 256, "versioned": true, "stamp": stamp },
            "activationFails": fails,
        }, "beta": {} })
    };
    f.set_configs(&cfg("1", "", false)).expect("cfg");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "-m", "v1", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}");
    let v1 = f.device("d1").running_system();
    f.set_configs(&cfg("2", "", true)).expect("cfg");
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "-m", "v2", "--wait"]);
    assert_eq!(Fleet::child(&t, "d1")["result"], "rolled-back", "{t}");
    assert_eq!(f.device("d1").running_system(), v1);
    let failed_blob = format!("thymis-test-blob-alpha-2.{run}");
    let kept = f.device("d1").exec(&format!("ls /nix/store | grep -c -- '-{failed_blob}$' || true"));
    assert_eq!(kept.trim(), "1", "the failed system's version is not in the device's store");

    f.set_configs(&cfg("2", "fixed", false)).expect("cfg");
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "-m", "v2 fixed", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let sent = Fleet::child(&t, "d1")["bytes_sent"].as_u64().unwrap_or(0);
    assert!(sent < 64 << 10, "{sent} bytes sent: the rebuilt {failed_blob} went whole, not as a delta");
}
