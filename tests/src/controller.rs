//! The controller process of a fleet, and its command-line and API clients.

use super::*;

/// The controller process.
#[derive(Debug)]
pub struct Controller {
    pub state_dir: PathBuf,
    pub listen: String,
    pub(crate) opts: FleetOptions,
    pub(crate) child: Option<Child>,
    pub(crate) log: PathBuf,
    /// Extra environment for the controller (from its next start).
    pub env: Vec<(String, String)>,
}

impl Controller {
    pub(crate) fn start(&mut self) -> Result<()> {
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
