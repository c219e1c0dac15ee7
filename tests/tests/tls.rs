//! TLS from the first start: the controller's generated certificate, pinned by the agent
//! through its generated configuration (a wrong pin gets nothing) and by thymisctl at its
//! first use or at `thymisctl login`; plain HTTP only when asked for, with a warning.

use std::process::{Command, Output};
use std::time::Duration;

use thymis_fleet_tests::{Fleet, FleetOptions, bin, wait_for};

#[test]
fn deploy_over_wss_with_a_pinned_certificate_and_refuse_a_wrong_pin() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", false).expect("device");
    let config = std::fs::read_to_string(f.device("d1").dir.join("agent.toml")).expect("config");
    assert!(config.contains("controller_url = \"wss://"), "{config}");
    assert!(config.contains("controller_tls_sha256 = "), "{config}");
    assert!(!config.contains("allow_insecure_transport"), "{config}");
    f.device_mut("d1").start().expect("start");
    f.wait_online("d1");
    let out = f.controller.ctl(&["--json", "deploy", "--device", "d1", "--wait"]);
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());

    // Another device whose pin is wrong: the TLS handshake fails, its token stays unused.
    f.add_device("d2", "alpha", false).expect("device");
    let path = f.device("d2").dir.join("agent.toml");
    let text: String = std::fs::read_to_string(&path)
        .expect("config")
        .lines()
        .map(|l| {
            if l.starts_with("controller_tls_sha256") {
                format!("controller_tls_sha256 = \"{}\"", "ab".repeat(32))
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&path, text + "\n").expect("write");
    f.device_mut("d2").start().expect("start");
    wait_for("the pin mismatch", Duration::from_secs(30), || {
        f.device("d2").log().contains("does not match controller_tls_sha256").then_some(())
    });
    assert_eq!(f.device_row("d2")["enrolled"], false);
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The pin a generated agent configuration carries.
fn agent_pin(f: &Fleet, device: &str) -> String {
    let config = std::fs::read_to_string(f.device(device).dir.join("agent.toml")).expect("config");
    let line = config.lines().find(|l| l.starts_with("controller_tls_sha256")).expect("a pin").to_owned();
    line.split('"').nth(1).expect("quoted").to_owned()
}

/// The certificates the controller said it serves, in order.
fn logged_pins(f: &Fleet) -> Vec<String> {
    let log = f.controller.log();
    log.split("(certificate sha256 ").skip(1).map(|s| s.chars().take(64).collect()).collect()
}

#[test]
fn a_controller_started_without_flags_serves_only_tls_and_thymisctl_pins_it() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", false).expect("device");
    let pin = agent_pin(&f, "d1");
    // The controller says which certificate it serves, for people to compare.
    assert_eq!(logged_pins(&f), std::slice::from_ref(&pin), "{}", f.controller.log());
    // Nothing answers in the clear.
    let plain = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"])
        .arg(format!("http://{}/healthz", f.controller.listen))
        .output()
        .expect("curl");
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200", "plain HTTP was served");

    // thymisctl's first use pinned what the agent pins (the harness's first call was
    // `device add`), and said so once.
    let pins = std::fs::read_to_string(f.controller.thymisctl_config_dir().join("known-controllers")).expect("pins");
    assert!(pins.contains(&format!("https://{} {pin}", f.controller.listen)), "{pins}");
    let again = f.controller.ctl(&["devices"]);
    assert!(again.status.success() && !stderr(&again).contains("first use"), "{}", stderr(&again));

    // The certificate is replaced (or someone is in between): thymisctl refuses and says
    // what it saw; a login with a wrong fingerprint pins nothing; the right one goes on.
    std::fs::remove_file(f.controller.state_dir.join("tls.crt")).expect("rm crt");
    std::fs::remove_file(f.controller.state_dir.join("tls.key")).expect("rm key");
    f.controller.restart().expect("restart");
    let new_pin = logged_pins(&f).last().cloned().expect("the new certificate in the log");
    assert_ne!(new_pin, pin);
    let refused = f.controller.ctl(&["devices"]);
    assert!(!refused.status.success());
    let err = stderr(&refused);
    assert!(err.contains(&new_pin) && err.contains(&pin) && err.contains("thymisctl login"), "{err}");

    let url = f.controller.base_url();
    let login = |extra: &[&str]| {
        Command::new(bin("thymisctl"))
            .args(["login", &url])
            .args(extra)
            .env("THYMIS_CONFIG_DIR", f.controller.thymisctl_config_dir())
            .output()
            .expect("thymisctl login")
    };
    let wrong = login(&["--fingerprint", &"ab".repeat(32)]);
    assert!(!wrong.status.success() && stderr(&wrong).contains("nothing was pinned"), "{}", stderr(&wrong));
    let unasked = login(&[]);
    assert!(!unasked.status.success() && stderr(&unasked).contains(&new_pin), "{}", stderr(&unasked));
    assert!(!f.controller.ctl(&["devices"]).status.success(), "a refused login changed the pin");
    let ok = login(&["--fingerprint", &new_pin.to_uppercase()]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // Logged in: later commands go there without --controller.
    let devices = Command::new(bin("thymisctl"))
        .args(["--json", "devices"])
        .env("THYMIS_CONFIG_DIR", f.controller.thymisctl_config_dir())
        .env("THYMIS_TOKEN", f.controller.token())
        .env_remove("THYMIS_CONTROLLER")
        .output()
        .expect("thymisctl");
    assert!(devices.status.success(), "{}", stderr(&devices));
    assert!(String::from_utf8_lossy(&devices.stdout).contains("\"d1\""));
}

#[test]
fn plain_http_only_when_asked_for_and_never_allowed_by_a_generated_configuration() {
    let mut f = Fleet::new(FleetOptions { tls: false, ..Default::default() }).expect("fleet");
    f.controller.restart().expect("restart");
    let warnings = f.controller.log().matches("serving plain HTTP and ws:// (--insecure-plain-http)").count();
    assert_eq!(warnings, 2, "a warning at every start:\n{}", f.controller.log());

    // The generated configuration names ws:// but does not allow it: an agent started
    // with it as generated refuses to connect and says why.
    let v = f.controller.ctl_json(&["device", "add", "d1", "--config", "alpha"]);
    let generated = v["agent_config"].as_str().expect("agent_config");
    assert!(generated.contains("controller_url = \"ws://"), "{generated}");
    assert!(!generated.lines().any(|l| l.starts_with("allow_insecure_transport")), "{generated}");
    let dir = f.tmp.path().join("as-generated");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("agent.toml"), format!("{generated}state_dir = {:?}\ndbus = false\n", dir.join("state")))
        .expect("write");
    let out = Command::new("timeout")
        .arg("20")
        .arg(bin("thymis-agent"))
        .arg("--config")
        .arg(dir.join("agent.toml"))
        .output()
        .expect("agent");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not encrypted"), "{}", stderr(&out));
    assert_eq!(f.device_row("d1")["enrolled"], false);
}
