//! `thymis-imager build`: a full disk image of a system closure.
//!
//! ```text
//! GPT: 1 MiB | ESP (FAT32, 64 MiB or room for 3 kernel+initrd pairs, label ESP) | root (ext4, label nixos) | backup GPT
//! ESP:  EFI/BOOT/BOOTX64.EFI, EFI/systemd/systemd-bootx64.efi, EFI/nixos/<kernel, initrd>,
//!       loader/loader.conf, loader/entries/nixos-generation-1.conf   (NixOS's layout)
//! root: nix/store/<closure>, nix/var/nix/db (registered), nix/var/nix/profiles/system,
//!       etc/NIXOS, etc/thymis/agent.toml (0600), var/lib/thymis-agent/device.key (0600),
//!       var/lib/thymis-agent/image.json (the system and commit, reported until a deployment)
//! ```
//! Reproducible: files are staged in NAR order with Nix's canonical modes and times, on
//! a tmpfs of our own where we can mount one; file systems get fixed UUIDs, hash seeds
//! and times; zstd runs with a pinned worker count.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use thymis_store::nar::{DecodeLimits, encode_path, restore};
use thymis_store::{PathInfo, StorePath};

use crate::bmap::{BLOCK, Bmap, Range, hex};
use crate::closure;
use crate::manifest::{ImageManifest, now};
use crate::tools::run;

const MIB: u64 = 1 << 20;
/// The smallest ESP; larger when the boot files need it (see [`esp_size`]).
const ESP_MIN: u64 = 64 * MIB;
/// Kernel and initrd pairs the ESP has room for: the image's own, the next deployment's
/// (a kernel-changing one is written beside it before the reboot), and one more.
const ESP_PAIRS: u64 = 3;
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// zstd workers, pinned: the output must not depend on the machine.
const ZSTD_WORKERS: u32 = 2;

/// Where the closure comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A system in the local store.
    Store(StorePath),
    /// A system whose closure a `closureInfo` directory describes (inside a Nix build).
    ClosureInfo(StorePath, PathBuf),
    /// A configuration of the controller's project, built by the controller.
    Controller { connection: thymis_client::Connection, config: String, commit: Option<String> },
}

#[derive(Debug, Clone)]
pub struct Options {
    pub source: Source,
    pub out: PathBuf,
    pub name: String,
    pub size: Option<u64>,
    pub agent_config: Option<PathBuf>,
    pub device_key: Option<PathBuf>,
    /// The device's sealed secrets (`STATE_DIR/secrets.json` of the agent).
    pub secrets: Option<PathBuf>,
    /// Recorded in the manifest (a closure from the controller brings its own).
    pub commit: Option<String>,
    pub config: Option<String>,
    /// A U-Boot board's layout instead of the x86-64 UEFI one (`crate::board`).
    pub board: Option<&'static crate::board::Board>,
    /// The board's firmware files (default: the system's `firmware/`).
    pub firmware: Option<PathBuf>,
}

/// The closure to stage: its system, its paths (dependencies first), and the NARs of
/// those fetched from elsewhere (the others are read from the local store).
struct Closure {
    system: StorePath,
    infos: Vec<PathInfo>,
    nars: HashMap<StorePath, File>,
    commit: Option<String>,
    config: Option<String>,
}

fn closure(o: &Options, scratch: &Path) -> Result<Closure> {
    let local = |system: &StorePath, infos| Closure {
        system: system.clone(),
        infos,
        nars: HashMap::new(),
        commit: o.commit.clone(),
        config: o.config.clone(),
    };
    Ok(match &o.source {
        Source::Store(system) => local(system, closure::from_store(system)?),
        Source::ClosureInfo(system, dir) => local(system, closure::from_closure_info(dir)?),
        Source::Controller { connection, config, commit } => {
            let f = crate::remote::fetch(connection, config, commit.as_deref(), scratch)?;
            Closure { system: f.system, infos: f.infos, nars: f.nars, commit: f.commit, config: Some(config.clone()) }
        }
    })
}

/// A UUID derived from the system and a purpose, so the same inputs give the same image.
fn uuid(system: &StorePath, purpose: &str) -> String {
    let d = Sha256::digest(format!("{purpose}:{system}").as_bytes());
    let h = hex(&d[..16]);
    format!("{}-{}-4{}-8{}-{}", &h[..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

/// A staging directory, on a tmpfs we mount ourselves when we can (root), so that
/// directory order does not depend on where the inputs or TMPDIR live.
struct Staging {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Staging {
    fn new(near: &Path) -> Result<Staging> {
        let dir = tempfile::Builder::new().prefix(".thymis-imager-").tempdir_in(near)?;
        let mounted = rustix::process::geteuid().is_root()
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", "mode=0755,noatime", "thymis-imager", &dir.path().to_string_lossy()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
        if !mounted {
            eprintln!("thymis-imager: staging in {} (not a private tmpfs)", dir.path().display());
        }
        Ok(Staging { dir, mounted })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.dir.path()).status();
        }
    }
}

fn step(what: &str) {
    eprintln!("thymis-imager: {what}");
}

pub fn build(o: &Options) -> Result<ImageManifest> {
    fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let scratch = tempfile::Builder::new().prefix(".thymis-imager-fetch-").tempdir_in(&o.out)?;
    let Closure { system, infos, mut nars, commit, config } = closure(o, scratch.path())?;
    if !infos.iter().any(|i| i.path == system) {
        bail!("{system} is not in its closure");
    }
    let staging = Staging::new(&o.out)?;
    let root = staging.path().join("root");
    step(&format!("staging {} store paths", infos.len()));
    let board_entry = stage_root(&root, &system, &infos, &mut nars, o, commit.as_deref(), config.as_deref())?;
    drop(scratch);

    let store_bytes: u64 = infos.iter().map(|i| i.nar_size).sum();
    // Before the root: the ESP (UEFI), or the board's gap and FAT partition.
    let (before_root, after_root) = match o.board {
        Some(b) => (b.root_offset(), 0),
        None => (MIB + esp_size(&root, &system, esp_pairs(o.agent_config.as_deref())?)?, MIB),
    };
    let root_size = match o.size {
        Some(total) => total.checked_sub(before_root + after_root).filter(|s| *s >= 32 * MIB).with_context(|| {
            format!(
                "--size {total} leaves no room for the root file system beside {} MiB of boot partitions",
                before_root / MIB
            )
        })?,
        None => (store_bytes + store_bytes / 3 + 128 * MIB).div_ceil(MIB) * MIB,
    };
    // The file systems are made in place, inside the partitions of the (sparse) image.
    let total = before_root + root_size + after_root;
    let raw = staging.path().join("image.raw");
    step("writing the partition table");
    File::create(&raw)?.set_len(total)?;
    match o.board {
        Some(b) => b.partition(&raw, &uuid(&system, "disk")[..8], root_size)?,
        None => partition(&raw, &system, before_root - MIB, root_size)?,
    }
    step(&format!("making the root file system ({} MiB)", root_size / MIB));
    let label = if o.board.is_some() { "NIXOS_SD" } else { "nixos" };
    make_rootfs(&raw, before_root, &root, root_size, &system, label, staging.mounted)?;
    // Only after the root file system took the staged tree's times: reading the kernel
    // and initrd for the ESP may touch their access times.
    let boot_entry = match o.board {
        Some(b) => {
            step(&format!("making the {} firmware partition", b.name));
            b.make_firmware(&raw, o.firmware.as_deref(), &root.join("nix/store").join(system.base_name()))?;
            board_entry
        }
        None => make_esp(&raw, before_root - MIB, &system, &infos, &root)?,
    };

    let zst_name = format!("{}.img.zst", o.name);
    let zst = o.out.join(&zst_name);
    step(&format!("compressing to {}", zst.display()));
    // An image with the agent's configuration (its enrollment token) or a device key is
    // a secret: only its owner may read it.
    let secret = o.agent_config.is_some() || o.device_key.is_some() || o.secrets.is_some();
    let (bmap, image_sha256, compressed_sha256) = compress(&raw, &zst, if secret { 0o600 } else { 0o644 })?;
    fs::write(o.out.join(format!("{zst_name}.sha256")), format!("{compressed_sha256}  {zst_name}\n"))?;
    fs::write(o.out.join(format!("{}.bmap", o.name)), bmap.to_xml())?;
    let m = ImageManifest {
        format: 1,
        name: o.name.clone(),
        system: system.to_string(),
        commit,
        configuration: config,
        boots: boot_entry.is_some(),
        boot_entry,
        board: o.board.map(|b| b.name.to_owned()),
        image_size: total,
        image_sha256,
        compressed_size: fs::metadata(&zst)?.len(),
        compressed_sha256,
        mapped_bytes: bmap.mapped_blocks() * crate::bmap::BLOCK,
        created: now(),
    };
    fs::write(o.out.join("manifest.json"), serde_json::to_vec_pretty(&m)?)?;
    Ok(m)
}

/// The root file system's tree: the closure (via NAR, in NAR order), its registration,
/// the system profile, the agent's files, and for a board its `/boot` (whose default
/// entry it returns).
fn stage_root(
    root: &Path,
    system: &StorePath,
    infos: &[PathInfo],
    nars: &mut HashMap<StorePath, File>,
    o: &Options,
    commit: Option<&str>,
    config: Option<&str>,
) -> Result<Option<String>> {
    let store = root.join("nix/store");
    fs::create_dir_all(&store)?;
    let bar = crate::progress::bytes("staging", infos.iter().map(|i| i.nar_size).sum());
    for info in infos {
        let dest = store.join(info.path.base_name());
        let restored = |nar: &mut dyn Read| {
            restore(io::BufReader::new(nar), &dest, DecodeLimits::default())
                .with_context(|| format!("copying {}", info.path))
        };
        let (hash, size) = match nars.remove(&info.path) {
            Some(mut nar) => restored(&mut nar)?,
            None => {
                // Re-encoding gives entries in sorted order and checks the content on the way.
                let src = PathBuf::from(info.path.to_absolute());
                let (mut reader, mut writer) = io::pipe()?;
                let encoder = std::thread::spawn(move || -> Result<()> {
                    encode_path(&src, &mut writer)?;
                    Ok(())
                });
                let restored = restored(&mut reader);
                drop(reader);
                encoder.join().map_err(|_| anyhow::anyhow!("encoder thread panicked"))??;
                restored?
            }
        };
        if hash != info.nar_hash || size != info.nar_size {
            bail!("{} does not match its registration (hash or size): the store is corrupted", info.path);
        }
        bar.inc(size);
    }
    bar.finish_and_clear();
    // Registered as `nix-store --load-db` expects, in a chroot store rooted here.
    let mut load = Command::new("nix-store");
    // No build users are involved (and inside a Nix build there are none to be had).
    load.arg("--store").arg(root).args(["--option", "build-users-group", ""]).arg("--load-db");
    load.stdin(std::process::Stdio::piped());
    let mut child = load.spawn().context("running nix-store --load-db")?;
    child.stdin.take().context("stdin")?.write_all(closure::registration(infos).as_bytes())?;
    if !child.wait()?.success() {
        bail!("nix-store --load-db failed");
    }
    // Registration times are "now": pin them, and leave no write-ahead log behind.
    let db = rusqlite::Connection::open(root.join("nix/var/nix/db/db.sqlite"))
        .context("opening the image's Nix database")?;
    db.execute("UPDATE ValidPaths SET registrationTime = 1", [])?;
    db.pragma_update(None, "journal_mode", "DELETE")?;
    db.execute_batch("VACUUM")?;
    drop(db);
    let profiles = root.join("nix/var/nix/profiles");
    fs::create_dir_all(&profiles)?;
    std::os::unix::fs::symlink(system.to_absolute(), profiles.join("system-1-link"))?;
    std::os::unix::fs::symlink("system-1-link", profiles.join("system"))?;
    // No links from Nix's own bookkeeping may point at host paths.
    let _ = fs::remove_dir_all(root.join("nix/var/nix/gcroots"));
    let _ = fs::remove_dir_all(root.join("nix/var/nix/temproots"));
    let _ = fs::remove_dir_all(root.join("nix/var/nix/profiles/per-user"));
    fs::create_dir_all(root.join("etc"))?;
    fs::write(root.join("etc/NIXOS"), "")?;
    if let Some(cfg) = &o.agent_config {
        secret_copy(cfg, &root.join("etc/thymis/agent.toml"))?;
    }
    if let Some(key) = &o.device_key {
        secret_copy(key, &root.join("var/lib/thymis-agent/device.key"))?;
    }
    if let Some(secrets) = &o.secrets {
        secret_copy(secrets, &root.join("var/lib/thymis-agent/secrets.json"))?;
    }
    // The agent reports this system and commit until its first deployment.
    let agent_dir = root.join("var/lib/thymis-agent");
    fs::create_dir_all(&agent_dir)?;
    fs::set_permissions(&agent_dir, fs::Permissions::from_mode(0o700))?;
    let info = serde_json::json!({ "system": system.to_string(), "commit": commit, "configuration": config });
    fs::write(agent_dir.join("image.json"), serde_json::to_vec_pretty(&info)?)?;
    let entry = match o.board {
        Some(_) => Some(crate::board::stage_boot(root, system)?),
        None => None,
    };
    canonicalize(root, &store)?;
    Ok(entry)
}

fn secret_copy(src: &Path, dest: &Path) -> Result<()> {
    let bytes = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest)?;
    f.write_all(&bytes)?;
    Ok(())
}

/// Nix's canonical modes in the store (0444/0555, directories 0555) and time 1 for
/// everything, so the image does not depend on when it was built.
fn canonicalize(root: &Path, store: &Path) -> Result<()> {
    fn walk(p: &Path, in_store: bool, f: &mut dyn FnMut(&Path, &fs::Metadata, bool) -> Result<()>) -> Result<()> {
        let meta = fs::symlink_metadata(p)?;
        if meta.is_dir() {
            let mut names: Vec<_> = fs::read_dir(p)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
            names.sort();
            for n in names {
                walk(&p.join(n), in_store, f)?;
            }
        }
        f(p, &meta, in_store)
    }
    let mut fix = |p: &Path, meta: &fs::Metadata, in_store: bool| -> Result<()> {
        if !meta.file_type().is_symlink() && in_store {
            let exec = meta.is_dir() || meta.permissions().mode() & 0o100 != 0;
            fs::set_permissions(p, fs::Permissions::from_mode(if exec { 0o555 } else { 0o444 }))?;
        }
        let one = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec { tv_sec: 1, tv_nsec: 0 },
            last_modification: rustix::fs::Timespec { tv_sec: 1, tv_nsec: 0 },
        };
        rustix::fs::utimensat(rustix::fs::CWD, p, &one, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .with_context(|| format!("setting times of {}", p.display()))?;
        Ok(())
    };
    for e in fs::read_dir(store)? {
        walk(&e?.path(), true, &mut fix)?;
    }
    let mut rest = |p: &Path, meta: &fs::Metadata, _: bool| -> Result<()> {
        if p.starts_with(store) && p != store {
            return Ok(()); // done above
        }
        fix(p, meta, false)
    };
    walk(root, false, &mut rest)
}

/// The ESP with NixOS's systemd-boot layout; returns the entry name when the system
/// has a kernel and an initrd to boot.
fn make_esp(raw: &Path, esp: u64, system: &StorePath, infos: &[PathInfo], root: &Path) -> Result<Option<String>> {
    run(Command::new("mkfs.vfat")
        .args(["--invariant", "-F", "32", "-s", "1", "-n", "ESP", "-i", "54485953"])
        .args(["--offset", &(MIB / 512).to_string()])
        .arg(raw)
        .arg((esp / 1024).to_string()))?;
    // mtools addresses the partition as FILE@@OFFSET.
    let img = format!("{}@@{MIB}", raw.display());
    let sys = root.join("nix/store").join(system.base_name());
    // mtools stamps what it creates with SOURCE_DATE_EPOCH: a fixed date (FAT starts in 1980).
    let fat_time = "946684800";
    let mmd =
        |dir: &str| run(Command::new("mmd").args(["-D", "s", "-i", &img, dir]).env("SOURCE_DATE_EPOCH", fat_time));
    mmd("::/loader")?;
    mmd("::/loader/entries")?;
    let (kernel, initrd) = (fs::read_link(sys.join("kernel")), fs::read_link(sys.join("initrd")));
    let (Ok(kernel), Ok(initrd)) = (kernel, initrd) else {
        step("the closure has no kernel and initrd: the image has no boot entry");
        return Ok(None);
    };
    mmd("::/EFI")?;
    mmd("::/EFI/BOOT")?;
    mmd("::/EFI/systemd")?;
    mmd("::/EFI/nixos")?;
    let in_root = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    // NixOS names them <store hash>-<name>-bzImage.efi and ...-initrd.efi.
    let efi_name = |p: &Path, suffix: &str| -> Result<String> {
        let store_dir = p.parent().context("kernel path")?;
        let base = store_dir.file_name().context("kernel path")?.to_string_lossy().into_owned();
        Ok(format!("{base}-{suffix}.efi"))
    };
    let (kname, iname) = (efi_name(&kernel, "bzImage")?, efi_name(&initrd, "initrd")?);
    let mcopy = |src: &Path, dest: &str| {
        run(Command::new("mcopy").args(["-D", "o", "-i", &img]).arg(src).arg(dest).env("SOURCE_DATE_EPOCH", fat_time))
    };
    mcopy(&in_root(&kernel), &format!("::/EFI/nixos/{kname}"))?;
    mcopy(&in_root(&initrd), &format!("::/EFI/nixos/{iname}"))?;
    let boot_efi = systemd_boot_efi(infos, root)?;
    mcopy(&boot_efi, "::/EFI/systemd/systemd-bootx64.efi")?;
    mcopy(&boot_efi, "::/EFI/BOOT/BOOTX64.EFI")?;
    let params = fs::read_to_string(sys.join("kernel-params")).unwrap_or_default();
    let entry = "nixos-generation-1.conf";
    let tmp = tempfile::tempdir()?;
    fs::write(
        tmp.path().join("entry.conf"),
        format!(
            "title NixOS\nversion Generation 1\nlinux /EFI/nixos/{kname}\ninitrd /EFI/nixos/{iname}\noptions init={}/init {}\n",
            system.to_absolute(),
            params.trim()
        ),
    )?;
    fs::write(tmp.path().join("loader.conf"), format!("timeout 3\ndefault {entry}\n"))?;
    mcopy(&tmp.path().join("entry.conf"), &format!("::/loader/entries/{entry}"))?;
    mcopy(&tmp.path().join("loader.conf"), "::/loader/loader.conf")?;
    Ok(Some(entry.into()))
}

/// systemd-boot from the closure (NixOS ships it in systemd), else from this machine.
fn systemd_boot_efi(infos: &[PathInfo], root: &Path) -> Result<PathBuf> {
    for i in infos {
        let p = root.join("nix/store").join(i.path.base_name()).join("lib/systemd/boot/efi/systemd-bootx64.efi");
        if p.exists() {
            return Ok(p);
        }
    }
    let host = PathBuf::from("/usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    if host.exists() {
        return Ok(host);
    }
    bail!("no systemd-bootx64.efi in the closure or on this machine (Debian: systemd-boot-efi)")
}

/// Kernel and initrd pairs the ESP needs room for: the agent keeps `configuration_limit`
/// generations (its default 2) and tries one more; at least [`ESP_PAIRS`]. With 0 (keep
/// every generation) nothing bounds them: [`ESP_PAIRS`], and the docs say so.
fn esp_pairs(agent_config: Option<&Path>) -> Result<u64> {
    let Some(path) = agent_config else { return Ok(ESP_PAIRS) };
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table = text.parse().with_context(|| format!("{} is not TOML", path.display()))?;
    let limit = match table.get("configuration_limit") {
        None => 2,
        Some(v) => v
            .as_integer()
            .and_then(|n| u64::try_from(n).ok())
            .with_context(|| format!("{}: configuration_limit is not a count", path.display()))?,
    };
    Ok(if limit == 0 { ESP_PAIRS } else { (limit + 1).max(ESP_PAIRS) })
}

/// The ESP's size: room for `pairs` of the system's kernel and initrd and the boot
/// loader, at least [`ESP_MIN`] (the first kernel-changing deployment must fit beside
/// the image's own).
fn esp_size(root: &Path, system: &StorePath, pairs: u64) -> Result<u64> {
    let sys = root.join("nix/store").join(system.base_name());
    let mut pair = 0;
    for f in ["kernel", "initrd"] {
        let Ok(target) = fs::read_link(sys.join(f)) else { return Ok(ESP_MIN) };
        let staged = root.join(target.strip_prefix("/").unwrap_or(&target));
        pair += fs::metadata(&staged).with_context(|| format!("the system's {f}, {}", target.display()))?.len();
    }
    // The loader, its entries and FAT32's own tables.
    let needed = pairs * pair + 16 * MIB + pair / 8;
    Ok(needed.max(ESP_MIN).div_ceil(MIB) * MIB)
}

/// `root_offset`: where the root file system starts in the image.
fn make_rootfs(
    raw: &Path,
    root_offset: u64,
    tree: &Path,
    size: u64,
    system: &StorePath,
    label: &str,
    private_tmpfs: bool,
) -> Result<()> {
    let id = uuid(system, "rootfs");
    let seed = uuid(system, "hash-seed");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-U", &id, "-I", "256", "-T", "default"])
        .arg("-E")
        .arg(format!(
            "offset={root_offset},root_owner=0:0,hash_seed={seed},lazy_itable_init=0,lazy_journal_init=0,nodiscard"
        ))
        .arg("-d")
        .arg(tree)
        .arg(raw)
        .arg(format!("{}k", size / 1024))
        .env("E2FSPROGS_FAKE_TIME", "1"))?;
    fix_inodes(raw, root_offset, tree, private_tmpfs)
}

/// `mkfs.ext4 -d` copies each staged file's change time, which nobody can set, and its
/// owner and access time: overwrite them with debugfs so the image does not depend on
/// when it was staged, or by whom. Staged on our own tmpfs (mounted `noatime`, as root)
/// only the change times need it; elsewhere reading the tree (mkfs itself) moves access
/// times, and the files are the imager's user's. (Creation times come from the fake
/// clock, modification times were staged as 1.)
fn fix_inodes(raw: &Path, root_offset: u64, tree: &Path, private_tmpfs: bool) -> Result<()> {
    let mut paths = vec![PathBuf::from("/")];
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            paths.push(Path::new("/").join(p.strip_prefix(tree)?));
            if e.file_type()?.is_dir() {
                stack.push(p);
            }
        }
    }
    let root_owned = rustix::process::geteuid().is_root();
    let mut script = String::new();
    for p in &paths {
        let text = p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))?;
        if text.contains('"') || text.contains('\n') {
            bail!("{text:?}: file names with quotes or newlines cannot go into an image yet");
        }
        let mut fields = vec![("ctime", "19700101000001"), ("ctime_extra", "0")];
        if !private_tmpfs {
            fields.extend([("atime", "19700101000001"), ("atime_extra", "0")]);
        }
        if !root_owned {
            // Owned by root even when the imager is not (inside a Nix build's sandbox).
            fields.extend([("uid", "0"), ("gid", "0")]);
        }
        for (field, value) in fields {
            script.push_str(&format!("sif \"{text}\" {field} {value}\n"));
        }
    }
    let cmds = tempfile::NamedTempFile::new()?;
    fs::write(cmds.path(), script)?;
    // The superblock's write time, too, comes from the fake clock.
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(cmds.path())
        .arg(format!("{}?offset={root_offset}", raw.display()))
        .env("E2FSPROGS_FAKE_TIME", "1")
        .output()
        .context("running debugfs")?;
    let errors: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    if !out.status.success() || !errors.is_empty() {
        bail!("debugfs could not fix inode times: {}", errors.join("; "));
    }
    Ok(())
}

fn partition(raw: &Path, system: &StorePath, esp: u64, root_size: u64) -> Result<()> {
    let sectors = |b: u64| b / 512;
    let script = format!(
        "label: gpt\nlabel-id: {}\nunit: sectors\n\
         start={}, size={}, type={ESP_TYPE}, uuid={}, name=\"ESP\"\n\
         start={}, size={}, type={LINUX_TYPE}, uuid={}, name=\"nixos\"\n",
        uuid(system, "disk"),
        sectors(MIB),
        sectors(esp),
        uuid(system, "esp"),
        sectors(MIB + esp),
        sectors(root_size),
        uuid(system, "root"),
    );
    crate::tools::sfdisk(raw, &script)
}

/// One pass over the raw image: its sha256, the bmap's checksum of each mapped range,
/// and the compressed image with its own sha256.
fn compress(raw: &Path, zst: &Path, mode: u32) -> Result<(Bmap, String, String)> {
    let (size, mapped) = crate::bmap::mapped(raw)?;
    let mut input = File::open(raw)?;
    let bar = crate::progress::bytes("compressing", size);
    // Removed first: an older file keeps its own mode when it is opened again.
    let _ = fs::remove_file(zst);
    let file = OpenOptions::new().write(true).create_new(true).mode(mode).open(zst)?;
    let out = HashingWriter { inner: io::BufWriter::new(file), hash: Sha256::new() };
    let mut enc = zstd::stream::write::Encoder::new(out, 3)?;
    enc.multithread(ZSTD_WORKERS)?;
    // Store paths repeat themselves at long distances; 16 MiB windows stay within what
    // every decoder (bmaptool's zstd, ours) accepts without asking.
    enc.long_distance_matching(true)?;
    enc.window_log(thymis_store::zstd_limits::WINDOW_LOG_MAX)?;
    enc.include_checksum(true)?;
    let mut image_hash = Sha256::new();
    let mut ranges = Vec::with_capacity(mapped.len());
    let mut range_hash = Sha256::new();
    let mut next = mapped.iter().peekable();
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = 0u64;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        image_hash.update(chunk);
        enc.write_all(chunk)?;
        let end = pos + n as u64;
        // The parts of mapped ranges in this chunk (ranges are inclusive block runs).
        while let Some(&&(first, last)) = next.peek() {
            let (start, stop) = (first * BLOCK, ((last + 1) * BLOCK).min(size));
            if start >= end {
                break;
            }
            let (a, b) = (start.max(pos), stop.min(end));
            range_hash.update(&chunk[(a - pos) as usize..(b - pos) as usize]);
            if stop > end {
                break;
            }
            ranges.push(Range { first, last, sha256: hex(&std::mem::take(&mut range_hash).finalize()) });
            next.next();
        }
        pos = end;
        bar.inc(n as u64);
    }
    if pos != size {
        bail!("{} changed size while being compressed", raw.display());
    }
    let mut out = enc.finish()?;
    out.flush()?;
    out.inner.get_ref().sync_all()?;
    bar.finish_and_clear();
    Ok((Bmap { image_size: size, ranges }, hex(&image_hash.finalize()), hex(&out.hash.finalize())))
}

/// Hashes what passes through to the compressed image file.
struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.hash.update(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_esp_holds_the_kept_generations_and_the_one_being_tried() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cfg = |text: &str| {
            let p = tmp.path().join("agent.toml");
            fs::write(&p, text).expect("write");
            esp_pairs(Some(&p))
        };
        assert_eq!(esp_pairs(None).expect("none"), ESP_PAIRS);
        assert_eq!(cfg("controller_url = \"wss://c/agent/v1\"\n").expect("default"), 3, "2 kept, 1 tried");
        assert_eq!(cfg("configuration_limit = 5\n").expect("five"), 6);
        assert_eq!(cfg("configuration_limit = 1\n").expect("one"), ESP_PAIRS);
        assert_eq!(cfg("configuration_limit = 0\n").expect("all"), ESP_PAIRS);
        assert!(cfg("configuration_limit = -1\n").is_err());
        assert!(cfg("configuration_limit = \"many\"\n").is_err());
    }
}
