//! A nixpkgs bump: the NixOS-shaped system of bench/nixos-like.nix rebuilt with
//! `bump = 1` (every path a new hash, a tenth with a new version in its name, a few with
//! new content) to a device that runs the previous one, against `nix copy --to ssh-ng://`
//! of the same update, a full copy, and the floor of one zstd patch of the whole new
//! closure against the whole old one; and the controller's time and memory to make the
//! deltas after the build.

use crate::*;

/// The NARs of `system`'s closure, one after another, in `file`.
fn closure_nar(system: &str, file: &Path) {
    let paths = sh(Command::new("nix-store").args(["-qR", system]));
    let out = std::fs::File::create(file).expect("create");
    let status = Command::new("sh")
        .args(["-c", "for p in $0; do nix-store --dump \"$p\"; done"])
        .arg(paths.split_whitespace().collect::<Vec<_>>().join(" "))
        .stdout(out)
        .status()
        .expect("nix-store --dump");
    assert!(status.success(), "dumping the closure of {system}");
}

/// Size and time of `zstd -19 --long=30 --patch-from` of the new closure's NARs against
/// the old closure's: what any delta of the whole update can hardly beat.
fn patch_floor(old: &str, new: &str, dir: &Path) -> (u64, f64) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let (a, b, patch) = (dir.join("old.nar"), dir.join("new.nar"), dir.join("patch.zst"));
    closure_nar(old, &a);
    closure_nar(new, &b);
    let t0 = Instant::now();
    sh(Command::new("zstd")
        .args(["-q", "-f", "-19", "--long=30"])
        .arg(format!("--patch-from={}", a.display()))
        .arg(&b)
        .arg("-o")
        .arg(&patch));
    let secs = t0.elapsed().as_secs_f64();
    let size = std::fs::metadata(&patch).map(|m| m.len()).unwrap_or(0);
    set_aside(dir);
    (size, secs)
}

/// `thymisctl build` of the bumped system while the device runs the previous one: the
/// controller's time to compress the closure and make the deltas (from the build task's
/// log), how many paths and deltas, and its peak memory meanwhile (kB).
fn make_deltas(f: &Fleet) -> (f64, String, u64) {
    let pid = f.controller.pid().expect("controller pid");
    // Resets the process's peak resident set size (proc(5), clear_refs).
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    set_variant(f, "1");
    let b = f.controller.ctl_json(&["build", "bench", "--wait"]);
    assert_eq!(b["result"], "succeeded", "bench build failed: {b}");
    let peak: u64 = proc_field(pid, "VmHWM:").trim_end_matches(" kB").trim().parse().unwrap_or(0);
    let id = b["id"].as_i64().expect("task id");
    let mut r = http_agent()
        .get(format!("{}/api/v1/tasks/{id}/logs", f.controller.base_url()))
        .header("Authorization", format!("Bearer {}", f.controller.token()))
        .call()
        .expect("task logs");
    let logs: Value = r.body_mut().read_json().expect("logs json");
    let line = logs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["line"].as_str())
        .find(|l| l.starts_with("compressed for deployment in"))
        .unwrap_or_else(|| panic!("the build did not say how long compressing took: {logs}"))
        .to_owned();
    // "compressed for deployment in 12.34 s (2906 paths and deltas)"
    let secs = line.split_whitespace().nth(4).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let what = line.split_once('(').map(|(_, w)| w.trim_end_matches(')').to_owned()).unwrap_or_default();
    (secs, what, peak)
}

pub(crate) fn bump(rows: &mut Vec<String>) {
    let build = |b: &str| {
        sh(Command::new("nix-build").arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/nixos-like.nix")).args([
            "--arg",
            "bump",
            b,
            "--no-out-link",
        ]))
    };
    let (old, new) = (build("0"), build("1"));
    let names = |s: &str| -> Vec<String> {
        sh(Command::new("nix-store").args(["-qR", s])).lines().map(str::to_owned).collect()
    };
    let (old_paths, new_paths) = (names(&old), names(&new));
    let kept = new_paths.iter().filter(|p| old_paths.contains(p)).count();
    let renamed = new_paths.iter().filter(|p| p.ends_with("-1.1")).count();
    let nar = |s: &str| -> f64 {
        let out = sh(Command::new("nix").args(["path-info", "-S", s]));
        out.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0.0)
    };

    // The variant is the bump's number.
    let mut f = nixos_like_fleet("{ bump = builtins.fromJSON (builtins.readFile ./variant.txt); }");
    let ssh = sshd(&f);

    // A full copy of the previous system to an empty device, for scale.
    prepare(&mut f, None);
    let (full, _, child) = ours(&f, "0");
    let full_payload = child["bytes_sent"].as_f64().unwrap_or(0.0);

    // The controller makes the deltas once, after the build, while the device runs the
    // previous system (as after a commit, before the deployment).
    prepare(&mut f, Some("0"));
    let (delta_secs, delta_what, delta_peak) = make_deltas(&f);

    let (mut o, mut plain, mut comp, mut payload, mut deltas) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..*RUNS {
        prepare(&mut f, Some("0"));
        let (s, _, child) = ours(&f, "1");
        o.push(s);
        payload.push(child["bytes_sent"].as_f64().unwrap_or(0.0));
        deltas.push(child["paths_sent"].as_f64().unwrap_or(0.0));
        prepare(&mut f, Some("0"));
        plain.push(nix_copy(&f, &ssh, &new, false));
        prepare(&mut f, Some("0"));
        comp.push(nix_copy(&f, &ssh, &new, true));
    }
    drop(ssh);
    let (floor, floor_secs) =
        patch_floor(&old, &new, &Path::new("/var/tmp").join(format!("thymis-bench-floor-{}", std::process::id())));
    let (o, plain, comp, payload, sent_paths) = (med(&o), med(&plain), med(&comp), median(payload), median(deltas));
    let pct = |a: f64, b: f64| if b > 0.0 { format!("{:.2} %", 100.0 * a / b) } else { "–".into() };
    rows.push(format!(
        "| the bump | {} paths, {} of them rebuilt with a new hash, {renamed} with a new version in their name, about one in a hundred with 16 KiB of new content; {} → {} of NAR |",
        new_paths.len(),
        new_paths.len() - kept,
        mb(nar(&old)),
        mb(nar(&new))
    ));
    rows.push(format!(
        "| ours: the update to a device on the previous system, behind {RATE} | {:.2} s to activation, {} on the wire, {} compressed payload ({sent_paths:.0} paths sent) |",
        o.secs,
        mb(o.wire),
        mb(payload)
    ));
    rows.push(format!(
        "| `nix copy --to ssh-ng://` of the same update | {:.2} s, {} on the wire |",
        plain.secs,
        mb(plain.wire)
    ));
    rows.push(format!(
        "| `nix copy --to ssh-ng://?compress=true` | {:.2} s, {} on the wire |",
        comp.secs,
        mb(comp.wire)
    ));
    rows.push(format!(
        "| ours: a full copy of the previous system to an empty device (for scale) | {:.2} s, {} on the wire, {} compressed payload |",
        full.secs,
        mb(full.wire),
        mb(full_payload)
    ));
    rows.push(format!(
        "| floor: one `zstd -19 --long=30 --patch-from` of the new closure's NARs against the old closure's | {} (made in {floor_secs:.0} s) |",
        mb(floor as f64)
    ));
    rows.push(format!(
        "| the controller making the deltas after the build (2 cores) | {delta_secs:.2} s ({delta_what}), peak memory {:.0} MB |",
        delta_peak as f64 / 1024.0
    ));
    rows.push(format!(
        "| goals: at most 2 % of a full copy, 1.5x the floor, deltas in under a minute | payload {} of the full copy's ({} on the wire); payload {:.2}x the floor ({:.2}x on the wire); {delta_secs:.0} s; vs. ssh-ng: {:.2}x time, {:.3}x bytes (compress=true: {:.2}x, {:.3}x) |",
        pct(payload, full_payload),
        pct(o.wire, full.wire),
        payload / floor as f64,
        o.wire / floor as f64,
        o.secs / plain.secs,
        o.wire / plain.wire,
        o.secs / comp.secs,
        o.wire / comp.wire
    ));
    for r in rows.iter() {
        eprintln!("bench: {r}");
    }
}
