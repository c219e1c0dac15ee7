//! Simulated devices: process devices and systemd containers, each with its own
//! `/nix`, `/run` and network namespace, running a real agent.

use super::*;

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
    pub(crate) veth: String,
    pub(crate) child: Option<Child>,
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
    pub(crate) fn boot(&mut self) -> Result<()> {
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
    pub(crate) fn container_pid(&self) -> Option<String> {
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

/// The units a systemd device boots with: the repository's agent unit (its ExecStart
/// pointed at the workspace binary by a drop-in), the D-Bus policy, and the harness's
/// boot unit, which activates the recorded boot default at every boot as NixOS does.
pub(crate) fn install_units(dir: &Path) -> Result<()> {
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
