//! Who gets in: tokens, keys, revocation, pinned identities, the API's token.

use std::time::Duration;

use thymis_fleet_tests::{Fleet, FleetOptions, wait_for};

#[test]
fn api_refuses_requests_without_the_admin_token() {
    let f = Fleet::new(FleetOptions::default()).expect("fleet");
    let (code, body) = f.controller.api("/devices", Some("wrong"));
    assert_eq!(code, 401, "{body}");
    let (code, _) = f.controller.api("/devices", None);
    assert_eq!(code, 200);
}

#[test]
fn used_tokens_revoked_devices_and_unpinned_controllers_are_refused() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", true).expect("device");
    f.wait_online("d1");

    // A second agent (new key) with d1's already used token is refused.
    f.add_device("rogue", "alpha", false).expect("device");
    let d1_config = std::fs::read_to_string(f.device("d1").dir.join("agent.toml")).expect("config");
    let rogue_state = f.device("rogue").state_dir();
    let rogue_config: String = d1_config
        .lines()
        .map(|l| {
            if l.starts_with("state_dir") {
                format!("state_dir = {:?}", rogue_state.display().to_string())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(f.device("rogue").dir.join("agent.toml"), rogue_config + "\n").expect("write");
    f.device_mut("rogue").start().expect("start");
    wait_for("the rogue agent to be refused", Duration::from_secs(30), || {
        f.device("rogue").log().contains("enrollment token already used").then_some(())
    });
    let devices = f.controller.ctl_json(&["devices"]);
    assert_eq!(devices.as_array().map(|a| a.iter().filter(|d| d["online"] == true).count()), Some(1), "{devices}");

    // A revoked device is refused from its next connection on.
    let out = f.controller.ctl(&["device", "revoke", "d1"]);
    assert!(out.status.success());
    wait_for("d1 to be refused", Duration::from_secs(30), || f.device("d1").log().contains("is revoked").then_some(()));
    f.wait_offline("d1");

    // Re-enrolled (a new image): the stolen device's key stays out, even holding the
    // new token; only a new key enrolls with it.
    let v = f.controller.ctl_json(&["device", "reenroll", "d1"]);
    let token = v["enrollment_token"].as_str().expect("token").to_owned();
    let path = f.device("d1").dir.join("agent.toml");
    let with_token = |text: &str| -> String {
        let mut lines: Vec<String> =
            text.lines().filter(|l| !l.starts_with("enrollment_token")).map(str::to_owned).collect();
        lines.push(format!("enrollment_token = {token:?}"));
        lines.join("\n") + "\n"
    };
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, with_token(&text)).expect("write");
    let dev = f.device_mut("d1");
    dev.kill9();
    dev.start().expect("start");
    wait_for("the revoked key to be refused", Duration::from_secs(30), || {
        f.device("d1").log().contains("this device key was revoked").then_some(())
    });
    assert_eq!(f.device_row("d1")["enrolled"], false, "{}", f.device_row("d1"));
    let dev = f.device_mut("d1");
    dev.kill9();
    // A new key (a new image, or the key file gone): it enrolls with the new token.
    std::fs::remove_file(dev.state_dir().join("device.key")).expect("rm");
    dev.start().expect("start");
    f.wait_online("d1");
    assert_eq!(f.device_row("d1")["enrolled"], true);

    // Imaging an enrolled device would lock it out: only with --replace-key.
    let set = f.tmp.path().join("d1-image");
    let out = f.controller.ctl(&["image", "d1", "--out", &set.to_string_lossy()]);
    assert!(!out.status.success(), "an image for an enrolled device was made without --replace-key");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--replace-key") && err.contains("enrolled"), "{err}");
    f.wait_online("d1");

    // An agent that pins another controller identity does nothing with this one.
    f.add_device("pinned", "alpha", false).expect("device");
    let path = f.device("pinned").dir.join("agent.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    let other = "thymis-controller-1:uksYNxOOeh8CxyCyUGbiqT3c2mI4o6VajNGMqYOgy3c=";
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("controller_identity_keys") {
                format!("controller_identity_keys = [{other:?}]")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&path, text + "\n").expect("write");
    f.device_mut("pinned").start().expect("start");
    wait_for("the agent to refuse the controller", Duration::from_secs(30), || {
        f.device("pinned").log().contains("is not pinned").then_some(())
    });
    let row = f.device_row("pinned");
    assert_eq!(row["enrolled"], false, "the token was spent on an unpinned controller: {row}");
}

#[test]
fn a_path_signed_by_an_untrusted_key_is_refused_and_nothing_is_imported() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    f.add_device("d1", "alpha", false).expect("device");
    let path = f.device("d1").dir.join("agent.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    // Trust only some other Nix key.
    let other = "thymis-1:uwyy/0Sm9qFPdclZdy0/Uld2GwxdKG7moB3TyQCPPHA=";
    let text: String =
        text.lines()
            .map(|l| {
                if l.starts_with("nix_trusted_keys") { format!("nix_trusted_keys = [{other:?}]") } else { l.to_owned() }
            })
            .collect::<Vec<_>>()
            .join("\n");
    std::fs::write(&path, text + "\n").expect("write");
    f.device_mut("d1").start().expect("start");
    f.wait_online("d1");
    let out = f.controller.ctl(&["--json", "deploy", "--device", "d1", "--wait"]);
    assert_eq!(out.status.code(), Some(2));
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let child = Fleet::child(&t, "d1");
    assert_eq!(child["result"], "failed", "{child}\n{}", f.diagnostics());
    assert!(child["error"].as_str().unwrap_or("").contains("no signature by a trusted key"), "{child}");
    let store = f.device("d1").nix_dir().join("store");
    let names: Vec<String> = std::fs::read_dir(&store)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!names.iter().any(|n| n.contains("thymis-test")), "untrusted paths reached the store: {names:?}");
    assert!(f.device("d1").profile_system().is_none());
}

#[test]
fn browser_sessions_need_the_csrf_token_to_change_anything() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    let jar = f.tmp.path().join("cookies");
    let base = f.controller.base_url();
    let ca = f.controller.ca_file().expect("the controller serves TLS");
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .arg("--cacert")
            .arg(&ca)
            .args(["-s", "-b", &jar.to_string_lossy(), "-c", &jar.to_string_lossy(), "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().to_owned(), body.to_owned())
    };
    let (code, _) =
        curl(&["-H", "Content-Type: application/json", "-d", r#"{"token":"wrong"}"#, &format!("{base}/ui/login")]);
    assert_eq!(code, "401");
    let login = format!(r#"{{"token":"{}"}}"#, f.controller.token());
    let (code, body) = curl(&["-H", "Content-Type: application/json", "-d", &login, &format!("{base}/ui/login")]);
    assert_eq!(code, "200", "{body}");
    let csrf =
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["csrf"].as_str().expect("csrf").to_owned();
    let cookies = std::fs::read_to_string(&jar).expect("jar");
    assert!(cookies.contains("#HttpOnly_") && cookies.contains("thymis_session"), "{cookies}");
    // Served over https: the cookie is Secure (curl's jar: domain, subdomains, path, secure, ...).
    let line = cookies.lines().find(|l| l.contains("thymis_session")).expect("the session cookie");
    assert_eq!(line.split('\t').nth(3), Some("TRUE"), "the session cookie is not Secure: {line}");
    // Reading works with the cookie alone; changing needs the CSRF token.
    let (code, _) = curl(&[&format!("{base}/api/v1/devices")]);
    assert_eq!(code, "200");
    let add = r#"{"name":"x1","config":"alpha"}"#;
    let (code, body) = curl(&["-H", "Content-Type: application/json", "-d", add, &format!("{base}/api/v1/devices")]);
    assert_eq!(code, "403", "a cross-site request could add devices: {body}");
    let header = format!("X-CSRF-Token: {csrf}");
    let (code, body) =
        curl(&["-H", "Content-Type: application/json", "-H", &header, "-d", add, &format!("{base}/api/v1/devices")]);
    assert_eq!(code, "200", "{body}");
    // After logging out, the cookie is worth nothing.
    let (code, _) = curl(&["-X", "POST", "-H", &header, &format!("{base}/ui/logout")]);
    assert_eq!(code, "200");
    let (code, _) = curl(&[&format!("{base}/api/v1/devices")]);
    assert_eq!(code, "401");

    // A session outlives a restart of the controller, not a new admin token.
    let (code, body) = curl(&["-H", "Content-Type: application/json", "-d", &login, &format!("{base}/ui/login")]);
    assert_eq!(code, "200", "{body}");
    f.controller.restart().expect("restart");
    let (code, _) = curl(&[&format!("{base}/api/v1/devices")]);
    assert_eq!(code, "200", "a restart ended the session");
    std::fs::write(f.controller.state_dir.join("admin-token"), "a-rotated-admin-token-0123456789abcdef\n")
        .expect("rotate");
    f.controller.restart().expect("restart");
    let (code, _) = curl(&[&format!("{base}/api/v1/devices")]);
    assert_eq!(code, "401", "a session of the old admin token still works");
    assert!(f.controller.log().contains("every browser session ended"), "{}", f.controller.log());
}

#[test]
fn no_web_page_can_open_the_agent_socket() {
    let f = Fleet::new(FleetOptions::default()).expect("fleet");
    let out = f
        .controller
        .curl()
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--http1.1"])
        .args(["-H", "Connection: Upgrade", "-H", "Upgrade: websocket", "-H", "Sec-WebSocket-Version: 13"])
        .args(["-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "-H", "Origin: https://evil.example"])
        .arg(format!("{}/agent/v1", f.controller.base_url()))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
}

/// The controller runs under umask 000 here (the harness): its state directory, its
/// database and the secrets in it are the owner's only all the same.
#[test]
fn the_controllers_state_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fleet::new(FleetOptions { postgres: false, ..Default::default() }).expect("fleet");
    let mode = |name: &str| {
        let p = f.controller.state_dir.join(name);
        std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
    };
    assert_eq!(mode(""), 0o700, "the state directory");
    for file in ["db.sqlite", "db.sqlite-wal", "identity.key", "nix-signing.key", "admin-token", "tls.key"] {
        assert_eq!(mode(file), 0o600, "{file}");
    }
}

/// A client that never finishes its TLS handshake, one that trickles a request header,
/// and a kept-alive connection left idle are each closed after the listener's 10 s
/// timeout, not held for as long as the client likes.
#[test]
fn silent_trickling_and_idle_clients_are_dropped() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let f = Fleet::new(FleetOptions::default()).expect("fleet");
    let addr = f.controller.listen.clone();
    // Seconds until the controller closes the connection (a read of 0 bytes or an error).
    let closed_after = |mut read: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let mut buf = [0u8; 256];
            while matches!(read.read(&mut buf), Ok(n) if n > 0) {}
            start.elapsed().as_secs_f64()
        })
    };
    let tls = |tcp: TcpStream| {
        let config = thymis_tls_pin::Pinned::new(None, "nothing").client_config().expect("config");
        let name = "localhost".try_into().expect("name");
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("tls");
        rustls::StreamOwned::new(conn, tcp)
    };
    let connect = || {
        let tcp = TcpStream::connect(&addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(40))).expect("timeout");
        tcp
    };

    let silent = closed_after(Box::new(connect()));
    let mut trickle = tls(connect());
    trickle.write_all(b"GET /healthz HTTP/1.1\r\n").expect("write");
    let mut idle = tls(connect());
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut answer = [0u8; 15];
    idle.read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"HTTP/1.1 200 OK");
    let trickling = closed_after(Box::new(trickle));
    let idling = closed_after(Box::new(idle));
    for (what, t) in [("silent", silent), ("trickling", trickling), ("idle", idling)] {
        let secs = t.join().expect("thread");
        assert!((5.0..30.0).contains(&secs), "a {what} client was closed after {secs:.1} s");
    }
}
