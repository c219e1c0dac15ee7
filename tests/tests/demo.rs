//! The README's first command, `make demo` (scripts/demo.sh): it starts, says where the
//! UI is and what to try, its devices take a deployment and allow a terminal, and
//! SIGTERM stops it cleanly (exit 0, nothing left behind).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_starts_deploys_answers_a_terminal_and_stops_cleanly() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let port = 18_000 + std::process::id() % 1000;
    let mut demo = Command::new("bash")
        .arg(repo.join("scripts/demo.sh"))
        .env("THYMIS_DEMO_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo");
    let out = demo.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut text = String::new();
    let start = Instant::now();
    while !text.contains("stops the demo") {
        match rx.recv_timeout(Duration::from_secs(120).saturating_sub(start.elapsed())) {
            Ok(line) => text.push_str(&format!("{line}\n")),
            Err(_) => panic!("the demo did not start:\n{text}"),
        }
    }
    for what in ["https://127.0.0.1:", "Commit & Deploy", "Canary first", "Stage only", "thymisctl shell"] {
        assert!(text.contains(what), "the demo's instructions do not mention {what:?}:\n{text}");
    }
    let export = text.lines().find(|l| l.trim_start().starts_with("export THYMIS_CONTROLLER=")).expect("export line");
    let env: Vec<(String, String)> = export
        .trim_start()
        .trim_start_matches("export ")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let root = env.iter().find(|(k, _)| k == "THYMIS_CONFIG_DIR").map(|(_, v)| v.clone()).expect("config dir");
    let root = std::path::PathBuf::from(root).parent().expect("demo root").to_owned();
    let ctl = |args: &[&str]| {
        Command::new(thymis_fleet_tests::bin("thymisctl"))
            .args(args)
            .envs(env.iter().cloned())
            .output()
            .expect("thymisctl")
    };

    // Every device online, the systemd one included.
    let start = Instant::now();
    loop {
        let out = ctl(&["--json", "devices"]);
        let devices: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let online = devices.as_array().map_or(0, |d| d.iter().filter(|d| d["online"] == true).count());
        if online == 4 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "the demo's devices did not come online: {devices}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = ctl(&["deploy", "--tag", "demo", "--wait"]);
    assert!(
        out.status.success(),
        "the demo's deployment: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&["shell", "kiosk-1", "--", "uname", "-s"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Linux"),
        "the demo's terminal: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The systemd device has a real journal, which the controller relays.
    let out = ctl(&["logs", "kiosk-4", "-n", "20"]);
    let journal = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && journal.contains("thymis"),
        "kiosk-4's journal: {journal}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The starter's placeholder system has no kernel: its image is made, and says it
    // cannot boot.
    let set = root.join("kiosk-3-image");
    let out = ctl(&["--json", "image", "kiosk-3", "--replace-key", "--out", &set.to_string_lossy()]);
    let task: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("image: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(task["result"], "succeeded", "{task}");
    assert!(task["warning"].as_str().unwrap_or_default().contains("cannot boot"), "{task}");

    // SIGTERM: a clean stop, exit 0, and the demo's directory is gone.
    Command::new("kill").args(["-TERM", &demo.id().to_string()]).status().expect("kill");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = demo.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the demo did not stop");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "the demo ended {status:?} when stopped");
    assert!(!root.exists(), "the demo left {} behind", root.display());
}
