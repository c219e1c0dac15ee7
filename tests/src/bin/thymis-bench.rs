//! `make bench`: transfer against `nix copy --to ssh-ng://` (plain and compressed) to
//! the same device behind a 100 Mbit/s link, fleet fan-out, and the agent's footprint.
//! Every figure is a median of three runs, measured side by side with its baseline in
//! the same run; the table goes to stdout and `docs/benchmarks.md`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use thymis_fleet_tests::{Fleet, FleetOptions};
use thymis_store::signing::PublicKey;

static RUNS: std::sync::LazyLock<usize> =
    std::sync::LazyLock::new(|| std::env::var("THYMIS_BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3));
const RATE: &str = "100mbit";

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

#[derive(Default, Clone, Copy)]
struct Sample {
    secs: f64,
    wire: f64,
}

fn med(samples: &[Sample]) -> Sample {
    Sample {
        secs: median(samples.iter().map(|s| s.secs).collect()),
        wire: median(samples.iter().map(|s| s.wire).collect()),
    }
}

/// Installs the bench project (the closure of bench/closure.nix) into the controller.
fn install_project(f: &Fleet) {
    let project = f.controller.project_dir();
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/closure.nix"), project.join("closure.nix"))
        .expect("copy");
    std::fs::write(
        project.join("flake.nix"),
        r#"{ outputs = { self }: {
  nixosConfigurations.bench.config.system.build.toplevel =
    import ./closure.nix { variant = builtins.replaceStrings [ "\n" ] [ "" ] (builtins.readFile ./variant.txt); };
}; }
"#,
    )
    .expect("flake");
    std::fs::write(project.join("thymis.toml"), "[configs.bench]\ntags = [\"bench\"]\n").expect("toml");
    set_variant(f, "base");
}

fn set_variant(f: &Fleet, v: &str) {
    std::fs::write(f.controller.project_dir().join("variant.txt"), format!("{v}\n")).expect("variant");
    let _ = f.controller.ctl(&["project", "commit", "-m", &format!("variant {v}")]);
}

fn system_of(v: &str) -> String {
    sh(Command::new("nix-build").args([
        concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/closure.nix"),
        "--argstr",
        "variant",
        v,
        "--no-out-link",
    ]))
}

fn deploy(f: &Fleet) -> Value {
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "--wait"]);
    assert_eq!(t["result"], "succeeded", "bench deployment failed: {t}\n{}", f.diagnostics());
    t
}

/// Empties the device's store (agent stopped meanwhile), then installs `base` unshaped.
fn prepare(f: &mut Fleet, base: Option<&str>) {
    let dev = f.device_mut("d1");
    dev.unshape();
    dev.kill9();
    // The old store is moved aside, not deleted: ext4 allocating inodes among tens of
    // thousands it freed seconds before costs the next import several times its CPU
    // (profiled: `recently_deleted`, `find_inode_bit`), which no device sees. The fleet's
    // temporary directory goes at the end, outside every measurement.
    let nix = dev.nix_dir();
    let trash = aside(&nix);
    std::fs::create_dir_all(&trash).expect("mkdir");
    for e in std::fs::read_dir(&nix).into_iter().flatten().flatten() {
        std::fs::rename(e.path(), trash.join(e.file_name())).expect("move the old store aside");
    }
    let state = dev.state_dir();
    for f in ["pending.json", "state.json"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    // Keep the key and enrollment, forget the applied sequence with the store.
    dev.start().expect("agent");
    f.wait_online("d1");
    if let Some(v) = base {
        set_variant(f, v);
        deploy(f);
    }
    f.device("d1").shape(RATE).expect("tc");
    settle();
}

/// A new name beside `dir` for what a run leaves, to be deleted with the fleet's
/// temporary directory rather than between measurements (see [`prepare`]).
fn aside(dir: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos());
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.with_file_name(format!("{name}-old-{}", nanos.unwrap_or(0)))
}

/// Moves `dir` aside (see [`aside`]), if it exists.
fn set_aside(dir: &Path) {
    if dir.exists() {
        std::fs::rename(dir, aside(dir)).expect("move aside");
    }
}

/// Writes back what earlier runs left in the page cache (the stores they imported), so
/// that it does not land in the next measurement.
fn settle() {
    let _ = Command::new("sync").status();
}

/// A deployment of variant `v` to d1, its configuration built beforehand (the baselines
/// copy a closure that is already built): returns the time and bytes until the device
/// reported its activation (as the baselines end when the copy is done), the time until
/// the deployment was confirmed, and the child's JSON.
fn ours(f: &Fleet, v: &str) -> (Sample, f64, Value) {
    set_variant(f, v);
    let b = f.controller.ctl_json(&["build", "bench", "--wait"]);
    assert_eq!(b["result"], "succeeded", "bench build failed: {b}");
    let before = f.device("d1").link_bytes();
    let t0 = Instant::now();
    let started = f.controller.ctl_json(&["deploy", "--device", "d1"]);
    let id = started["id"].as_i64().expect("task id");
    let mut activated: Option<Sample> = None;
    // Polled over one kept-alive HTTP connection: a process per poll (curl) would take
    // a core of this machine away from the deployment it measures.
    let http = http_agent();
    let (url, auth) =
        (format!("{}/api/v1/tasks/{id}", f.controller.base_url()), format!("Bearer {}", f.controller.token()));
    loop {
        let t: Value = http
            .get(&url)
            .header("Authorization", &auth)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json().ok())
            .unwrap_or_default();
        let child = &t["children"][0];
        if activated.is_none() && (child["phase"] == "confirm" || !child["result"].is_null()) {
            activated =
                Some(Sample { secs: t0.elapsed().as_secs_f64(), wire: (f.device("d1").link_bytes() - before) as f64 });
        }
        if !child["result"].is_null() {
            assert_eq!(child["result"], "succeeded", "bench deployment failed: {t}\n{}", f.diagnostics());
            let confirmed = t0.elapsed().as_secs_f64();
            return (activated.unwrap_or_default(), confirmed, child.clone());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Sshd {
    child: Child,
    dir: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// sshd inside the device's namespaces, serving its store through `nix-daemon --stdio`.
fn sshd(f: &Fleet) -> Sshd {
    let dev = f.device("d1");
    let dir = f.tmp.path().join("ssh");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for k in ["hostkey", "id"] {
        sh(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(dir.join(k)));
    }
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).expect("keys");
    let conf = format!(
        "Port 2222\nListenAddress {}\nHostKey {}\nPermitRootLogin yes\nAuthorizedKeysFile {}\nStrictModes no\nUsePAM no\nPidFile none\nPasswordAuthentication no\n",
        dev.address(),
        dir.join("hostkey").display(),
        dir.join("authorized_keys").display()
    );
    std::fs::write(dir.join("sshd_config"), conf).expect("conf");
    let script = format!(
        "mount --bind '{}' /nix && mount -t tmpfs tmpfs /run && mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e -f '{}'",
        dev.nix_dir().display(),
        dir.join("sshd_config").display()
    );
    let child = Command::new("ip")
        .args(["netns", "exec", &dev.netns, "unshare", "--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sshd");
    std::thread::sleep(Duration::from_secs(1));
    Sshd { child, dir }
}

fn nix_copy(f: &Fleet, ssh: &Sshd, system: &str, compress: bool) -> Sample {
    let dev = f.device("d1");
    let url = format!("ssh-ng://root@{}{}", dev.address(), if compress { "?compress=true" } else { "" });
    let opts = format!(
        "-i {} -p 2222 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        ssh.dir.join("id").display()
    );
    let before = dev.link_bytes();
    let t0 = Instant::now();
    sh(Command::new("nix").args(["copy", "--no-check-sigs", "--to", &url, system]).env("NIX_SSHOPTS", &opts));
    Sample { secs: t0.elapsed().as_secs_f64(), wire: (dev.link_bytes() - before) as f64 }
}

fn mb(b: f64) -> String {
    if b < 1e5 { format!("{:.1} kB", b / 1e3) } else { format!("{:.1} MB", b / 1e6) }
}

fn transfer(rows: &mut Vec<String>) {
    let mut f =
        Fleet::new(FleetOptions { confirm_timeout: 60, reply_timeout: 300, dead_after: 20, ..Default::default() })
            .expect("fleet");
    install_project(&f);
    f.add_device("d1", "bench", true).expect("device");
    f.wait_online("d1");
    let ssh = sshd(&f);
    let cases: [(&str, Option<&str>, &str); 4] = [
        ("full copy to an empty device", None, "base"),
        ("one component modified", Some("base"), "modified"),
        ("one component replaced", Some("base"), "replaced"),
        ("no-op (device has everything)", Some("base"), "base"),
    ];
    for (label, base, v) in cases {
        let system = system_of(v);
        let (mut o, mut p, mut c) = (vec![], vec![], vec![]);
        let (mut payload, mut confirmed) = (vec![], vec![]);
        for _ in 0..*RUNS {
            prepare(&mut f, base);
            let (s, done, child) = ours(&f, v);
            payload.push(child["bytes_sent"].as_f64().unwrap_or(0.0));
            confirmed.push(done);
            o.push(s);
            prepare(&mut f, base);
            p.push(nix_copy(&f, &ssh, &system, false));
            prepare(&mut f, base);
            c.push(nix_copy(&f, &ssh, &system, true));
        }
        let (o, p, c) = (med(&o), med(&p), med(&c));
        let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}x", a / b) } else { "–".into() };
        rows.push(format!(
            "| {label} | {:.2} s, {} | {:.2} s | {:.2} s, {} | {:.2} s, {} | {} | {} time, {} bytes |",
            o.secs,
            mb(o.wire),
            median(confirmed),
            p.secs,
            mb(p.wire),
            c.secs,
            mb(c.wire),
            mb(median(payload)),
            ratio(o.secs, p.secs),
            ratio(o.wire, p.wire)
        ));
        eprintln!("bench: {}", rows.last().map(String::as_str).unwrap_or(""));
    }
    drop(ssh);
}

/// The closure of bench/nixos-like.nix: (system, number of paths, NAR bytes).
fn nixos_like() -> (String, usize, u64) {
    let system = sh(Command::new("nix-build")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/nixos-like.nix"))
        .arg("--no-out-link"));
    let paths = sh(Command::new("nix-store").args(["-qR", &system])).lines().count();
    let nar = sh(Command::new("nix").args(["path-info", "-S", &system]));
    let nar = nar.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    (system, paths, nar)
}

/// `nix-store --export` of `paths` piped into `nix-store --import` of an empty store on
/// this machine: the floor of any copy (no network, no checks beyond Nix's own).
fn export_import(paths: &[String], dir: &Path) -> f64 {
    set_aside(dir);
    std::fs::create_dir_all(dir).expect("mkdir");
    settle();
    let t0 = Instant::now();
    let mut export = Command::new("nix-store")
        .arg("--export")
        .args(paths)
        .stdout(Stdio::piped())
        .spawn()
        .expect("nix-store --export");
    let import = Command::new("nix-store")
        .arg("--store")
        .arg(dir)
        .arg("--import")
        .stdin(export.stdout.take().expect("pipe"))
        .stdout(Stdio::null())
        .status()
        .expect("nix-store --import");
    assert!(export.wait().is_ok_and(|s| s.success()) && import.success(), "export | import failed");
    let secs = t0.elapsed().as_secs_f64();
    set_aside(dir);
    secs
}

/// The rate a bulk TCP stream gets through the device's shaped link, bytes per second.
fn link_rate(f: &Fleet) -> f64 {
    let dev = f.device("d1");
    let mut sink = Command::new("ip")
        .args(["netns", "exec", &dev.netns, "socat", "-u", "TCP-LISTEN:5555,reuseaddr", "OPEN:/dev/null"])
        .spawn()
        .expect("socat listener");
    std::thread::sleep(Duration::from_millis(500));
    let bytes = 40u64 << 20;
    let t0 = Instant::now();
    sh(Command::new("sh")
        .args(["-c", &format!("head -c {bytes} /dev/urandom | socat -u - TCP:{}:5555", dev.address())]));
    let secs = t0.elapsed().as_secs_f64();
    let _ = sink.wait();
    bytes as f64 / secs
}

/// A closure shaped like a real NixOS system to an empty device: ours on loopback and
/// behind the shaped link, `nix copy` over ssh-ng behind the same link, and the floor of
/// one export/import stream on this machine. Also the per-path cost of importing a
/// process per path (as the agent did before batches) against one import for many.
fn real_size(rows: &mut Vec<String>) {
    let (system, paths, nar) = nixos_like();
    let closure: Vec<String> =
        sh(Command::new("nix-store").args(["-qR", &system])).lines().map(str::to_owned).collect();
    let mut f =
        Fleet::new(FleetOptions { confirm_timeout: 120, reply_timeout: 300, dead_after: 20, ..Default::default() })
            .expect("fleet");
    let project = f.controller.project_dir();
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/nixos-like.nix"), project.join("nixos-like.nix"))
        .expect("copy");
    std::fs::write(
        project.join("flake.nix"),
        "{ outputs = { self }: { nixosConfigurations.bench.config.system.build.toplevel = import ./nixos-like.nix; }; }\n",
    )
    .expect("flake");
    std::fs::write(project.join("thymis.toml"), "[configs.bench]\ntags = [\"bench\"]\n").expect("toml");
    set_variant(&f, "base");
    f.add_device("d1", "bench", true).expect("device");
    f.wait_online("d1");
    let ssh = sshd(&f);
    f.device("d1").shape(RATE).expect("tc");
    let rate = link_rate(&f);
    let scratch = f.tmp.path().join("floor");
    let (mut floor, mut lo, mut shaped, mut plain, mut comp, mut payload) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..*RUNS {
        floor.push(export_import(&closure, &scratch));
        prepare(&mut f, None);
        f.device("d1").unshape();
        lo.push(ours(&f, "base").0.secs);
        prepare(&mut f, None);
        let (s, _, child) = ours(&f, "base");
        shaped.push(s);
        payload.push(child["bytes_sent"].as_f64().unwrap_or(0.0));
        prepare(&mut f, None);
        plain.push(nix_copy(&f, &ssh, &system, false));
        prepare(&mut f, None);
        comp.push(nix_copy(&f, &ssh, &system, true));
    }
    drop(ssh);
    let (floor, lo, shaped, plain, comp, payload) =
        (median(floor), median(lo), med(&shaped), med(&plain), med(&comp), median(payload));
    let at_rate = payload / rate;
    let ms = |secs: f64| secs * 1000.0 / paths as f64;
    rows.push(format!("| closure | {paths} paths, {} of NAR (bench/nixos-like.nix) |", mb(nar as f64)));
    rows.push(format!("| loopback: ours, full deploy to activation | {lo:.2} s ({:.1} ms per path) |", ms(lo)));
    rows.push(format!(
        "| loopback: `nix-store --export \\| nix-store --import` (floor) | {floor:.2} s ({:.1} ms per path); ours / floor {:.2}x |",
        ms(floor),
        lo / floor
    ));
    rows.push(format!(
        "| {RATE} (measured {:.1} Mbit/s): ours | {:.2} s, {} on the wire, {} compressed payload; {:.2}x the time the payload needs at the measured rate ({at_rate:.2} s) |",
        rate * 8.0 / 1e6,
        shaped.secs,
        mb(shaped.wire),
        mb(payload),
        shaped.secs / at_rate
    ));
    rows.push(format!("| {RATE}: `nix copy --to ssh-ng://` | {:.2} s, {} on the wire |", plain.secs, mb(plain.wire)));
    rows.push(format!(
        "| {RATE}: `nix copy --to ssh-ng://?compress=true` | {:.2} s, {} on the wire; ours {:.2}x its time |",
        comp.secs,
        mb(comp.wire),
        shaped.secs / comp.secs
    ));
    rows.push(per_path_import(&closure, &scratch));
    for r in rows.iter() {
        eprintln!("bench: {r}");
    }
}

/// Importing 200 small paths of the closure with a `nix-store --import` each (the agent
/// before batches) against one import for all (a batch): milliseconds per path.
fn per_path_import(closure: &[String], dir: &Path) -> String {
    let small: Vec<&String> = closure
        .iter()
        .filter(|p| std::fs::metadata(p.as_str()).is_ok_and(|m| m.is_dir()) && !p.contains("system"))
        .take(200)
        .collect();
    let export = |p: &[&String]| -> Vec<u8> {
        let out = Command::new("nix-store").arg("--export").args(p).output().expect("export");
        out.stdout
    };
    let import = |data: &[u8]| {
        use std::io::Write;
        let mut c = Command::new("nix-store")
            .arg("--store")
            .arg(dir)
            .arg("--import")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("import");
        c.stdin.take().expect("stdin").write_all(data).expect("write");
        assert!(c.wait().is_ok_and(|s| s.success()), "import failed");
    };
    // References first: each path is imported after the paths it refers to.
    let one_each: Vec<Vec<u8>> = small.iter().map(|p| export(&[*p])).collect();
    let all = export(&small);
    let (mut single, mut batch) = (vec![], vec![]);
    for _ in 0..*RUNS {
        set_aside(dir);
        let t0 = Instant::now();
        for data in &one_each {
            import(data);
        }
        single.push(t0.elapsed().as_secs_f64());
        set_aside(dir);
        let t0 = Instant::now();
        import(&all);
        batch.push(t0.elapsed().as_secs_f64());
    }
    set_aside(dir);
    let n = small.len() as f64;
    format!(
        "| importing {} small paths: a process per path / one batch | {:.1} ms per path / {:.1} ms per path |",
        small.len(),
        median(single) * 1000.0 / n,
        median(batch) * 1000.0 / n
    )
}

/// Handshakes the load generators hold open at once. They all come from one address,
/// where a real fleet's devices come from many: their controller lets that one address
/// hold as many ([`load_fleet_args`]), or its per-address limit (32 by default) would
/// refuse them.
const LOAD_HANDSHAKES: usize = 128;

/// The controller's arguments for a fleet of load generators (see [`LOAD_HANDSHAKES`]).
fn load_fleet_args() -> Vec<String> {
    vec![format!("--max-handshakes-per-peer={LOAD_HANDSHAKES}")]
}

type LoadWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An HTTP client for the bench's own controller on this machine: over TLS it takes the
/// certificate the controller shows, as the harness's scripted agents do.
fn http_agent() -> ureq::Agent {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = ureq::tls::TlsConfig::builder().disable_verification(true).build();
    ureq::Agent::config_builder().http_status_as_error(false).tls_config(tls).build().into()
}

/// Enrolls `n` devices of `config` through the API (one HTTP connection, kept alive):
/// their enrollment tokens.
fn enroll_load_agents(f: &Fleet, n: usize, config: &str) -> Vec<String> {
    let agent = http_agent();
    let auth = format!("Bearer {}", f.controller.token());
    (0..n)
        .map(|i| {
            let mut r = agent
                .post(&format!("{}/api/v1/devices", f.controller.base_url()))
                .header("Authorization", &auth)
                .send_json(json!({ "name": format!("load{i}"), "config": config }))
                .expect("add device");
            let v: Value = r.body_mut().read_json().expect("json");
            v["enrollment_token"].as_str().expect("token").to_owned()
        })
        .collect()
}

/// A load-generator agent's connection: the agent's own handshake
/// ([`AgentHandshake`]) with a fresh key and token, trusting only `controller_key`.
async fn load_agent_connect(url: &str, token: String, controller_key: PublicKey) -> Result<LoadWs, String> {
    use futures_util::{SinkExt, StreamExt};
    use thymis_proto::handshake::{AgentHandshake, Nonce};
    use thymis_proto::{decode_agent_bound, encode};
    use tokio_tungstenite::tungstenite::Message;
    let key = thymis_store::signing::SecretKey::generate("thymis-device").map_err(|e| e.to_string())?;
    let mut ws = thymis_fleet_tests::ws_connect(url).await.map_err(|e| format!("connect: {e:#}"))?;
    let pinned = [controller_key];
    let mut h = AgentHandshake::new(&key, &pinned, Some(token), Nonce(rand32()));
    ws.send(Message::text(encode(&h.hello("load")))).await.map_err(|e| e.to_string())?;
    async fn next(ws: &mut LoadWs) -> Result<thymis_proto::AgentBound, String> {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => decode_agent_bound(t.as_str(), false).map_err(|e| format!("{e}: {t}")),
            other => Err(format!("no answer: {other:?}")),
        }
    }
    let auth = h.on_challenge(next(&mut ws).await?).map_err(|e| e.to_string())?;
    ws.send(Message::text(encode(&auth))).await.map_err(|e| e.to_string())?;
    h.on_welcome(next(&mut ws).await?).map_err(|e| e.to_string())?;
    Ok(ws)
}

/// The controller's identity key, which load agents pin.
fn controller_key(f: &Fleet) -> PublicKey {
    let (status, identity) = f.controller.api("/identity", None);
    assert_eq!(status, 200, "{identity}");
    identity["identity_key"].as_str().and_then(|k| k.parse().ok()).expect("the controller's identity key")
}

/// A binary cache the load generators substitute from, as agents configured with
/// `substituters` do: its URL and the keys its narinfos must be signed with.
struct LoadCache {
    url: String,
    keys: Vec<thymis_store::signing::PublicKey>,
    http: ureq::Agent,
}

/// What a load generator took from its cache for `paths`: every path the cache has with
/// a trusted signature is fetched and checked (hash and size, after decompression) but
/// not imported. Returns the paths still missing, and the paths and compressed bytes
/// substituted.
fn load_substitute(cache: &LoadCache, paths: Vec<thymis_store::StorePath>) -> (Vec<thymis_store::StorePath>, u64, u64) {
    use std::io::Read;
    use thymis_store::narinfo::{Compression, NarInfo, narinfo_name};
    let (mut missing, mut n, mut bytes) = (Vec::new(), 0u64, 0u64);
    for path in paths {
        let fetched = (|| -> Result<u64, String> {
            let get = |url: String| -> Result<Vec<u8>, String> {
                let mut r = cache.http.get(&url).call().map_err(|e| format!("{url}: {e}"))?;
                if r.status() != 200 {
                    return Err(format!("{url}: {}", r.status()));
                }
                r.body_mut().with_config().limit(1 << 30).read_to_vec().map_err(|e| format!("{url}: {e}"))
            };
            let text =
                String::from_utf8(get(format!("{}/{}", cache.url, narinfo_name(&path)))?).map_err(|e| e.to_string())?;
            let info = NarInfo::parse(&text).map_err(|e| e.to_string())?;
            thymis_store::signing::verify_path(&info.info, &cache.keys).map_err(|e| e.to_string())?;
            let body = get(format!("{}/{}", cache.url, info.url))?;
            let reader: Box<dyn Read> = match info.compression {
                Compression::Zstd => {
                    Box::new(thymis_store::zstd_limits::decoder(&body[..]).map_err(|e| e.to_string())?)
                }
                Compression::None => Box::new(&body[..]),
                Compression::Xz => return Err("the bench's cache writes zstd".into()),
            };
            thymis_store::nar::copy_verified(reader, &mut std::io::sink(), &info.info.nar_hash, info.info.nar_size)
                .map_err(|e| e.to_string())?;
            Ok(body.len() as u64)
        })();
        match fetched {
            Ok(b) => {
                n += 1;
                bytes += b;
            }
            Err(_) => missing.push(path),
        }
    }
    (missing, n, bytes)
}

/// A load-generator agent during a copy: accepts the offer, substitutes what its cache
/// (if any) has, lacks every other path, checks each NAR it receives (zstd, then sha256
/// and size against the signed path info) without importing it, acknowledges it, and
/// ends at `activate`. Returns the compressed bytes received from the controller.
async fn load_agent_copy(mut ws: LoadWs, cache: Option<std::sync::Arc<LoadCache>>) -> Result<u64, String> {
    use futures_util::{SinkExt, StreamExt};
    use thymis_proto::{AgentBound, ControllerBound, CopyWindow, decode_agent_bound, encode};
    use tokio_tungstenite::tungstenite::Message;
    use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};
    let mut received = 0u64;
    // One decompression context and buffer for the connection, as an agent would keep.
    let mut dec = Decoder::new().map_err(|e| e.to_string())?;
    dec.set_parameter(DParameter::WindowLogMax(thymis_store::zstd_limits::WINDOW_LOG_MAX))
        .map_err(|e| e.to_string())?;
    let mut out = vec![0u8; 128 << 10];
    let mut current: Option<(thymis_store::PathInfo, thymis_store::hash::NarHasher)> = None;
    loop {
        let frame = ws.next().await.ok_or("closed")?.map_err(|e| e.to_string())?;
        let reply = match frame {
            Message::Binary(b) => {
                received += b.len() as u64;
                let (_, hasher) = current.as_mut().ok_or("chunk outside a path")?;
                let mut input = InBuffer::around(&b);
                while input.pos < b.len() {
                    let mut o = OutBuffer::around(&mut out[..]);
                    dec.run(&mut input, &mut o).map_err(|e| e.to_string())?;
                    let n = o.pos();
                    hasher.update(&out[..n]);
                }
                continue;
            }
            Message::Text(t) => match decode_agent_bound(t.as_str(), true).map_err(|e| e.to_string())? {
                AgentBound::Offer { offer } => {
                    let id = serde_json::from_str::<Value>(&offer.payload)
                        .ok()
                        .and_then(|v| v["deployment_id"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    ControllerBound::OfferAccepted { deployment_id: id }
                }
                AgentBound::QueryPaths { deployment_id, paths } => {
                    let (missing, substituted_paths, substituted_bytes) = match cache.clone() {
                        Some(c) => tokio::task::spawn_blocking(move || load_substitute(&c, paths))
                            .await
                            .map_err(|e| e.to_string())?,
                        None => (paths, 0, 0),
                    };
                    ControllerBound::PathsMissing {
                        deployment_id,
                        missing,
                        bases: vec![],
                        window: Some(CopyWindow { paths: 512, bytes: 64 << 20 }),
                        substituted_paths,
                        substituted_bytes,
                    }
                }
                AgentBound::PathStart { info, .. } => {
                    dec.reinit().map_err(|e| e.to_string())?;
                    current = Some((info, thymis_store::hash::NarHasher::new()));
                    continue;
                }
                AgentBound::PathEnd { deployment_id, path } => {
                    let (info, mut hasher) = current.take().ok_or("end outside a path")?;
                    loop {
                        let mut o = OutBuffer::around(&mut out[..]);
                        let left = dec.flush(&mut o).map_err(|e| e.to_string())?;
                        let n = o.pos();
                        hasher.update(&out[..n]);
                        if left == 0 {
                            break;
                        }
                    }
                    let (hash, size) = hasher.finish();
                    if hash != info.nar_hash || size != info.nar_size {
                        return Err(format!("{path}: NAR hash or size mismatch"));
                    }
                    ControllerBound::PathImported { deployment_id, path }
                }
                AgentBound::Activate { .. } => return Ok(received),
                _ => continue,
            },
            Message::Close(_) => return Err("closed".into()),
            _ => continue,
        };
        ws.send(Message::text(encode(&reply))).await.map_err(|e| e.to_string())?;
    }
}

/// A fleet for load generators (see [`load_fleet_args`]), with `extra` arguments for its
/// controller. A deployment that outlives the harness's two-minute expiry would end
/// `expired` mid-copy on a slow run of this machine, measuring nothing.
fn load_fleet(n: usize, extra: Vec<String>) -> Fleet {
    let mut extra_args = load_fleet_args();
    extra_args.extend(extra);
    Fleet::new(FleetOptions {
        reply_timeout: 600,
        dead_after: 120,
        heartbeat: 30,
        deployment_ttl: 3600,
        parallel: Some(n),
        extra_args,
        ..Default::default()
    })
    .expect("fleet")
}

/// Builds configuration `alpha` as `cfg` says: its closure's NAR bytes.
fn load_build(f: &Fleet, cfg: Value) -> f64 {
    f.set_configs(&json!({ "alpha": cfg, "beta": {} })).expect("cfg");
    let _ = f.controller.ctl(&["project", "commit", "-m", "load"]);
    let b = f.controller.ctl_json(&["build", "alpha", "--wait"]);
    assert_eq!(b["result"], "succeeded", "{b}");
    let nar = sh(Command::new("nix").args(["path-info", "-S", b["system"].as_str().unwrap_or_default()]));
    nar.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0.0)
}

/// The sum of a numeric field over a task's children.
fn children_sum(task: &Value, key: &str) -> i64 {
    task["children"].as_array().map_or(0, |c| c.iter().filter_map(|c| c[key].as_i64()).sum())
}

/// What one deployment of `alpha` to N load generators measured.
struct LoadRun {
    secs: f64,
    done: usize,
    /// Compressed bytes the load generators received from the controller.
    bytes: u64,
    /// The controller's CPU seconds, and the load generators' (this process's).
    cpu: f64,
    gen_cpu: f64,
    read: u64,
    peak: String,
    idle: String,
    task: Value,
}

/// N load-generator agents (one process, the real protocol, hashes checked, nothing
/// imported), each substituting from `cache` first if given, connect and then take one
/// deployment of `alpha` at once: measured from `thymisctl deploy` to every copy done
/// (each agent at `activate`).
fn load_rollout(f: &Fleet, n: usize, cache: Option<std::sync::Arc<LoadCache>>) -> LoadRun {
    let tokens = enroll_load_agents(f, n, "alpha");
    let url = f.controller.agent_url();
    let ck = controller_key(f);
    let ctl_pid = f.controller.pid().expect("controller pid");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(LOAD_HANDSHAKES));
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut handles = Vec::new();
    for token in tokens {
        let (url, limit, ready, cache, ck) = (url.clone(), limit.clone(), ready.clone(), cache.clone(), ck.clone());
        handles.push(rt.spawn(async move {
            let permit = limit.acquire_owned().await.expect("semaphore");
            let ws = load_agent_connect(&url, token, ck).await;
            drop(permit);
            ready.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            load_agent_copy(ws.map_err(|e| format!("handshake: {e}"))?, cache).await
        }));
    }
    // Every handshake has ended, each connected or failed (a failure ends its task,
    // reported below).
    while ready.load(std::sync::atomic::Ordering::Relaxed) < n {
        std::thread::sleep(Duration::from_millis(100));
    }
    let idle = proc_field(ctl_pid, "VmRSS:");
    let (c0, g0, io0) = (cpu_ticks(ctl_pid), cpu_ticks(std::process::id()), disk_reads(ctl_pid));
    let t0 = Instant::now();
    let out = f.controller.ctl(&["--json", "deploy", "--config", "alpha", "-m", "load"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let results: Vec<Result<u64, String>> = rt
        .block_on(async { futures_util::future::join_all(handles).await })
        .into_iter()
        .map(|r| r.map_err(|e| e.to_string()).and_then(|r| r))
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(ctl_pid) - c0) as f64 / 100.0;
    let gen_cpu = (cpu_ticks(std::process::id()) - g0) as f64 / 100.0;
    let read = disk_reads(ctl_pid) - io0;
    let peak = proc_field(ctl_pid, "VmHWM:");
    rt.shutdown_background();
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        eprintln!("bench: a load agent failed: {e}");
    }
    let id = serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|t| t["id"].as_i64()).expect("task id");
    let (_, task) = f.controller.api(&format!("/tasks/{id}"), None);
    LoadRun {
        secs,
        done: results.iter().filter(|r| r.is_ok()).count(),
        bytes: results.iter().filter_map(|r| r.as_ref().ok()).sum(),
        cpu,
        gen_cpu,
        read,
        peak,
        idle,
        task,
    }
}

/// The controller alone serving copies: N load generators take a deployment of one
/// configuration at once. Aggregate rate, the controller's peak memory and CPU per device.
fn fan_out_load(rows: &mut Vec<String>) {
    let sizes: Vec<usize> = std::env::var("THYMIS_BENCH_LOAD_DEVICES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or(vec![100, 1000]);
    for n in sizes {
        let f = load_fleet(n, vec![]);
        let nar = load_build(&f, json!({ "version": "2", "small": 500, "payloads": 24, "payloadKiB": 2048 }));
        let r = load_rollout(&f, n, None);
        rows.push(format!(
            "| {n} | {} of {n} in {:.1} s | {} compressed ({} NAR) per device | {:.2} GB/s | {} ({} before) | {:.1} ms per device ({:.2} cores) | {} | {:.2} cores |",
            r.done,
            r.secs,
            mb(r.bytes as f64 / r.done.max(1) as f64),
            mb(nar),
            r.bytes as f64 / r.secs / 1e9,
            r.peak,
            r.idle,
            r.cpu * 1000.0 / n as f64,
            r.cpu / r.secs,
            mb(r.read as f64),
            r.gen_cpu / r.secs,
        ));
        eprintln!("bench: {}", rows.last().map(String::as_str).unwrap_or(""));
    }
}

/// The same fleet-wide rollout to N load generators through the controller alone, and
/// through a site cache the controller publishes to (`--publish-cache`, served by
/// busybox httpd): the bytes the controller sent and the devices took from the cache,
/// counted by the controller, and the time to every copy done.
fn site_cache_load(rows: &mut Vec<String>) {
    let n: usize = std::env::var("THYMIS_BENCH_CACHE_DEVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    for with_cache in [false, true] {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tmp");
        let publish = vec!["--publish-cache".into(), format!("file://{}?compression=zstd", dir.path().display())];
        let f = load_fleet(n, if with_cache { publish } else { vec![] });
        load_build(&f, json!({ "version": "4", "payloads": 10, "payloadKiB": 512, "small": 300 }));
        let addr = "127.0.0.1:18091";
        let mut httpd =
            Command::new("busybox").args(["httpd", "-f", "-p", addr, "-h"]).arg(dir.path()).spawn().expect("httpd");
        let cache = with_cache.then(|| {
            let (_, id) = f.controller.api("/identity", None);
            let key = id["nix_signing_key"].as_str().expect("the controller's Nix key");
            std::sync::Arc::new(LoadCache {
                url: format!("http://{addr}"),
                keys: vec![key.parse().expect("nix key")],
                http: ureq::Agent::config_builder().http_status_as_error(false).build().into(),
            })
        });
        let r = load_rollout(&f, n, cache);
        let _ = httpd.kill();
        let _ = httpd.wait();
        let sum = |k: &str| children_sum(&r.task, k);
        rows.push(format!(
            "| {} | {n} load generators | {} of {n} in {:.2} s | {} ({} paths) | {} ({} paths) | {:.2} s |",
            if with_cache { "controller + site cache" } else { "controller alone" },
            r.done,
            r.secs,
            mb(sum("bytes_sent") as f64),
            sum("paths_sent"),
            mb(sum("bytes_substituted") as f64),
            sum("paths_substituted"),
            r.cpu,
        ));
        eprintln!("bench: {}", rows.last().map(String::as_str).unwrap_or(""));
    }
}

/// Returns the footprint line of the one-device run.
fn fan_out(rows: &mut Vec<String>) -> String {
    let mut foot = String::new();
    let mut base_secs = 0.0;
    for n in [1usize, 10, 50] {
        let mut f = Fleet::new(FleetOptions { reply_timeout: 300, ..Default::default() }).expect("fleet");
        f.set_configs(&json!({ "alpha": { "version": "2", "payloads": 10, "payloadKiB": 512 }, "beta": {} }))
            .expect("cfg");
        for i in 0..n {
            f.add_device(&format!("f{i}"), "alpha", true).expect("device");
        }
        for i in 0..n {
            f.wait_online(&format!("f{i}"));
        }
        let t0 = Instant::now();
        let t = f.controller.ctl_json(&["deploy", "--config", "alpha", "-m", "fan-out", "--wait"]);
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(t["result"], "succeeded", "{t}");
        let (_, stats) = f.controller.api("/stats", None);
        if n == 1 {
            base_secs = secs;
        }
        rows.push(format!(
            "| {n} | {:.2} s | {:.2}x | {} | {} |",
            secs,
            secs / base_secs.max(1e-9),
            stats["builds"],
            stats["compressions"]
        ));
        eprintln!("bench: {}", rows.last().map(String::as_str).unwrap_or(""));
        if n == 1 {
            foot = footprint(&f);
        }
    }
    foot
}

/// One fleet-wide rollout through the controller alone, and again with the devices
/// substituting from a site cache (the controller's `--publish-cache`, served by busybox
/// httpd): time to all confirmed, and the bytes the controller sent.
fn site_cache(rows: &mut Vec<String>) {
    const DEVICES: usize = 20;
    for (uplink, with_cache) in [(None, false), (None, true), (Some("20mbit"), false), (Some("20mbit"), true)] {
        let cache = tempfile::tempdir_in("/var/tmp").expect("tmp");
        // Closer to the production defaults than the tests' timeouts: a capped uplink
        // queues the controller's messages behind the copies.
        let mut opts = FleetOptions {
            reply_timeout: 300,
            confirm_timeout: 120,
            heartbeat: 5,
            dead_after: 30,
            ..Default::default()
        };
        if with_cache {
            opts.extra_args =
                vec!["--publish-cache".into(), format!("file://{}?compression=zstd", cache.path().display())];
        }
        let mut f = Fleet::new(opts).expect("fleet");
        f.set_configs(
            &json!({ "alpha": { "version": "4", "payloads": 10, "payloadKiB": 512, "small": 300 }, "beta": {} }),
        )
        .expect("cfg");
        f.controller.ctl(&["project", "commit", "-m", "site cache"]);
        let built = f.controller.ctl_json(&["build", "alpha", "--wait"]);
        assert_eq!(built["result"], "succeeded", "{built}");
        let addr = format!("{}:18090", f.host_address());
        let mut httpd = Command::new("busybox")
            .args(["httpd", "-f", "-p", &addr, "-h"])
            .arg(cache.path())
            .spawn()
            .expect("busybox httpd");
        for i in 0..DEVICES {
            let name = format!("s{i}");
            f.add_device(&name, "alpha", false).expect("device");
            if with_cache {
                f.add_agent_config(&name, &format!("substituters = [\"http://{addr}\"]\n")).expect("cfg");
            }
            f.device_mut(&name).start().expect("start");
        }
        for i in 0..DEVICES {
            f.wait_online(&format!("s{i}"));
        }
        if let Some(rate) = uplink {
            f.shape_controller(rate).expect("shape");
        }
        let t0 = Instant::now();
        let t = f.controller.ctl_json(&["deploy", "--config", "alpha", "-m", "site cache", "--wait"]);
        let secs = t0.elapsed().as_secs_f64();
        let _ = httpd.kill();
        let _ = httpd.wait();
        assert_eq!(t["result"], "succeeded", "{t}");
        let sum = |k: &str| children_sum(&t, k);
        rows.push(format!(
            "| {}{} | {DEVICES} | {secs:.2} s | {} ({} paths) | {} ({} paths) |",
            if with_cache { "controller + site cache" } else { "controller alone" },
            uplink.map_or(String::new(), |r| format!(", controller's uplink {r}")),
            mb(sum("bytes_sent") as f64),
            sum("paths_sent"),
            mb(sum("bytes_substituted") as f64),
            sum("paths_substituted"),
        ));
        eprintln!("bench: {}", rows.last().map(String::as_str).unwrap_or(""));
    }
}

/// `thymis-imager build` against `cp -a` + `mkfs.ext4 -d` + `zstd -3 -T0` of the same
/// closure, and `flash` against `bmaptool copy` of the same image (both to a new file).
fn imager(rows: &mut Vec<String>) {
    let system = system_of("base");
    let paths: Vec<String> = sh(Command::new("nix-store").args(["-qR", &system])).lines().map(str::to_owned).collect();
    let imager = thymis_fleet_tests::bin("thymis-imager");
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tmp");
    let dir = tmp.path();
    let timed = |f: &mut dyn FnMut()| {
        let t0 = Instant::now();
        f();
        t0.elapsed().as_secs_f64()
    };
    let (mut ours, mut base, mut flash, mut bmaptool) = (vec![], vec![], vec![], vec![]);
    let mut base_zst = 0u64;
    for run in 0..*RUNS {
        let set = dir.join(format!("set{run}"));
        ours.push(timed(&mut || {
            sh(Command::new(&imager).args(["build", "--system", &system, "--name", "bench", "--out"]).arg(&set));
        }));
        let root = dir.join(format!("root{run}"));
        let img = dir.join(format!("plain{run}.img"));
        base.push(timed(&mut || {
            std::fs::create_dir_all(root.join("nix/store")).expect("mkdir");
            sh(Command::new("cp").arg("-a").args(&paths).arg(root.join("nix/store")));
            sh(Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&root).arg(&img).arg("400M"));
            sh(Command::new("zstd").args(["-q", "-3", "-T0", "-f"]).arg(&img));
        }));
        base_zst = std::fs::metadata(img.with_extension("img.zst")).map(|m| m.len()).unwrap_or(0);
        let _ = Command::new("rm").arg("-rf").arg(&root).arg(&img).arg(img.with_extension("img.zst")).status();
        let zst = set.join("bench.img.zst");
        let target = dir.join(format!("flash{run}.img"));
        flash.push(timed(&mut || {
            sh(Command::new(&imager).arg("flash").arg(&zst).arg(&target));
        }));
        let target2 = dir.join(format!("bmaptool{run}.img"));
        bmaptool.push(timed(&mut || {
            sh(Command::new("bmaptool")
                .args(["-q", "copy", "--bmap"])
                .arg(set.join("bench.bmap"))
                .arg(&zst)
                .arg(&target2));
        }));
        let _ = std::fs::remove_file(&target);
        let _ = std::fs::remove_file(&target2);
    }
    let m: Value =
        serde_json::from_slice(&std::fs::read(dir.join("set0/manifest.json")).expect("manifest")).expect("json");
    let (ours, base, flash, bmaptool) = (median(ours), median(base), median(flash), median(bmaptool));
    let ours_zst = m["compressed_size"].as_u64().unwrap_or(0);
    rows.push(format!(
        "| build: {} paths, {} MiB mapped of {} MiB | {ours:.2} s, {} compressed | {base:.2} s, {} compressed (`cp -a`, `mkfs.ext4 -d`, `zstd -3 -T0`) | {:.2}x time, {:.2}x size |",
        paths.len(),
        m["mapped_bytes"].as_u64().unwrap_or(0) >> 20,
        m["image_size"].as_u64().unwrap_or(0) >> 20,
        mb(ours_zst as f64),
        mb(base_zst as f64),
        ours / base,
        ours_zst as f64 / base_zst.max(1) as f64
    ));
    rows.push(format!(
        "| flash to a new file (checked, read back) | {flash:.2} s | {bmaptool:.2} s (`bmaptool copy`) | {:.2}x |",
        flash / bmaptool
    ));
    for r in rows.iter() {
        eprintln!("bench: {r}");
    }
}

fn proc_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l[key.len()..].trim().to_owned())
        .unwrap_or_default()
}

/// Bytes `pid` made the disk read (page-cache hits excluded).
fn disk_reads(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("read_bytes:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

fn footprint(f: &Fleet) -> String {
    let pid = f.devices[0].agent_pid().expect("agent pid");
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(20));
    let cpu = (cpu_ticks(pid) - t0) as f64 / 100.0 / 20.0 * 100.0;
    let line = format!(
        "| idle agent | {} resident | {cpu:.2} % of one core (20 s, heartbeat every 1 s) |",
        proc_field(pid, "VmRSS:")
    );
    eprintln!("bench: {line}");
    line
}

/// Idle agents speaking the real protocol from one process, against one controller.
fn scale(n: usize) -> Vec<String> {
    use futures_util::{SinkExt, StreamExt};
    use thymis_proto::{AgentBound, ControllerBound, decode_agent_bound, encode};
    use tokio_tungstenite::tungstenite::Message;

    let f = Fleet::new(FleetOptions {
        heartbeat: 15,
        dead_after: 45,
        reply_timeout: 300,
        extra_args: load_fleet_args(),
        ..Default::default()
    })
    .expect("fleet");
    let t0 = Instant::now();
    let tokens = enroll_load_agents(&f, n, "alpha");
    let enroll_secs = t0.elapsed().as_secs_f64();
    let url = f.controller.agent_url();
    let ck = controller_key(&f);
    let ctl_pid = f.controller.pid().expect("controller pid");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let offered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(LOAD_HANDSHAKES));
    let t_connect = Instant::now();
    for token in tokens {
        let (url, connected, offered, limit, ck) =
            (url.clone(), connected.clone(), offered.clone(), limit.clone(), ck.clone());
        rt.spawn(async move {
            let permit = limit.acquire_owned().await.expect("semaphore");
            let mut ws = match load_agent_connect(&url, token, ck).await {
                Ok(ws) => ws,
                Err(e) => return eprintln!("bench: a load agent's handshake failed: {e}"),
            };
            drop(permit);
            connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut beat = tokio::time::interval(Duration::from_secs(15));
            loop {
                tokio::select! {
                    m = ws.next() => match m {
                        Some(Ok(Message::Text(t))) => {
                            if let Ok(AgentBound::Offer { offer }) = decode_agent_bound(t.as_str(), true) {
                                offered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let id = serde_json::from_str::<Value>(&offer.payload).ok().and_then(|v| v["deployment_id"].as_str().map(str::to_owned)).unwrap_or_default();
                                let _ = ws.send(Message::text(encode(&ControllerBound::OfferRefused { deployment_id: id, reason: "load generator".into() }))).await;
                            }
                        }
                        Some(Ok(_)) => {}
                        other => {
                            let why = match other {
                                Some(Err(e)) => format!("error: {e}"),
                                None => "closed".into(),
                                _ => "?".into(),
                            };
                            eprintln!("bench: load agent connection ended: {why}");
                            return;
                        }
                    },
                    _ = beat.tick() => { let _ = ws.send(Message::text(encode(&ControllerBound::Heartbeat { seq: 0 }))).await; }
                }
            }
        });
    }
    let all = |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::Relaxed) >= n;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !all(&connected) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let connect_secs = t_connect.elapsed().as_secs_f64();
    let got = connected.load(std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(5));
    let c0 = cpu_ticks(ctl_pid);
    std::thread::sleep(Duration::from_secs(30));
    let idle_cpu = (cpu_ticks(ctl_pid) - c0) as f64 / 100.0 / 30.0 * 100.0;
    let rss = proc_field(ctl_pid, "VmRSS:");
    let t_deploy = Instant::now();
    let out = f.controller.ctl(&["--json", "deploy", "--config", "alpha", "-m", "notice"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(180);
    while !all(&offered) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let notice_secs = t_deploy.elapsed().as_secs_f64();
    let reached = offered.load(std::sync::atomic::Ordering::Relaxed);
    rt.shutdown_background();
    vec![
        format!(
            "| agents connected | {got} of {n} in {connect_secs:.1} s (enrollment through the API: {enroll_secs:.1} s) |"
        ),
        format!("| controller memory, all connected | {rss} |"),
        format!("| controller CPU, idle (heartbeats every 15 s) | {idle_cpu:.1} % of one core |"),
        format!("| signed offer delivered to every agent | {reached} of {n} in {notice_secs:.1} s (build included) |"),
    ]
}

fn rand32() -> [u8; 32] {
    let mut b = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b
}

fn main() {
    let machine = format!(
        "{} cores, {} memory, {}, Nix {}",
        sh(&mut Command::new("nproc")),
        sh(Command::new("sh").args(["-c", "free -h | awk '/Mem:/ {print $2}'"])),
        sh(Command::new("uname").args(["-sr"])),
        sh(Command::new("nix-store").arg("--version")).replace("nix-store (Nix) ", "")
    );
    let agents: usize = std::env::var("THYMIS_BENCH_AGENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    // THYMIS_BENCH_ONLY=scale|transfer|real|load|fanout|cache|loadcache|imager runs (and prints) only that part, for investigating.
    match std::env::var("THYMIS_BENCH_ONLY").as_deref() {
        Ok("scale") => {
            println!("{}", scale(agents).join("\n"));
            return;
        }
        Ok(part @ ("real" | "load" | "transfer" | "cache" | "loadcache" | "imager")) => {
            let mut rows = vec![];
            match part {
                "real" => real_size(&mut rows),
                "cache" => site_cache(&mut rows),
                "loadcache" => site_cache_load(&mut rows),
                "load" => fan_out_load(&mut rows),
                "transfer" => transfer(&mut rows),
                _ => imager(&mut rows),
            }
            println!("{}", rows.join("\n"));
            return;
        }
        Ok("fanout") => {
            let mut rows = vec![];
            let foot = fan_out(&mut rows);
            println!("{}\n{foot}", rows.join("\n"));
            return;
        }
        _ => {}
    }
    let mut transfer_rows = vec![];
    transfer(&mut transfer_rows);
    let mut real_rows = vec![];
    real_size(&mut real_rows);
    let mut fan_rows = vec![];
    let foot = fan_out(&mut fan_rows);
    let mut load_rows = vec![];
    fan_out_load(&mut load_rows);
    let mut cache_rows = vec![];
    site_cache(&mut cache_rows);
    let mut load_cache_rows = vec![];
    site_cache_load(&mut load_cache_rows);
    let mut imager_rows = vec![];
    imager(&mut imager_rows);
    let scale_rows = scale(agents);
    let doc = format!(
        "# Benchmarks\n\nMeasured by `make bench` on {machine}. Medians of {} runs; each baseline ran side by side in the same run.\n\n\
## Transfer: a 223 MB closure of 8 paths to a device behind a {RATE} link\n\n\
Ours: `thymisctl deploy` of a configuration built beforehand (`thymisctl build`; the baselines too copy a closure that is already built), from start to the device's report that it activated (offer, query, copy of the missing paths, activation), and to the confirmed result (confirmation over a new connection). \
Baselines: `nix copy --to ssh-ng://` to the same device (sshd in its namespaces), plain and with `?compress=true`. \
Bytes are what crossed the device's veth (both directions).\n\n\
| case | ours, to activation | ours, to confirmation | ssh-ng | ssh-ng compress=true | our compressed payload | ours / plain ssh-ng |\n|---|---|---|---|---|---|---|\n{}\n\n\
## A real-sized system: a closure shaped like NixOS's to an empty device\n\n\
Ours: as above, to the device's activation report. The floor: `nix-store --export` of the closure piped into `nix-store --import` of an empty store on this machine. The link rate is a bulk TCP stream's through the same shaped link.\n\n\
| | |\n|---|---|\n{}\n\n\
## Fan-out: one configuration (13 paths, 5 MB) to N devices at once\n\n\
| devices | time | vs. one device | builds | compressions |\n|---|---|---|---|---|\n{}\n\n\
## Fan-out where the controller is the bottleneck: load-generator agents\n\n\
N agents speaking the real protocol from one process (each with its own key, enrollment and connection) take one deployment at once; each checks every NAR (zstd, sha256, size against the signed path info) but imports nothing, so the figures are the controller's: its time to serve every copy, the aggregate compressed bytes per second it sent, its peak resident memory, its CPU time per device, and what it read from the disk (the cache's NARs are read once per path, not once per device, when the page cache holds them). The closure: 527 paths, 500 of them small and 24 of 2 MiB of incompressible data. The load generators share the machine's cores with the controller; their CPU use is in the last column.\n\n\
| devices | all copies done | per device | aggregate | controller peak memory (connected, before the deployment) | controller CPU | controller disk reads | load generators' CPU |\n|---|---|---|---|---|---|---|---|\n{}\n\n\
## A fleet-wide rollout through a site cache\n\n\
The same deployment (a closure of 315 paths, 5 MB of it incompressible) to 20 devices, through the controller alone, and with the devices substituting from the site cache the controller publishes to (`--publish-cache file://...?compression=zstd`, served by busybox httpd on the same machine); first with no link limit (devices, cache and controller share this machine's cores), then with what the controller sends to all devices together capped at 20 Mbit/s, as a site's uplink to a distant controller would be (the cache, on the site, is not capped): time from `thymisctl deploy` to every device confirmed, and the compressed bytes the controller sent against those the devices took from the cache (docs/scale.md).\n\n\
| | devices | all confirmed | controller sent | from the cache |\n|---|---|---|---|---|\n{}\n\n\
The same comparison with load-generator agents (each fetches every narinfo and NAR its cache has over HTTP, checks the signature, hash and size, imports nothing, and asks the controller for the rest): time from `thymisctl deploy` to every copy done, what the controller counted as sent and as substituted, and the controller's CPU time for the rollout.\n\n\
| | devices | all copies done | controller sent | from the cache | controller CPU |\n|---|---|---|---|---|---|\n{}\n\n\
## Agent footprint\n\n| | |\n|---|---|\n{foot}\n\n\
## Imager: the transfer benchmark's closure\n\n| | ours | baseline | ours / baseline |\n|---|---|---|---|\n{}\n\n\
## Controller scale: {agents} idle agents speaking the real protocol from one process\n\n| | |\n|---|---|\n{}\n",
        *RUNS,
        transfer_rows.join("\n"),
        real_rows.join("\n"),
        fan_rows.join("\n"),
        load_rows.join("\n"),
        cache_rows.join("\n"),
        load_cache_rows.join("\n"),
        imager_rows.join("\n"),
        scale_rows.join("\n"),
    );
    println!("{doc}");
    std::fs::write(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md"), doc)
        .expect("write docs/benchmarks.md");
}
