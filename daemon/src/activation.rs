//! Running `switch-to-configuration` so that nothing can lose its result.
//!
//! The agent does not run activation as its own child: activation may restart the
//! agent itself. It launches its own binary in helper mode (`thymis-agent activate`),
//! in a transient systemd unit where systemd runs, else in a process group of its own.
//! The helper writes the output to `activations/NAME.log` and, atomically, the exit
//! status and failed units to `activations/NAME.json`, which the agent (or the agent
//! restarted after a crash) reads.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use thymis_store::StorePath;

use crate::persist;

/// What `switch-to-configuration` is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SwitchAction {
    /// Activate now; leave the boot loader alone.
    Test,
    /// Make it the boot default; do not activate.
    Boot,
}

impl SwitchAction {
    fn as_str(self) -> &'static str {
        match self {
            SwitchAction::Test => "test",
            SwitchAction::Boot => "boot",
        }
    }
}

/// The helper's record of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperResult {
    /// `None` when it was killed by a signal or could not start.
    pub exit_code: Option<i32>,
    pub failed_units: Vec<String>,
    /// The last lines of output, for error messages.
    pub output_tail: String,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("activations")
}

fn result_path(state_dir: &Path, name: &str) -> PathBuf {
    dir(state_dir).join(format!("{name}.json"))
}

fn log_path(state_dir: &Path, name: &str) -> PathBuf {
    dir(state_dir).join(format!("{name}.log"))
}

fn pid_path(state_dir: &Path, name: &str) -> PathBuf {
    dir(state_dir).join(format!("{name}.pid"))
}

/// Failed unit names from `switch-to-configuration`'s
/// `warning: the following units failed: a.service, b.service` line.
pub fn parse_failed_units(output: &str) -> Vec<String> {
    const MARK: &str = "the following units failed: ";
    let mut units: Vec<String> = output
        .lines()
        .filter_map(|l| l.split_once(MARK).map(|(_, rest)| rest))
        .flat_map(|rest| rest.split(',').map(|u| u.trim().to_owned()))
        .filter(|u| !u.is_empty())
        .collect();
    units.sort();
    units.dedup();
    units
}

fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").exists()
}

/// Where systemd runs, keeps the units that `systemctl is-failed` confirms (a unit that
/// recovered by itself is not reported); elsewhere the parsed names stand.
pub fn cross_check(units: Vec<String>) -> Vec<String> {
    if !systemd_runs() {
        return units;
    }
    units
        .into_iter()
        .filter(|u| {
            Command::new("systemctl")
                .args(["is-failed", "--quiet", "--"])
                .arg(u)
                .status()
                .map(|s| s.success())
                .unwrap_or(true)
        })
        .collect()
}

/// The last journal lines of each unit, where journald runs.
pub fn unit_logs(units: &[String]) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut logs = std::collections::BTreeMap::new();
    if !systemd_runs() {
        return logs;
    }
    for u in units {
        let out = Command::new("journalctl").args(["-u", u, "-n", "10", "-o", "cat", "--no-pager"]).output();
        if let Ok(out) = out
            && out.status.success()
        {
            let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
            if !lines.is_empty() {
                logs.insert(u.clone(), lines);
            }
        }
    }
    logs
}

/// Helper mode: runs the switch and records its result. Blocking.
pub fn run_helper(state_dir: &Path, name: &str, system: &StorePath, action: SwitchAction) -> Result<()> {
    fs::create_dir_all(dir(state_dir))?;
    persist::write_atomic(&pid_path(state_dir, name), std::process::id().to_string().as_bytes(), 0o644)?;
    let log_file = log_path(state_dir, name);
    let mut log = fs::File::create(&log_file).with_context(|| format!("creating {}", log_file.display()))?;
    let program = format!("{}/bin/switch-to-configuration", system.to_absolute());
    let status = Command::new(&program)
        .arg(action.as_str())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .status();
    let exit_code = match &status {
        Ok(s) => s.code(),
        Err(e) => {
            let _ = writeln!(log, "could not run {program}: {e}");
            None
        }
    };
    drop(log);
    let output = fs::read_to_string(&log_file).unwrap_or_default();
    let tail: Vec<&str> = output.lines().rev().take(20).collect();
    let result = HelperResult {
        exit_code,
        failed_units: parse_failed_units(&output),
        output_tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    };
    persist::write_json(&result_path(state_dir, name), &result)?;
    Ok(())
}

/// Starts the helper detached from the agent, so that neither the agent's restart nor
/// its death stops activation halfway.
pub fn launch(state_dir: &Path, name: &str, system: &StorePath, action: SwitchAction) -> Result<()> {
    fs::create_dir_all(dir(state_dir))?;
    for stale in [result_path(state_dir, name), log_path(state_dir, name), pid_path(state_dir, name)] {
        let _ = fs::remove_file(stale);
    }
    let exe = std::env::current_exe().context("finding the agent's own binary")?;
    let helper_args = |c: &mut Command| {
        c.arg("activate")
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--name")
            .arg(name)
            .arg("--system")
            .arg(system.to_absolute())
            .arg("--action")
            .arg(action.as_str());
    };
    let mut cmd;
    if systemd_runs() {
        // A busy systemd can fail a transient unit now and start it a moment later.
        let mut last = String::new();
        for attempt in 0..3 {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_secs(1));
                // It did start after all (systemd-run reported a failure late): once is enough.
                if pid_path(state_dir, name).exists() || result_path(state_dir, name).exists() {
                    return Ok(());
                }
            }
            cmd = Command::new("systemd-run");
            cmd.args(["--quiet", "--collect", "--service-type=exec"])
                .arg(format!("--unit=thymis-activate-{name}"))
                .arg("--")
                .arg(&exe);
            helper_args(&mut cmd);
            let out = cmd.stdin(Stdio::null()).output().context("running systemd-run")?;
            if out.status.success() {
                return Ok(());
            }
            last = format!("systemd-run failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
            // The unit may exist from the failed attempt: a new one needs its name.
            let _ = Command::new("systemctl")
                .args(["reset-failed", &format!("thymis-activate-{name}.service")])
                .stderr(Stdio::null())
                .status();
        }
        bail!("{last}");
    } else {
        // A session of its own (setsid), so signals to the agent's group miss it.
        let setsid = ["/usr/bin/setsid", "/run/current-system/sw/bin/setsid", "/bin/setsid"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        match setsid {
            Some(s) => {
                cmd = Command::new(s);
                cmd.arg(&exe);
            }
            None => cmd = Command::new(&exe),
        }
        helper_args(&mut cmd);
        use std::os::unix::process::CommandExt;
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the activation helper")?;
        // Reap it when it ends, so it leaves no zombie while the agent lives.
        std::thread::spawn(move || child.wait());
    }
    Ok(())
}

/// Waits for the helper's result, streaming new log lines to `on_line`. A helper that
/// vanished without a result (killed, or the machine lost it) counts as a failed run.
pub async fn wait(state_dir: &Path, name: &str, mut on_line: impl FnMut(String)) -> HelperResult {
    let (result_file, log_file, pid_file) =
        (result_path(state_dir, name), log_path(state_dir, name), pid_path(state_dir, name));
    let mut offset = 0usize;
    let mut waited = Duration::ZERO;
    // Short: the result file is tiny, and each tick is latency added to every deployment.
    let tick = Duration::from_millis(20);
    loop {
        if let Ok(text) = fs::read(&log_file)
            && text.len() > offset
        {
            let new = &text[offset..];
            if let Some(end) = new.iter().rposition(|&b| b == b'\n') {
                for line in String::from_utf8_lossy(&new[..end]).lines() {
                    on_line(line.to_owned());
                }
                offset += end + 1;
            }
        }
        if let Ok(Some(r)) = persist::read_json::<HelperResult>(&result_file) {
            return r;
        }
        let pid: Option<i32> = fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok());
        let gone = match pid {
            Some(pid) => !process_alive(pid),
            None => waited > Duration::from_secs(30),
        };
        // Read the result once more: the helper may have finished between the checks.
        if gone {
            if let Ok(Some(r)) = persist::read_json::<HelperResult>(&result_file) {
                return r;
            }
            return HelperResult {
                exit_code: None,
                failed_units: vec![],
                output_tail: "the activation helper ended without recording a result".into(),
            };
        }
        tokio::time::sleep(tick).await;
        waited += tick;
    }
}

fn process_alive(pid: i32) -> bool {
    match rustix::process::Pid::from_raw(pid) {
        Some(p) => {
            rustix::process::test_kill_process(p).is_ok()
                && !fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
                    .unwrap_or(false)
        }
        None => false,
    }
}

/// Removes the records of a finished run.
pub fn forget(state_dir: &Path, name: &str) {
    for f in [result_path(state_dir, name), pid_path(state_dir, name)] {
        let _ = fs::remove_file(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_units_are_parsed_from_the_warning_line() {
        let out = "activating the configuration...\n\
                   warning: the following units failed: demo.service, other@x.service\n\
                   \n× demo.service - Demo\n";
        assert_eq!(parse_failed_units(out), ["demo.service", "other@x.service"]);
        assert!(parse_failed_units("all fine\n").is_empty());
    }
}
