//! The imager on the transfer benchmark's closure, against its baseline.

use crate::*;

/// `thymis-imager build` against `cp -a` + `mkfs.ext4 -d` + `zstd -3 -T0` of the same
/// closure, and `flash` against `bmaptool copy` of the same image (both to a new file).
pub(crate) fn imager(rows: &mut Vec<String>) {
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
