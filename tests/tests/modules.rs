//! The NixOS modules evaluated with nixpkgs' real module system (`lib.evalModules`),
//! through `tests/nixos/eval-modules.nix`, and docs/nixos.md's examples with them.
//!
//! nixpkgs is not on this machine: the test runs when NIXPKGS_LIB points at a checkout
//! of nixpkgs' lib (nixpkgs itself or nix-community/nixpkgs.lib), and says it skipped
//! otherwise. Without it, `fleet.nix` is still checked for import-from-derivation.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `nix` blocks of docs/nixos.md that follow a `<!-- evaluated: NAME -->` line.
fn doc_examples() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(root().join("docs/nixos.md")).expect("docs/nixos.md");
    let mut out = vec![];
    let mut rest = doc.as_str();
    while let Some(i) = rest.find("<!-- evaluated: ") {
        rest = &rest[i + "<!-- evaluated: ".len()..];
        let name = rest[..rest.find(" -->").expect("marker end")].to_owned();
        let start = rest.find("```nix\n").expect("a nix block after the marker") + "```nix\n".len();
        let len = rest[start..].find("```").expect("block end");
        out.push((name, rest[start..start + len].to_owned()));
        rest = &rest[start + len..];
    }
    out
}

fn eval(expr_file: &Path, args: &[(&str, String)]) -> Result<Value, String> {
    let mut cmd = Command::new("nix-instantiate");
    // Read-write: the generated files (pkgs.formats' stand-in) are written and read back.
    cmd.args(["--read-write-mode", "--eval", "--strict", "--json"]).arg(expr_file);
    for (name, expr) in args {
        cmd.args(["--arg", name, expr]);
    }
    let out = cmd.output().expect("nix-instantiate");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("json"))
}

#[test]
fn modules_evaluate_with_the_real_module_system_and_the_docs_examples_hold() {
    let Ok(lib) = std::env::var("NIXPKGS_LIB") else {
        eprintln!("SKIPPED: NIXPKGS_LIB is not set (a checkout of nixpkgs' lib); the modules were not evaluated");
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let examples = doc_examples();
    assert!(examples.len() >= 2, "docs/nixos.md lost its evaluated examples");
    let mut attrs = String::from("{ ");
    for (name, text) in &examples {
        let f = dir.path().join(format!("{name}.nix"));
        std::fs::write(&f, text).expect("write");
        attrs.push_str(&format!("{name} = {}; ", f.display()));
    }
    attrs.push('}');
    let v = eval(&root().join("tests/nixos/eval-modules.nix"), &[("nixpkgsLib", lib), ("docExamples", attrs)])
        .unwrap_or_else(|e| panic!("the modules do not evaluate:\n{e}"));

    // An agent without enrollment_token_file: the null is left out of its TOML.
    let toml = &v["agentTomlWithoutToken"];
    assert_eq!(toml["controller_url"], "wss://c.example/agent/v1", "{toml}");
    assert_eq!(toml["terminal"], false, "the terminal is off unless enabled: {toml}");
    assert_eq!(v["agentTomlWithTerminal"]["terminal"], true);
    assert_eq!(v["agentTomlWithTerminal"]["substituters"], serde_json::json!(["http://cache.site.example"]));
    assert_eq!(toml["substituters"], serde_json::json!([]), "{toml}");
    assert!(toml.get("enrollment_token_file").is_none(), "{toml}");
    // A generation that hangs resets by itself, unless turned off (docs/agent.md).
    let hang = &v["agentHangProtection"];
    assert_eq!(hang["kernelParams"], serde_json::json!(["panic=10", "boot.panic_on_fail"]), "{hang}");
    assert_eq!(hang["watchdog"], "30s", "{hang}");
    let off = &v["agentHangProtectionOff"];
    assert_eq!((&off["kernelParams"], &off["watchdog"]), (&serde_json::json!([]), &Value::Null), "{off}");
    // GRUB (NixOS's default loader) keeps 100 generations; no EFI variables by default.
    assert_eq!(hang["toml"]["configuration_limit"], 100, "{hang}");
    assert_eq!(hang["toml"]["can_touch_efi_variables"], false, "{hang}");
    let sb = &v["agentSystemdBoot"];
    assert_eq!(
        (&sb["configuration_limit"], &sb["can_touch_efi_variables"]),
        (&serde_json::json!(5), &Value::Bool(true)),
        "{sb}"
    );
    // The package defaults to pkgs.thymis; arguments escaped for systemd.
    let exec = v["agentExecStart"].as_str().unwrap_or_default();
    assert!(
        exec.starts_with("\"/nix/store/00000000000000000000000000000000-thymis/bin/thymis-agent\" \"--config\""),
        "{exec}"
    );
    // The state directory follows state_dir.
    let checks = &v["agentHealthChecks"];
    assert_eq!(checks["thymis/health-checks/deadline"], "30", "{checks}");
    assert!(
        checks["thymis/health-checks/required.d/page"].as_str().unwrap_or_default().contains("curl -fsS"),
        "{checks}"
    );
    assert_eq!(checks["thymis/health-checks/required.d/page.timeout"], "60", "{checks}");
    assert_eq!(checks["thymis/health-checks/wanted.d/sensor.timeout"], "5", "{checks}");
    assert!(checks.get("thymis/health-checks/required.d/sensor").is_none(), "a wanted check is not required: {checks}");
    assert_eq!(v["agentNoHealthChecks"], serde_json::json!({}), "no checks, no files");
    // A hold group reaches the agent and the bus policy (docs/agent.md, "Holds").
    let hold = &v["agentHoldGroup"];
    assert_eq!(hold["toml"]["hold_group"], "kiosk", "{hold}");
    let policies = hold["policies"].as_array().cloned().unwrap_or_default();
    assert_eq!(policies.len(), 2, "{hold}");
    let group = policies[1].as_str().unwrap_or_default();
    assert!(group.contains(r#"<policy group="kiosk">"#) && group.contains(r#"send_member="Hold""#), "{group}");
    assert_eq!(v["agentNoHoldGroupPolicies"], 1, "no hold group, no policy for one");
    assert_eq!(v["agentSecretPath"], "/run/thymis/secrets/wifi-psk");
    assert_eq!(v["agentSecretPathElsewhere"], "/run/keys/token");
    assert_eq!(v["agentSecretUsers"], serde_json::json!(["kiosk.service", "wpa_supplicant.service"]));
    assert_eq!(v["agentNoSecretUsers"], serde_json::json!([]));
    assert_eq!(v["agentStateDirectory"], "fleet");
    assert_eq!(v["agentElsewhere"]["hasStateDirectory"], false);
    assert_eq!(v["agentElsewhere"]["tmpfiles"][0], "d /data/thymis 0700 root root -");
    // nixosModules.default and .agent together: one package, the flake's.
    assert!(v["bothFlakeModules"].as_str().unwrap_or_default().contains("-thymis-flake/bin/thymis-agent"), "{v}");
    // Flags through settings: a flag alone, or nothing (TLS unless asked otherwise).
    let plain = v["controllerPlain"].as_str().unwrap_or_default();
    assert!(plain.contains("\"--insecure-plain-http\" \"--parallel\" \"20\""), "{plain}");
    assert!(!v["controllerDefault"].as_str().unwrap_or_default().contains("plain"), "{v}");
    // A PostgreSQL database, its password from an environment file out of the store: the
    // URL goes in the environment, which the file's THYMIS_DATABASE overrides (a
    // command-line --database would override the file).
    let pg = &v["controllerPostgres"];
    assert!(!pg["execStart"].as_str().unwrap_or_default().contains("--database"), "{pg}");
    assert_eq!(
        pg["environment"]["THYMIS_DATABASE"],
        "postgres://thymis@db.example/thymis?sslmode=verify-full&sslrootcert=/etc/db-ca.pem",
        "{pg}"
    );
    assert_eq!(pg["environmentFile"], "/run/secrets/thymis.env");
    // A server over the network only with verified TLS; a local socket needs none.
    let plain = v["controllerPostgresPlain"][0].as_str().unwrap_or_default();
    assert!(plain.contains("db.example") && plain.contains("sslmode=verify-full"), "{v}");
    assert_eq!(v["controllerPostgresTls"], serde_json::json!([]));
    assert_eq!(v["controllerPostgresLocal"], serde_json::json!([]));
    // systemd must not expand % or $ in an argument.
    assert!(v["controllerEscaped"].as_str().unwrap_or_default().ends_with("\"wss://x.example/%%h/$$HOME\""), "{v}");
    // openFirewall on a loopback-only listen is refused; on all addresses it opens the port.
    let refused = v["controllerFirewallOnLoopback"][0].as_str().unwrap_or_default();
    assert!(refused.contains("listens on 127.0.0.1:8443 only"), "{v}");
    assert_eq!(v["controllerFirewallOnAll"]["failed"], serde_json::json!([]));
    assert_eq!(v["controllerFirewallOnAll"]["ports"], serde_json::json!([8443]));
    // nginx speaks TLS to the controller unless it serves plain HTTP; agents behind nginx
    // reach wss://HOSTNAME and check its certificate with the device's CA bundle.
    assert_eq!(v["nginx"]["proxyPass"], "https://127.0.0.1:8443");
    assert_eq!(v["nginxPlain"], "http://127.0.0.1:8443");
    let exec = v["nginx"]["execStart"].as_str().unwrap_or_default();
    assert!(exec.contains("\"--public-url\" \"wss://t.example\""), "{exec}");
    assert!(exec.contains("\"--agent-ca-file\" \"/etc/ssl/certs/ca-certificates.crt\""), "{exec}");
    // nginx on the same machine names the client in X-Forwarded-For, which is believed from it alone.
    assert!(exec.contains("\"--trusted-proxy\" \"127.0.0.1\" \"--trusted-proxy\" \"::1\""), "{exec}");
    // docs/nixos.md: each example passes every assertion (ACME's included).
    for (name, _) in &examples {
        let e = &v["docExamples"][name];
        assert_eq!(e["failed"], serde_json::json!([]), "docs/nixos.md example {name}: {e}");
        assert!(!e["units"].as_array().map(Vec::is_empty).unwrap_or(true), "example {name} runs nothing: {e}");
    }
    assert_eq!(v["docExamples"]["secrets"]["agentBefore"], serde_json::json!(["kiosk.service"]));
}

/// fleet.nix imports no file built at evaluation time (refused where IFD is off, as on
/// Hydra): its device module is a file of the repository.
#[test]
fn the_fleet_vm_test_imports_no_derivation() {
    let text = std::fs::read_to_string(root().join("tests/nixos/fleet.nix")).expect("fleet.nix");
    for (i, line) in text.lines().enumerate() {
        let l = line.trim_start();
        if l.starts_with('#') {
            continue;
        }
        // An `import` of something `pkgs.write*` made is the only way IFD got in here.
        if let Some(rest) = l.split("(import ").nth(1) {
            let name = rest.split([' ', ')']).next().unwrap_or_default();
            assert!(
                !text.contains(&format!("{name} = pkgs.write")),
                "fleet.nix:{}: `import {name}` reads a file built at evaluation time",
                i + 1
            );
        }
    }
}
