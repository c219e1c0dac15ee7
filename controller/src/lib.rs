//! `thymis-controller`: keeps the fleet's project, builds each configuration, and
//! deploys it over the air to the agents (see `docs/controller.md`).

pub mod agents;
pub mod api;
pub mod artifacts;
pub mod build;
pub mod caller;
pub mod client_addr;
pub mod commits;
pub mod conn;
pub mod console;
pub mod controller;
pub mod copy_progress;
pub mod db;
pub mod delta_bases;
pub mod deploy;
pub mod engine;
pub mod http;
pub mod log_budget;
pub mod model;
pub mod nar_cache;
pub mod peer_limits;
pub mod pending;
pub mod pg_tls;
pub mod project;
pub mod random;
pub mod read_cap;
pub mod secrets;
pub mod sql;
pub mod streams;
pub mod sync;
pub mod tls;
pub mod ui;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

/// Command line of `thymis-controller`.
#[derive(Debug, Parser)]
#[command(name = "thymis-controller", version, about = "Thymis fleet controller")]
pub struct Cli {
    /// State directory (project, database, keys, admin token); created on first start.
    #[arg(long, env = "THYMIS_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// URL agents use to reach this controller (default: derived from --listen).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Serve HTTPS/wss:// with this certificate (PEM) and --tls-key, instead of the one
    /// generated at the first start (STATE_DIR/tls.crt, which agents and thymisctl pin).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP and ws://, unencrypted: only behind a TLS-terminating proxy (give
    /// its URL as --public-url) or on a test network. Warns at every start.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub insecure_plain_http: bool,
    /// Generated agent configurations trust the public URL's certificate through this CA
    /// bundle on the device (`controller_ca_file`) instead of pinning the controller's own
    /// certificate: for a TLS-terminating proxy with a CA-issued certificate, e.g.
    /// /etc/ssl/certs/ca-certificates.crt.
    #[arg(long, value_name = "PATH_ON_DEVICE")]
    pub agent_ca_file: Option<PathBuf>,
    /// After each build, copy the system's closure to this Nix binary cache (`nix copy
    /// --to`, e.g. file:///srv/cache, which a site's web server serves to its devices),
    /// signed with the controller's Nix key, which agents trust.
    #[arg(long, value_name = "STORE_URL")]
    pub publish_cache: Option<String>,
    /// The database: an SQLite file (default: STATE_DIR/db.sqlite) or a PostgreSQL URL,
    /// postgres://USER[:PASSWORD]@HOST[:PORT]/DB (a local socket's directory as the host,
    /// percent-encoded: postgres://thymis@%2Frun%2Fpostgresql/thymis), which controllers
    /// serving one fleet share (docs/scale.md). A server over the network (not a local
    /// socket or loopback) only with ?sslmode=verify-full&sslrootcert=CA.pem: TLS checked
    /// against that CA and the host.
    #[arg(long, env = "THYMIS_DATABASE", value_name = "PATH_OR_URL")]
    pub database: Option<String>,
    /// Seconds between heartbeats on agent connections.
    #[arg(long, default_value_t = 15)]
    pub heartbeat: u64,
    /// Seconds of silence after which an agent connection is declared dead.
    #[arg(long, default_value_t = 45)]
    pub dead_after: u64,
    /// Seconds an agent has to finish its handshake.
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Seconds a device may take to answer during a deployment.
    #[arg(long, default_value_t = 120)]
    pub reply_timeout: u64,
    /// Seconds a deployment waits for offline devices before they end `expired`.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub deployment_ttl: u64,
    /// Seconds an enrollment token stays valid.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub token_ttl: u64,
    /// Confirmation deadline written into generated agent configurations, seconds.
    #[arg(long, default_value_t = 120)]
    pub confirm_timeout: u64,
    /// Devices deployed to in parallel.
    #[arg(long, default_value_t = 10)]
    pub parallel: usize,
    /// Flake input overrides for builds, `NAME=FLAKEREF` (repeatable), e.g. a local
    /// nixpkgs for a controller without network: `nixpkgs=path:/srv/nixpkgs`.
    #[arg(long = "override-input", value_name = "NAME=FLAKEREF")]
    pub override_input: Vec<String>,
    /// Seconds between expiry sweeps.
    #[arg(long, default_value_t = 5)]
    pub sweep_interval: u64,
    /// Agent connections in their handshake at once, all source addresses together.
    #[arg(long, default_value_t = 4096)]
    pub max_handshakes: usize,
    /// Agent connections in their handshake at once from one source address (a site
    /// behind one NAT address shares it; its agents retry).
    #[arg(long, default_value_t = 32)]
    pub max_handshakes_per_peer: usize,
    /// Connections open at once (API, web UI and agents); past it, new ones wait in the
    /// listen queue. Never more than the open-file limit allows.
    #[arg(long, default_value_t = 16384)]
    pub max_connections: usize,
    /// Reverse proxies whose `X-Forwarded-For` names the client (an address or a block,
    /// repeatable, or comma-separated in the environment): behind a proxy every
    /// connection comes from the proxy, and the per-address limits would put every
    /// client in one bucket. Connections from other addresses are their own clients.
    #[arg(long = "trusted-proxy", env = "THYMIS_TRUSTED_PROXIES", value_delimiter = ',', value_name = "ADDR[/LEN]")]
    pub trusted_proxies: Vec<crate::client_addr::Cidr>,
}

impl Cli {
    pub fn tls_enabled(&self) -> bool {
        !self.insecure_plain_http
    }

    pub fn settings(&self) -> controller::Settings {
        controller::Settings {
            state_dir: self.state_dir.clone(),
            database: self.database.as_deref().map(crate::sql::Location::parse),
            public_url: self.public_url.clone().unwrap_or_else(|| {
                let scheme = if self.tls_enabled() { "wss" } else { "ws" };
                format!("{scheme}://{}", self.listen)
            }),
            tls_sha256: None,
            agent_ca_file: self.agent_ca_file.clone(),
            publish_cache: self.publish_cache.clone(),
            heartbeat: Duration::from_secs(self.heartbeat.max(1)),
            dead_after: Duration::from_secs(self.dead_after.max(2)),
            handshake_timeout: Duration::from_secs(self.handshake_timeout.max(1)),
            reply_timeout: Duration::from_secs(self.reply_timeout.max(1)),
            deployment_ttl: Duration::from_secs(self.deployment_ttl.max(1)),
            token_ttl: Duration::from_secs(self.token_ttl.max(1)),
            confirm_timeout: Duration::from_secs(self.confirm_timeout.max(1)),
            parallel: self.parallel.max(1),
            max_unauthenticated: self.max_handshakes.max(1),
            max_unauthenticated_per_peer: self.max_handshakes_per_peer.max(1),
            trusted_proxies: self.trusted_proxies.clone(),
            enroll_failures_per_minute: 30,
            logins_per_device_per_minute: 60,
            override_inputs: self
                .override_input
                .iter()
                .filter_map(|o| o.split_once('=').map(|(n, r)| (n.to_owned(), r.to_owned())))
                .collect(),
        }
    }
}

pub fn main(cli: Cli) -> Result<()> {
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("async runtime")?;
    runtime.block_on(run(cli))
}

pub async fn run(cli: Cli) -> Result<()> {
    let mut settings = cli.settings();
    std::fs::create_dir_all(&cli.state_dir).with_context(|| format!("creating {}", cli.state_dir.display()))?;
    let tls = if cli.tls_enabled() {
        let host = |u: &str| u.split("://").nth(1).and_then(|r| r.split(['/', ':']).next()).map(str::to_owned);
        let hosts: Vec<String> =
            [Some(cli.listen.ip().to_string()), host(&settings.public_url)].into_iter().flatten().collect();
        let tls = tls::load(cli.tls_cert.as_deref(), cli.tls_key.as_deref(), &cli.state_dir, &hosts)?;
        settings.tls_sha256 = Some(tls.cert_sha256);
        tracing::info!("serving TLS with {} (certificate sha256 {})", tls.cert_path.display(), tls.cert_sha256);
        Some(tls)
    } else {
        tracing::warn!(
            "serving plain HTTP and ws:// (--insecure-plain-http): admin token, sessions and closures cross the \
             network unencrypted; use this only behind a TLS-terminating proxy or on a test network"
        );
        None
    };
    let ctl = controller::Controller::open(settings)?;
    deploy::recover(&ctl)?;
    let sweeper = ctl.clone();
    let every = Duration::from_secs(cli.sweep_interval.max(1));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = sweeper.db.heartbeat(&sweeper.instance) {
                tracing::warn!("heartbeat: {e:#}");
            }
            if let Err(e) = deploy::sweep(&sweeper) {
                tracing::warn!("expiry sweep: {e:#}");
            }
            if let Err(e) = deploy::carry_on(&sweeper) {
                tracing::warn!("carrying on deployments: {e:#}");
            }
            sweeper.nar_cache.prune(Duration::from_secs(24 * 3600));
        }
    });
    let listener =
        tokio::net::TcpListener::bind(cli.listen).await.with_context(|| format!("listening on {}", cli.listen))?;
    tracing::info!(
        listen = %cli.listen,
        public_url = %ctl.settings.public_url,
        admin_token = %ctl.paths.admin_token.display(),
        "controller ready"
    );
    let app = api::router(ctl);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let max_connections = http::connection_limit(cli.max_connections);
    http::serve(listener, tls, app, max_connections, stop).await.context("serving")
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("THYMIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // Colours only on a terminal: a log file or the journal gets plain text.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        b.without_time().with_ansi(false).init()
    } else {
        b.with_ansi(tty).init()
    }
}
