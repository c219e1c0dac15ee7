//! Health checks that ship with a configuration: executables in the new system's
//! `etc/thymis/health-checks/required.d/` and `wanted.d/` (NixOS fills them from the
//! module's `services.thymis-agent.healthChecks`), each exiting 0 when the device is
//! healthy. The agent runs them after a successful activation (and after the boot of a
//! reboot deployment), before it reports the deployment ready for confirmation: a
//! required check still failing at the deadline rolls the device back, a failing wanted
//! one is named in the result.
//!
//! Each generation carries its own idea of "healthy": the checks and their deadline come
//! from the system being deployed, never from the agent's configuration.
//!
//! A check runs with a clean environment (only `PATH` to the new system's tools), in a
//! process group of its own that is killed when it exits or its timeout passes (a check
//! that forks into the background leaves nothing behind), and only the end of its
//! output is kept (one that prints megabytes costs no memory).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

/// Where a system keeps its checks.
pub const DIR: &str = "etc/thymis/health-checks";
/// How long a generation's checks may keep failing before it counts as unhealthy,
/// unless the system says otherwise (`DIR/deadline`, seconds).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// How long one run of a check may take, unless `NAME.timeout` beside it says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The end of a check's output that is kept.
pub const OUTPUT_TAIL: usize = 2048;
/// Between rounds of a check that failed.
const RETRY: Duration = Duration::from_secs(2);

/// One check of a system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub path: PathBuf,
    pub required: bool,
    pub timeout: Duration,
}

/// The checks of `system` (required ones first, each kind by name), and their deadline.
pub fn checks_of(system: &Path) -> (Vec<Check>, Duration) {
    let root = system.join(DIR);
    let mut checks = Vec::new();
    for (sub, required) in [("required.d", true), ("wanted.d", false)] {
        let Ok(entries) = std::fs::read_dir(root.join(sub)) else { continue };
        let mut found: Vec<Check> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_owned();
                if name.starts_with('.') || name.ends_with(".timeout") {
                    return None;
                }
                let timeout = seconds(&root.join(sub).join(format!("{name}.timeout"))).unwrap_or(DEFAULT_TIMEOUT);
                Some(Check { name, path: e.path(), required, timeout })
            })
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        checks.extend(found);
    }
    (checks, seconds(&root.join("deadline")).unwrap_or(DEFAULT_DEADLINE))
}

fn seconds(path: &Path) -> Option<Duration> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok().map(Duration::from_secs)
}

/// How one run of a check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    pub passed: bool,
    /// Why it failed (`exited 1`, `timed out after 5 s`), and the end of its output.
    pub summary: String,
}

/// Runs `check` once, with `system`'s tools on `PATH`, for at most `limit`.
pub async fn run_once(check: &Check, system: &Path, limit: Duration) -> Ran {
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return Ran { passed: false, summary: format!("no pipe for its output: {e}") },
    };
    let stderr = match writer.try_clone() {
        Ok(w) => w,
        Err(e) => return Ran { passed: false, summary: format!("no pipe for its output: {e}") },
    };
    // The new system's tools first (on NixOS /usr/bin and /bin hold only env and sh).
    let path = format!("{0}/sw/bin:{0}/sw/sbin:/run/wrappers/bin:/usr/bin:/bin", system.display());
    let mut cmd = tokio::process::Command::new(&check.path);
    cmd.env_clear()
        .env("PATH", path)
        .env("THYMIS_HEALTH_CHECK", &check.name)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Ran { passed: false, summary: format!("did not start: {e}") },
    };
    // Our copies of the pipe's writing end are gone with `cmd`: the reader sees its end
    // once the check and whatever it started are gone.
    drop(cmd);
    let pgid = child.id();
    let mut output = Tail::default();
    let mut reader = match tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into()) {
        Ok(r) => Some(r),
        Err(e) => {
            output.push(format!("(its output cannot be read: {e})").as_bytes());
            None
        }
    };
    let outcome = tokio::select! {
        status = child.wait() => Some(status),
        () = read(reader.as_mut(), &mut output, false) => None,
        () = tokio::time::sleep(limit) => None,
    };
    // Whatever the check left running in its group goes with it; then what it wrote
    // last is read (the pipe ends with the group, or after a moment for anything that
    // left the group).
    if let Some(pgid) = pgid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
    }
    let _ = child.kill().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), read(reader.as_mut(), &mut output, true)).await;
    let how = match outcome {
        Some(Ok(s)) if s.success() => return Ran { passed: true, summary: String::new() },
        Some(Ok(s)) => match s.code() {
            Some(c) => format!("exited {c}"),
            None => "was killed".to_owned(),
        },
        Some(Err(e)) => format!("could not be waited for: {e}"),
        None => format!("timed out after {} s", limit.as_secs()),
    };
    let tail = output.text();
    let summary = if tail.is_empty() { how } else { format!("{how}: {tail}") };
    Ran { passed: false, summary }
}

/// Reads `reader` into `output`; at its end returns when `to_end`, else waits for ever
/// (so that only the check's exit or its timeout ends the race it is in).
async fn read(reader: Option<&mut tokio::net::unix::pipe::Receiver>, output: &mut Tail, to_end: bool) {
    if let Some(reader) = reader {
        let mut buf = vec![0u8; 8192];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => output.push(&buf[..n]),
            }
        }
    }
    if !to_end {
        std::future::pending::<()>().await;
    }
}

/// The end of an output, bounded.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
    cut: bool,
}

impl Tail {
    fn push(&mut self, more: &[u8]) {
        self.bytes.extend_from_slice(more);
        if self.bytes.len() > OUTPUT_TAIL {
            let drop = self.bytes.len() - OUTPUT_TAIL;
            self.bytes.drain(..drop);
            self.cut = true;
        }
    }

    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes).trim().to_owned();
        if self.cut { format!("… {text}") } else { text }
    }
}

/// What the checks of a generation came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The first required check still failing at the deadline: `NAME: why`.
    pub required_failed: Option<String>,
    /// The wanted checks still failing at the deadline.
    pub wanted_failed: Vec<String>,
}

/// Runs `system`'s checks, each failing one again every few seconds until it passes
/// or the deadline passes; `log` hears each failure.
pub async fn run_all(system: &Path, mut log: impl FnMut(String)) -> Verdict {
    let (checks, deadline) = checks_of(system);
    if checks.is_empty() {
        return Verdict::default();
    }
    log(format!("health checks: {} to pass within {} s", checks.len(), deadline.as_secs()));
    let until = Instant::now() + deadline;
    let mut failing: Vec<(Check, String)> = checks.into_iter().map(|c| (c, String::new())).collect();
    loop {
        let mut still = Vec::new();
        for (check, _) in failing {
            let left = until.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
            let ran = run_once(&check, system, check.timeout.min(left)).await;
            if ran.passed {
                log(format!("health check {} passed", check.name));
            } else {
                log(format!("health check {} failed: {}", check.name, ran.summary));
                still.push((check, ran.summary));
            }
        }
        failing = still;
        if failing.is_empty() || Instant::now() + RETRY >= until {
            break;
        }
        tokio::time::sleep(RETRY).await;
    }
    let required_failed =
        failing.iter().find(|(c, _)| c.required).map(|(c, why)| format!("health check {} failed: {why}", c.name));
    let wanted_failed = failing.iter().filter(|(c, _)| !c.required).map(|(c, _)| c.name.clone()).collect();
    Verdict { required_failed, wanted_failed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn system_with(checks: &[(&str, &str, &str)], deadline: u64) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tmp");
        for (kind, name, script) in checks {
            let dir = tmp.path().join(DIR).join(kind);
            std::fs::create_dir_all(&dir).expect("dir");
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::write(tmp.path().join(DIR).join("deadline"), deadline.to_string()).expect("deadline");
        tmp
    }

    #[tokio::test]
    async fn a_failing_required_check_is_named_with_its_output_and_a_wanted_one_is_listed() {
        let sys = system_with(
            &[
                ("required.d", "page", "echo the kiosk page is blank; exit 3"),
                ("required.d", "ok", "exit 0"),
                ("wanted.d", "sensor", "echo no reading >&2; exit 1"),
            ],
            3,
        );
        let v = run_all(sys.path(), |_| {}).await;
        let why = v.required_failed.expect("a required check failed");
        assert!(why.contains("page") && why.contains("exited 3") && why.contains("the kiosk page is blank"), "{why}");
        assert_eq!(v.wanted_failed, vec!["sensor".to_owned()]);
    }

    #[tokio::test]
    async fn a_check_that_passes_after_a_while_passes_and_none_is_healthy() {
        let sys = system_with(&[("required.d", "comes-up", "test -e \"$0.up\" || { touch \"$0.up\"; exit 1; }")], 10);
        assert_eq!(run_all(sys.path(), |_| {}).await, Verdict::default());
        let empty = tempfile::tempdir().expect("tmp");
        assert_eq!(run_all(empty.path(), |_| {}).await, Verdict::default());
    }

    #[tokio::test]
    async fn a_check_that_hangs_floods_or_forks_cannot_hold_the_agent() {
        let sys = system_with(
            &[
                ("required.d", "hangs", "sleep 1000"),
                ("wanted.d", "floods", "yes 0123456789abcdef | head -c 50000000; exit 1"),
                ("wanted.d", "forks", "sleep 1000 & exit 0"),
            ],
            1,
        );
        std::fs::write(sys.path().join(DIR).join("required.d/hangs.timeout"), "1").expect("timeout");
        let started = Instant::now();
        let v = run_all(sys.path(), |_| {}).await;
        assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
        let why = v.required_failed.expect("the hung check failed");
        assert!(why.contains("hangs") && why.contains("timed out"), "{why}");
        assert_eq!(v.wanted_failed, vec!["floods".to_owned()]);
        let (checks, _) = checks_of(sys.path());
        assert_eq!(checks.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["hangs", "floods", "forks"]);
        assert_eq!(checks[0].timeout, Duration::from_secs(1));
    }

    #[tokio::test]
    async fn the_environment_is_clean() {
        let sys = system_with(&[("required.d", "env", "test -z \"$HOME\" && test \"$THYMIS_HEALTH_CHECK\" = env")], 2);
        assert_eq!(run_all(sys.path(), |_| {}).await, Verdict::default());
    }
}
