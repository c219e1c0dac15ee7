//! The controller's shared state: settings, keys, database, project, connected agents.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use thymis_store::signing::SecretKey;
use tokio::sync::{Semaphore, broadcast};

use crate::conn::Conn;
use crate::db::Db;
use crate::project::Project;

/// Tunables; every timeout can go down to a second so tests run fast.
#[derive(Debug, Clone)]
pub struct Settings {
    pub state_dir: PathBuf,
    /// Where the database is (default: `db.sqlite` in the state directory).
    pub database: Option<crate::sql::Location>,
    /// The URL agents use, written into generated agent configurations.
    pub public_url: String,
    pub heartbeat: Duration,
    pub dead_after: Duration,
    pub handshake_timeout: Duration,
    /// How long a device may take to answer a request during a deployment.
    pub reply_timeout: Duration,
    /// How long a deployment waits for offline devices.
    pub deployment_ttl: Duration,
    pub token_ttl: Duration,
    /// The confirmation deadline written into agent configurations.
    pub confirm_timeout: Duration,
    /// Devices deployed to at the same time.
    pub parallel: usize,
    /// Connections still in their handshake, all peers together.
    pub max_unauthenticated: usize,
    /// Connections still in their handshake from one source address.
    pub max_unauthenticated_per_peer: usize,
    /// Proxies whose `X-Forwarded-For` names the client (`client_addr`).
    pub trusted_proxies: Vec<crate::client_addr::Cidr>,
    /// Failed enrollment attempts allowed per minute from one source address.
    pub enroll_failures_per_minute: u32,
    /// Logins allowed per minute to one device (after it proved it holds its key).
    pub logins_per_device_per_minute: u32,
    /// sha256 of the controller's TLS certificate (agents pin it), when serving TLS.
    pub tls_sha256: Option<thymis_tls_pin::Fingerprint>,
    /// A CA bundle on the devices that agents check the public URL's certificate with
    /// instead of the pin (a proxy with a CA-issued certificate in front).
    pub agent_ca_file: Option<PathBuf>,
    /// A Nix binary cache each built closure is copied to (`--publish-cache`).
    pub publish_cache: Option<String>,
    /// `--override-input NAME REF` for every build.
    pub override_inputs: Vec<(String, String)>,
}

/// Files of the state directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
    pub project: PathBuf,
    pub db: PathBuf,
    pub identity_key: PathBuf,
    pub nix_key: PathBuf,
    pub admin_token: PathBuf,
}

impl Paths {
    pub fn new(root: &Path) -> Self {
        Paths {
            root: root.to_owned(),
            project: root.join("project"),
            db: root.join("db.sqlite"),
            identity_key: root.join("identity.key"),
            nix_key: root.join("nix-signing.key"),
            admin_token: root.join("admin-token"),
        }
    }
}

pub use crate::sync::lock;

/// Everything the controller's handlers share.
#[derive(Debug)]
pub struct Controller {
    pub settings: Settings,
    pub paths: Paths,
    pub db: Db,
    pub project: Project,
    pub identity: SecretKey,
    pub nix_key: SecretKey,
    pub admin_token: String,
    conns: Mutex<HashMap<String, Arc<Conn>>>,
    /// Device names as they connect (deployments waiting for them listen).
    pub connected: broadcast::Sender<String>,
    /// Task ids as they change (live views listen).
    pub task_changed: broadcast::Sender<i64>,
    /// What the engine has pending in memory (recounts due, waves released).
    pub pending: crate::pending::Pending,
    pub handshakes: Arc<Semaphore>,
    pub peers: Arc<crate::peer_limits::PeerLimits>,
    pub log_budget: crate::log_budget::LogBudgets,
    /// Serialises builds and closure preparation per (commit, config).
    pub builds: tokio::sync::Mutex<HashMap<(String, String), Result<thymis_store::StorePath, String>>>,
    pub nar_cache: crate::nar_cache::NarCache,
    /// Builds run since start (the fan-out benchmark reads it).
    pub build_count: std::sync::atomic::AtomicU64,
    /// This controller among those sharing the database (kept in the state directory,
    /// so a restarted controller knows its own tasks).
    pub instance: String,
    /// Device deployments this process is delivering now (one delivery each).
    pub delivering: Mutex<HashSet<i64>>,
    /// Deliveries of deployments this controller did not start (`--parallel` of them).
    pub adopted: Semaphore,
    /// Commits' subjects and distance from HEAD, for the devices table and task pages.
    pub commits: crate::commits::Commits,
    /// Live progress of the copies under way here.
    pub copies: crate::copy_progress::Copies,
}

fn load_or_create_key(path: &Path, name: &str) -> Result<SecretKey> {
    match std::fs::read_to_string(path) {
        Ok(t) => t.trim().parse().with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = SecretKey::generate(name)?;
            write_secret(path, &k.to_secret_string())?;
            std::fs::write(path.with_extension("pub"), format!("{}\n", k.public()))?;
            Ok(k)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{text}")?;
    f.sync_all()?;
    Ok(())
}

impl Controller {
    /// Opens the state directory, creating whatever is missing on first start.
    pub fn open(settings: Settings) -> Result<Arc<Controller>> {
        let paths = Paths::new(&settings.state_dir);
        std::fs::create_dir_all(&paths.root).with_context(|| format!("creating {}", paths.root.display()))?;
        // Keys, tokens, the database and artifacts with enrollment tokens: the owner's
        // only, whatever the umask.
        std::fs::set_permissions(&paths.root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .with_context(|| format!("making {} private", paths.root.display()))?;
        let identity = load_or_create_key(&paths.identity_key, "thymis-controller-1")?;
        let nix_key = load_or_create_key(&paths.nix_key, "thymis-1")?;
        let admin_token = match std::fs::read_to_string(&paths.admin_token) {
            Ok(t) => t.trim().to_owned(),
            Err(_) => {
                let t = crate::random::hex::<24>()?;
                write_secret(&paths.admin_token, &t)?;
                t
            }
        };
        let project = Project::new(&paths.project);
        project.init_if_missing().context("creating the project repository")?;
        let db = match &settings.database {
            Some(location) => Db::connect(location)?,
            None => Db::open(&paths.db)?,
        };
        let ended = db.end_sessions_of_other_tokens(&admin_token)?;
        if ended > 0 {
            tracing::warn!(sessions = ended, "the admin token changed: every browser session ended");
        }
        let (connected, _) = broadcast::channel(1024);
        let (task_changed, _) = broadcast::channel(1024);
        let handshakes = Arc::new(Semaphore::new(settings.max_unauthenticated));
        let nar_cache_dir = paths.root.join("nar-cache");
        let instance = match std::fs::read_to_string(paths.root.join("controller-id")) {
            Ok(id) => id.trim().to_owned(),
            Err(_) => {
                let id = format!("ctl-{}", crate::random::hex::<6>()?);
                write_secret(&paths.root.join("controller-id"), &id)?;
                id
            }
        };
        db.heartbeat(&instance)?;
        Ok(Arc::new(Controller {
            instance,
            delivering: Mutex::new(HashSet::new()),
            adopted: Semaphore::new(settings.parallel.max(1)),
            nar_cache: crate::nar_cache::NarCache::new(nar_cache_dir),
            paths,
            db,
            project,
            identity,
            nix_key,
            admin_token,
            conns: Mutex::new(HashMap::new()),
            connected,
            task_changed,
            pending: Default::default(),
            commits: Default::default(),
            copies: Default::default(),
            handshakes,
            log_budget: Default::default(),
            peers: crate::peer_limits::PeerLimits::new(
                settings.max_unauthenticated_per_peer,
                settings.enroll_failures_per_minute,
                settings.logins_per_device_per_minute,
            ),
            builds: tokio::sync::Mutex::new(HashMap::new()),
            build_count: std::sync::atomic::AtomicU64::new(0),
            settings,
        }))
    }

    pub fn conn(&self, device: &str) -> Option<Arc<Conn>> {
        lock(&self.conns).get(device).cloned()
    }

    /// Devices connected to this controller or to another one that is alive.
    pub fn online(&self) -> HashSet<String> {
        let mut online: HashSet<String> = lock(&self.conns).keys().cloned().collect();
        match self.db.devices_connected_elsewhere(&self.instance, self.alive_since()) {
            Ok(elsewhere) => online.extend(elsewhere),
            Err(e) => tracing::warn!("devices connected to other controllers: {e:#}"),
        }
        online
    }

    /// Ends connections of devices revoked or re-enrolled through another controller
    /// (one that did it itself has ended them already).
    pub fn end_revoked(&self) -> Result<()> {
        let local: Vec<Arc<Conn>> = lock(&self.conns).values().cloned().collect();
        if local.is_empty() || !self.db.is_shared() {
            return Ok(());
        }
        let keys: HashMap<String, (bool, Option<String>)> =
            self.db.devices()?.into_iter().map(|d| (d.name.clone(), (d.revoked, d.public_key))).collect();
        for conn in local {
            let ok = keys.get(&conn.device).is_some_and(|(revoked, key)| !revoked && key.is_some());
            if !ok {
                tracing::warn!(device = %conn.device, "revoked or re-enrolled through another controller: disconnecting");
                self.unregister(&conn);
            }
        }
        Ok(())
    }

    /// Controllers seen since then are alive (a controller's heartbeat is its sweep), by
    /// the database's clock, as heartbeats are.
    pub fn alive_since(&self) -> i64 {
        let now = self.db.clock().unwrap_or_else(|_| crate::db::now());
        now - self.settings.dead_after.as_secs().max(3) as i64
    }

    /// Registers a new connection, replacing (and closing) an older one of the device.
    pub fn register(&self, conn: Arc<Conn>) {
        if let Some(old) = lock(&self.conns).insert(conn.device.clone(), conn.clone()) {
            old.close();
        }
        if let Err(e) = self.db.set_device_controller(&conn.device, &self.instance, true) {
            tracing::warn!(device = %conn.device, "recording the connection: {e:#}");
        }
        let _ = self.connected.send(conn.device.clone());
    }

    pub fn unregister(&self, conn: &Arc<Conn>) {
        let mut conns = lock(&self.conns);
        if conns.get(&conn.device).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            conns.remove(&conn.device);
            let _ = self.db.set_device_controller(&conn.device, &self.instance, false);
        }
        conn.close();
    }

    pub fn notify_task(&self, task: i64) {
        let _ = self.task_changed.send(task);
    }

    /// A complete agent configuration for a device (docs/agent.md).
    pub fn agent_config(&self, device: &str, token: &str) -> String {
        let url = format!("{}/agent/v1", self.settings.public_url.trim_end_matches('/'));
        let mut s = format!(
            "# thymis-agent configuration for device {device:?}, generated by thymis-controller.\n\
             # It holds a single-use enrollment token: treat this file as a secret.\n\
             controller_url = {url:?}\n\
             enrollment_token = {token:?}\n\
             controller_identity_keys = [{:?}]\n\
             nix_trusted_keys = [{:?}]\n\
             confirm_timeout = {}\n",
            self.identity.public().to_string(),
            self.nix_key.public().to_string(),
            self.settings.confirm_timeout.as_secs().max(1),
        );
        // Never `allow_insecure_transport`: only an admin sets that, by hand.
        match (&self.settings.agent_ca_file, &self.settings.tls_sha256) {
            _ if url.starts_with("ws://") => s.push_str(
                "# This URL is ws:// (the controller runs with --insecure-plain-http): the agent refuses it\n\
                 # unless you add `allow_insecure_transport = true` here, which is only for a test network.\n",
            ),
            (Some(ca), _) => s.push_str(&format!("controller_ca_file = {:?}\n", ca.display().to_string())),
            (None, Some(pin)) => s.push_str(&format!("controller_tls_sha256 = \"{pin}\"\n")),
            (None, None) => s.push_str(
                "# The controller serves plain HTTP behind a TLS proxy: name the proxy's certificate with\n\
                 # controller_tls_sha256 = \"...\" or its CA with controller_ca_file = \"...\".\n",
            ),
        }
        s.push_str(
            "# `thymisctl shell` and the device page's terminal give this controller's admin a root shell\n\
             # on the device; the agent refuses them unless you uncomment this:\n\
             # terminal = true\n",
        );
        s
    }
}
