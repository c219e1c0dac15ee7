//! `thymisctl`: drives a Thymis controller over its HTTP API. With `--json`, stdout
//! holds exactly one JSON document; progress and logs go to stderr.

pub mod client;
pub mod console;
pub mod device;
pub mod known_controllers;
pub mod safe_text;

pub use client::{Client, Connection};

use std::io::IsTerminal;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use thymis_api::{Device, DeviceResult, Enrollment, Preview, Task, TaskState};

use crate::safe_text::{printable, printable_or_dash};

/// Exit status when a deployment or build finished, but not successfully.
pub const EXIT_UNSUCCESSFUL: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "thymisctl", version, about = "Thymis command line")]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,
    /// Print exactly one JSON document on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print what devices sent (logs, errors, versions) as it came, escape sequences and
    /// all, instead of showing their control characters as `\xNN`.
    #[arg(long, global = true)]
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
    /// Commit (when dirty) and deploy to devices, configurations or tags.
    Deploy {
        #[arg(long = "device")]
        devices: Vec<String>,
        #[arg(long = "config")]
        configs: Vec<String>,
        #[arg(long = "tag")]
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
        /// Wait until no device is pending or running; exit 0 only if all succeeded.
        #[arg(long)]
        wait: bool,
        /// Deploy to this many devices (or N%) first, alone, and go on only when they
        /// succeeded.
        #[arg(long, value_name = "N|P%", value_parser = count)]
        canary: Option<String>,
        /// Then go on in waves of this many devices (or N%); default: all the rest.
        #[arg(long, value_name = "N|P%", value_parser = count)]
        wave_size: Option<String>,
        /// Failed devices tolerated before the rollout halts by itself (default: none).
        #[arg(long, value_name = "N|P%", value_parser = count)]
        max_failures: Option<String>,
        /// Seconds to wait after each wave before the next (a device that leaves its new
        /// system meanwhile counts as failed).
        #[arg(long, value_name = "SECONDS")]
        soak: Option<u64>,
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

/// `thymisctl login URL`: pins the certificate the controller presents, if it is the one
/// `--fingerprint` names (or, without it, on first use of that controller, saying so).
fn login(url: &str, conn: &Connection) -> Result<Value> {
    use known_controllers as known;
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
    Ok(json!({ "controller": url, "sha256": sha256 }))
}

/// A number of devices or a percentage (`3`, `25%`).
fn count(s: &str) -> Result<String, String> {
    let ok = match s.strip_suffix('%') {
        Some(p) => p.parse::<u8>().is_ok_and(|p| p <= 100),
        None => s.parse::<usize>().is_ok(),
    };
    if ok { Ok(s.to_owned()) } else { Err(format!("{s:?} is neither a number of devices nor a percentage like 25%")) }
}

/// Runs a command; returns the process exit status.
pub fn run(cli: Cli) -> Result<u8> {
    safe_text::set_raw(cli.raw);
    let out = |v: &Value, human: &dyn Fn(&Value)| {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            human(v);
        }
    };
    match &cli.command {
        Cmd::Status => {
            let v = device::status()?;
            out(&v, &|v| {
                for (k, val) in v.as_object().into_iter().flatten() {
                    println!("{k:<20} {}", s(val));
                }
            });
            return Ok(0);
        }
        Cmd::Rollback => {
            let msg = device::rollback()?;
            out(&json!({ "message": msg }), &|_| println!("{msg}"));
            return Ok(0);
        }
        Cmd::InstallBundle { file } => {
            let v = device::install_bundle(file)?;
            out(&v, &|v| println!("{} {}", s(&v["result"]), s(&v["reason"])));
            let ok = typed::<thymis_api::DeviceResult>(&v["result"]).is_some_and(thymis_api::DeviceResult::is_success);
            return Ok(if ok { 0 } else { EXIT_UNSUCCESSFUL });
        }
        Cmd::Login { url } => {
            let v = login(url, &cli.connection)?;
            out(&v, &|v| match v["sha256"].as_str() {
                Some(f) => println!("logged in to {} (certificate sha256 {f})", s(&v["controller"])),
                None => println!("logged in to {} (plain HTTP: not encrypted)", s(&v["controller"])),
            });
            return Ok(0);
        }
        _ => {}
    }
    let c = Client::new(&cli.connection)?;
    match &cli.command {
        Cmd::Status | Cmd::Rollback | Cmd::InstallBundle { .. } | Cmd::Login { .. } => {}
        Cmd::Image { device, commit, out: dir, replace_key } => {
            let body = json!({ "commit": commit, "replace_key": replace_key });
            let task = c.call("POST", &format!("/devices/{device}/image"), Some(body))?;
            let done = artifacts(&c, &task, !cli.json, |name| dir.join(name))?;
            out(&done, &|t| println!("image of {device} in {} ({})", dir.display(), s(&t["system"])));
            return Ok(if done["result"] == "succeeded" { 0 } else { EXIT_UNSUCCESSFUL });
        }
        Cmd::Bundle { device, config, commit, expires_in, out: file } => {
            let body = json!({ "device": device, "config": config, "commit": commit, "expires_in": expires_in });
            let task = c.call("POST", "/bundles", Some(body))?;
            let done = artifacts(&c, &task, !cli.json, |_| file.clone())?;
            out(&done, &|t| println!("bundle of {} in {}", s(&t["system"]), file.display()));
            return Ok(if done["result"] == "succeeded" { 0 } else { EXIT_UNSUCCESSFUL });
        }
        Cmd::Device(DeviceCmd::Add { name, config }) => {
            let v = c.call("POST", "/devices", Some(json!({ "name": name, "config": config })))?;
            out(&v, &print_enrollment);
        }
        Cmd::Device(DeviceCmd::Reenroll { name }) => {
            let v = c.call("POST", &format!("/devices/{name}/reenroll"), None)?;
            out(&v, &print_enrollment);
        }
        Cmd::Device(DeviceCmd::Revoke { name }) => {
            let v = c.call("POST", &format!("/devices/{name}/revoke"), None)?;
            out(&v, &|_| println!("device {name} revoked"));
        }
        Cmd::Devices => {
            let v = c.call("GET", "/devices", None)?;
            out(&v, &print_devices);
        }
        Cmd::Device(DeviceCmd::Show { name }) => {
            let v = c.call("GET", &format!("/devices/{}", console::encode(name)), None)?;
            out(&v, &print_device);
        }
        Cmd::Logs { device, units, since, lines, follow } => {
            let q = console::LogsQuery { units, since: since.as_deref(), lines: *lines, follow: *follow };
            console::logs(&c, device, &q, cli.json)?;
        }
        Cmd::Shell { device, command } => return console::shell(&c, device, command),
        Cmd::Project(ProjectCmd::Status) => {
            let v = c.call("GET", "/project/status", None)?;
            out(&v, &|v| {
                let changes = v["changes"].as_array().cloned().unwrap_or_default();
                if changes.is_empty() {
                    println!("clean at {}", s(&v["head"]));
                }
                for ch in changes {
                    println!("{:<9} {}", s(&ch["status"]), s(&ch["path"]));
                }
            });
        }
        Cmd::Project(ProjectCmd::Commit { message }) => {
            let v =
                c.call("POST", "/project/commit", Some(json!({ "message": message.clone().unwrap_or_default() })))?;
            out(&v, &|v| println!("{}", s(&v["commit"])));
        }
        Cmd::Deploy {
            devices,
            configs,
            tags,
            commit,
            message,
            reboot,
            preview,
            wait,
            canary,
            wave_size,
            max_failures,
            soak,
        } => {
            let req = json!({ "devices": devices, "configs": configs, "tags": tags, "commit": commit,
                              "message": message, "reboot": reboot, "canary": canary, "wave_size": wave_size,
                              "max_failures": max_failures, "soak": soak });
            if *preview {
                let v = c.call("POST", "/deploy/preview", Some(req))?;
                out(&v, &print_preview);
                return Ok(0);
            }
            let task = c.call("POST", "/deploy", Some(req))?;
            let id = task["id"].as_i64().ok_or_else(|| anyhow!("no task id in {task}"))?;
            eprintln!("deployment task {id} at commit {}", s(&task["commit"]));
            if !*wait {
                out(&task, &print_task);
                return Ok(0);
            }
            let done = follow(&c, id, !cli.json)?;
            out(&done, &print_task);
            return Ok(if all_succeeded(&done) { 0 } else { EXIT_UNSUCCESSFUL });
        }
        Cmd::Resume { id, wait } => {
            let task = c.call("POST", &format!("/tasks/{id}/resume"), None)?;
            let next = task["id"].as_i64().ok_or_else(|| anyhow!("no task id in {task}"))?;
            if next != *id {
                eprintln!("task {id} goes on as deployment task {next}");
            }
            if !*wait {
                out(&task, &print_task);
                return Ok(0);
            }
            let done = follow(&c, next, !cli.json)?;
            out(&done, &print_task);
            return Ok(if all_succeeded(&done) { 0 } else { EXIT_UNSUCCESSFUL });
        }
        Cmd::Build { config, commit, wait } => {
            let task = c.call("POST", "/build", Some(json!({ "config": config, "commit": commit })))?;
            let id = task["id"].as_i64().ok_or_else(|| anyhow!("no task id"))?;
            if !*wait {
                out(&task, &print_task);
                return Ok(0);
            }
            let done = follow(&c, id, !cli.json)?;
            out(&done, &print_task);
            return Ok(if done["result"] == "succeeded" { 0 } else { EXIT_UNSUCCESSFUL });
        }
        Cmd::Tasks => {
            let v = c.call("GET", "/tasks", None)?;
            out(&v, &|v| {
                for t in v.as_array().cloned().unwrap_or_default() {
                    println!(
                        "{:>5}  {:<10} {:<9} {:<16} {}",
                        t["id"],
                        s(&t["kind"]),
                        s(&t["state"]),
                        s(&t["result"]),
                        &s(&t["commit"]).chars().take(12).collect::<String>()
                    );
                }
            });
        }
        Cmd::Task { id, follow: f } => {
            let v = if *f { follow(&c, *id, !cli.json)? } else { c.call("GET", &format!("/tasks/{id}"), None)? };
            out(&v, &print_task);
        }
        Cmd::Cancel { id } => {
            let v = c.call("POST", &format!("/tasks/{id}/cancel"), None)?;
            out(&v, &print_task);
        }
    }
    Ok(0)
}

/// Waits for an image or bundle task, then downloads its files to `dest(name)`.
pub fn artifacts(c: &Client, task: &Value, show: bool, dest: impl Fn(&str) -> std::path::PathBuf) -> Result<Value> {
    let id = task["id"].as_i64().ok_or_else(|| anyhow!("no task id in {task}"))?;
    let done = follow(c, id, show)?;
    if done["result"] != "succeeded" {
        bail!("task {id} {}: {}", s(&done["result"]), s(&done["error"]));
    }
    for f in c.call("GET", &format!("/tasks/{id}/artifacts"), None)?.as_array().cloned().unwrap_or_default() {
        let name = s(&f["name"]);
        check_artifact_name(&name)?;
        let path = dest(&name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        c.download(&format!("/tasks/{id}/artifacts/{name}"), &path)?;
        if show {
            eprintln!("  downloaded {}", path.display());
        }
    }
    Ok(done)
}

/// An artifact's name as the server gives it becomes a file name under `--out`: a
/// plain name only (no `/`, no `..`, no leading dot), or the server could write anywhere.
pub fn check_artifact_name(name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains("..")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
    if !plain {
        bail!("the controller named an artifact {name:?}, which is not a plain file name: refused");
    }
    Ok(())
}

/// Whether every child ended `succeeded` or `succeeded-with-failed-units`.
pub fn all_succeeded(task: &Value) -> bool {
    typed::<Task>(task).is_some_and(|t| t.all_succeeded())
}

/// An answer as the API's type; `None` for one this thymisctl does not know.
fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Option<T> {
    serde_json::from_value(v.clone()).ok()
}

/// Follows a task until no child is pending or running, printing logs and progress to
/// stderr. Queued children (offline devices) do not hold the wait. Uses the task's
/// server-sent events, so the result is seen as soon as it is recorded.
pub fn follow(c: &Client, id: i64, show: bool) -> Result<Value> {
    let tty = std::io::stderr().is_terminal();
    let settled = |t: &Value| t["state"].as_str().and_then(TaskState::parse).is_some_and(TaskState::is_settled);
    let mut last = Value::Null;
    let url = format!("{}/api/v1/tasks/{id}/events", c.base);
    let mut resp = c
        .agent
        .get(&url)
        .header("Authorization", &format!("Bearer {}", c.token))
        .header("Accept", "text/event-stream")
        .call()
        .with_context(|| format!("following task {id}"))?;
    if !resp.status().is_success() {
        bail!("following task {id}: {}", resp.status());
    }
    let reader = std::io::BufReader::new(resp.body_mut().with_config().limit(u64::MAX).reader());
    let mut event = String::new();
    for line in std::io::BufRead::lines(reader) {
        let line = line?;
        if let Some(name) = line.strip_prefix("event: ") {
            event = name.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ") {
            match event.as_str() {
                "log" if show => {
                    if tty {
                        eprint!("\r\x1b[2K");
                    }
                    eprintln!("  {}", printable(data));
                }
                "task" => {
                    last = serde_json::from_str(data).unwrap_or(Value::Null);
                    if settled(&last) {
                        break;
                    }
                    if show && tty {
                        let summary: Vec<String> = last["children"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                            .iter()
                            .map(|ch| {
                                format!(
                                    "{} {}/{} {} paths",
                                    s(&ch["device"]),
                                    s(&ch["state"]),
                                    s(&ch["phase"]),
                                    ch["paths_sent"]
                                )
                            })
                            .collect();
                        eprint!("\r\x1b[2K{}", summary.join("  |  "));
                    }
                }
                _ => {}
            }
        }
    }
    if show && tty {
        eprint!("\r\x1b[2K");
    }
    // The stream ends with the task; a "waiting" task (queued devices) ends the wait too.
    if !settled(&last) {
        last = c.call("GET", &format!("/tasks/{id}"), None)?;
    }
    if last["state"] == "waiting" && show {
        for ch in last["children"].as_array().cloned().unwrap_or_default() {
            if ch["state"] == "queued" {
                eprintln!("  {} is offline: queued until it connects", s(&ch["device"]));
            }
        }
    }
    Ok(last)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_enrollment(v: &Value) {
    let Some(e) = typed::<Enrollment>(v) else { return println!("{v}") };
    println!("device {}: enrollment token {}", e.name, e.enrollment_token);
    println!("agent configuration (keep it secret):\n{}", e.agent_config);
}

fn print_devices(v: &Value) {
    let Some(devices) = typed::<Vec<Device>>(v) else { return println!("{v}") };
    println!("{:<16} {:<12} {:<7} {:<12} SYSTEM", "NAME", "CONFIG", "ONLINE", "COMMIT");
    for d in devices {
        let commit: String = printable_or_dash(d.commit.as_deref()).chars().take(12).collect();
        let online = if d.online { "yes" } else { "no" };
        println!("{:<16} {:<12} {online:<7} {commit:<12} {}", d.name, d.config, printable_or_dash(d.system.as_deref()));
        if let Some(next) = hand_set(&d) {
            println!("{:<16} boots next {} (set on the device)", "", printable(next));
        }
    }
}

/// What an idle device's profile names instead of what it runs: set on the device by
/// hand, so deployments are refused until it ran or is set back (docs/agent.md).
fn hand_set(d: &Device) -> Option<&str> {
    d.boots_next.as_deref().filter(|_| d.agent_state.as_deref() == Some("idle"))
}

fn print_device(v: &Value) {
    let Some(d) = typed::<thymis_api::DeviceDetail>(v) else { return println!("{v}") };
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
    if d.history.is_empty() {
        return println!("no deployments yet");
    }
    println!("\n{:<6} {:<20} {:<12} {:<28} REASON", "TASK", "TIME", "COMMIT", "RESULT");
    for h in &d.history {
        let commit: String = printable_or_dash(h.commit.as_deref()).chars().take(12).collect();
        let result = h.result.map_or_else(|| format!("({})", h.state.as_str()), |r| r.as_str().to_owned());
        let reason = printable(h.reason.map(|r| r.as_str()).or(h.error.as_deref()).unwrap_or(""));
        println!("{:<6} {:<20} {commit:<12} {result:<28} {reason}", h.task, console::utc(h.updated.max(0) as u64));
    }
}

fn print_preview(v: &Value) {
    let Some(p) = typed::<Preview>(v) else { return println!("{v}") };
    match &p.commit {
        Some(c) => println!("commit {c}"),
        None => println!("{} uncommitted change(s) will be committed first", p.uncommitted_changes),
    }
    println!("configurations: {}", p.configs.join(", "));
    for d in p.devices {
        println!("  {:<16} {:<12} {}", d.name, d.config, if d.online { "online" } else { "offline" });
    }
}

fn print_task(v: &Value) {
    let Some(t) = typed::<Task>(v) else { return println!("{v}") };
    let text = |v: Option<&str>| v.unwrap_or("-").to_owned();
    println!("task {} ({}) {} {}", t.id, t.kind, t.state.as_str(), text(t.result.map(|r| r.as_str())));
    if let Some(e) = &t.error {
        println!("  error: {}", printable(e));
    }
    if let Some(r) = &t.rollout {
        let soak = r.soak_until.map(|u| format!(", soaking until {u}")).unwrap_or_default();
        println!("  rollout: wave {}{soak}", r.wave);
    }
    for c in &t.children {
        let mut line = format!(
            "  {:<16} {:<9} {:<9} {:<28}",
            c.device,
            c.state.as_str(),
            text(c.phase.map(|p| p.as_str())),
            text(c.result.map(DeviceResult::as_str))
        );
        if let Some(r) = &c.reason {
            line.push_str(&format!(" reason: {r}"));
        }
        if !c.failed_units.is_empty() {
            line.push_str(&format!(" failed units: {}", printable(&c.failed_units.join(", "))));
        }
        if c.paths_substituted > 0 {
            line.push_str(&format!(" ({} paths from binary caches)", c.paths_substituted));
        }
        if let Some(e) = &c.error {
            line.push_str(&format!(" error: {}", printable(e)));
        }
        println!("{line}");
    }
}
