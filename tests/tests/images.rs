//! Images and bundles from the controller: a device flashed from its image enrolls,
//! reports the image's commit and system before any deployment, and takes deployments;
//! bundles carry a sequence number from the controller's counter.

use std::process::Command;

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions, bin};
use thymis_store::bundle::{self, Target};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_device_flashed_from_its_image_enrolls_reports_the_image_and_takes_deployments() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    let out = f.controller.ctl(&["--json", "device", "add", "fresh", "--config", "alpha"]);
    assert!(out.status.success());
    let set = f.tmp.path().join("image-set");
    let t = f.controller.ctl_json(&["image", "fresh", "--out", &set.to_string_lossy()]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let system = t["system"].as_str().expect("system").to_owned();
    run(Command::new(bin("thymis-imager")).arg("verify").arg(&set));

    // "Flash" it, then give a process device the image's /nix, its agent configuration
    // and its state directory.
    let disk = f.tmp.path().join("disk.img");
    run(Command::new(bin("thymis-imager")).arg("flash").arg(set.join("fresh.img.zst")).arg(&disk));
    let root = format!("{}?offset={}", disk.display(), 65u64 << 20);
    let config = run(Command::new("debugfs").args(["-R", "cat /etc/thymis/agent.toml", &root]));
    assert!(config.contains("enrollment_token"), "{config}");
    f.add_raw_device("fresh", &config, false).expect("device");
    let dev_dir = f.device("fresh").dir.clone();
    std::fs::remove_dir_all(dev_dir.join("nix")).expect("rm");
    std::fs::remove_dir_all(dev_dir.join("state")).expect("rm");
    run(Command::new("debugfs").args(["-R", &format!("rdump /nix {}", dev_dir.display()), &root]));
    let state_parent = f.tmp.path().join("rdump-state");
    std::fs::create_dir_all(&state_parent).expect("mkdir");
    run(Command::new("debugfs").args([
        "-R",
        &format!("rdump /var/lib/thymis-agent {}", state_parent.display()),
        &root,
    ]));
    std::fs::rename(state_parent.join("thymis-agent"), dev_dir.join("state")).expect("state");
    f.device_mut("fresh").start().expect("start");
    f.wait_online("fresh");
    let row = f.device_row("fresh");
    assert_eq!(row["system"], system.as_str(), "a flashed device shows the image's system: {row}");
    assert_eq!(row["commit"], f.controller.project_head().as_str(), "and its commit: {row}");

    // It takes deployments like any device; the image's generation is the rollback point.
    f.set_configs(&json!({ "alpha": { "version": "2" }, "beta": {} })).expect("cfg");
    let t = f.controller.ctl_json(&["deploy", "--device", "fresh", "-m", "v2", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    assert_eq!(f.device("fresh").generations().len(), 2);
    assert_eq!(f.device_row("fresh")["enrolled"], true, "enrolled with the token the image carried");
}

#[test]
fn bundles_from_the_controller_take_the_next_sequence_number() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "--wait"]);
    assert_eq!(t["result"], "succeeded");
    let used = t["children"][0]["sequence"].as_i64().expect("sequence");
    let file = f.tmp.path().join("alpha.tar");
    let b = f.controller.ctl_json(&["bundle", "--config", "alpha", "--out", &file.to_string_lossy()]);
    assert_eq!(b["result"], "succeeded", "{b}");
    let key = |name: &str| -> thymis_store::signing::SecretKey {
        std::fs::read_to_string(f.controller.state_dir.join(name)).expect("key").trim().parse().expect("parse")
    };
    let scratch = tempfile::tempdir().expect("tmp");
    let (m, _) = bundle::read(
        std::fs::File::open(&file).expect("bundle"),
        &[key("identity.key").public()],
        &[key("nix-signing.key").public()],
        scratch.path(),
        |_| Ok(Default::default()),
    )
    .expect("a valid bundle");
    assert_eq!(m.target, Target::Config("alpha".into()));
    assert!(m.sequence as i64 > used, "bundle sequence {} not above the deployment's {used}", m.sequence);
    assert_eq!(m.system.to_string(), b["system"].as_str().expect("system"));
}
