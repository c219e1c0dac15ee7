//! After a deployment: a device's page (`thymisctl device show`), its journal
//! (`thymisctl logs`) and a terminal on it (`thymisctl shell`), through the controller,
//! on a systemd device with its real journald, and what is refused.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions, wait_for};

fn text(out: &std::process::Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_systemd_devices_history_journal_and_terminal_reach_the_admin() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    let t = f.systemd_device_with_web_unit("s1", "7").expect("s1 with web.service");

    // The device page: what it runs, and the deployment just made.
    let d = f.controller.ctl_json(&["device", "show", "s1"]);
    assert_eq!(d["online"], true);
    assert_eq!(d["config"], "alpha");
    assert_eq!(d["history"][0]["task"], t["id"]);
    assert_eq!(d["history"][0]["result"], "succeeded");
    assert_eq!(d["history"][0]["commit"], t["commit"]);
    assert_eq!(d["commit"], t["commit"]);
    assert!(d["agent_version"].as_str().is_some_and(|v| !v.is_empty()), "{d}");
    let human = text(&f.controller.ctl(&["device", "show", "s1"])).0;
    assert!(human.contains("succeeded") && human.contains("web up") || human.contains(&t["id"].to_string()), "{human}");

    // The unit's own lines, from the device's journald.
    let out = f.controller.ctl(&["logs", "s1", "-u", "web.service", "-n", "50"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("alpha version 7 is up"), "web.service's line not in:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("thymis-agent"), "-u web.service shows other units' lines:\n{stdout}");
    let out = f.controller.ctl(&["--json", "logs", "s1", "-u", "web.service", "-n", "50"]);
    let entries: Vec<serde_json::Value> =
        text(&out).0.lines().map(|l| serde_json::from_str(l).expect("one JSON entry per line")).collect();
    assert!(entries.iter().any(|e| e["unit"] == "web.service" && e["time_us"].as_u64().is_some()), "{entries:?}");

    // A follow shows a line written after it started, and ends on the device when the
    // client leaves.
    let mut follow = f
        .controller
        .ctl_command(&["logs", "s1", "-f", "-n", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("thymisctl logs -f");
    let lines = BufReader::new(follow.stdout.take().expect("stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let marker = format!("written-after-the-follow-{}", std::process::id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        f.device("s1").exec(&format!("echo {marker} | systemd-cat -t thymis-test"));
        while let Ok(l) = rx.recv_timeout(Duration::from_secs(1)) {
            if l.contains(&marker) {
                seen = true;
                break;
            }
        }
    }
    assert!(seen, "the follow never showed the new line\n{}", f.diagnostics());
    let _ = follow.kill();
    let _ = follow.wait();
    wait_for("journalctl to end on the device", Duration::from_secs(30), || {
        let left = f.device("s1").exec("pgrep -x journalctl || true");
        left.trim().is_empty().then_some(())
    });

    // A command in a terminal: its output and its exit status.
    let out = f.controller.ctl(&["shell", "s1", "--", "systemctl", "is-active", "web.service"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("active"), "{stdout}");
    let out = f.controller.ctl(&["shell", "s1", "--", "systemctl", "is-active", "no-such.service"]);
    assert_eq!(out.status.code(), Some(3), "systemctl's status for an inactive unit: {:?}", text(&out));
    // A login shell reading a script from a pipe.
    let mut sh =
        f.controller.ctl_command(&["shell", "s1"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("shell");
    {
        use std::io::Write;
        let mut stdin = sh.stdin.take().expect("stdin");
        stdin.write_all(b"echo hello-$((40+2)) from $(cat /proc/sys/kernel/hostname)\nexit 7\n").expect("write");
    }
    let out = sh.wait_with_output().expect("shell");
    assert_eq!(out.status.code(), Some(7), "{:?}", text(&out));
    assert!(text(&out).0.contains("hello-42"), "{:?}", text(&out));

    // Every session is a task saying who, where and how it ended.
    let tasks = f.controller.ctl_json(&["tasks"]);
    let terminals: Vec<_> = tasks.as_array().expect("tasks").iter().filter(|t| t["kind"] == "terminal").collect();
    assert_eq!(terminals.len(), 3, "{tasks}");
    assert!(terminals.iter().all(|t| t["state"] == "finished"), "{terminals:?}");
    assert!(
        terminals
            .iter()
            .any(|t| t["result"] == "failed" && t["error"].as_str().is_some_and(|e| e.contains("status 3")))
    );
    assert!(terminals[0]["message"].as_str().is_some_and(|m| m.contains("s1") && m.contains("admin token")));
}

#[test]
fn journal_and_terminal_are_refused_with_a_reason() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("p1", "alpha", true).expect("device");
    f.add_device("p2", "alpha", false).expect("device");
    f.wait_online("p1");
    let fails = |args: &[&str], says: &str| {
        let out = f.controller.ctl(args);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?} succeeded: {stdout}");
        assert!(stderr.contains(says), "{args:?}: {stderr:?} does not say {says:?}");
    };
    fails(&["shell", "p1", "--", "true"], "terminal is disabled on this device");
    fails(&["logs", "p1"], "no journal");
    fails(&["logs", "p2"], "p2 is offline");
    fails(&["shell", "p2"], "p2 is offline");
    fails(&["logs", "nobody"], "no device \"nobody\"");
    fails(&["logs", "p1", "-u", "web;reboot"], "not a systemd unit name");
    fails(&["logs", "p1", "--since", "$(reboot)"], "not a time");
    fails(&["device", "show", "nobody"], "no device");

    // A browser session needs its CSRF token and this controller's origin.
    let c = &f.controller;
    let login = c
        .curl()
        .args(["-s", "-i", "-X", "POST", "-H", "content-type: application/json"])
        .arg("--data")
        .arg(json!({ "token": c.token() }).to_string())
        .arg(format!("{}/ui/login", c.base_url()))
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&login.stdout).into_owned();
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: ").or_else(|| l.strip_prefix("Set-Cookie: ")))
        .and_then(|c| c.split(';').next())
        .expect("session cookie")
        .to_owned();
    let status = |extra: &[&str]| {
        let out = c
            .curl()
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", &format!("cookie: {cookie}")])
            .args(extra)
            .arg(format!("{}/api/v1/devices/p1/journal", c.base_url()))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(status(&[]), "403", "a session's journal request without its CSRF token");
    assert_eq!(status(&["-H", "x-csrf-token: wrong"]), "403");
    let csrf = serde_json::from_str::<serde_json::Value>(head.split("\r\n\r\n").nth(1).unwrap_or("{}"))
        .ok()
        .and_then(|v| v["csrf"].as_str().map(str::to_owned))
        .expect("csrf token in the login answer");
    let with_csrf = format!("x-csrf-token: {csrf}");
    assert_eq!(status(&["-H", &with_csrf, "-H", "origin: https://evil.example"]), "403");
    // Past the session's checks, to the device's own answer: p1 has no journald.
    assert_eq!(status(&["-H", &with_csrf]), "409");

    // The terminal's WebSocket: the token as an offered subprotocol, never in the URL.
    let upgrade = |query: &str, protocols: Option<String>| {
        let mut cmd = c.curl();
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "-H",
            &format!("cookie: {cookie}"),
        ])
        .args(["-H", "connection: Upgrade", "-H", "upgrade: websocket", "-H", "sec-websocket-version: 13"])
        .args(["-H", "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ=="]);
        if let Some(p) = protocols {
            cmd.args(["-H", &format!("sec-websocket-protocol: {p}")]);
        }
        let out = cmd.arg(format!("{}/api/v1/devices/p1/terminal{query}", c.base_url())).output().expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(upgrade(&format!("?csrf={csrf}"), None), "403", "the CSRF token in the URL is not taken");
    assert_eq!(upgrade("", Some("thymis.terminal, csrf.wrong".into())), "403");
    // p1 has `terminal = false`: the device refuses, past the session's checks.
    assert_eq!(upgrade("", Some(format!("thymis.terminal, csrf.{csrf}"))), "409");
}

/// Seconds the device's copy phase took (sampled every 50 ms).
fn copy_seconds(f: &Fleet, task: i64) -> f64 {
    let mut started = None;
    loop {
        let (_, t) = f.controller.api(&format!("/tasks/{task}"), None);
        let c = Fleet::child(&t, "s1");
        match (c["phase"].as_str(), started) {
            (Some("copy"), None) if c["state"] == "running" => started = Some(Instant::now()),
            (Some("activate" | "confirm"), Some(s)) => return s.elapsed().as_secs_f64(),
            _ if !c["result"].is_null() => {
                assert_eq!(c["result"], "succeeded", "{c}\n{}", f.diagnostics());
                return started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_copy_goes_as_fast_while_a_chatty_units_journal_is_followed() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_systemd_device("s1", "alpha", true).expect("systemd device");
    f.wait_online("s1");
    f.device("s1").shape("8mbit").expect("tc");
    // Each deployment brings 24 new paths of 256 KiB of incompressible data: about 6 s.
    let deploy = |payloads: u32| {
        f.set_configs(&json!({ "alpha": { "version": payloads.to_string(), "payloads": payloads }, "beta": {} }))
            .expect("cfg");
        let out = f.controller.ctl(&["--json", "deploy", "--device", "s1", "-m", &format!("{payloads} payloads")]);
        let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let secs = copy_seconds(&f, t["id"].as_i64().expect("id"));
        let done = f.wait_task(t["id"].as_i64().expect("id"), Duration::from_secs(120));
        assert_eq!(done["result"], "succeeded", "{done}");
        secs
    };
    let before = deploy(24);

    // About a thousand lines a second, in bursts, followed through the controller.
    f.device("s1").exec(
        "systemd-run --unit=chatty bash -c 'exec 3<> <(:); while :; do for j in 0 1 2 3 4 5 6 7 8 9; do \
         echo chatty line $((i++)); done; read -t 0.01 -u 3; done'",
    );
    let mut follow = f
        .controller
        .ctl_command(&["logs", "s1", "-u", "chatty.service", "-f", "-n", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("thymisctl logs -f");
    let lines = BufReader::new(follow.stdout.take().expect("stdout"));
    let counted =
        std::thread::spawn(move || lines.lines().map_while(Result::ok).filter(|l| l.contains("chatty line")).count());
    std::thread::sleep(Duration::from_secs(1));
    let during = deploy(48);
    let _ = follow.kill();
    let _ = follow.wait();
    let streamed = counted.join().expect("reader");
    f.device("s1").exec("systemctl stop chatty.service");
    let after = deploy(72);

    let alone = (before + after) / 2.0;
    eprintln!("copy alone {before:.2} s and {after:.2} s; with the journal followed {during:.2} s ({streamed} lines)");
    assert!(streamed > 1_000, "the follow showed {streamed} lines of the chatty unit");
    assert!(during <= alone * 1.10, "the copy took {during:.2} s with a journal followed, {alone:.2} s without");
}

#[test]
fn a_terminal_follows_window_size_changes_and_closes_when_idle() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("p1", "alpha", false).expect("device");
    let config = std::fs::read_to_string(f.device("p1").state_dir().with_file_name("agent.toml")).expect("config");
    assert!(config.contains("# terminal = true"), "the generated configuration does not say how to allow a terminal");
    f.add_agent_config("p1", "terminal = true\nterminal_idle_timeout = 2\n").expect("config");
    f.device_mut("p1").start().expect("start");
    f.wait_online("p1");

    // The size the terminal opened with, then the one the client changes it to.
    let command = serde_json::to_string(&["sh", "-c", "stty size; read x; stty size"]).expect("json");
    let url = format!(
        "{}/api/v1/devices/p1/terminal?cols=80&rows=24&command={}",
        f.controller.base_url().replacen("https://", "wss://", 1),
        command.bytes().map(|b| format!("%{b:02X}")).collect::<String>()
    );
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert("Authorization", format!("Bearer {}", f.controller.token()).parse().expect("header"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (output, last) = rt.block_on(async {
        let mut ws = thymis_fleet_tests::ws_connect(request).await.expect("terminal socket");
        let mut output = String::new();
        let mut resized = false;
        let last = loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), ws.next()).await.expect("terminal output");
            match msg.expect("open").expect("frame") {
                Message::Binary(b) => output.push_str(&String::from_utf8_lossy(&b)),
                Message::Text(t) => break t.to_string(),
                _ => {}
            }
            if !resized && output.contains("24 80") {
                resized = true;
                ws.send(Message::Text(r#"{"resize":{"cols":120,"rows":40}}"#.into())).await.expect("resize");
                ws.send(Message::Binary(b"\n".to_vec().into())).await.expect("input");
            }
        };
        (output, last)
    });
    assert!(output.contains("24 80") && output.contains("40 120"), "sizes seen: {output:?}");
    assert_eq!(last, r#"{"exit_status":0}"#);

    // Nothing in or out for the idle timeout: the device closes the session.
    let started = Instant::now();
    let out = f.controller.ctl(&["shell", "p1", "--", "sleep", "60"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success() && stderr.contains("idle for 2 s"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
}

/// A terminal whose device drops off ends by itself: `thymisctl shell` says the device
/// disconnected and exits non-zero, and the terminal's task ends, instead of waiting for
/// ever in raw mode.
#[test]
fn a_terminal_ends_with_its_devices_connection() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("p1", "alpha", false).expect("device");
    f.add_agent_config("p1", "terminal = true\n").expect("cfg");
    f.device_mut("p1").start().expect("start");
    f.wait_online("p1");
    let mut shell = f
        .controller
        .ctl_command(&["shell", "p1", "--", "sleep", "600"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("thymisctl shell");
    let terminal = |f: &Fleet| {
        let tasks = f.controller.ctl_json(&["tasks"]);
        tasks.as_array().expect("tasks").iter().find(|t| t["kind"] == "terminal").cloned()
    };
    wait_for("the terminal to open", Duration::from_secs(30), || terminal(&f).filter(|t| t["state"] == "running"));
    f.device_mut("p1").kill9();
    let status =
        wait_for("thymisctl shell to end by itself", Duration::from_secs(30), || shell.try_wait().ok().flatten());
    let out = shell.wait_with_output().expect("output");
    let (_, stderr) = text(&out);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("p1: the device disconnected"), "{stderr}");
    let task = wait_for("the terminal's task to end", Duration::from_secs(30), || {
        terminal(&f).filter(|t| t["state"] == "finished")
    });
    assert_eq!(task["result"], "failed", "{task}");
}
