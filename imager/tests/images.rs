//! Images judged by the outside tools: sfdisk, e2fsck, mtools, zstd, bmaptool, Nix.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const IMAGER: &str = env!("CARGO_BIN_EXE_thymis-imager");
const MIB: u64 = 1 << 20;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh salt, so each test builds its own store paths.
fn salt() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn closure() -> String {
    let salt = salt();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../crates/store/tests/fixtures/closure.nix");
    run(Command::new("nix-build").args([fixture, "--argstr", "salt", &salt, "--no-out-link"])).trim().to_owned()
}

fn build(system: &str, out: &Path, extra: &[&str]) -> Value {
    let stdout =
        run(Command::new(IMAGER).args(["build", "--system", system, "--name", "dev", "--out"]).arg(out).args(extra));
    serde_json::from_str(&stdout).expect("manifest on stdout")
}

/// The raw image of a built set, made by bmaptool from its compressed image and block map.
fn unpack(set: &Path, raw: &Path) {
    run(Command::new("bmaptool")
        .args(["copy", "--bmap"])
        .arg(set.join("dev.bmap"))
        .arg(set.join("dev.img.zst"))
        .arg(raw));
}

fn sha256(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path)).split_whitespace().next().unwrap_or_default().to_owned()
}

/// The root partition's offset (after 1 MiB of GPT and the 64 MiB ESP).
const ROOT_OFFSET: u64 = 65 * MIB;

fn debugfs(img: &Path, cmd: &str) -> String {
    run(Command::new("debugfs").arg("-R").arg(cmd).arg(format!("{}?offset={ROOT_OFFSET}", img.display())))
}

#[test]
fn an_image_passes_the_outside_tools_and_carries_a_valid_store() {
    let tmp = tempfile::tempdir().expect("tmp");
    let system = closure();
    std::fs::write(tmp.path().join("agent.toml"), "controller_url = \"wss://c/agent/v1\"\n").expect("write");
    std::fs::write(tmp.path().join("device.key"), "thymis-device:secret\n").expect("write");
    let out = tmp.path().join("set");
    let m = build(
        &system,
        &out,
        &[
            "--agent-config",
            &tmp.path().join("agent.toml").to_string_lossy(),
            "--device-key",
            &tmp.path().join("device.key").to_string_lossy(),
            "--commit",
            "abc123",
        ],
    );
    assert_eq!(m["boots"], false, "a closure without kernel gives an image without a boot entry: {m}");
    assert_eq!(m["commit"], "abc123");
    for f in ["dev.img.zst", "dev.img.zst.sha256", "dev.bmap", "manifest.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // It carries an enrollment token and a device key: a secret, whatever the umask.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(out.join("dev.img.zst")).expect("stat").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the image with secrets is readable by others");
    run(Command::new("zstd").args(["-t", "-q"]).arg(out.join("dev.img.zst")));
    run(Command::new(IMAGER).arg("verify").arg(&out));

    // bmaptool, straight from the compressed image, gives the image of the manifest.
    let raw = tmp.path().join("raw.img");
    unpack(&out, &raw);
    assert_eq!(sha256(&raw), m["image_sha256"].as_str().expect("sha"));

    // GPT with an ESP, verified by sfdisk.
    run(Command::new("sfdisk").arg("--verify").arg(&raw));
    let table: Value = serde_json::from_str(&run(Command::new("sfdisk").arg("--json").arg(&raw))).expect("json");
    let parts = table["partitiontable"]["partitions"].as_array().expect("partitions").clone();
    assert_eq!(table["partitiontable"]["label"], "gpt");
    assert_eq!(parts[0]["type"], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "first partition is not an ESP");
    assert_eq!(parts[1]["start"].as_u64().map(|s| s * 512), Some(ROOT_OFFSET));
    let listing = run(Command::new("mdir").arg("-i").arg(format!("{}@@{}", raw.display(), MIB)).arg("::/"));
    assert!(listing.contains("loader"), "{listing}");
    run(Command::new("e2fsck").arg("-fn").arg(format!("{}?offset={ROOT_OFFSET}", raw.display())));

    // The store inside, registered: copied out and checked by Nix.
    let dump = tmp.path().join("dump");
    std::fs::create_dir_all(&dump).expect("mkdir");
    debugfs(&raw, &format!("rdump /nix {}", dump.display()));
    // Nothing in Nix's bookkeeping points at the build host (checked before Nix itself
    // touches the copy, which adds links of its own).
    for entry in walk(&dump.join("nix/var")) {
        if let Ok(target) = std::fs::read_link(&entry) {
            let t = target.to_string_lossy();
            assert!(t.starts_with("/nix/store/") || !t.starts_with('/'), "{} -> {t}", entry.display());
        }
    }
    let store = dump.to_string_lossy().into_owned();
    run(Command::new("nix-store").args(["--store", &store, "--verify", "--check-contents"]));
    let refs = run(Command::new("nix-store").args(["--store", &store, "-q", "--references", &system]));
    assert!(refs.contains("test-app"), "{refs}");
    let profile = std::fs::read_link(dump.join("nix/var/nix/profiles/system-1-link")).expect("profile");
    assert_eq!(profile, PathBuf::from(&system));
    let stat = debugfs(&raw, "stat /etc/thymis/agent.toml");
    assert!(stat.contains("Mode:  0600"), "agent config is not private: {stat}");
    let stat = debugfs(&raw, "stat /var/lib/thymis-agent/device.key");
    assert!(stat.contains("Mode:  0600"), "{stat}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        out.push(p.clone());
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.extend(walk(&p));
        }
    }
    out
}

#[test]
fn the_same_inputs_give_the_same_image_whatever_file_system_they_are_staged_on() {
    let tmp = tempfile::tempdir().expect("tmp");
    let system = closure();
    let on_tmpfs = tmp.path().join("tmpfs");
    std::fs::create_dir_all(&on_tmpfs).expect("mkdir");
    run(Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&on_tmpfs));
    let a = build(&system, &on_tmpfs.join("set"), &[]);
    let b = build(&system, &tmp.path().join("disk-set"), &[]);
    let _ = Command::new("umount").arg(&on_tmpfs).status();
    assert_eq!(a["image_sha256"], b["image_sha256"], "raw images differ");
    assert_eq!(a["compressed_sha256"], b["compressed_sha256"], "compressed images differ");
}

#[test]
fn flash_writes_and_verifies_and_refuses_unsafe_targets_and_corrupted_images() {
    let tmp = tempfile::tempdir().expect("tmp");
    let system = closure();
    let set = tmp.path().join("set");
    let m = build(&system, &set, &[]);
    let image = set.join("dev.img.zst");
    let flash = |target: &Path, extra: &[&str]| {
        Command::new(IMAGER).arg("flash").arg(&image).arg(target).args(extra).output().expect("flash")
    };

    // A new file is created and holds exactly the image.
    let target = tmp.path().join("disk.img");
    let out = flash(&target, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha256(&target), m["image_sha256"].as_str().expect("sha"));

    // Too small.
    let small = tmp.path().join("small.img");
    std::fs::write(&small, vec![0u8; MIB as usize]).expect("write");
    let out = flash(&small, &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("the image needs"));

    // A block device needs --yes; a mounted one is refused even with it.
    let loop_dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&target)).trim().to_owned();
    let out = flash(Path::new(&loop_dev), &[]);
    let refused_without_yes = String::from_utf8_lossy(&out.stderr).contains("pass --yes");
    let _ = Command::new("losetup").args(["-d", &loop_dev]).status();
    assert!(refused_without_yes, "{}", String::from_utf8_lossy(&out.stderr));
    let root_loop = run(Command::new("losetup").args(["-f", "--show", "-o", &ROOT_OFFSET.to_string()]).arg(&target))
        .trim()
        .to_owned();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let mounted = Command::new("mount").args(["-o", "ro", &root_loop]).arg(&mnt).status().expect("mount").success();
    let out = flash(&target, &[]);
    let _ = Command::new("umount").arg(&mnt).status();
    let _ = Command::new("losetup").args(["-d", &root_loop]).status();
    assert!(mounted, "could not mount the image's root for the test");
    assert!(!out.status.success(), "flashed over a mounted file system");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is mounted"), "{}", String::from_utf8_lossy(&out.stderr));

    // One corrupted byte: caught by verify and by flash.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    for f in ["dev.img.zst", "dev.img.zst.sha256", "dev.bmap", "manifest.json"] {
        std::fs::copy(set.join(f), bad.join(f)).expect("copy");
    }
    let mut bytes = std::fs::read(bad.join("dev.img.zst")).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(bad.join("dev.img.zst"), &bytes).expect("write");
    let v = Command::new(IMAGER).arg("verify").arg(&bad).output().expect("verify");
    assert!(!v.status.success(), "verify missed a corrupted byte");
    let out = Command::new(IMAGER)
        .arg("flash")
        .arg(bad.join("dev.img.zst"))
        .arg(tmp.path().join("x.img"))
        .output()
        .expect("flash");
    assert!(!out.status.success(), "flash wrote a corrupted image");
}

/// Inside a Nix build's sandbox the imager is not root: it cannot mount its tmpfs, and
/// the files it stages are its own. The image must be the same all the same.
#[test]
fn an_image_built_without_root_is_the_same_and_owned_by_root() {
    let tmp = tempfile::tempdir().expect("tmp");
    let system = closure();
    let as_root = build(&system, &tmp.path().join("root-set"), &[]);
    let out = tmp.path().join("user-set");
    std::fs::create_dir_all(&out).expect("mkdir");
    for dir in [tmp.path(), out.as_path()] {
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    }
    // Without root there is no access to this machine's (single-user) Nix database: the
    // closure comes as a closureInfo does inside a Nix build.
    let info = tmp.path().join("closure-info");
    std::fs::create_dir_all(&info).expect("mkdir");
    let paths = run(Command::new("nix-store").args(["-qR", &system]));
    let registration = run(Command::new("nix-store").arg("--dump-db").args(paths.lines()));
    std::fs::write(info.join("registration"), registration).expect("write");
    let stdout = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", IMAGER, "build", "--system", &system])
        .args(["--name", "dev", "--closure-info"])
        .arg(&info)
        .arg("--out")
        .arg(&out)
        .env("HOME", &out));
    let m: Value = serde_json::from_str(&stdout).expect("manifest");
    let raw = tmp.path().join("user.raw");
    run(Command::new(IMAGER).arg("flash").arg(out.join("dev.img.zst")).arg(&raw));
    let stat = debugfs(&raw, &format!("stat {system}/bin"));
    assert!(stat.contains("User:     0   Group:     0"), "store files must be root's: {stat}");
    assert_eq!(m["image_sha256"], as_root["image_sha256"], "built without root: a different image");
}

/// A system whose kernel and initrd are large gets an ESP with room for three pairs of
/// them (the image's own and the next kernel-changing deployments'), the root partition
/// after it.
#[test]
fn the_esp_has_room_for_three_kernels_and_initrds() {
    let tmp = tempfile::tempdir().expect("tmp");
    let salt = salt();
    // 40 MiB of kernel, 20 MiB of initrd: three pairs need 180 MiB, more than 64.
    let expr = format!(
        r#"let mk = name: script: derivation {{ inherit name; system = "x86_64-linux"; builder = "/bin/sh";
             args = [ "-c" script ]; PATH = "/usr/bin:/bin"; salt = "{salt}"; }};
           kernel = mk "big-kernel" "mkdir $out && head -c 41943040 /dev/urandom > $out/bzImage && head -c 20971520 /dev/urandom > $out/initrd";
         in mk "big-boot-system" "mkdir $out && ln -s ${{kernel}}/bzImage $out/kernel && ln -s ${{kernel}}/initrd $out/initrd && echo quiet > $out/kernel-params && printf '#!/bin/sh\n' > $out/init""#
    );
    let system = run(Command::new("nix-build").args(["-E", &expr, "--no-out-link"])).trim().to_owned();
    let out = tmp.path().join("set");
    let m = build(&system, &out, &[]);
    assert_eq!(m["boots"], true, "{m}");
    let raw = tmp.path().join("raw.img");
    unpack(&out, &raw);
    run(Command::new("sfdisk").arg("--verify").arg(&raw));
    let table: Value = serde_json::from_str(&run(Command::new("sfdisk").arg("--json").arg(&raw))).expect("json");
    let parts = table["partitiontable"]["partitions"].as_array().expect("partitions").clone();
    let esp = parts[0]["size"].as_u64().expect("size") * 512;
    assert!(esp >= 3 * 60 * MIB, "an ESP of {} MiB has no room for three kernel+initrd pairs", esp / MIB);
    let root_offset = parts[1]["start"].as_u64().expect("start") * 512;
    assert_eq!(root_offset, MIB + esp, "the root partition does not follow the ESP");
    let listing = run(Command::new("mdir").arg("-i").arg(format!("{}@@{}", raw.display(), MIB)).arg("::/EFI/nixos"));
    assert!(listing.contains("bzImage"), "{listing}");
    // The file system really has the room: two more pairs' worth can be written.
    let filler = tmp.path().join("filler");
    std::fs::write(&filler, vec![0u8; 120 << 20]).expect("filler");
    run(Command::new("mcopy")
        .arg("-i")
        .arg(format!("{}@@{}", raw.display(), MIB))
        .arg(&filler)
        .arg("::/EFI/nixos/next"));
    run(Command::new("e2fsck").arg("-fn").arg(format!("{}?offset={root_offset}", raw.display())));
}
