//! `thymis-imager`: full disk images of a system closure (GPT, an EFI system partition
//! with NixOS's systemd-boot layout, an ext4 root holding the registered closure and the
//! agent's configuration), their verification and safe flashing, and offline update
//! bundles. See `docs/imager.md`.

pub mod bmap;
pub mod board;
pub mod build;
pub mod closure;
pub mod flash;
pub mod manifest;
pub mod progress;
pub mod remote;
pub mod tools;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use thymis_store::StorePath;

#[derive(Debug, Parser)]
#[command(name = "thymis-imager", version, about = "Thymis disk images, flashing and offline bundles")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

// Parsed once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Build a compressed full disk image of a system closure.
    Build {
        /// The system closure (a store path); or give --config to have the controller
        /// build that configuration of its project, or --device for the controller's
        /// image of one device.
        #[arg(long, required_unless_present_any = ["config", "device"])]
        system: Option<StorePath>,
        /// The controller's image of this device: its configuration, a new enrollment
        /// token, and its secrets sealed to a key made for it (downloaded into --out).
        #[arg(long, conflicts_with_all = ["system", "config", "closure_info", "agent_config", "device_key", "secrets"])]
        device: Option<String>,
        /// With --device, for an enrolled device: the image enrolls a new key and the
        /// device as it runs now is locked out.
        #[arg(long, requires = "device")]
        replace_key: bool,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "thymis")]
        name: String,
        /// Image size (e.g. 2G, 512M); default: what the closure needs, with room.
        #[arg(long)]
        size: Option<String>,
        /// Agent configuration to place at /etc/thymis/agent.toml (a secret: 0600).
        #[arg(long)]
        agent_config: Option<PathBuf>,
        /// The device's key, placed at /var/lib/thymis-agent/device.key (0600).
        #[arg(long)]
        device_key: Option<PathBuf>,
        /// The device's secrets, sealed to that key (the controller's image makes it),
        /// placed at /var/lib/thymis-agent/secrets.json (0600): the agent writes them
        /// into its secrets_dir at its first start, before it says it is ready.
        #[arg(long, requires = "device_key")]
        secrets: Option<PathBuf>,
        /// Read the closure from a `pkgs.closureInfo` output (inside a Nix build).
        #[arg(long)]
        closure_info: Option<PathBuf>,
        /// Recorded in the manifest; with --config, the commit the controller builds
        /// (default: its project's HEAD).
        #[arg(long)]
        commit: Option<String>,
        /// Recorded in the manifest; without --system, the configuration of the
        /// controller's project to build (through its API: --controller, --token).
        #[arg(long)]
        config: Option<String>,
        /// An image for this U-Boot board (aarch64; see `thymis-imager boards`) instead
        /// of an x86-64 UEFI one.
        #[arg(long)]
        board: Option<String>,
        /// The board's firmware files (default: the system's firmware/ directory).
        #[arg(long, requires = "board")]
        firmware: Option<PathBuf>,
        #[command(flatten)]
        connection: thymis_client::Connection,
    },
    /// List the boards `build --board` knows.
    Boards,
    /// Check an image set against its manifest and checksums.
    Verify { dir: PathBuf },
    /// Write an image to a block device or file: mapped ranges only, each checked, then read back.
    Flash {
        image: PathBuf,
        target: PathBuf,
        /// Required for block devices.
        #[arg(long)]
        yes: bool,
    },
    /// Write an offline update bundle of a system closure.
    Bundle {
        #[arg(long)]
        system: StorePath,
        #[arg(long)]
        identity_key: PathBuf,
        #[arg(long)]
        nix_key: PathBuf,
        #[arg(long)]
        sequence: u64,
        /// device:NAME or config:NAME
        #[arg(long)]
        target: thymis_store::bundle::Target,
        #[arg(long)]
        out: PathBuf,
        /// Seconds from now after which devices with a synchronised clock refuse it.
        #[arg(long)]
        expires_in: Option<u64>,
        #[arg(long)]
        commit: Option<String>,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Boards => {
            for b in board::BOARDS {
                println!("{:<16} {}", b.name, b.description);
            }
        }
        Cmd::Build { device: Some(device), out, commit, replace_key, connection, .. } => {
            // The controller makes it (it holds the device's secrets and keys).
            let c = thymis_client::Client::new(&connection)?;
            let req = thymis_api::ArtifactRequest { commit, replace_key, ..Default::default() };
            let task: thymis_api::Task = c.post(&format!("/devices/{device}/image"), Some(&req))?;
            thymis_client::tasks::artifacts(&c, task.id, |name| out.join(name), |_| {})?;
            let manifest =
                std::fs::read_to_string(out.join("manifest.json")).context("reading the image's manifest")?;
            println!("{manifest}");
        }
        Cmd::Build {
            device: None,
            replace_key: _,
            system,
            out,
            name,
            size,
            agent_config,
            device_key,
            secrets,
            closure_info,
            commit,
            config,
            board,
            firmware,
            connection,
        } => {
            let size = size.map(|s| tools::parse_size(&s)).transpose()?;
            let board = board.map(|b| board::by_name(&b)).transpose()?;
            let source = match (system, closure_info, &config) {
                (Some(system), None, _) => build::Source::Store(system),
                (Some(system), Some(dir), _) => build::Source::ClosureInfo(system, dir),
                (None, None, Some(config)) => {
                    build::Source::Controller { connection, config: config.clone(), commit: commit.clone() }
                }
                (None, Some(_), _) => anyhow::bail!("--closure-info needs --system"),
                (None, None, None) => anyhow::bail!("give --system, or --config to build through the controller"),
            };
            let m = build::build(&build::Options {
                source,
                out,
                name,
                size,
                agent_config,
                device_key,
                secrets,
                commit,
                config,
                board,
                firmware,
            })?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Cmd::Verify { dir } => {
            let m = manifest::verify(&dir)?;
            eprintln!("{}: ok ({} bytes, sha256 {})", dir.display(), m.image_size, m.image_sha256);
        }
        Cmd::Flash { image, target, yes } => flash::flash(&image, &target, yes)?,
        Cmd::Bundle { system, identity_key, nix_key, sequence, target, out, expires_in, commit } => {
            let read = |p: &PathBuf| -> Result<thymis_store::signing::SecretKey> {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                text.trim().parse().with_context(|| format!("{} is not a name:base64 secret key", p.display()))
            };
            let (identity, nix) = (read(&identity_key)?, read(&nix_key)?);
            let infos = closure::from_store(&system)?;
            let mut signed = infos;
            for i in &mut signed {
                nix.sign_path(i);
            }
            let now = manifest::now();
            let m = thymis_store::bundle::Manifest {
                format: 0,
                target,
                system,
                commit,
                sequence,
                expires: expires_in.map(|s| now + s),
                created: now,
                paths: vec![],
                secrets: None,
            };
            let scratch = tempfile::tempdir()?;
            let file = std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
            let store = thymis_store::local_store::LocalStore::system();
            thymis_store::bundle::write(std::io::BufWriter::new(file), m, &identity, &store, &signed, scratch.path())?;
            eprintln!("wrote {} ({} paths)", out.display(), signed.len());
        }
    }
    Ok(())
}
