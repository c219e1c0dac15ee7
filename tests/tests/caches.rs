//! Binary caches: the controller publishes each built closure to a Nix binary cache
//! (`--publish-cache`, written by `nix copy`), a plain web server (busybox httpd) serves
//! it, and agents substitute from it before the controller sends anything. A cache that
//! is down, does not answer, or serves a NAR with the wrong hash only sends the device
//! back to the controller for what it could not get.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions, wait_for};

/// A process that is killed when the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &std::path::Path, addr: &str) -> Server {
    let child = Command::new("busybox")
        .args(["httpd", "-f", "-p", addr, "-h"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("busybox httpd");
    let url = format!("http://{addr}/nix-cache-info");
    wait_for("the cache's web server", Duration::from_secs(10), || {
        Command::new("curl").args(["-fs", "-o", "/dev/null", &url]).status().ok()?.success().then_some(())
    });
    Server(child)
}

/// A fleet whose controller publishes to the file cache `cache`, and configuration
/// "alpha" (`alpha`) built and published there: (fleet, its system, its closure's size).
fn published(cache: &std::path::Path, alpha: serde_json::Value) -> (Fleet, String, i64) {
    let f = Fleet::new(FleetOptions {
        extra_args: vec!["--publish-cache".into(), format!("file://{}", cache.display())],
        ..Default::default()
    })
    .expect("fleet");
    f.set_configs(&json!({ "alpha": alpha, "beta": {} })).expect("cfg");
    f.controller.ctl(&["project", "commit", "-m", "a closure to cache"]);
    let built = f.controller.ctl_json(&["build", "alpha", "--wait"]);
    assert_eq!(built["result"], "succeeded", "{built}");
    let logs = f.controller.task_logs(built["id"].as_i64().expect("id")).join("\n");
    assert!(logs.contains("published"), "{logs}");
    let system = built["system"].as_str().expect("system").to_owned();
    let closure_size =
        String::from_utf8_lossy(&Command::new("nix-store").args(["-qR", &system]).output().expect("nix-store").stdout)
            .lines()
            .count() as i64;
    (f, system, closure_size)
}

#[test]
fn devices_substitute_from_the_published_cache_and_fall_back_to_the_controller() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cache = tmp.path().join("cache");
    let (mut f, system, closure_size) = published(&cache, json!({ "version": "1", "payloads": 3, "small": 600 }));

    // A copy of the cache in which one NAR is another path's (a wrong hash).
    let evil = tmp.path().join("evil");
    assert!(Command::new("cp").arg("-r").arg(&cache).arg(&evil).status().expect("cp").success());
    let mut nars: Vec<_> =
        std::fs::read_dir(evil.join("nar")).expect("nar dir").map(|e| e.expect("entry").path()).collect();
    nars.sort();
    assert!(nars.iter().all(|n| n.to_string_lossy().ends_with(".nar.xz")), "nix copy's default is xz: {nars:?}");
    std::fs::copy(&nars[0], &nars[1]).expect("swap a NAR");
    // A copy of the cache that holds 90 % of the closure (every tenth narinfo gone).
    let partial = tmp.path().join("partial");
    assert!(Command::new("cp").arg("-r").arg(&cache).arg(&partial).status().expect("cp").success());
    let mut narinfos: Vec<_> = std::fs::read_dir(&partial)
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "narinfo"))
        .collect();
    narinfos.sort();
    let mut removed = vec![];
    for p in narinfos.iter().step_by(10) {
        let text = std::fs::read_to_string(p).expect("narinfo");
        removed.extend(text.lines().find_map(|l| l.strip_prefix("StorePath: ")).map(str::to_owned));
        std::fs::remove_file(p).expect("rm");
    }
    // Those, and what refers to them: a path is imported only after its references, so
    // the device takes these from the controller.
    let closure: std::collections::BTreeSet<String> =
        String::from_utf8_lossy(&Command::new("nix-store").args(["-qR", &system]).output().expect("nix-store").stdout)
            .lines()
            .map(str::to_owned)
            .collect();
    let out = Command::new("nix-store").args(["-q", "--referrers-closure"]).args(&removed).output().expect("nix-store");
    let not_substitutable =
        String::from_utf8_lossy(&out.stdout).lines().filter(|p| closure.contains(*p)).count() as i64;
    assert!(not_substitutable < closure_size, "every path depends on a removed one");
    // The same closure in caches with NARs compressed with zstd, and not at all.
    let key = f.controller.state_dir.join("nix-signing.key");
    for compression in ["zstd", "none"] {
        let to = format!(
            "file://{}?compression={compression}&secret-key={}",
            tmp.path().join(compression).display(),
            key.display()
        );
        let out = Command::new("nix").args(["copy", "--to", &to, &system]).output().expect("nix copy");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    let host = f.host_address();
    // The good cache again over https, behind a TLS proxy whose certificate a test CA issued.
    let pki = tmp.path().join("pki");
    std::fs::create_dir_all(&pki).expect("mkdir");
    let openssl = format!(
        "set -e; cd {dir}
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 1 -subj /CN=test-ca 2>/dev/null
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key -out srv.csr -subj /CN=cache 2>/dev/null
         printf 'subjectAltName=IP:{host}' > ext
         openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out srv.crt -days 1 -extfile ext 2>/dev/null
         cat srv.crt srv.key > srv.pem",
        dir = pki.display()
    );
    assert!(Command::new("sh").args(["-c", &openssl]).status().expect("openssl").success());
    let _good = serve(&cache, &format!("{host}:18080"));
    let _evil = serve(&evil, &format!("{host}:18081"));
    let _zstd = serve(&tmp.path().join("zstd"), &format!("{host}:18084"));
    let _none = serve(&tmp.path().join("none"), &format!("{host}:18085"));
    let _partial = serve(&partial, &format!("{host}:18087"));
    let _https = Server(
        Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:18086,bind={host},cert={},verify=0,fork,reuseaddr",
                pki.join("srv.pem").display()
            ))
            .arg(format!("TCP:{host}:18080"))
            .stderr(Stdio::null())
            .spawn()
            .expect("socat"),
    );
    // Accepts connections and never answers.
    let _silent = Server(
        Command::new("socat")
            .args([&format!("TCP-LISTEN:18082,bind={host},fork,reuseaddr"), "EXEC:sleep 3600"])
            .spawn()
            .expect("socat"),
    );
    let devices = [
        ("good", format!("[\"http://{host}:18080\"]")),
        ("evil", format!("[\"http://{host}:18081\"]")),
        ("zstd", format!("[\"http://{host}:18084\"]")),
        ("plain", format!("[\"http://{host}:18085\"]")),
        ("partial", format!("[\"http://{host}:18087\"]")),
        (
            "https",
            format!("[\"https://{host}:18086\"]\nsubstituter_ca_file = {:?}", pki.join("ca.crt").display().to_string()),
        ),
        // Down (nothing listens on 18083), then silent.
        ("broken", format!("[\"http://{host}:18083\", \"http://{host}:18082\"]")),
    ];
    for (name, substituters) in &devices {
        f.add_device(name, "alpha", false).expect("device");
        f.add_agent_config(name, &format!("substituters = {substituters}\nsubstituter_timeout = 2\n")).expect("cfg");
        f.device_mut(name).start().expect("start");
    }
    for (name, _) in &devices {
        f.wait_online(name);
    }
    // The preview asks each device what its caches would serve, and leaves that out of
    // what the controller would send.
    let preview = f.controller.ctl_json(&["deploy", "--config", "alpha", "--dry-run"]);
    let previewed = |name: &str| -> serde_json::Value {
        preview["devices"].as_array().into_iter().flatten().find(|d| d["device"] == name).cloned().expect("previewed")
    };
    let t = f.controller.ctl_json(&["deploy", "--config", "alpha", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let child = |name: &str| Fleet::child(&t, name).clone();
    let count = |c: &serde_json::Value, k: &str| c[k].as_i64().unwrap_or(-1);
    for name in ["good", "partial", "broken"] {
        let (p, c) = (previewed(name), child(name));
        let (said, sent) = (p["send_bytes"].as_i64().unwrap_or(-1), count(&c, "bytes_sent"));
        assert!(
            said.abs_diff(sent) * 10 <= sent.unsigned_abs(),
            "{name}: the preview said {said} bytes, {sent} were sent: {p}"
        );
        let served = p["from_caches"]["paths"].as_i64().unwrap_or(-1);
        assert_eq!(served, count(&c, "paths_substituted"), "{name}: {p}\n{c}");
    }

    // Everything from the cache: the controller sent nothing.
    let good = child("good");
    assert_eq!(count(&good, "paths_sent"), 0, "{good}");
    assert!(count(&good, "paths_substituted") >= closure_size - 1, "{good} of {closure_size}");
    assert!(count(&good, "bytes_substituted") > 0);
    for name in ["zstd", "plain", "https"] {
        let c = child(name);
        let log = f.device(name).log();
        let log: Vec<&str> = log.lines().filter(|l| l.contains("cache") || l.contains("panic")).take(12).collect();
        assert_eq!(count(&c, "paths_sent"), 0, "{name}: {c}\n{log:?}");
        assert!(count(&c, "paths_substituted") >= closure_size - 1, "{name}: {c}");
    }
    // A cache with 90 % of the closure: the controller sent only what could not come from
    // it (the missing paths and those that refer to them).
    let partial = child("partial");
    let sent = count(&partial, "paths_sent");
    let (gone, expected) = (removed.len(), not_substitutable);
    assert!(
        sent <= expected && sent >= expected - 1,
        "{gone} paths not in the cache, {expected} depend on them, {sent} sent: {partial}"
    );
    assert!(count(&partial, "paths_substituted") >= closure_size - expected - 1, "{partial}");
    // The path whose NAR was wrong came from the controller; the rest from the cache.
    let evil = child("evil");
    assert!(count(&evil, "paths_sent") >= 1, "{evil}");
    assert!(count(&evil, "paths_substituted") >= closure_size - 3, "{evil}");
    // Nothing usable: all from the controller, and no deployment failed for it.
    let broken = child("broken");
    assert_eq!(count(&broken, "paths_substituted"), 0, "{broken}");
    assert!(count(&broken, "paths_sent") >= closure_size - 1, "{broken}");
    for (name, _) in &devices {
        assert_eq!(f.device_row(name)["system"], system.as_str(), "{name}");
    }
    let agent_log = f.device("evil").log();
    assert!(agent_log.contains("not substituted"), "the wrong NAR was not refused:\n{agent_log}");
}

/// What a hostile cache does with each NAR it is asked for (its narinfos are the real,
/// signed ones, with the unsigned fields rewritten).
#[derive(Clone, Copy, PartialEq)]
enum Hostile {
    /// xz that decompresses to 1 GiB of zeros (about 150 KB).
    Bomb,
    /// The same with zstd.
    ZstdBomb,
    /// A `FileSize` of a petabyte, and the body one byte a second.
    Trickle,
    /// A redirect to the honest cache's NAR (the device would get the path if it followed).
    Redirect,
}

/// Serves `cache`'s narinfos rewritten to point at NARs that behave as `how` says, on
/// `addr`, until the test ends. `honest` is the URL of the real cache (for redirects).
fn serve_hostile(cache: std::path::PathBuf, addr: &str, how: Hostile, bombs: [std::path::PathBuf; 2], honest: String) {
    let bomb = if how == Hostile::ZstdBomb { bombs[1].clone() } else { bombs[0].clone() };
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind(addr).expect("bind");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (cache, bomb, honest) = (cache.clone(), bomb.clone(), honest.clone());
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                // The rest of the request's head.
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) <= 2 {
                        break;
                    }
                }
                let respond = |conn: &mut std::net::TcpStream, status: &str, headers: &str, body: &[u8]| {
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(body));
                };
                if path == "/nix-cache-info" {
                    return respond(&mut conn, "200 OK", "", b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n");
                }
                if let Some(name) = path.strip_prefix('/').filter(|p| p.ends_with(".narinfo")) {
                    let Ok(text) = std::fs::read_to_string(cache.join(name)) else {
                        return respond(&mut conn, "404 Not Found", "", b"");
                    };
                    let real_url = text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap_or_default().to_owned();
                    let file_size = if how == Hostile::Trickle {
                        "1000000000000000".to_owned()
                    } else {
                        std::fs::metadata(&bomb).map(|m| m.len().to_string()).unwrap_or_default()
                    };
                    let rewritten: String = text
                        .lines()
                        .map(|l| match l.split_once(": ") {
                            Some(("URL", _)) => format!("URL: hostile/{real_url}"),
                            Some(("Compression", _)) if how == Hostile::ZstdBomb => "Compression: zstd".to_owned(),
                            Some(("Compression", _)) => "Compression: xz".to_owned(),
                            Some(("FileSize", _)) => format!("FileSize: {file_size}"),
                            _ => l.to_owned(),
                        })
                        .map(|l| l + "\n")
                        .collect();
                    return respond(&mut conn, "200 OK", "", rewritten.as_bytes());
                }
                let Some(real) = path.strip_prefix("/hostile/") else {
                    return respond(&mut conn, "404 Not Found", "", b"");
                };
                match how {
                    Hostile::Bomb | Hostile::ZstdBomb => {
                        respond(&mut conn, "200 OK", "", &std::fs::read(&bomb).expect("bomb"))
                    }
                    Hostile::Redirect => {
                        respond(&mut conn, "302 Found", &format!("Location: {honest}/{real}\r\n"), b"")
                    }
                    Hostile::Trickle => {
                        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000000\r\n\r\n");
                        for _ in 0..3600 {
                            if conn.write_all(&[0xfd]).is_err() {
                                return;
                            }
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
            });
        }
    });
}

/// The agent's peak memory (VmHWM), in MiB.
fn peak_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM");
    kib / 1024
}

/// Caches that attack the device (xz and zstd bombs, a trickle behind a petabyte
/// `FileSize`, a redirect elsewhere) cost it bounded memory and time, and the controller serves what
/// they did not.
#[test]
fn hostile_caches_cost_bounded_memory_and_time_and_the_controller_serves_the_rest() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cache = tmp.path().join("cache");
    let (mut f, system, closure_size) = published(&cache, json!({ "version": "1", "payloads": 2 }));
    let bombs = [tmp.path().join("bomb.xz"), tmp.path().join("bomb.zst")];
    for (bomb, tool) in bombs.iter().zip(["xz -0 -T1", "zstd -q -3"]) {
        let made = Command::new("sh")
            .args(["-c", &format!("head -c 1G /dev/zero | {tool} > {}", bomb.display())])
            .status()
            .expect("compress");
        assert!(made.success());
    }

    let host = f.host_address();
    let _honest = serve(&cache, &format!("{host}:18090"));
    let honest = format!("http://{host}:18090");
    let caches = [
        ("bomb", Hostile::Bomb, 18091),
        ("zbomb", Hostile::ZstdBomb, 18094),
        ("trickle", Hostile::Trickle, 18092),
        ("redirect", Hostile::Redirect, 18093),
    ];
    for (name, how, port) in caches {
        serve_hostile(cache.clone(), &format!("{host}:{port}"), how, bombs.clone(), honest.clone());
        f.add_device(name, "alpha", false).expect("device");
        f.add_agent_config(name, &format!("substituters = [\"http://{host}:{port}\"]\nsubstituter_timeout = 2\n"))
            .expect("cfg");
        f.device_mut(name).start().expect("start");
    }
    for (name, _, _) in caches {
        f.wait_online(name);
    }
    let started = std::time::Instant::now();
    let t = f.controller.ctl_json(&["deploy", "--config", "alpha", "--wait"]);
    let took = started.elapsed();
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    // Bounded time: the trickle is given up by the signed NAR size's budget (a few seconds
    // for these paths), not by a petabyte's.
    assert!(took < Duration::from_secs(90), "the deployment took {took:?}");
    for (name, _, _) in caches {
        let c = Fleet::child(&t, name);
        assert_eq!(c["paths_substituted"], 0, "{name}: {c}");
        assert!(c["paths_sent"].as_i64().unwrap_or(0) >= closure_size - 1, "{name}: {c}");
        assert_eq!(f.device_row(name)["system"], system.as_str(), "{name}");
    }
    // Bounded memory: each bomb was cut at the first byte that is not a NAR.
    for name in ["bomb", "zbomb"] {
        let pid = f.device(name).agent_pid().expect("the agent runs");
        let peak = peak_mib(pid);
        assert!(peak < 150, "{name}: the decompression bomb took the agent to {peak} MiB");
    }
    assert!(f.device("redirect").log().contains("redirects are not followed"), "{}", f.device("redirect").log());
}

/// An honest cache's large NAR, xz-compressed as `nix copy --to file://` does (256 MiB of
/// incompressible data in one xz stream), substitutes within the same memory bound as the
/// bombs are held to: the decoder streams it.
#[test]
fn an_honest_256_mib_xz_nar_substitutes_within_the_bombs_memory_bound() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cache = tmp.path().join("cache");
    // xz at level 0 (fast to make; the decoder's memory does not depend on the level here).
    let f = Fleet::new(FleetOptions {
        extra_args: vec!["--publish-cache".into(), format!("file://{}?compression-level=0", cache.display())],
        ..Default::default()
    })
    .expect("fleet");
    let mut f = f;
    f.set_configs(&json!({ "alpha": { "version": "1", "blob": { "kib": 262144 } }, "beta": {} })).expect("cfg");
    f.controller.ctl(&["project", "commit", "-m", "a large path to cache"]);
    let built = f.controller.ctl_json(&["build", "alpha", "--wait"]);
    assert_eq!(built["result"], "succeeded", "{built}");
    let nars: Vec<u64> = std::fs::read_dir(cache.join("nar"))
        .expect("nar dir")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".nar.xz"))
        .map(|e| e.metadata().expect("meta").len())
        .collect();
    assert!(nars.iter().any(|n| *n > 200 << 20), "no large xz NAR in the cache: {nars:?}");
    let host = f.host_address();
    let _server = serve(&cache, &format!("{host}:18095"));
    f.add_device("big", "alpha", false).expect("device");
    f.add_agent_config("big", &format!("substituters = [\"http://{host}:18095\"]\n")).expect("cfg");
    f.device_mut("big").start().expect("start");
    f.wait_online("big");
    let t = f.controller.ctl_json(&["deploy", "--config", "alpha", "--wait"]);
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let c = Fleet::child(&t, "big");
    assert!(c["bytes_substituted"].as_i64().unwrap_or(0) > 200 << 20, "the large path was not substituted: {c}");
    let peak = peak_mib(f.device("big").agent_pid().expect("the agent runs"));
    assert!(peak < 150, "substituting a 256 MiB xz NAR took the agent to {peak} MiB");
}
