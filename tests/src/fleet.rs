//! A fleet: a controller, its devices and their network, with the test project.

use super::*;

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

/// A controller and its devices.
#[derive(Debug)]
pub struct Fleet {
    pub controller: Controller,
    /// The controller's PostgreSQL server, when it has one (dropped after it).
    pub postgres: Option<postgres::Postgres>,
    pub devices: Vec<Device>,
    pub(crate) net: Net,
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
    pub(crate) fn install_test_project(&self) -> Result<()> {
        Self::install_test_project_in(&self.controller)
    }

    pub(crate) fn install_test_project_in(controller: &Controller) -> Result<()> {
        let project = controller.project_dir();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/project");
        for f in ["flake.nix", "fake-system.nix", "boot.nix", "arm.nix", "stage1.nix", "configs.json", "thymis.toml"] {
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

    /// A namespace on the fleet's bridge for a client (address `.210`) that must not see
    /// this machine's interfaces come and go.
    pub fn client_net(&self) -> Result<ClientNet> {
        let (netns, veth) = self.link(200)?;
        Ok(ClientNet { netns, veth })
    }

    /// A network namespace for device `index`, on the fleet's bridge.
    pub(crate) fn link(&self, index: usize) -> Result<(String, String)> {
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

    pub(crate) fn add_device_with(
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

    /// `thymisctl --json deploy --wait ARGS`: its exit status and the finished task.
    pub fn deploy_wait(&self, args: &[&str]) -> (i32, Value) {
        let mut full = vec!["--json", "deploy", "--wait"];
        full.extend_from_slice(args);
        let out = self.controller.ctl(&full);
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("deploy {args:?}: {e}: {}\n{}", String::from_utf8_lossy(&out.stderr), self.diagnostics())
        });
        (out.status.code().unwrap_or(-1), v)
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
