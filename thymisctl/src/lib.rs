//! `thymisctl`: drives a Thymis controller over its HTTP API. With `--json`, stdout
//! holds exactly one JSON document; progress and logs go to stderr.

pub mod console;
pub mod device;
pub use thymis_client::safe_text;

use std::io::IsTerminal;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use thymis_api::{
    ActivateRequest, Activated, AddDevice, ArtifactRequest, BuildRequest, ChildState, CommitRequest, Committed, Count,
    DeployRequest, Device, DeviceDetail, DeviceResult, Enrollment, Preview, ProjectStatus, Revoked, Staging, Task,
    TaskResult, TaskState,
};
use thymis_client::known_controllers as known;
use thymis_client::{Client, Connection, Progress, artifacts, follow};

use crate::safe_text::{printable, printable_or_dash};

/// Exit status when a deployment or build finished, but not successfully.
pub const EXIT_UNSUCCESSFUL: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "thymisctl", version, about = "Thymis command line")]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,
    /// Print exactly one JSON document on stdout.
    #[arg(long, global = true, help_heading = "Connection and output")]
    pub json: bool,
    /// Print what devices sent (logs, errors, versions) as it came, escape sequences and
    /// all, instead of showing their control characters as `\xNN`.
    #[arg(long, global = true, help_heading = "Connection and output")]
    pub raw: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Trust a controller: pin its certificate (checked against --fingerprint, which its
    /// log shows at start) and use its URL when no --controller is given.
    Login { url: String },
    /// Manage devices.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// List devices: configuration, online, the commit and system they run.
    Devices,
    /// A device's journal, through the controller: the last entries, or those since a
    /// time; with -f, new ones as they come until interrupted.
    Logs {
        device: String,
        /// Only this unit's entries (repeatable).
        #[arg(short = 'u', long = "unit")]
        units: Vec<String>,
        /// Entries since this time ("2026-12-01 10:00", "-1h", "today").
        #[arg(long, allow_hyphen_values = true)]
        since: Option<String>,
        /// How many past entries (default: 100, or all since --since up to 10,000).
        #[arg(short = 'n', long)]
        lines: Option<u32>,
        /// Keep showing new entries.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// A terminal on a device, through the controller (its agent must allow it:
    /// `terminal = true`): a login shell, or COMMAND; exits with its status.
    Shell {
        device: String,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// The project repository.
    #[command(subcommand)]
    Project(ProjectCmd),
    /// Secrets for devices (Wi-Fi keys, API tokens): sent to each device encrypted to
    /// its key, written to its secrets_dir, never put in the Nix store.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Commit (when dirty) and deploy to devices, configurations or tags.
    Deploy {
        /// A device to deploy to (again for more).
        #[arg(long = "device", value_name = "NAME")]
        devices: Vec<String>,
        /// Every device bound to this configuration of thymis.toml (again for more).
        #[arg(long = "config", value_name = "NAME")]
        configs: Vec<String>,
        /// Every device of the configurations carrying this tag (again for more).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Deploy this commit instead of HEAD.
        #[arg(long)]
        commit: Option<String>,
        /// Commit message for uncommitted changes.
        #[arg(short = 'm', long)]
        message: Option<String>,
        /// Reboot into the new system (boot it once, keep it after confirmation).
        #[arg(long)]
        reboot: bool,
        /// Show what would be deployed, and stop.
        #[arg(long)]
        preview: bool,
        /// Build, and say what the update would change and cost (packages added,
        /// removed and changed, sizes, reboots, what each device lacks); nothing is
        /// committed, sent or switched.
        #[arg(long, conflicts_with = "preview")]
        dry_run: bool,
        /// Wait until no device is pending or running; exit 0 only if all succeeded.
        #[arg(long)]
        wait: bool,
        /// Deploy to this many devices (or N%) first, alone, and go on only when they
        /// succeeded.
        #[arg(long, value_name = "N|P%")]
        canary: Option<Count>,
        /// Then go on in waves of this many devices (or N%); default: all the rest.
        #[arg(long, value_name = "N|P%")]
        wave_size: Option<Count>,
        /// Failed devices tolerated before the rollout halts by itself (default: none).
        #[arg(long, value_name = "N|P%")]
        max_failures: Option<Count>,
        /// Seconds to wait after each wave before the next (a device that leaves its new
        /// system meanwhile counts as failed).
        #[arg(long, value_name = "SECONDS")]
        soak: Option<u64>,
        /// Copy to the devices and stop before switching (`staged`); `thymisctl
        /// activate TASK` switches them.
        #[arg(long)]
        stage_only: bool,
        /// Switch (and reboot) only inside this maintenance window, e.g.
        /// "Mon-Fri 22:00-06:00" or "daily 02:00-04:00 Europe/Berlin" (instead of the
        /// configurations' or tags' window in thymis.toml); the copy happens at once.
        #[arg(long, value_name = "SPEC")]
        window: Option<String>,
    },
    /// Switch a deployment's staged devices now (all, or those named): a stage-only
    /// deployment's, or those waiting for their window. A device held by an
    /// application switches once the hold is released.
    Activate {
        id: i64,
        #[arg(long = "device")]
        devices: Vec<String>,
        #[arg(long)]
        wait: bool,
    },
    /// Go on with a staged rollout: a soaking one's next wave now, or a halted one's
    /// devices that did not succeed, as a new deployment at the project's HEAD.
    Resume {
        id: i64,
        #[arg(long)]
        wait: bool,
    },
    /// Build a configuration without deploying it.
    Build {
        config: String,
        #[arg(long)]
        commit: Option<String>,
        #[arg(long)]
        wait: bool,
    },
    /// List recent tasks.
    Tasks,
    /// Show a task; with --follow, until it ends.
    Task {
        id: i64,
        #[arg(long)]
        follow: bool,
    },
    /// Cancel a deployment (devices that have not activated stop).
    Cancel { id: i64 },
    /// Build a disk image for a device (carrying a new enrollment token) and download it.
    Image {
        device: String,
        #[arg(long)]
        commit: Option<String>,
        /// Directory for the image set (NAME.img.zst, .sha256, .bmap, manifest.json).
        #[arg(long)]
        out: std::path::PathBuf,
        /// For an enrolled device: the image enrolls a new key, and the enrolled one is
        /// revoked when the image is made (the device as it runs now is locked out).
        #[arg(long)]
        replace_key: bool,
    },
    /// Build an offline update bundle for a device or a configuration and download it.
    Bundle {
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        device: Option<String>,
        #[arg(long)]
        config: Option<String>,
        #[arg(long)]
        commit: Option<String>,
        /// Seconds until devices with a synchronised clock refuse it.
        #[arg(long)]
        expires_in: Option<u64>,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// On a device: the local agent's state (D-Bus).
    Status,
    /// On a device: roll back the deployment awaiting confirmation (D-Bus, root).
    Rollback,
    /// On a device: install an offline update bundle (D-Bus, root).
    InstallBundle { file: std::path::PathBuf },
    /// On a device: hold updates (D-Bus; root or the agent's hold_group): deployments
    /// are copied and staged, and switch once released.
    Hold { reason: String },
    /// On a device: release the hold taken with `thymisctl hold`.
    Release,
}

/// For whom a secret is: one of these.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct SecretScope {
    /// For one device (overrides its configuration's and tags' value).
    #[arg(long, value_name = "NAME")]
    device: Option<String>,
    /// For every device of a configuration (overrides its tags').
    #[arg(long, value_name = "NAME")]
    config: Option<String>,
    /// For every device of the configurations carrying a tag.
    #[arg(long, value_name = "TAG")]
    tag: Option<String>,
}

impl SecretScope {
    fn scope(&self) -> thymis_api::secrets::Scope {
        use thymis_api::secrets::Scope;
        match (&self.device, &self.config, &self.tag) {
            (Some(d), _, _) => Scope::Device(d.clone()),
            (_, Some(c), _) => Scope::Config(c.clone()),
            (_, _, Some(t)) => Scope::Tag(t.clone()),
            _ => unreachable!("clap requires one"),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Set a secret from a file or standard input (never from the command line, where
    /// other users and the shell's history would see it).
    Set {
        name: String,
        #[command(flatten)]
        scope: SecretScope,
        /// Read the value from this file (default: standard input).
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        #[arg(long, default_value = "root")]
        owner: String,
        #[arg(long, default_value = "root")]
        group: String,
        /// Octal permission bits of the file on the device.
        #[arg(long, default_value = "0400")]
        mode: String,
        /// Store it only: it reaches the devices with their next deployment (default:
        /// a deployment of what they run now carries it at once).
        #[arg(long)]
        no_deploy: bool,
    },
    /// The secrets: names, scopes, owners, modes and when they changed (never values).
    List,
    /// Remove a secret (devices drop it at their next deployment).
    Rm {
        name: String,
        #[command(flatten)]
        scope: SecretScope,
        #[arg(long)]
        no_deploy: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Add a device bound to a configuration; prints its enrollment token and agent config.
    Add {
        name: String,
        #[arg(long)]
        config: String,
    },
    /// Issue a new enrollment token for a new key (re-imaging); the enrolled key, if
    /// any, is revoked.
    Reenroll { name: String },
    /// Refuse the device from now on.
    Revoke { name: String },
    /// A device: configuration, tags, online or last seen, what it runs, its agent, and
    /// its deployments.
    Show { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ProjectCmd {
    /// Uncommitted changes.
    Status,
    /// Commit all changes (`git add -A`).
    Commit {
        #[arg(short = 'm', long)]
        message: Option<String>,
    },
}

/// What `thymisctl login` did (`--json`).
#[derive(Debug, Serialize)]
struct LoggedIn {
    controller: String,
    sha256: Option<String>,
}

/// `thymisctl login URL`: pins the certificate the controller presents, if it is the one
/// `--fingerprint` names (or, without it, on first use of that controller, saying so).
fn login(url: &str, conn: &Connection) -> Result<LoggedIn> {
    let url = Connection { controller: Some(url.to_owned()), ..conn.clone() }.url()?;
    let dir = known::config_dir()?;
    let mut sha256 = None;
    if url.starts_with("https://") {
        let origin = known::origin(&url)?;
        let shown = known::presented_certificate(&url)?;
        let mut pins = known::KnownControllers::load(&dir)?;
        match (conn.fingerprint()?, pins.get(&origin)) {
            (Some(expected), _) if expected != shown => bail!(
                "the controller at {url} presents the certificate sha256 {shown}, not {expected}: nothing was pinned"
            ),
            (Some(_), _) => {}
            (None, Some(pinned)) if pinned != shown => bail!(
                "the controller at {url} presents the certificate sha256 {shown}, but {pinned} is pinned: if it was \
                 replaced on purpose, check the new one in the controller's log and pass --fingerprint {shown}"
            ),
            (None, Some(_)) => {}
            (None, None) => eprintln!(
                "thymisctl: trusting {origin} on first use: certificate sha256 {shown} (compare it with the \
                 controller's log, or pass --fingerprint)"
            ),
        }
        pins.pin(&origin, shown)?;
        sha256 = Some(shown.to_string());
    }
    known::remember_controller(&dir, &url)?;
    Ok(LoggedIn { controller: url, sha256 })
}

/// Runs a command; returns the process exit status.
pub fn run(cli: Cli) -> Result<u8> {
    safe_text::set_raw(cli.raw);
    // With --json, the answer as the API's type; else as `human` shows it.
    fn out<T: Serialize>(json: bool, v: &T, human: impl FnOnce(&T)) {
        if json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            human(v);
        }
    }
    let json = cli.json;
    match &cli.command {
        Cmd::Status => {
            let v = device::status()?;
            out(json, &v, |v| {
                for (k, val) in v.as_object().into_iter().flatten() {
                    println!("{k:<20} {}", s(val));
                }
            });
            return Ok(0);
        }
        Cmd::Hold { reason } => {
            let msg = device::hold(reason)?;
            out(json, &serde_json::json!({ "message": msg }), |_| println!("{msg}"));
            return Ok(0);
        }
        Cmd::Release => {
            let msg = device::release()?;
            out(json, &serde_json::json!({ "message": msg }), |_| println!("{msg}"));
            return Ok(0);
        }
        Cmd::Rollback => {
            let msg = device::rollback()?;
            out(json, &serde_json::json!({ "message": msg }), |_| println!("{msg}"));
            return Ok(0);
        }
        Cmd::InstallBundle { file } => {
            let v = device::install_bundle(file)?;
            out(json, &v, |v| println!("{} {}", s(&v["result"]), s(&v["reason"])));
            let ok = serde_json::from_value::<DeviceResult>(v["result"].clone()).is_ok_and(DeviceResult::is_success);
            return Ok(if ok { 0 } else { EXIT_UNSUCCESSFUL });
        }
        Cmd::Login { url } => {
            let v = login(url, &cli.connection)?;
            out(json, &v, |v| match &v.sha256 {
                Some(f) => println!("logged in to {} (certificate sha256 {f})", v.controller),
                None => println!("logged in to {} (plain HTTP: not encrypted)", v.controller),
            });
            return Ok(0);
        }
        _ => {}
    }
    let c = Client::new(&cli.connection)?;
    let show = !json;
    match &cli.command {
        Cmd::Status
        | Cmd::Rollback
        | Cmd::InstallBundle { .. }
        | Cmd::Hold { .. }
        | Cmd::Release
        | Cmd::Login { .. } => {}
        Cmd::Image { device, commit, out: dir, replace_key } => {
            let req = ArtifactRequest { commit: commit.clone(), replace_key: *replace_key, ..Default::default() };
            let task: Task = c.post(&format!("/devices/{device}/image"), Some(&req))?;
            let done = artifacts(&c, task.id, |name| dir.join(name), progress(show))?;
            out(json, &done, |t| println!("image of {device} in {} ({})", dir.display(), dash(t.system.as_deref())));
            return Ok(exit_status(done.result == Some(TaskResult::Succeeded)));
        }
        Cmd::Bundle { device, config, commit, expires_in, out: file } => {
            let req = ArtifactRequest {
                device: device.clone(),
                config: config.clone(),
                commit: commit.clone(),
                expires_in: *expires_in,
                ..Default::default()
            };
            let task: Task = c.post("/bundles", Some(&req))?;
            let done = artifacts(&c, task.id, |_| file.clone(), progress(show))?;
            out(json, &done, |t| println!("bundle of {} in {}", dash(t.system.as_deref()), file.display()));
            return Ok(exit_status(done.result == Some(TaskResult::Succeeded)));
        }
        Cmd::Secret(SecretCmd::Set { name, scope, file, owner, group, mode, no_deploy }) => {
            use anyhow::Context as _;
            use base64::Engine as _;
            let value = match file {
                Some(f) => std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
                None => {
                    let mut v = vec![];
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut v).context("reading standard input")?;
                    v
                }
            };
            let req = thymis_api::secrets::SetSecret {
                name: name.clone(),
                scope: scope.scope(),
                owner: owner.clone(),
                group: group.clone(),
                mode: mode.clone(),
                value: base64::engine::general_purpose::STANDARD.encode(value),
                deploy: !*no_deploy,
            };
            let v: thymis_api::secrets::SecretChanged = c.post("/secrets", Some(&req))?;
            out(json, &v, |v| {
                println!("set {} for {}", v.secret.name, v.secret.scope);
                secret_tasks(&v.tasks);
            });
        }
        Cmd::Secret(SecretCmd::List) => {
            let v: Vec<thymis_api::secrets::SecretInfo> = c.get("/secrets")?;
            out(json, &v, |v| {
                println!("{:<24} {:<24} {:<10} {:<10} {:<5} UPDATED (UTC)", "NAME", "FOR", "OWNER", "GROUP", "MODE");
                for s in v {
                    println!(
                        "{:<24} {:<24} {:<10} {:<10} {:<5} {}",
                        s.name,
                        s.scope.to_string(),
                        s.owner,
                        s.group,
                        s.mode,
                        console::utc(s.updated.max(0) as u64)
                    );
                }
            });
        }
        Cmd::Secret(SecretCmd::Rm { name, scope, no_deploy }) => {
            let req =
                thymis_api::secrets::RemoveSecret { name: name.clone(), scope: scope.scope(), deploy: !*no_deploy };
            let v: serde_json::Value = c.post("/secrets/remove", Some(&req))?;
            out(json, &v, |v| {
                println!("removed {name} for {}", req.scope);
                let tasks: Vec<i64> = serde_json::from_value(v["tasks"].clone()).unwrap_or_default();
                secret_tasks(&tasks);
            });
        }
        Cmd::Device(DeviceCmd::Add { name, config }) => {
            let v: Enrollment = c.post("/devices", Some(&AddDevice { name: name.clone(), config: config.clone() }))?;
            out(json, &v, print_enrollment);
        }
        Cmd::Device(DeviceCmd::Reenroll { name }) => {
            let v: Enrollment = c.post(&format!("/devices/{name}/reenroll"), None::<&()>)?;
            out(json, &v, print_enrollment);
        }
        Cmd::Device(DeviceCmd::Revoke { name }) => {
            let v: Revoked = c.post(&format!("/devices/{name}/revoke"), None::<&()>)?;
            out(json, &v, |_| println!("device {name} revoked"));
        }
        Cmd::Devices => {
            let v: Vec<Device> = c.get("/devices")?;
            out(json, &v, |v| print_devices(v));
        }
        Cmd::Device(DeviceCmd::Show { name }) => {
            let v: DeviceDetail = c.get(&format!("/devices/{}", console::encode(name)))?;
            out(json, &v, print_device);
        }
        Cmd::Logs { device, units, since, lines, follow } => {
            let q = console::LogsQuery { units, since: since.as_deref(), lines: *lines, follow: *follow };
            console::logs(&c, device, &q, json)?;
        }
        Cmd::Shell { device, command } => return console::shell(&c, device, command),
        Cmd::Project(ProjectCmd::Status) => {
            let v: ProjectStatus = c.get("/project/status")?;
            out(json, &v, |v| {
                if v.changes.is_empty() {
                    println!("clean at {}", v.head);
                }
                for ch in &v.changes {
                    println!("{:<9} {}", ch.status, printable(&ch.path));
                }
            });
        }
        Cmd::Project(ProjectCmd::Commit { message }) => {
            let req = CommitRequest { message: message.clone().unwrap_or_default() };
            let v: Committed = c.post("/project/commit", Some(&req))?;
            out(json, &v, |v| println!("{}", v.commit));
        }
        Cmd::Deploy {
            devices,
            configs,
            tags,
            commit,
            message,
            reboot,
            preview,
            dry_run,
            wait,
            canary,
            wave_size,
            max_failures,
            soak,
            stage_only,
            window,
        } => {
            let req = DeployRequest {
                devices: devices.clone(),
                configs: configs.clone(),
                tags: tags.clone(),
                commit: commit.clone(),
                message: message.clone(),
                reboot: *reboot,
                staging: Staging { canary: *canary, wave_size: *wave_size, max_failures: *max_failures, soak: *soak },
                stage_only: *stage_only,
                window: window.clone(),
            };
            if *preview {
                let v: Preview = c.post("/deploy/preview", Some(&req))?;
                out(json, &v, print_preview);
                return Ok(0);
            }
            if *dry_run {
                let v: thymis_api::preview::DryRun = c.post("/deploy/dry-run", Some(&req))?;
                out(json, &v, print_dry_run);
                return Ok(0);
            }
            let task: Task = c.post("/deploy", Some(&req))?;
            eprintln!("deployment task {} at commit {}", task.id, dash(task.commit.as_deref()));
            return finish(&c, task, *wait, json);
        }
        Cmd::Activate { id, devices, wait } => {
            let req = ActivateRequest { devices: devices.clone() };
            let a: Activated = c.post(&format!("/tasks/{id}/activate"), Some(&req))?;
            if json && !*wait {
                println!("{}", serde_json::to_string_pretty(&a).unwrap_or_default());
                return Ok(0);
            }
            if !a.activating.is_empty() {
                eprintln!("activating: {}", a.activating.join(", "));
            }
            if !a.held.is_empty() {
                eprintln!("held on the device (switches once released): {}", a.held.join(", "));
            }
            let task: Task = c.get(&format!("/tasks/{id}"))?;
            return finish(&c, task, *wait, json);
        }
        Cmd::Resume { id, wait } => {
            let task: Task = c.post(&format!("/tasks/{id}/resume"), None::<&()>)?;
            if task.id != *id {
                eprintln!("task {id} goes on as deployment task {}", task.id);
            }
            return finish(&c, task, *wait, json);
        }
        Cmd::Build { config, commit, wait } => {
            let task: Task =
                c.post("/build", Some(&BuildRequest { config: config.clone(), commit: commit.clone() }))?;
            return finish(&c, task, *wait, json);
        }
        Cmd::Tasks => {
            let v: Vec<Task> = c.get("/tasks")?;
            out(json, &v, |v| {
                println!("{:>5}  {:<10} {:<9} {:<16} {:<20} COMMIT", "ID", "KIND", "STATE", "RESULT", "CREATED (UTC)");
                for t in v {
                    println!(
                        "{:>5}  {:<10} {:<9} {:<16} {:<20} {}",
                        t.id,
                        t.kind,
                        t.state.as_str(),
                        t.result.map_or("-", TaskResult::as_str),
                        console::utc(t.created.max(0) as u64),
                        dash(t.commit.as_deref()).chars().take(12).collect::<String>()
                    );
                }
            });
        }
        Cmd::Task { id, follow: f } => {
            let v: Task = if *f { follow(&c, *id, progress(show))? } else { c.get(&format!("/tasks/{id}"))? };
            if *f && show {
                say_queued(&v);
            }
            out(json, &v, print_task);
        }
        Cmd::Cancel { id } => {
            let v: Task = c.post(&format!("/tasks/{id}/cancel"), None::<&()>)?;
            out(json, &v, print_task);
        }
    }
    Ok(0)
}

/// A started deployment or build: shown at once, or (`--wait`) followed to its end, its
/// exit status saying whether every device (or the build) succeeded.
fn finish(c: &Client, task: Task, wait: bool, json: bool) -> Result<u8> {
    let show = |t: &Task| {
        if json {
            println!("{}", serde_json::to_string_pretty(t).unwrap_or_default());
        } else {
            print_task(t);
        }
    };
    if !wait {
        show(&task);
        return Ok(0);
    }
    let done = follow(c, task.id, progress(!json))?;
    if !json {
        say_queued(&done);
    }
    show(&done);
    let ok = if task.kind == "deployment" {
        done.all_succeeded_or_staged()
    } else {
        done.result == Some(TaskResult::Succeeded)
    };
    Ok(exit_status(ok))
}

fn exit_status(ok: bool) -> u8 {
    if ok { 0 } else { EXIT_UNSUCCESSFUL }
}

/// Shows a followed task's progress on stderr: its log lines, and on a terminal one
/// line of its devices that keeps being rewritten.
fn progress(show: bool) -> impl FnMut(Progress<'_>) {
    let tty = std::io::stderr().is_terminal();
    let mut drawn = false;
    move |p| {
        if !show {
            return;
        }
        if drawn {
            eprint!("\r\x1b[2K");
            drawn = false;
        }
        match p {
            Progress::Log(line) => eprintln!("  {}", printable(line)),
            Progress::Downloaded(path) => eprintln!("  downloaded {}", path.display()),
            Progress::Task(t) if tty && !t.state.is_settled() => {
                let summary: Vec<String> = t
                    .children
                    .iter()
                    .map(|ch| {
                        let phase = ch.phase.map_or("-", |p| p.as_str());
                        format!("{} {}/{phase} {} paths", ch.device, ch.state.as_str(), ch.paths_sent)
                    })
                    .collect();
                eprint!("\r\x1b[2K{}", summary.join("  |  "));
                drawn = true;
            }
            Progress::Task(_) => {}
        }
    }
}

/// A "waiting" deployment ended the wait: its offline devices are named.
fn say_queued(t: &Task) {
    if t.state == TaskState::Waiting {
        for ch in t.children.iter().filter(|ch| ch.state == ChildState::Queued) {
            eprintln!("  {} is offline: queued until it connects", ch.device);
        }
        for ch in t.children.iter().filter(|ch| ch.state == ChildState::Staged) {
            let why = ch.waiting.as_ref().map_or("staged".into(), |w| w.describe());
            eprintln!("  {}: {}", ch.device, printable(&why));
        }
    }
}

fn dash(v: Option<&str>) -> String {
    printable_or_dash(v).into_owned()
}

/// A value of the agent's D-Bus answers (not the controller's API), as text.
fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Where a secret's change goes.
fn secret_tasks(tasks: &[i64]) {
    match tasks {
        [] => println!("it reaches the devices with their next deployment"),
        _ => {
            let ids: Vec<String> = tasks.iter().map(i64::to_string).collect();
            println!("deploying it to the devices it reaches: task {} (thymisctl task ID)", ids.join(", "));
        }
    }
}

fn print_enrollment(e: &Enrollment) {
    println!("device {}: enrollment token {}", e.name, e.enrollment_token);
    println!("agent configuration (keep it secret):\n{}", e.agent_config);
}

fn print_devices(devices: &[Device]) {
    println!(
        "{:<16} {:<12} {:<12} {:<20} {:<12} {:<10} SYSTEM",
        "NAME", "CONFIG", "STATE", "LAST SEEN (UTC)", "COMMIT", "HEAD"
    );
    for d in devices {
        let commit: String = printable_or_dash(d.commit.as_deref()).chars().take(12).collect();
        let state = if d.revoked {
            "key revoked"
        } else if !d.enrolled {
            "not enrolled"
        } else if d.online {
            "online"
        } else {
            "offline"
        };
        let seen = d.last_seen.map_or("never".into(), |t| console::utc(t.max(0) as u64));
        let head = match d.behind_head {
            Some(0) => "HEAD".to_owned(),
            Some(n) => format!("-{n}"),
            None => "-".into(),
        };
        println!(
            "{:<16} {:<12} {state:<12} {seen:<20} {commit:<12} {head:<10} {}",
            d.name,
            d.config,
            printable_or_dash(d.system.as_deref())
        );
        if let Some(next) = hand_set(d) {
            println!("{:<16} boots next {} (set on the device)", "", printable(next));
        }
        if let Some(h) = &d.hold {
            println!("{:<16} {}", "", printable(&hold_text(h)));
        }
    }
}

/// `held: REASON (since T)`, and whether it is past the device's maximum.
fn hold_text(h: &thymis_api::HoldReport) -> String {
    let over = if h.overdue { "; older than the device's maximum: no longer obeyed" } else { "" };
    format!("held: {} (since {}{over})", h.reason, console::utc(h.since))
}

/// What an idle device's profile names instead of what it runs: set on the device by
/// hand, so deployments are refused until it ran or is set back (docs/agent.md).
fn hand_set(d: &Device) -> Option<&str> {
    d.boots_next.as_deref().filter(|_| d.agent_state.as_deref() == Some("idle"))
}

fn print_device(d: &DeviceDetail) {
    let dev = &d.device;
    let opt = |v: &Option<String>| printable_or_dash(v.as_deref()).into_owned();
    let missing = if d.config_exists { "" } else { " (not in the project)" };
    println!("device        {}", dev.name);
    println!("configuration {}{missing}", dev.config);
    println!("tags          {}", if d.tags.is_empty() { "-".into() } else { d.tags.join(", ") });
    let seen = dev.last_seen.map_or("never".into(), |t| console::utc(t.max(0) as u64));
    println!("online        {}", if dev.online { "yes".into() } else { format!("no (last seen {seen})") });
    println!(
        "enrolled      {}{}",
        if dev.enrolled { "yes" } else { "no" },
        if dev.revoked { " (revoked)" } else { "" }
    );
    println!("commit        {}", opt(&dev.commit));
    println!("system        {}", opt(&dev.system));
    if let Some(next) = hand_set(dev) {
        println!("boots next    {} (set on the device: deployments wait until it ran or is set back)", printable(next));
    }
    println!("agent         {} ({})", opt(&dev.agent_version), opt(&dev.agent_state));
    if let Some(h) = &dev.hold {
        println!("updates       {}", printable(&hold_text(h)));
    }
    if let Some(z) = &dev.time_zone {
        println!("time zone     {}", printable(z));
    }
    if d.history.is_empty() {
        return println!("no deployments yet");
    }
    println!("\n{:<6} {:<20} {:<12} {:<28} REASON", "TASK", "TIME", "COMMIT", "RESULT");
    for h in &d.history {
        let commit: String = printable_or_dash(h.commit.as_deref()).chars().take(12).collect();
        let result = h.result.map_or_else(|| format!("({})", h.state.as_str()), |r| r.as_str().to_owned());
        let waiting = h.waiting.as_ref().map(|w| w.describe());
        let reason =
            printable(h.reason.map(|r| r.as_str()).or(waiting.as_deref()).or(h.error.as_deref()).unwrap_or(""));
        println!("{:<6} {:<20} {commit:<12} {result:<28} {reason}", h.task, console::utc(h.updated.max(0) as u64));
    }
}

fn print_dry_run(d: &thymis_api::preview::DryRun) {
    use thymis_api::human_bytes as h;
    println!(
        "dry run at commit {} (task {}): nothing was sent or switched",
        &d.commit[..d.commit.len().min(12)],
        d.task
    );
    for c in &d.configs {
        let was = c.before_bytes.map(|b| format!(", was {}", h(b as i64))).unwrap_or_default();
        let reboot = c.reboot.as_deref().map_or("no (switches live)".to_owned(), |r| format!("yes: {}", printable(r)));
        println!(
            "\nconfiguration {}: {} paths, {}{was}; reboot needed: {reboot}",
            c.config,
            c.closure_paths,
            h(c.closure_bytes as i64)
        );
        if c.before.is_none() {
            println!("  (its devices run nothing the controller has: no package diff)");
        }
        for p in &c.changed {
            println!("  changed  {:<32} {} -> {}", p.name, dash(Some(&p.old)), dash(Some(&p.new)));
        }
        for p in &c.added {
            println!("  added    {:<32} {}", p.name, dash(Some(&p.version)));
        }
        for p in &c.removed {
            println!("  removed  {:<32} {}", p.name, dash(Some(&p.version)));
        }
    }
    println!(
        "\n{:<16} {:<12} {:>7} {:>11} {:>11} {:>7}  RUNS",
        "DEVICE", "CONFIG", "LACKS", "NAR BYTES", "SENDS", "DELTAS"
    );
    for dev in &d.devices {
        let lacks = if dev.known { dev.paths.to_string() } else { format!("{}?", dev.paths) };
        println!(
            "{:<16} {:<12} {:>7} {:>11} {:>11} {:>7}  {}",
            dev.device,
            dev.config,
            lacks,
            h(dev.bytes as i64),
            h(dev.send_bytes as i64),
            dev.deltas,
            dash(dev.runs.as_deref())
        );
        if let Some(c) = dev.from_caches.filter(|c| c.paths > 0) {
            println!("{:<16} its binary caches serve {} paths ({})", "", c.paths, h(c.bytes as i64));
        }
    }
    println!("(SENDS: what the controller sends, compressed or as deltas, besides what the device's caches serve)");
}

fn print_preview(p: &Preview) {
    match &p.commit {
        Some(c) => println!("commit {c}"),
        None => println!("{} uncommitted change(s) will be committed first", p.uncommitted_changes),
    }
    println!("configurations: {}", p.configs.join(", "));
    for d in &p.devices {
        println!("  {:<16} {:<12} {}", d.name, d.config, if d.online { "online" } else { "offline" });
    }
}

fn print_task(t: &Task) {
    let text = |v: Option<&str>| v.unwrap_or("-").to_owned();
    println!("task {} ({}) {} {}", t.id, t.kind, t.state.as_str(), text(t.result.map(|r| r.as_str())));
    let settled = t.state.is_settled() && t.state != TaskState::Waiting;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let took = thymis_api::human_duration(if settled { t.updated } else { now } - t.created);
    println!(
        "  started {}, {} {took}",
        console::utc(t.created.max(0) as u64),
        if settled { "took" } else { "running for" }
    );
    if let Some(c) = &t.commit {
        let subject = t.commit_subject.as_deref().map(|s| format!(" {}", printable(s))).unwrap_or_default();
        println!("  commit {}{subject}", c.chars().take(12).collect::<String>());
    }
    if let Some(e) = &t.error {
        println!("  error: {}", printable(e));
    }
    if let Some(w) = &t.warning {
        println!("  warning: {}", printable(w));
    }
    if let Some(r) = &t.rollout {
        let waves = t.children.iter().map(|c| c.wave).max().unwrap_or(1);
        let p = &r.plan;
        let mut plan = vec![];
        if let Some(c) = p.canary {
            plan.push(format!("canary {c}"));
        }
        if let Some(w) = p.wave_size {
            plan.push(format!("waves of {w}"));
        }
        plan.push(format!("max failures {}", p.max_failures.map_or("0".into(), |m| m.to_string())));
        if let Some(s) = p.soak {
            plan.push(format!("soak {s} s"));
        }
        let soak =
            r.soak_until.map(|u| format!(", soaking until {}", console::utc(u.max(0) as u64))).unwrap_or_default();
        println!("  rollout: wave {} of {waves}{soak} ({})", r.wave, plan.join(", "));
    }
    if t.children.is_empty() {
        return;
    }
    println!("  {:<16} {:>4}  {:<18} {:>11} {:>10}  RESULT", "DEVICE", "WAVE", "STATUS", "PATHS", "SENT");
    for c in &t.children {
        let paths = match (c.copy, c.paths_total) {
            // While the copy runs: how far in bytes, so one large path shows progress.
            (Some(p), _) if p.nar_bytes_total > 0 => format!("{}%", p.nar_bytes_done * 100 / p.nar_bytes_total),
            (_, Some(total)) => format!("{}/{total}", c.paths_sent),
            _ => c.paths_sent.to_string(),
        };
        let mut line = format!(
            "  {:<16} {:>4}  {:<18} {:>11} {:>10}  {}",
            c.device,
            c.wave,
            c.status(),
            paths,
            thymis_api::human_bytes(c.bytes_sent),
            text(c.result.map(DeviceResult::as_str))
        );
        if let Some(r) = &c.reason {
            line.push_str(&format!(" reason: {r}"));
        }
        if !c.failed_units.is_empty() {
            line.push_str(&format!(" failed units: {}", printable(&c.failed_units.join(", "))));
        }
        if !c.failed_checks.is_empty() {
            line.push_str(&format!(" failed health checks: {}", printable(&c.failed_checks.join(", "))));
        }
        if c.paths_substituted > 0 {
            line.push_str(&format!(" ({} paths from binary caches)", c.paths_substituted));
        }
        if let Some(w) = &c.waiting {
            line.push_str(&format!(" {}", printable(&w.describe())));
        }
        if let Some(p) =
            c.packages.as_ref().filter(|p| !p.changed.is_empty() || !p.added.is_empty() || !p.removed.is_empty())
        {
            let changed: Vec<String> = p.changed.iter().map(|x| format!("{} {} -> {}", x.name, x.old, x.new)).collect();
            line.push_str(&format!(
                " packages: {}{}",
                printable(&changed.join(", ")),
                if p.added.is_empty() && p.removed.is_empty() {
                    String::new()
                } else {
                    format!(" ({} added, {} removed)", p.added.len(), p.removed.len())
                }
            ));
        }
        if let Some(r) = c.reboot_needed.as_deref().filter(|_| c.result.is_none()) {
            line.push_str(&format!(" (reboot needed: {})", printable(r)));
        }
        if let Some(e) = &c.error {
            line.push_str(&format!(" error: {}", printable(e)));
        }
        println!("{line}");
    }
}
