//! Shared by the benchmark's parts: running commands, medians, the bench project and its
//! variants, deploying and waiting.

use crate::*;

pub(crate) static RUNS: std::sync::LazyLock<usize> =
    std::sync::LazyLock::new(|| std::env::var("THYMIS_BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3));
pub(crate) const RATE: &str = "100mbit";

pub(crate) fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

#[derive(Default, Clone, Copy)]
pub(crate) struct Sample {
    pub(crate) secs: f64,
    pub(crate) wire: f64,
}

pub(crate) fn med(samples: &[Sample]) -> Sample {
    Sample {
        secs: median(samples.iter().map(|s| s.secs).collect()),
        wire: median(samples.iter().map(|s| s.wire).collect()),
    }
}

/// Installs the bench project (the closure of bench/closure.nix) into the controller.
pub(crate) fn install_project(f: &Fleet) {
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

pub(crate) fn set_variant(f: &Fleet, v: &str) {
    std::fs::write(f.controller.project_dir().join("variant.txt"), format!("{v}\n")).expect("variant");
    let _ = f.controller.ctl(&["project", "commit", "-m", &format!("variant {v}")]);
}

pub(crate) fn system_of(v: &str) -> String {
    sh(Command::new("nix-build").args([
        concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/closure.nix"),
        "--argstr",
        "variant",
        v,
        "--no-out-link",
    ]))
}

pub(crate) fn deploy(f: &Fleet) -> Value {
    let t = f.controller.ctl_json(&["deploy", "--device", "d1", "--wait"]);
    assert_eq!(t["result"], "succeeded", "bench deployment failed: {t}\n{}", f.diagnostics());
    t
}

/// Empties the device's store (agent stopped meanwhile), then installs `base` unshaped.
pub(crate) fn prepare(f: &mut Fleet, base: Option<&str>) {
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
pub(crate) fn aside(dir: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos());
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.with_file_name(format!("{name}-old-{}", nanos.unwrap_or(0)))
}

/// Moves `dir` aside (see [`aside`]), if it exists.
pub(crate) fn set_aside(dir: &Path) {
    if dir.exists() {
        std::fs::rename(dir, aside(dir)).expect("move aside");
    }
}

/// Writes back what earlier runs left in the page cache (the stores they imported), so
/// that it does not land in the next measurement.
pub(crate) fn settle() {
    let _ = Command::new("sync").status();
}

pub(crate) fn mb(b: f64) -> String {
    if b < 1e5 { format!("{:.1} kB", b / 1e3) } else { format!("{:.1} MB", b / 1e6) }
}

pub(crate) fn rand32() -> [u8; 32] {
    let mut b = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b
}
