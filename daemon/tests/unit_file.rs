//! The plain systemd unit and the NixOS module share one source of truth,
//! `modules/agent-unit.json`: this test fails when the committed unit file drifts from
//! it, or the module stops reading it. Regenerate with `THYMIS_BLESS=1`.

use std::path::PathBuf;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => {
            if *b {
                "yes".into()
            } else {
                "no".into()
            }
        }
        other => other.to_string(),
    }
}

/// The unit file for a non-NixOS machine (the systemd-device tests use it).
fn render(unit: &Value) -> String {
    let list =
        |k: &str| unit[k].as_array().map(|a| a.iter().map(value).collect::<Vec<_>>().join(" ")).unwrap_or_default();
    let mut s = String::from("# Generated from modules/agent-unit.json by daemon/tests/unit_file.rs: do not edit.\n");
    s.push_str(&format!(
        "[Unit]\nDescription={}\nAfter={}\nWants={}\n\n[Service]\n",
        value(&unit["description"]),
        list("after"),
        list("wants")
    ));
    s.push_str("ExecStart=/usr/local/bin/thymis-agent --config /etc/thymis/agent.toml\n");
    if let Some(cfg) = unit["serviceConfig"].as_object() {
        for (k, v) in cfg {
            s.push_str(&format!("{k}={}\n", value(v)));
        }
    }
    s.push_str(&format!("\n[Install]\nWantedBy={}\n", list("wantedBy")));
    s
}

#[test]
fn plain_unit_matches_the_shared_settings() {
    let json = std::fs::read_to_string(root().join("modules/agent-unit.json")).expect("agent-unit.json");
    let unit: Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(unit["serviceConfig"]["Type"], "notify", "the agent reports readiness with sd_notify");
    assert_eq!(unit["restartIfChanged"], false, "activation must not restart the agent mid-deployment");
    let path = root().join("daemon/systemd/thymis-agent.service");
    let rendered = render(&unit);
    if std::env::var_os("THYMIS_BLESS").is_some() {
        std::fs::write(&path, &rendered).expect("write unit");
    }
    let committed = std::fs::read_to_string(&path).expect("unit file");
    assert_eq!(committed, rendered, "daemon/systemd/thymis-agent.service drifted from modules/agent-unit.json");
}

#[test]
fn module_reads_the_shared_settings_and_the_policy_file() {
    let module = std::fs::read_to_string(root().join("modules/agent.nix")).expect("agent.nix");
    assert!(
        module.contains("builtins.fromJSON (builtins.readFile ./agent-unit.json)"),
        "module ignores agent-unit.json"
    );
    assert!(module.contains("unit.serviceConfig"), "module does not use the shared serviceConfig");
    assert!(module.contains("../daemon/dbus/io.thymis.Agent1.conf"), "module does not install the D-Bus policy");
}

#[test]
fn flake_package_points_at_the_workspace_lock_file_and_every_nix_file_parses() {
    let pkg = std::fs::read_to_string(root().join("nix/package.nix")).expect("package.nix");
    assert!(pkg.contains("cargoLock.lockFile = ../Cargo.lock;"), "package.nix does not use the workspace Cargo.lock");
    assert!(root().join("Cargo.lock").exists());
    let lock: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("flake.lock")).expect("flake.lock")).expect("json");
    assert_eq!(lock["nodes"]["nixpkgs"]["locked"]["rev"], "8623c4c20aa4ca2f5fb81510d2944066c3fb0d96");
    let mut files = vec![];
    for dir in ["", "modules", "nix", "tests/nixos", "tests/fixtures/project", "controller/src/starter"] {
        for e in std::fs::read_dir(root().join(dir)).expect("dir").flatten() {
            if e.path().extension().is_some_and(|x| x == "nix") {
                files.push(e.path());
            }
        }
    }
    assert!(files.len() >= 7, "{files:?}");
    for f in files {
        let out =
            std::process::Command::new("nix-instantiate").arg("--parse").arg(&f).output().expect("nix-instantiate");
        assert!(out.status.success(), "{} does not parse: {}", f.display(), String::from_utf8_lossy(&out.stderr));
    }
}
