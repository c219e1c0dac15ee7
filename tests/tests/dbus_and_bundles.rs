//! The agent on a real system-like D-Bus daemon with its policy, and offline bundles
//! installed through it.

use std::time::Duration;

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions, SystemBus, wait_for};
use thymis_store::bundle::{self, Manifest, Target};
use thymis_store::closure::sort_dependencies_first;
use thymis_store::local_store::LocalStore;
use thymis_store::signing::SecretKey;

const DEST: &str = "io.thymis.Agent1";
const PATH: &str = "/io/thymis/Agent1";

fn prop(bus: &SystemBus, name: &str) -> String {
    let (ok, out) = bus.busctl(&["get-property", DEST, PATH, DEST, name]);
    assert!(ok, "get-property {name}: {out}");
    // `s "value"` or `b true`
    out.trim().split_once(' ').map(|(_, v)| v.trim_matches('"').to_owned()).unwrap_or_default()
}

#[test]
fn dbus_properties_follow_a_deployment_and_methods_are_root_only() {
    let bus = SystemBus::start().expect("bus");
    let mut f = Fleet::new(FleetOptions { confirm_timeout: 20, ..Default::default() }).expect("fleet");
    f.add_device_on_bus("d1", "alpha", true, Some(&bus)).expect("device");
    f.wait_online("d1");
    wait_for("the agent on the bus", Duration::from_secs(20), || {
        bus.busctl(&["introspect", DEST, PATH]).0.then_some(())
    });
    let (_, intro) = bus.busctl(&["introspect", DEST, PATH]);
    for member in [
        ".State",
        ".CurrentSystem",
        ".PreviousSystem",
        ".ControllerConnected",
        ".Rollback",
        ".InstallBundle",
        ".DeploymentFinished",
        ".LastDeployment",
        ".Progress",
        ".CurrentCommit",
    ] {
        assert!(intro.contains(member), "{member} missing from:\n{intro}");
    }
    assert_eq!(prop(&bus, "State"), "idle");
    assert_eq!(prop(&bus, "ControllerConnected"), "true");

    f.set_configs(&json!({ "alpha": { "version": "2", "delay": 3 }, "beta": { "version": "1" } })).expect("cfg");
    let out = f.controller.ctl(&["--json", "deploy", "--device", "d1", "-m", "slow"]);
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = task["id"].as_i64().expect("id");
    // During the deployment, the state says so.
    let seen = wait_for("State activating", Duration::from_secs(60), || {
        let s = prop(&bus, "State");
        matches!(s.as_str(), "activating" | "awaiting-confirmation").then_some(s)
    });
    assert!(!seen.is_empty());
    let t = f.wait_task(id, Duration::from_secs(60));
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let system = Fleet::child(&t, "d1")["system"].as_str().expect("system").to_owned();
    wait_for("State idle", Duration::from_secs(20), || (prop(&bus, "State") == "idle").then_some(()));
    assert_eq!(prop(&bus, "CurrentSystem"), system);
    assert_eq!(prop(&bus, "CurrentCommit"), t["commit"].as_str().expect("commit"));

    // thymisctl status reads the same over the bus.
    let out = std::process::Command::new(thymis_fleet_tests::bin("thymisctl"))
        .args(["--json", "status"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .output()
        .expect("thymisctl status");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(st["CurrentSystem"], system.as_str(), "{st}");
    assert_eq!(st["LastDeployment"]["result"], "succeeded", "{st}");

    // Anyone may read; only root may call methods.
    let nobody = Some(65534);
    let (ok, out) = bus.busctl_as(nobody, &["get-property", DEST, PATH, DEST, "State"]);
    assert!(ok, "an unprivileged reader was refused: {out}");
    let (ok, out) = bus.busctl_as(nobody, &["call", DEST, PATH, DEST, "Rollback"]);
    assert!(!ok && out.to_lowercase().contains("access denied"), "unprivileged Rollback: {out}");
    // Root may call it; with nothing pending it says so.
    let (ok, out) = bus.busctl(&["call", DEST, PATH, DEST, "Rollback"]);
    assert!(!ok && out.contains("nothing to roll back"), "{out}");
}

/// Writes a bundle of `system` signed with the controller's keys (as the controller's
/// "download bundle" will).
fn make_bundle(
    f: &Fleet,
    system: &str,
    target: Target,
    sequence: u64,
    identity: Option<&SecretKey>,
) -> std::path::PathBuf {
    let read_key = |file: &str| -> SecretKey {
        std::fs::read_to_string(f.controller.state_dir.join(file)).expect("key").trim().parse().expect("key parses")
    };
    let nix_key = read_key("nix-signing.key");
    let identity = identity.cloned().unwrap_or_else(|| read_key("identity.key"));
    let system: thymis_store::StorePath = system.parse().expect("path");
    let store = LocalStore::system();
    let mut infos =
        sort_dependencies_first(store.path_infos(std::slice::from_ref(&system), true).expect("infos")).expect("sort");
    for i in &mut infos {
        nix_key.sign_path(i);
    }
    let manifest = Manifest {
        format: 0,
        target,
        system,
        commit: None,
        sequence,
        expires: None,
        created: 1_800_000_000,
        paths: vec![],
        secrets: None,
    };
    let file = f.tmp.path().join(format!("bundle-{sequence}.tar"));
    let out = std::fs::File::create(&file).expect("create");
    bundle::write(out, manifest, &identity, &store, &infos, f.tmp.path()).expect("write bundle");
    file
}

fn install(bus: &SystemBus, file: &std::path::Path) -> (i32, String) {
    let out = std::process::Command::new(thymis_fleet_tests::bin("thymisctl"))
        .args(["--json", "install-bundle"])
        .arg(file)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .output()
        .expect("thymisctl install-bundle");
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn offline_bundles_install_roll_back_and_refuse_replays_and_foreign_signatures() {
    let bus = SystemBus::start().expect("bus");
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device_on_bus("d1", "alpha", true, Some(&bus)).expect("device");
    f.wait_online("d1");
    // Build v2 and a broken v3 on the controller (no deployment), then go air-gapped.
    let build = |f: &Fleet, cfg: serde_json::Value, msg: &str| -> String {
        f.set_configs(&cfg).expect("cfg");
        assert!(f.controller.ctl(&["project", "commit", "-m", msg]).status.success());
        let t = f.controller.ctl_json(&["build", "alpha", "--wait"]);
        assert_eq!(t["result"], "succeeded", "{t}");
        t["system"].as_str().expect("system").to_owned()
    };
    let v2 = build(&f, json!({ "alpha": { "version": "2", "units": ["web.service"] }, "beta": {} }), "v2");
    let broken = build(&f, json!({ "alpha": { "version": "3", "activationFails": true }, "beta": {} }), "v3");
    wait_for("the agent on the bus", Duration::from_secs(20), || {
        bus.busctl(&["introspect", DEST, PATH]).0.then_some(())
    });
    f.controller.kill();

    let good = make_bundle(&f, &v2, Target::Device("d1".into()), 100, None);
    let (code, out) = install(&bus, &good);
    assert_eq!(code, 0, "{out}\n{}", f.diagnostics());
    assert!(out.contains("\"succeeded\""), "{out}");
    let dev = f.device("d1");
    assert_eq!(dev.profile_system().as_deref(), Some(v2.as_str()));
    assert_eq!(dev.running_system(), v2);
    assert_eq!(dev.units(), "web.service=alpha-2");

    // The same bundle again: its sequence is not above the last applied.
    let (code, out) = install(&bus, &good);
    assert_ne!(code, 0);
    assert!(out.contains("not above the last applied"), "{out}");

    // Signed by a key the device does not pin.
    let stranger = SecretKey::generate("thymis-controller-1").expect("key");
    let foreign = make_bundle(&f, &v2, Target::Device("d1".into()), 200, Some(&stranger));
    let (code, out) = install(&bus, &foreign);
    assert_ne!(code, 0);
    assert!(out.contains("not signed by a trusted controller identity key"), "{out}");

    // For another device.
    let other = make_bundle(&f, &v2, Target::Device("d2".into()), 300, None);
    let (code, out) = install(&bus, &other);
    assert_ne!(code, 0);
    assert!(out.contains("bundle is for"), "{out}");

    // A bundle (for the configuration) whose activation fails rolls back.
    let bad = make_bundle(&f, &broken, Target::Config("alpha".into()), 400, None);
    let (code, out) = install(&bus, &bad);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("rolled-back") && out.contains("activation-failed"), "{out}");
    let dev = f.device("d1");
    assert_eq!(dev.profile_system().as_deref(), Some(v2.as_str()));
    assert_eq!(dev.running_system(), v2);
}
