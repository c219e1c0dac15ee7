//! Fleet test harness: the real `thymis-controller` and real `thymis-agent`s on
//! **process devices**: each agent in its own mount namespace (its own `/nix`, a
//! private tmpfs `/run`) and its own network namespace, linked to the controller by a
//! veth pair on a bridge. Everything a fleet creates is removed when it is dropped,
//! even when the test fails.
//!
//! Needs root, Nix, iproute2 and nftables (`scripts/setup.sh` installs them) and the
//! workspace's binaries built (`cargo build --workspace --bins`; `make test` does).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub mod balancer;
pub mod board;
pub mod nginx;
pub mod postgres;
pub mod vm;

/// The directory holding the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("THYMIS_BIN_DIR") {
        return d.into();
    }
    // target/debug/deps/<test binary> -> target/debug; target/release/<bench> -> target/release
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_owned()
    } else {
        dir.to_owned()
    }
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` first (make test does)", p.display());
    p
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Waits until `f` returns `Some`, or fails after `timeout` with `what`.
/// Unix seconds by this machine's clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A WebSocket to `url` (`ws://` or `wss://`), as a scripted agent opens one: over TLS
/// it takes whatever certificate the controller shows (the harness's own controller;
/// pinning is what `tests/tests/tls.rs` checks).
pub async fn ws_connect(
    url: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
    let config = thymis_tls_pin::Pinned::new(None, "nothing").client_config()?;
    let connector = tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(config));
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector)).await?;
    Ok(ws)
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A system-like D-Bus daemon with Debian's system policy and the agent's policy file,
/// on a socket of its own (a real `dbus-daemon`, not the host's bus).
#[derive(Debug)]
pub struct SystemBus {
    pub address: String,
    dir: PathBuf,
    child: Child,
}

impl SystemBus {
    pub fn start() -> Result<SystemBus> {
        let pid = std::process::id();
        let n = NEXT_NET.fetch_add(1, Ordering::SeqCst);
        // World-traversable, so an unprivileged caller can reach the socket.
        let dir = PathBuf::from(format!("/tmp/thymis-bus-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policy"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/dbus/io.thymis.Agent1.conf");
        std::fs::copy(policy, dir.join("policy/io.thymis.Agent1.conf"))?;
        let socket = dir.join("system_bus_socket");
        let mut conf = String::new();
        for line in std::fs::read_to_string("/usr/share/dbus-1/system.conf")?.lines() {
            let t = line.trim();
            if t.starts_with("<user>") || t.starts_with("<pidfile>") || t.starts_with("<include ") {
                continue;
            }
            if t.starts_with("<listen>") {
                conf.push_str(&format!("  <listen>unix:path={}</listen>\n", socket.display()));
            } else if t.starts_with("<includedir>") {
                if !conf.contains("thymis-policy") {
                    conf.push_str(&format!(
                        "  <includedir>{}</includedir><!-- thymis-policy -->\n",
                        dir.join("policy").display()
                    ));
                }
            } else {
                conf.push_str(line);
                conf.push('\n');
            }
        }
        std::fs::write(dir.join("system.conf"), conf)?;
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", dir.join("system.conf").display()))
            .args(["--nofork", "--nopidfile"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dbus-daemon")?;
        wait_for("the D-Bus socket", Duration::from_secs(10), || socket.exists().then_some(()));
        Ok(SystemBus { address: format!("unix:path={}", socket.display()), dir, child })
    }

    /// `busctl --address=... ARGS` as root; (success, stdout+stderr).
    pub fn busctl(&self, args: &[&str]) -> (bool, String) {
        self.busctl_as(None, args)
    }

    /// `busctl` as an unprivileged user (`nobody`) when `uid` is given.
    pub fn busctl_as(&self, uid: Option<u32>, args: &[&str]) -> (bool, String) {
        let mut cmd = match uid {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args([format!("--reuid={u}"), format!("--regid={u}"), "--clear-groups".into(), "busctl".into()]);
                c
            }
            None => Command::new("busctl"),
        };
        let out = cmd.arg(format!("--address={}", self.address)).args(args).output().expect("busctl");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
}

impl Drop for SystemBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
/// A bridge on the host with its own /24; devices hang off it.
struct Net {
    bridge: String,
    subnet: u32,
}

impl Net {
    fn new() -> Result<Net> {
        let pid = std::process::id();
        for _ in 0..250 {
            let n = NEXT_NET.fetch_add(1, Ordering::SeqCst);
            let subnet = (pid.wrapping_mul(31).wrapping_add(n)) % 250 + 1;
            let bridge = format!("thbr{subnet}");
            if ip(&["link", "add", &bridge, "type", "bridge"]).is_err() {
                continue; // taken by a concurrent fleet
            }
            let net = Net { bridge, subnet };
            ip(&["addr", "add", &format!("{}/24", net.host()), "dev", &net.bridge])?;
            ip(&["link", "set", &net.bridge, "up"])?;
            return Ok(net);
        }
        bail!("no free test subnet")
    }

    fn host(&self) -> String {
        format!("10.213.{}.1", self.subnet)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Options for a fleet; every timeout is seconds, short so tests run fast.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub confirm_timeout: u64,
    pub heartbeat: u64,
    pub dead_after: u64,
    pub deployment_ttl: u64,
    pub reply_timeout: u64,
    /// Serve HTTPS/wss:// (the controller's default, with the certificate it generates);
    /// false starts it with `--insecure-plain-http`, and device configurations then say
    /// `allow_insecure_transport = true`, as an admin would have to write by hand.
    pub tls: bool,
    /// The controller's `--parallel` (devices copied to at once), when not its default.
    pub parallel: Option<usize>,
    /// The controller's `--max-handshakes`, when not its default.
    pub max_handshakes: Option<usize>,
    /// More arguments for the controller.
    pub extra_args: Vec<String>,
    /// The controller's database on a private PostgreSQL server instead of its SQLite
    /// file; also set for every fleet by `THYMIS_TEST_DATABASE=postgres`.
    pub postgres: bool,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            confirm_timeout: 8,
            heartbeat: 1,
            dead_after: 4,
            deployment_ttl: 120,
            reply_timeout: 20,
            tls: true,
            parallel: None,
            max_handshakes: None,
            extra_args: vec![],
            postgres: std::env::var("THYMIS_TEST_DATABASE").is_ok_and(|d| d == "postgres"),
        }
    }
}

/// The controller process.
#[derive(Debug)]
pub struct Controller {
    pub state_dir: PathBuf,
    pub listen: String,
    opts: FleetOptions,
    child: Option<Child>,
    log: PathBuf,
    /// Extra environment for the controller (from its next start).
    pub env: Vec<(String, String)>,
}

impl Controller {
    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        // Under the most permissive umask: what must be private is made so explicitly.
        // And with systemd's default soft limit of 1024 open files (a service's).
        let child = Command::new("sh")
            .args(["-c", "umask 000; ulimit -Sn 1024; exec \"$0\" \"$@\""])
            .arg(bin("thymis-controller"))
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--listen", &self.listen])
            .args(["--heartbeat", &self.opts.heartbeat.to_string()])
            .args(["--dead-after", &self.opts.dead_after.to_string()])
            .args(["--confirm-timeout", &self.opts.confirm_timeout.to_string()])
            .args(["--deployment-ttl", &self.opts.deployment_ttl.to_string()])
            .args(["--reply-timeout", &self.opts.reply_timeout.to_string()])
            .args(["--sweep-interval", "1", "--handshake-timeout", "3"])
            .args(if self.opts.tls { &[][..] } else { &["--insecure-plain-http"][..] })
            .args(self.opts.parallel.map(|p| format!("--parallel={p}")))
            .args(self.opts.max_handshakes.map(|m| format!("--max-handshakes={m}")))
            .args(&self.opts.extra_args)
            .env("THYMIS_LOG", "info,thymis_controller=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting thymis-controller")?;
        self.child = Some(child);
        let url = format!("{}/healthz", self.base_url());
        wait_for("the controller to listen", Duration::from_secs(20), || {
            let ok = self.curl().args(["-fs", "-o", "/dev/null", &url]).status().ok()?.success();
            ok.then_some(())
        });
        Ok(())
    }

    /// `http://ADDR` or `https://ADDR`.
    pub fn base_url(&self) -> String {
        format!("{}://{}", if self.opts.tls { "https" } else { "http" }, self.listen)
    }

    /// The agent socket's URL, `ws://` or `wss://`.
    pub fn agent_url(&self) -> String {
        format!("{}://{}/agent/v1", if self.opts.tls { "wss" } else { "ws" }, self.listen)
    }

    /// Where `thymisctl` keeps its pins for this fleet (`THYMIS_CONFIG_DIR`).
    pub fn thymisctl_config_dir(&self) -> PathBuf {
        self.state_dir.with_file_name("thymisctl-config")
    }

    /// The certificate the controller generated, when serving TLS.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.opts.tls.then(|| self.state_dir.join("tls.crt"))
    }

    pub fn curl(&self) -> Command {
        let mut c = Command::new("curl");
        if let Some(ca) = self.ca_file() {
            c.arg("--cacert").arg(ca);
        }
        c
    }

    /// The controller's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the controller at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.start()
    }

    /// Restarts the controller with these extra arguments (for ones that name the
    /// fleet's network, known only once the fleet exists).
    pub fn restart_with(&mut self, extra_args: Vec<String>) -> Result<()> {
        self.opts.extra_args = extra_args;
        self.restart()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("admin-token")).unwrap_or_default().trim().to_owned()
    }

    /// Runs `thymisctl ARGS` against this controller (stdin empty).
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_command(args).stdin(Stdio::null()).output().expect("running thymisctl")
    }

    /// `thymisctl ARGS` against this controller, to be run by the caller.
    pub fn ctl_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("thymisctl"));
        // thymisctl pins the controller's certificate at its first use, as a user's would.
        c.args(args)
            .env("THYMIS_CONTROLLER", self.base_url())
            .env("THYMIS_TOKEN", self.token())
            .env("THYMIS_CONFIG_DIR", self.thymisctl_config_dir());
        c
    }

    /// `thymisctl --json ARGS`, parsed; panics with stderr when it fails.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.ctl(&full);
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "thymisctl {args:?}: {e}; status {}; stdout {stdout}; stderr {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// GET an API path (`/api/v1` prefixed) with the admin token; (status, body).
    pub fn api(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let token = token.map(str::to_owned).unwrap_or_else(|| self.token());
        let out = self
            .curl()
            .args(["-s", "-w", "\n%{http_code}", "-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("{}/api/v1{path}", self.base_url()))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// The task's log lines.
    /// Every line of a task's log (the API gives it a page at a time).
    pub fn task_logs(&self, id: i64) -> Vec<String> {
        let mut lines = vec![];
        let mut after = 0;
        loop {
            let (_, v) = self.api(&format!("/tasks/{id}/logs?after={after}"), None);
            let page = v.as_array().cloned().unwrap_or_default();
            let Some(last) = page.last().and_then(|l| l["id"].as_i64()) else { return lines };
            lines.extend(page.iter().filter_map(|l| l["line"].as_str().map(str::to_owned)));
            after = last;
        }
    }

    pub fn project_head(&self) -> String {
        run(Command::new("git").arg("-C").arg(self.project_dir()).args(["rev-parse", "HEAD"])).unwrap_or_default()
    }

    pub fn project_dir(&self) -> PathBuf {
        self.state_dir.join("project")
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a simulated device runs its agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The agent in its own mount namespace (own `/nix`, tmpfs `/run`) and netns.
    Process,
    /// A `systemd-nspawn` container booting a real systemd with a system D-Bus, the
    /// agent as its systemd unit (the repository's unit file), its own netns; reboots
    /// are real (the container exits and the harness boots it again).
    Systemd,
}

/// A simulated device: a real agent with its own `/nix`, `/run` and network namespace.
#[derive(Debug)]
pub struct Device {
    pub kind: Kind,
    pub name: String,
    pub dir: PathBuf,
    pub netns: String,
    veth: String,
    child: Option<Child>,
    /// The system bus the agent publishes on, when it has one.
    pub bus: Option<String>,
    /// Extra environment for a process device's agent (from its next start).
    pub env: Vec<(String, String)>,
}

impl Device {
    pub fn nix_dir(&self) -> PathBuf {
        self.dir.join("nix")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn start(&mut self) -> Result<()> {
        if self.kind == Kind::Systemd {
            return self.boot();
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("agent.log"))?;
        let script = format!(
            "mkdir -p /nix && mount --bind '{nix}' /nix && mount -t tmpfs tmpfs /run && exec '{agent}' --config '{config}'",
            nix = self.nix_dir().display(),
            agent = bin("thymis-agent").display(),
            config = self.dir.join("agent.toml").display(),
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(script)
            .env("THYMIS_LOG", "info,thymis_agent=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("DBUS_SYSTEM_BUS_ADDRESS", self.bus.clone().unwrap_or_else(|| "unix:path=/nonexistent".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the agent")?;
        self.child = Some(child);
        Ok(())
    }

    /// Boots the container (systemd devices).
    fn boot(&mut self) -> Result<()> {
        let dir = &self.dir;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("console.log"))?;
        let bind = |from: PathBuf, to: &str, ro: bool| {
            format!("--bind{}={}:{to}", if ro { "-ro" } else { "" }, from.display())
        };
        // A reboot ends systemd-nspawn with 133; like firmware, the loop boots it again.
        let child = Command::new("sh")
            .args(["-c", "while :; do \"$@\"; rc=$?; [ $rc -eq 133 ] || exit $rc; done", "nspawn-loop"])
            .arg("systemd-nspawn")
            .args(["-D", "/", "--volatile=yes", "--register=no", "--keep-unit", "--console=passive"])
            .arg(format!("--machine={}", self.netns))
            .arg(format!("--network-namespace-path=/run/netns/{}", self.netns))
            // Its firewall is its own (the fake systems set rules in its netns).
            .arg("--capability=CAP_NET_ADMIN")
            .arg(bind(dir.join("nix"), "/nix", false))
            .arg(bind(dir.join("state"), "/var/lib/thymis-agent", false))
            .arg(bind(dir.join("agent.toml"), "/etc/thymis/agent.toml", true))
            .arg(bind(bin("thymis-agent"), "/opt/thymis/thymis-agent", true))
            .arg(bind(dir.join("units/thymis-agent.service"), "/etc/systemd/system/thymis-agent.service", true))
            .arg(bind(dir.join("units/harness.conf"), "/etc/systemd/system/thymis-agent.service.d/harness.conf", true))
            .arg(bind(dir.join("units/thymis-test-boot.service"), "/etc/systemd/system/thymis-test-boot.service", true))
            .arg(bind(dir.join("units/io.thymis.Agent1.conf"), "/etc/dbus-1/system.d/io.thymis.Agent1.conf", true))
            // The container's network is the harness's veth, which systemd-networkd does
            // not manage: masked, its wait-online would hold network-online.target for minutes.
            .arg("--bind-ro=/dev/null:/etc/systemd/system/systemd-networkd-wait-online.service")
            // Enabled the way a kernel command line would: the units are bind-mounted files.
            .args(["-b", "--", "systemd.firstboot=off", "systemd.wants=thymis-test-boot.service"])
            .arg("systemd.wants=thymis-agent.service")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting systemd-nspawn")?;
        self.child = Some(child);
        // Up when systemd has started the agent (other host units may still be starting).
        wait_for(&format!("{} to boot", self.name), Duration::from_secs(60), || {
            let state = self.exec("systemctl is-active thymis-agent 2>/dev/null || true");
            (state.trim() == "active").then_some(())
        });
        Ok(())
    }

    /// This boot's id (systemd devices: it changes at every reboot of the container).
    pub fn boot_id(&self) -> String {
        self.exec("cat /proc/sys/kernel/random/boot_id").trim().to_owned()
    }

    /// Reboots a systemd device for real: `systemctl reboot` inside ends the container
    /// (exit 133), and the harness's loop boots it again, as firmware would.
    pub fn reboot(&mut self) -> Result<()> {
        assert_eq!(self.kind, Kind::Systemd, "only systemd devices reboot");
        let before = self.boot_id();
        let _ = self.exec("systemctl reboot");
        self.wait_rebooted(&before);
        Ok(())
    }

    /// Waits until the device runs a boot other than `before`, with its agent up.
    pub fn wait_rebooted(&self, before: &str) {
        wait_for(&format!("{} to reboot", self.name), Duration::from_secs(90), || {
            let id = self.boot_id();
            let up = self.exec("systemctl is-active thymis-agent 2>/dev/null || true");
            (!id.is_empty() && id != before && up.trim() == "active").then_some(())
        });
    }

    /// The container's init (PID 1 inside), for nsenter: loop shell -> nspawn -> systemd.
    fn container_pid(&self) -> Option<String> {
        let shell = self.child.as_ref()?.id();
        let nspawn = run(Command::new("pgrep").args(["-P", &shell.to_string()])).ok()?;
        let nspawn = nspawn.lines().next()?.trim().to_owned();
        let kids = run(Command::new("pgrep").args(["-P", &nspawn])).ok()?;
        kids.lines().next().map(|l| l.trim().to_owned())
    }

    /// Kills the agent with SIGKILL (its activation helper, if any, lives on).
    pub fn kill9(&mut self) {
        if self.kind == Kind::Systemd {
            let _ = self.exec("systemctl kill -s KILL thymis-agent");
            return;
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        let file =
            if self.kind == Kind::Systemd { self.state_dir().join("agent.log") } else { self.dir.join("agent.log") };
        std::fs::read_to_string(file).unwrap_or_default()
    }

    /// Runs a command inside the device (its namespaces), e.g. to read its /run.
    pub fn exec(&self, script: &str) -> String {
        if self.kind == Kind::Systemd {
            let Some(pid) = self.container_pid() else { return String::new() };
            return run(Command::new("timeout").args(["60", "nsenter", "-t", &pid, "-a", "sh", "-c", script]))
                .unwrap_or_default();
        }
        let target = self.agent_pid().unwrap_or(0).to_string();
        run(Command::new("nsenter").args(["-t", &target, "-m", "-n", "sh", "-c", script])).unwrap_or_default()
    }

    /// The host side of the device's veth pair (its counters see all its traffic).
    pub fn host_veth(&self) -> &str {
        &self.veth
    }

    /// Bytes through the device's link so far (both directions).
    pub fn link_bytes(&self) -> u64 {
        ["rx_bytes", "tx_bytes"]
            .iter()
            .map(|c| {
                std::fs::read_to_string(format!("/sys/class/net/{}/statistics/{c}", self.veth))
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// The device's address on the fleet's bridge.
    pub fn address(&self) -> String {
        let out = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.netns,
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "scope",
            "global",
        ]))
        .unwrap_or_default();
        out.split_whitespace().find(|w| w.contains('/')).and_then(|a| a.split('/').next()).unwrap_or("").to_owned()
    }

    /// Removes the link cap of [`Device::shape`].
    pub fn unshape(&self) {
        let peer = self.veth.replacen("thv", "thp", 1);
        let _ = ip(&["netns", "exec", &self.netns, "tc", "qdisc", "del", "dev", &peer, "root"]);
        let _ = run(Command::new("tc").args(["qdisc", "del", "dev", &self.veth, "root"]));
    }

    /// The agent's process id (the process in the device's namespaces).
    pub fn agent_pid(&self) -> Option<u32> {
        // `ip netns exec`, `unshare` and `sh -c ... exec` all exec, so the process started
        // becomes the agent; until it has, the agent is among its children. (Its own
        // children are helpers such as `nix-store --import`.)
        let pid = self.child.as_ref()?.id();
        let is_agent = |p: u32| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e.ends_with("thymis-agent"));
        if is_agent(pid) {
            return Some(pid);
        }
        let kids = run(Command::new("pgrep").args(["-P", &pid.to_string()])).unwrap_or_default();
        kids.lines().filter_map(|l| l.trim().parse().ok()).find(|p| is_agent(*p)).or(Some(pid))
    }

    /// Caps the device's link (both directions seen from the device's side: egress
    /// shaping on its interface) at `rate`, e.g. "8mbit".
    pub fn shape(&self, rate: &str) -> Result<()> {
        let peer = self.veth.replacen("thv", "thp", 1);
        ip(&[
            "netns",
            "exec",
            &self.netns,
            "tc",
            "qdisc",
            "replace",
            "dev",
            &peer,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "32kbit",
            "latency",
            "400ms",
        ])?;
        run(Command::new("tc").args([
            "qdisc", "replace", "dev", &self.veth, "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms",
        ]))?;
        Ok(())
    }

    /// Silently drops every packet of the device (an nftables black hole, not a link
    /// down, which would only stall TCP).
    pub fn black_hole(&self, on: bool) -> Result<()> {
        let nft = |args: &str| {
            run(Command::new("ip").args(["netns", "exec", &self.netns, "sh", "-c", &format!("nft {args}")]))
        };
        if on {
            nft("add table inet thymis_harness")?;
            nft("'add chain inet thymis_harness in { type filter hook input priority -10; policy drop; }'")?;
            nft("'add chain inet thymis_harness out { type filter hook output priority -10; policy drop; }'")?;
        } else {
            nft("delete table inet thymis_harness")?;
        }
        Ok(())
    }

    /// The device's system profile generations: (number, store path), oldest first.
    pub fn generations(&self) -> Vec<(u64, String)> {
        let profiles = self.nix_dir().join("var/nix/profiles");
        let mut gens: Vec<(u64, String)> = std::fs::read_dir(&profiles)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let n = name.strip_prefix("system-")?.strip_suffix("-link")?.parse().ok()?;
                        let target = std::fs::read_link(e.path()).ok()?;
                        Some((n, target.to_string_lossy().into_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        gens.sort();
        gens
    }

    /// The store path the system profile points at.
    pub fn profile_system(&self) -> Option<String> {
        let profiles = self.nix_dir().join("var/nix/profiles");
        let link = std::fs::read_link(profiles.join("system")).ok()?;
        Some(std::fs::read_link(profiles.join(link)).ok()?.to_string_lossy().into_owned())
    }

    /// What the device runs now (`/run/current-system` in its private /run).
    pub fn running_system(&self) -> String {
        self.exec("readlink /run/current-system")
    }

    /// The "units" the running generation declared.
    pub fn units(&self) -> String {
        self.exec("cd /run/thymis-test/units 2>/dev/null && for u in *; do echo \"$u=$(cat $u)\"; done")
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if self.kind == Kind::Systemd
            && let Some(mut c) = self.child.take()
        {
            // The loop first, so it does not boot the container again.
            let nspawn = run(Command::new("pgrep").args(["-P", &c.id().to_string()])).unwrap_or_default();
            let _ = c.kill();
            let _ = c.wait();
            for p in nspawn.lines() {
                let _ = Command::new("kill").args(["-9", p.trim()]).status();
            }
        }
        self.kill9();
        // Activation helpers may outlive the agent: end everything in the namespace.
        if let Ok(pids) = run(Command::new("ip").args(["netns", "pids", &self.netns])) {
            for p in pids.lines() {
                let _ = Command::new("kill").args(["-9", p.trim()]).status();
            }
        }
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = ip(&["link", "del", &self.veth]);
    }
}

/// A controller and its devices.
#[derive(Debug)]
pub struct Fleet {
    pub controller: Controller,
    /// The controller's PostgreSQL server, when it has one (dropped after it).
    pub postgres: Option<postgres::Postgres>,
    pub devices: Vec<Device>,
    net: Net,
    pub tmp: tempfile::TempDir,
}

impl Fleet {
    /// Starts a controller whose project is the fake-system test project.
    pub fn new(mut opts: FleetOptions) -> Result<Fleet> {
        let tmp = tempfile::Builder::new().prefix("thymis-fleet-").tempdir()?;
        let net = Net::new()?;
        let postgres = if opts.postgres { Some(postgres::Postgres::start()?) } else { None };
        if let Some(pg) = &postgres {
            opts.extra_args.push(format!("--database={}", pg.database("thymis")?));
        }
        let listen = format!("{}:8443", net.host());
        let mut controller = Controller {
            state_dir: tmp.path().join("controller"),
            listen,
            opts,
            child: None,
            log: tmp.path().join("controller.log"),
            env: vec![],
        };
        controller.start()?;
        let fleet = Fleet { controller, postgres, devices: vec![], net, tmp };
        fleet.install_test_project()?;
        Ok(fleet)
    }

    /// A second controller of the fleet (its database must be PostgreSQL), set up as
    /// docs/scale.md says: its own state directory with the first one's identity and
    /// Nix keys, admin token and TLS certificate, the same fixture project; on port 8444.
    pub fn second_controller(&self) -> Result<Controller> {
        if self.postgres.is_none() {
            bail!("two controllers share a PostgreSQL database");
        }
        let state_dir = self.tmp.path().join("controller-b");
        std::fs::create_dir_all(&state_dir)?;
        for f in ["identity.key", "nix-signing.key", "admin-token", "tls.crt", "tls.key"] {
            let from = self.controller.state_dir.join(f);
            if from.exists() {
                std::fs::copy(&from, state_dir.join(f))?;
            }
        }
        let mut b = Controller {
            state_dir,
            listen: format!("{}:8444", self.net.host()),
            opts: self.controller.opts.clone(),
            child: None,
            log: self.tmp.path().join("controller-b.log"),
            env: vec![],
        };
        b.start()?;
        Self::install_test_project_in(&b)?;
        Ok(b)
    }

    /// Replaces the starter project with the fixture project and commits it.
    fn install_test_project(&self) -> Result<()> {
        Self::install_test_project_in(&self.controller)
    }

    fn install_test_project_in(controller: &Controller) -> Result<()> {
        let project = controller.project_dir();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/project");
        for f in ["flake.nix", "fake-system.nix", "boot.nix", "arm.nix", "configs.json", "thymis.toml"] {
            std::fs::copy(fixtures.join(f), project.join(f))?;
        }
        let out = controller.ctl(&["project", "commit", "-m", "fleet test project"]);
        if !out.status.success() {
            bail!("committing the test project: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Edits `configs.json` in the project work tree (not committed).
    pub fn set_configs(&self, json: &Value) -> Result<()> {
        std::fs::write(self.controller.project_dir().join("configs.json"), serde_json::to_vec_pretty(json)?)?;
        Ok(())
    }

    /// Caps what the controller sends to all devices together at `rate` (e.g. "20mbit"),
    /// as a site's uplink to a distant controller would; other traffic from the host
    /// (a site cache serving on another port) is not capped.
    pub fn shape_controller(&self, rate: &str) -> Result<()> {
        let port = self.controller.listen.rsplit(':').next().unwrap_or("8443").to_owned();
        let br = &self.net.bridge;
        run(Command::new("tc").args(["qdisc", "replace", "dev", br, "root", "handle", "1:", "htb", "default", "20"]))?;
        run(Command::new("tc")
            .args(["class", "add", "dev", br, "parent", "1:", "classid", "1:10", "htb", "rate", rate]))?;
        run(Command::new("tc")
            .args(["class", "add", "dev", br, "parent", "1:", "classid", "1:20", "htb", "rate", "10gbit"]))?;
        run(Command::new("tc").args([
            "filter", "add", "dev", br, "parent", "1:", "protocol", "ip", "u32", "match", "ip", "sport", &port,
            "0xffff", "flowid", "1:10",
        ]))?;
        Ok(())
    }

    /// The host side of the fleet's bridge (where a scripted peer can listen).
    pub fn host_address(&self) -> String {
        self.net.host()
    }

    /// A process device with a hand-written agent configuration (for scripted peers).
    pub fn add_raw_device(&mut self, name: &str, agent_toml: &str, start: bool) -> Result<usize> {
        let index = self.devices.len();
        let dir = self.tmp.path().join(name);
        std::fs::create_dir_all(dir.join("nix"))?;
        std::fs::create_dir_all(dir.join("state"))?;
        let text = format!("{agent_toml}\nstate_dir = {:?}\ndbus = false\n", dir.join("state").display().to_string());
        std::fs::write(dir.join("agent.toml"), text)?;
        let (netns, veth) = self.link(index)?;
        let mut dev = Device {
            kind: Kind::Process,
            name: name.to_owned(),
            dir,
            netns,
            veth,
            child: None,
            bus: None,
            env: vec![],
        };
        if start {
            dev.start()?;
        }
        self.devices.push(dev);
        Ok(index)
    }

    /// A network namespace for device `index`, on the fleet's bridge.
    fn link(&self, index: usize) -> Result<(String, String)> {
        let netns = format!("thns{}-{index}", self.net.subnet);
        let veth = format!("thv{}x{index}", self.net.subnet);
        let peer = format!("thp{}x{index}", self.net.subnet);
        ip(&["netns", "add", &netns])?;
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &netns])?;
        ip(&["link", "set", &veth, "master", &self.net.bridge])?;
        ip(&["link", "set", &veth, "up"])?;
        let addr = format!("10.213.{}.{}/24", self.net.subnet, 10 + index);
        ip(&["netns", "exec", &netns, "ip", "addr", "add", &addr, "dev", &peer])?;
        ip(&["netns", "exec", &netns, "ip", "link", "set", &peer, "up"])?;
        ip(&["netns", "exec", &netns, "ip", "link", "set", "lo", "up"])?;
        Ok((netns, veth))
    }

    /// A systemd device whose agent allows a terminal, online and deployed to with
    /// `web.service` running (version `version` of `alpha`): the deployment task.
    pub fn systemd_device_with_web_unit(&mut self, name: &str, version: &str) -> Result<Value> {
        self.add_systemd_device(name, "alpha", false)?;
        self.add_agent_config(name, "terminal = true\n")?;
        self.device_mut(name).start()?;
        self.wait_online(name);
        self.set_configs(
            &serde_json::json!({ "alpha": { "version": version, "units": ["web.service"] }, "beta": {} }),
        )?;
        let t = self.controller.ctl_json(&["deploy", "--wait", "--device", name, "-m", "web up"]);
        if t["result"] != "succeeded" {
            bail!("deploying web.service to {name}: {t}\n{}", self.diagnostics());
        }
        Ok(t)
    }

    /// Adds `text` to a device's agent configuration (for its next start).
    pub fn add_agent_config(&self, name: &str, text: &str) -> Result<()> {
        let file = self.device(name).dir.join("agent.toml");
        let mut config = std::fs::read_to_string(&file)?;
        config.push_str(text);
        std::fs::write(&file, config)?;
        Ok(())
    }

    /// Adds a device bound to `config` and, when `start`, starts its agent.
    pub fn add_device(&mut self, name: &str, config: &str, start: bool) -> Result<usize> {
        self.add_device_on_bus(name, config, start, None)
    }

    /// [`Fleet::add_device`] with the agent publishing on `bus`.
    pub fn add_device_on_bus(
        &mut self,
        name: &str,
        config: &str,
        start: bool,
        bus: Option<&SystemBus>,
    ) -> Result<usize> {
        self.add_device_with(name, config, start, bus, Kind::Process)
    }

    /// A systemd device (nspawn container booting systemd, with its own system bus).
    pub fn add_systemd_device(&mut self, name: &str, config: &str, start: bool) -> Result<usize> {
        self.add_device_with(name, config, start, None, Kind::Systemd)
    }

    fn add_device_with(
        &mut self,
        name: &str,
        config: &str,
        start: bool,
        bus: Option<&SystemBus>,
        kind: Kind,
    ) -> Result<usize> {
        let v = self.controller.ctl_json(&["device", "add", name, "--config", config]);
        let agent_config = v["agent_config"].as_str().context("agent_config")?.to_owned();
        let index = self.devices.len();
        let dir = self.tmp.path().join(name);
        std::fs::create_dir_all(dir.join("nix"))?;
        std::fs::create_dir_all(dir.join("state"))?;
        let state_dir = match kind {
            Kind::Process => dir.join("state").display().to_string(),
            Kind::Systemd => "/var/lib/thymis-agent".to_owned(),
        };
        let mut config_text = format!(
            "{agent_config}state_dir = {state_dir:?}\ndbus = {}\nreconnect_min = 0.2\nreconnect_max = 1.0\nconnect_timeout = 3\n",
            bus.is_some() || kind == Kind::Systemd
        );
        if !self.controller.opts.tls {
            config_text.push_str("allow_insecure_transport = true\n");
        }
        if kind == Kind::Process {
            // A process device shares this machine: its reboots must never be real, and
            // it must not read this machine's boot loader.
            config_text
                .push_str("reboot_command = [\"sh\", \"-c\", \"echo a process device does not reboot >&2; exit 1\"]\n");
            config_text.push_str(&format!(
                "boot_dir = {:?}\nefivars_dir = {:?}\nfirmware_dir = {:?}\n",
                dir.join("boot").display().to_string(),
                dir.join("efivars").display().to_string(),
                dir.join("firmware").display().to_string()
            ));
        }
        if kind == Kind::Systemd {
            // The container has no boot loader: at boot, its harness activates the system
            // the last `switch-to-configuration boot` named, as a loader without a one-shot
            // entry would. Reboot deployments there need the agent's consent.
            config_text.push_str(
                "boot_dir = \"/var/lib/thymis-agent/no-boot\"\nefivars_dir = \"/var/lib/thymis-agent/no-efivars\"\nallow_unsafe_reboot = true\n",
            );
        }
        if kind == Kind::Systemd {
            install_units(&dir.join("units"))?;
        }
        std::fs::write(dir.join("agent.toml"), config_text)?;
        let (netns, veth) = self.link(index)?;
        let mut dev = Device {
            kind,
            name: name.to_owned(),
            dir,
            netns,
            veth,
            child: None,
            bus: bus.map(|b| b.address.clone()),
            env: vec![],
        };
        if start {
            dev.start()?;
        }
        self.devices.push(dev);
        Ok(index)
    }

    pub fn device(&self, name: &str) -> &Device {
        self.devices.iter().find(|d| d.name == name).expect("device")
    }

    pub fn device_mut(&mut self, name: &str) -> &mut Device {
        self.devices.iter_mut().find(|d| d.name == name).expect("device")
    }

    /// Waits until the devices table shows `name` online.
    pub fn wait_online(&self, name: &str) {
        let start = Instant::now();
        loop {
            let v = self.controller.ctl_json(&["devices"]);
            let online = v.as_array().is_some_and(|a| a.iter().any(|d| d["name"] == name && d["online"] == true));
            if online {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{name} not online after 30s\n{}", self.diagnostics());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the devices table shows `name` offline.
    pub fn wait_offline(&self, name: &str) {
        wait_for(&format!("{name} offline"), Duration::from_secs(30), || {
            let v = self.controller.ctl_json(&["devices"]);
            v.as_array()?.iter().find(|d| d["name"] == name && d["online"] == false).map(|_| ())
        });
    }

    /// The devices table row of `name`.
    pub fn device_row(&self, name: &str) -> Value {
        let v = self.controller.ctl_json(&["devices"]);
        v.as_array().and_then(|a| a.iter().find(|d| d["name"] == name).cloned()).unwrap_or_default()
    }

    /// Waits until task `id` is no longer pending/running, and returns its JSON.
    /// A task's JSON read as the API's type (`thymis_api::Task`): fails when the
    /// controller answers anything else.
    pub fn typed_task(v: &Value) -> thymis_api::Task {
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("not a task ({e}): {v}"))
    }

    pub fn wait_task(&self, id: i64, timeout: Duration) -> Value {
        wait_for(&format!("task {id} to settle"), timeout, || {
            let t = self.controller.ctl_json(&["task", &id.to_string()]);
            matches!(t["state"].as_str(), Some("finished" | "cancelled" | "waiting" | "halted")).then_some(t)
        })
    }

    /// The child of `task` for `device`.
    pub fn child<'a>(task: &'a Value, device: &str) -> &'a Value {
        task["children"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["device"] == device))
            .unwrap_or_else(|| panic!("no child for {device} in {task}"))
    }

    /// A summary of everything for a failing assertion.
    pub fn diagnostics(&self) -> String {
        let mut s = format!("--- controller log ---\n{}\n", tail(&self.controller.log(), 60));
        for d in &self.devices {
            s.push_str(&format!("--- {} agent log ---\n{}\n", d.name, tail(&d.log(), 40)));
        }
        s
    }
}

/// The units a systemd device boots with: the repository's agent unit (its ExecStart
/// pointed at the workspace binary by a drop-in), the D-Bus policy, and the harness's
/// boot unit, which activates the recorded boot default at every boot as NixOS does.
fn install_units(dir: &Path) -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::create_dir_all(dir)?;
    std::fs::copy(repo.join("daemon/systemd/thymis-agent.service"), dir.join("thymis-agent.service"))?;
    std::fs::copy(repo.join("daemon/dbus/io.thymis.Agent1.conf"), dir.join("io.thymis.Agent1.conf"))?;
    std::fs::write(
        dir.join("harness.conf"),
        "[Unit]\nAfter=thymis-test-boot.service\n\n[Service]\nExecStart=\n\
         ExecStart=/opt/thymis/thymis-agent --config /etc/thymis/agent.toml\n\
         StandardError=append:/var/lib/thymis-agent/agent.log\n\
         Environment=THYMIS_LOG=info,thymis_agent=debug\n",
    )?;
    std::fs::write(
        dir.join("thymis-test-boot.service"),
        "[Unit]\nDescription=Activate the boot default (as NixOS's boot does)\nBefore=thymis-agent.service\n\n\
         [Service]\nType=oneshot\nRemainAfterExit=yes\n\
         ExecStart=/bin/sh -c 'f=/nix/var/nix/thymis-test-boot-default; [ -f $f ] && $(cat $f)/bin/switch-to-configuration test || true'\n",
    )?;
    Ok(())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
