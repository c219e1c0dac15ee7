//! Images and offline bundles made by the controller: a device's disk image carrying
//! its enrollment (through `thymis-imager`), and bundles for a device or a
//! configuration, each with a number from the controller-wide offer sequence. They are
//! tasks; their files stay in `STATE_DIR/artifacts/TASK/` until deleted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use thymis_store::bundle::{self, Manifest, Target};
use thymis_store::local_store::LocalStore;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::build;
use crate::controller::Controller;
use crate::db::now;
use crate::engine;
use crate::model::task::{Event as TaskEvent, TaskResult};

pub fn dir(ctl: &Controller, task: i64) -> PathBuf {
    ctl.paths.root.join("artifacts").join(task.to_string())
}

/// The files of a task's artifacts.
pub fn list(ctl: &Controller, task: i64) -> Result<Vec<(String, u64)>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir(ctl, task)).with_context(|| format!("task {task} has no artifacts"))? {
        let e = e?;
        if e.file_type()?.is_file() {
            files.push((e.file_name().to_string_lossy().into_owned(), e.metadata()?.len()));
        }
    }
    files.sort();
    Ok(files)
}

/// One artifact file, by a name that must be one of the listed ones.
pub fn path(ctl: &Controller, task: i64, name: &str) -> Result<PathBuf> {
    if !list(ctl, task)?.iter().any(|(n, _)| n == name) {
        bail!("task {task} has no artifact {name:?}");
    }
    Ok(dir(ctl, task).join(name))
}

pub fn delete(ctl: &Controller, task: i64) -> Result<()> {
    std::fs::remove_dir_all(dir(ctl, task)).with_context(|| format!("task {task} has no artifacts"))
}

fn private_dir(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(p)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// `thymis-imager`: `THYMIS_IMAGER`, beside this binary, or on PATH.
fn imager() -> PathBuf {
    if let Some(p) = std::env::var_os("THYMIS_IMAGER") {
        return p.into();
    }
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("thymis-imager")));
    beside.filter(|p| p.exists()).unwrap_or_else(|| "thymis-imager".into())
}

fn resolve(ctl: &Controller, commit: Option<&str>) -> Result<String> {
    match commit {
        Some(c) => ctl.project.resolve(c),
        None => ctl.project.head(),
    }
}

/// Builds a disk image for `device` (its configuration at `commit`), carrying an agent
/// configuration with a fresh enrollment token. For an enrolled device that token is for
/// a new key, and the enrolled one is revoked: only with `replace_key`.
pub async fn start_image(ctl: &Arc<Controller>, device: &str, commit: Option<&str>, replace_key: bool) -> Result<i64> {
    let d = ctl.db.device(device)?.ok_or_else(|| anyhow!("no device {device:?}"))?;
    if d.revoked {
        bail!("device {device} is revoked");
    }
    if d.enrolled && !replace_key {
        bail!(
            "device {device} is enrolled (key {}): its image carries a token for a new key, and building it \
             revokes the enrolled one (the device as it runs now is locked out); pass --replace-key to do that",
            d.key_fingerprint.as_deref().unwrap_or("?")
        );
    }
    let commit = resolve(ctl, commit)?;
    let task = ctl.db.create_task(&ctl.instance, "image", Some(&commit), None, Some(&d.config), false, None)?;
    let ctl2 = ctl.clone();
    let device = device.to_owned();
    tokio::spawn(async move {
        let r = make_image(&ctl2, task, &device, &d.config, &commit, replace_key).await;
        finish(&ctl2, task, r);
    });
    Ok(task)
}

async fn make_image(
    ctl: &Arc<Controller>,
    task: i64,
    device: &str,
    config: &str,
    commit: &str,
    replace_key: bool,
) -> Result<String> {
    engine::task_event(ctl, task, TaskEvent::Started, None)?;
    let system = build::build(ctl, task, commit, config).await?;
    let out = dir(ctl, task);
    private_dir(&out)?;
    let scratch = tempfile::tempdir_in(&ctl.paths.root)?;
    let ttl = ctl.settings.token_ttl.as_secs() as i64;
    let token = match ctl.db.device(device)? {
        Some(d) if d.enrolled && !replace_key => bail!("device {device} enrolled meanwhile; pass --replace-key"),
        Some(d) if d.enrolled => {
            let fingerprint = d.info.key_fingerprint.unwrap_or_default();
            let token = ctl.db.reenroll(device, ttl)?;
            if let Some(conn) = ctl.conn(device) {
                ctl.unregister(&conn);
            }
            ctl.db.log(task, None, &format!("revoked the enrolled key {fingerprint} of {device} (--replace-key)"))?;
            token
        }
        _ => ctl.db.issue_token(device, ttl)?,
    };
    let agent_config = scratch.path().join("agent.toml");
    std::fs::write(&agent_config, ctl.agent_config(device, &token))?;
    ctl.db.log(task, None, &format!("making the image of {device} ({system}); it carries a new enrollment token"))?;
    let mut imager_cmd = tokio::process::Command::new(imager());
    imager_cmd
        .args(["build", "--system", &system.to_string(), "--name", device, "--commit", commit, "--config", config])
        .arg("--out")
        .arg(&out)
        .arg("--agent-config")
        .arg(&agent_config);
    // A device with secrets gets its key made here, and its secrets sealed to it: they
    // are in place at its first start, before its services need them (the token then
    // enrolls this key).
    let tags = ctl.project.toml_at(commit)?.configs.get(config).map(|c| c.tags.clone()).unwrap_or_default();
    let secrets = crate::secrets::secrets_of(ctl, device, config, &tags)?;
    if !secrets.is_empty() {
        let key = thymis_store::signing::SecretKey::generate(thymis_proto::DEVICE_KEY_NAME)?;
        let deployment_id = format!("image-{task}");
        let n = secrets.len();
        let kept = thymis_proto::secrets::Kept {
            current: Some(thymis_proto::secrets::Sealed {
                device: device.to_owned(),
                sealed: crate::secrets::seal_for(&key.public(), device, &deployment_id, secrets)?,
                deployment_id,
            }),
            previous: None,
        };
        let (key_file, secrets_file) = (scratch.path().join("device.key"), scratch.path().join("secrets.json"));
        write_private(&key_file, key.to_secret_string().as_bytes())?;
        write_private(&secrets_file, &serde_json::to_vec(&kept)?)?;
        imager_cmd.arg("--device-key").arg(&key_file).arg("--secrets").arg(&secrets_file);
        ctl.db.log(task, None, &format!("the image carries {device}'s key and its {n} secrets, sealed to it"))?;
    }
    let mut child = imager_cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running thymis-imager")?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    while let Some(line) = lines.next_line().await? {
        ctl.db.log(task, None, &line)?;
        ctl.notify_task(task);
    }
    if !child.wait().await?.success() {
        bail!("thymis-imager failed (see the task's log)");
    }
    // An image whose system has no kernel is made as asked, and says it cannot boot.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).context("reading the image's manifest")?)?;
    if manifest["boot_entry"].is_null() {
        let warning = "this image cannot boot: its system has no kernel and initrd (a NixOS configuration has \
                       them; the starter project's placeholder configuration does not), so it has no boot entry";
        ctl.db.set_task_warning(task, warning)?;
        ctl.db.log(task, None, &format!("warning: {warning}"))?;
    }
    Ok(system.to_string())
}

/// A file only its owner reads, written with that mode from the start.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    Ok(())
}

/// Writes an offline bundle for a device or a configuration at `commit`.
pub async fn start_bundle(
    ctl: &Arc<Controller>,
    target: Target,
    commit: Option<&str>,
    expires_in: Option<u64>,
) -> Result<i64> {
    let config = match &target {
        Target::Device(d) => ctl.db.device(d)?.ok_or_else(|| anyhow!("no device {d:?}"))?.info.config,
        Target::Config(c) => c.clone(),
    };
    let commit = resolve(ctl, commit)?;
    if !ctl.project.toml_at(&commit)?.configs.contains_key(&config) {
        bail!("no configuration {config:?} in thymis.toml at {commit}");
    }
    let task = ctl.db.create_task(&ctl.instance, "bundle", Some(&commit), None, Some(&config), false, None)?;
    let ctl2 = ctl.clone();
    tokio::spawn(async move {
        let r = make_bundle(&ctl2, task, target, &config, &commit, expires_in).await;
        finish(&ctl2, task, r);
    });
    Ok(task)
}

async fn make_bundle(
    ctl: &Arc<Controller>,
    task: i64,
    target: Target,
    config: &str,
    commit: &str,
    expires_in: Option<u64>,
) -> Result<String> {
    engine::task_event(ctl, task, TaskEvent::Started, None)?;
    let system = build::build(ctl, task, commit, config).await?;
    let closure = build::signed_closure(ctl, &system).await?;
    let sequence = ctl.db.next_sequence()?;
    let out = dir(ctl, task);
    private_dir(&out)?;
    let created = now() as u64;
    // A device's bundle carries its secrets, as a deployment to it would.
    let secrets = match &target {
        Target::Device(d) => {
            let tags = ctl.project.toml_at(commit)?.configs.get(config).map(|c| c.tags.clone()).unwrap_or_default();
            crate::secrets::for_device(ctl, d, config, &tags, &format!("bundle-{sequence}"))?
        }
        Target::Config(_) => None,
    };
    let manifest = Manifest {
        format: 0,
        target,
        system: system.clone(),
        commit: Some(commit.to_owned()),
        sequence,
        expires: expires_in.map(|s| created + s),
        created,
        paths: vec![],
        secrets,
    };
    let ctl2 = ctl.clone();
    let file = out.join(format!("bundle-{sequence}.tar"));
    tokio::task::spawn_blocking(move || -> Result<()> {
        let f = std::fs::File::create(&file)?;
        let w = std::io::BufWriter::new(f);
        let scratch = tempfile::tempdir_in(&ctl2.paths.root)?;
        bundle::write(w, manifest, &ctl2.identity, &LocalStore::system(), &closure, scratch.path())?;
        Ok(())
    })
    .await??;
    ctl.db.log(task, None, &format!("bundle of {system} with sequence {sequence}"))?;
    Ok(system.to_string())
}

fn finish(ctl: &Controller, task: i64, r: Result<String>) {
    match r {
        Ok(system) => {
            let _ = ctl.db.set_task_system(task, &system);
            let _ = engine::task_event(ctl, task, TaskEvent::Ended(TaskResult::Succeeded), None);
        }
        Err(e) => {
            let _ = engine::task_event(ctl, task, TaskEvent::Ended(TaskResult::Failed), Some(&format!("{e:#}")));
        }
    }
    ctl.notify_task(task);
}
