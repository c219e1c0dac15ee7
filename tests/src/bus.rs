//! A private D-Bus system bus (a real dbus-daemon) for agents that publish on one.

use super::*;

/// A system-like D-Bus daemon with Debian's system policy and the agent's policy file,
/// on a socket of its own (a real `dbus-daemon`, not the host's bus).
#[derive(Debug)]
pub struct SystemBus {
    pub address: String,
    pub(crate) dir: PathBuf,
    pub(crate) child: Child,
}

impl SystemBus {
    pub fn start() -> Result<SystemBus> {
        Self::start_with(None)
    }

    /// A bus whose policy also lets `hold_group` hold and release updates, as the NixOS
    /// module installs it for an agent with a `hold_group`.
    pub fn start_with_hold_group(hold_group: &str) -> Result<SystemBus> {
        Self::start_with(Some(hold_group))
    }

    fn start_with(hold_group: Option<&str>) -> Result<SystemBus> {
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
        if let Some(group) = hold_group {
            let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/dbus/io.thymis.Agent1-hold.conf.in");
            let text = std::fs::read_to_string(template)?.replace("@holdGroup@", group);
            std::fs::write(dir.join("policy/io.thymis.Agent1-hold.conf"), text)?;
        }
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
