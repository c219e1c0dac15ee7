//! A real-sized system: a closure shaped like NixOS's to an empty device, against the
//! floor of `nix-store --export | --import`.

use crate::*;

/// The closure of bench/nixos-like.nix: (system, number of paths, NAR bytes).
pub(crate) fn nixos_like() -> (String, usize, u64) {
    let system = sh(Command::new("nix-build")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/nixos-like.nix"))
        .arg("--no-out-link"));
    let paths = sh(Command::new("nix-store").args(["-qR", &system])).lines().count();
    let nar = sh(Command::new("nix").args(["path-info", "-S", &system]));
    let nar = nar.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    (system, paths, nar)
}

/// A fleet whose configuration `bench` is bench/nixos-like.nix called with `args` (a Nix
/// expression that may read `./variant.txt`), set to variant "0", and its device d1.
pub(crate) fn nixos_like_fleet(args: &str) -> Fleet {
    let mut f =
        Fleet::new(FleetOptions { confirm_timeout: 120, reply_timeout: 300, dead_after: 20, ..Default::default() })
            .expect("fleet");
    let project = f.controller.project_dir();
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/nixos-like.nix"), project.join("nixos-like.nix"))
        .expect("copy");
    std::fs::write(
        project.join("flake.nix"),
        format!("{{ outputs = {{ self }}: {{ nixosConfigurations.bench.config.system.build.toplevel = import ./nixos-like.nix ({args}); }}; }}\n"),
    )
    .expect("flake");
    std::fs::write(project.join("thymis.toml"), "[configs.bench]\ntags = [\"bench\"]\n").expect("toml");
    set_variant(&f, "0");
    f.add_device("d1", "bench", true).expect("device");
    f.wait_online("d1");
    f
}

/// `nix-store --export` of `paths` piped into `nix-store --import` of an empty store on
/// this machine: the floor of any copy (no network, no checks beyond Nix's own).
pub(crate) fn export_import(paths: &[String], dir: &Path) -> f64 {
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
pub(crate) fn link_rate(f: &Fleet) -> f64 {
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
pub(crate) fn real_size(rows: &mut Vec<String>) {
    let (system, paths, nar) = nixos_like();
    let closure: Vec<String> =
        sh(Command::new("nix-store").args(["-qR", &system])).lines().map(str::to_owned).collect();
    let mut f = nixos_like_fleet("{ }");
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
pub(crate) fn per_path_import(closure: &[String], dir: &Path) -> String {
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
