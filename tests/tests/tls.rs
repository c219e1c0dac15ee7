//! wss:// end to end: the controller's generated certificate, pinned by the agent
//! through its generated configuration; a wrong pin gets nothing.

use std::time::Duration;

use thymis_fleet_tests::{Fleet, FleetOptions, wait_for};

#[test]
fn deploy_over_wss_with_a_pinned_certificate_and_refuse_a_wrong_pin() {
    let mut f = Fleet::new(FleetOptions { tls: true, ..Default::default() }).expect("fleet");
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
