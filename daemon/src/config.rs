//! The agent's configuration file (TOML), as the NixOS module renders it from `settings`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// Why a terminal is refused where the agent's configuration does not allow one.
pub const NO_TERMINAL: &str =
    "the terminal is disabled on this device (its agent configuration does not say terminal = true)";

/// `thymis-agent --config FILE`. Unknown keys are refused so a typo cannot silently
/// turn a safety setting off.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// `wss://host:port/agent/v1` (or `ws://` with `allow_insecure_transport`).
    pub controller_url: String,
    pub state_dir: PathBuf,
    pub enrollment_token: Option<String>,
    pub enrollment_token_file: Option<PathBuf>,
    /// Pinned controller identity public keys (`name:base64`); any one may sign.
    pub controller_identity_keys: Vec<String>,
    /// sha256 (hex) of the controller's TLS certificate, pinned when the URL is wss://.
    pub controller_tls_sha256: Option<String>,
    /// Or: a CA (PEM) whose certificates are trusted for the controller's host name.
    pub controller_ca_file: Option<PathBuf>,
    /// Nix signing keys accepted for store paths.
    pub nix_trusted_keys: Vec<String>,
    /// Seconds the controller has to confirm an activated deployment.
    pub confirm_timeout: u64,
    pub allow_insecure_transport: bool,
    /// The system profile whose generations are the rollback points.
    pub system_profile: PathBuf,
    /// Where the running system is linked (NixOS: `/run/current-system`).
    pub current_system_link: PathBuf,
    /// Reconnect backoff bounds, seconds.
    pub reconnect_min: f64,
    pub reconnect_max: f64,
    /// Seconds to open a connection and to finish the handshake.
    pub connect_timeout: u64,
    /// For offline bundles: a command (argv) that must exit 0 after activation.
    pub health_check: Vec<String>,
    /// Whether to use the D-Bus system bus (it is retried when absent).
    pub dbus: bool,
    /// How the agent reboots the device for reboot deployments.
    pub reboot_command: Vec<String>,
    /// Where the boot loader's files are (its kind is read from them).
    pub boot_dir: PathBuf,
    /// Where the firmware's variables are (efivarfs); systemd-boot is recognised by
    /// its `LoaderInfo` variable there.
    pub efivars_dir: PathBuf,
    /// Where a U-Boot board's FAT partition is mounted (its boot script and boot-once
    /// state; NixOS's SD images list it at `/boot/firmware` with `noauto`, and the agent
    /// mounts it then: `bootloader::on_demand`).
    pub firmware_dir: PathBuf,
    /// NixOS's `boot.loader.efi.canTouchEfiVariables`: where false, the agent writes no
    /// EFI variable, so systemd-boot has no one-shot boot for reboot deployments.
    pub can_touch_efi_variables: bool,
    /// Where the system that booted is linked (NixOS: `/run/booted-system`): a new
    /// system whose kernel, initrd, kernel parameters, device trees or init interface
    /// differ from it needs a reboot.
    pub booted_system_link: PathBuf,
    /// Profile generations kept when a deployment is made permanent (as NixOS's
    /// `configurationLimit`); older ones leave the profile, so the boot menu and the
    /// ESP stay bounded: an image's ESP has room for this many kernels and one more
    /// (the one being tried). 0 keeps every generation.
    pub configuration_limit: usize,
    /// Reboot into a new generation even where the boot loader can only make it the
    /// default (extlinux, or no loader the agent knows): a system that does not come
    /// up then has no way back.
    pub allow_unsafe_reboot: bool,
    /// Nix binary caches asked for a deployment's paths before the controller
    /// (`http://cache.site.example`); what they serve must be signed by a key of
    /// `nix_trusted_keys`.
    pub substituters: Vec<String>,
    /// Seconds a binary cache has to connect and to answer a request.
    pub substituter_timeout: u64,
    /// The CA certificates (PEM) an https:// binary cache's certificate is checked with.
    pub substituter_ca_file: PathBuf,
    /// Let the controller's admin open a terminal (a root shell) on this device.
    pub terminal: bool,
    /// Seconds a terminal may sit without input or output before it is closed.
    pub terminal_idle_timeout: u64,
    /// While this file exists the device holds updates (its first line says why):
    /// deployments are copied and staged, and switch once it is gone (`crate::hold`).
    pub hold_file: PathBuf,
    /// Seconds after which a hold is no longer obeyed, and reported overdue.
    pub hold_max_age: u64,
    /// A group whose members may call `Hold` and `Release` over D-Bus besides root.
    pub hold_group: Option<String>,
    /// Where the device's secrets are written, one file per secret (a tmpfs: they are
    /// never on a disk in clear).
    pub secrets_dir: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            controller_url: String::new(),
            state_dir: PathBuf::from("/var/lib/thymis-agent"),
            enrollment_token: None,
            enrollment_token_file: None,
            controller_identity_keys: vec![],
            controller_tls_sha256: None,
            controller_ca_file: None,
            nix_trusted_keys: vec![],
            confirm_timeout: 120,
            allow_insecure_transport: false,
            system_profile: PathBuf::from("/nix/var/nix/profiles/system"),
            current_system_link: PathBuf::from("/run/current-system"),
            reconnect_min: 1.0,
            reconnect_max: 60.0,
            connect_timeout: 10,
            health_check: vec![],
            dbus: true,
            reboot_command: vec!["systemctl".into(), "reboot".into()],
            boot_dir: PathBuf::from("/boot"),
            efivars_dir: PathBuf::from("/sys/firmware/efi/efivars"),
            firmware_dir: PathBuf::from("/boot/firmware"),
            can_touch_efi_variables: true,
            booted_system_link: PathBuf::from("/run/booted-system"),
            configuration_limit: 2,
            allow_unsafe_reboot: false,
            substituters: vec![],
            substituter_timeout: 10,
            substituter_ca_file: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            terminal: false,
            terminal_idle_timeout: 900,
            hold_file: PathBuf::from("/run/thymis/hold"),
            hold_max_age: 24 * 3600,
            hold_group: None,
            secrets_dir: PathBuf::from("/run/thymis/secrets"),
        }
    }
}

/// Why the configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config: AgentConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        config.validate().map_err(|why| ConfigError::Invalid { path: path.to_owned(), why })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.controller_url.is_empty() {
            return Err("controller_url is not set".into());
        }
        if self.controller_url.starts_with("ws://") && !self.allow_insecure_transport {
            return Err(format!(
                "controller_url {} is not encrypted: use wss://, or set allow_insecure_transport = true \
                 when a TLS proxy or a test network carries it",
                self.controller_url
            ));
        }
        if !self.controller_url.starts_with("ws://") && !self.controller_url.starts_with("wss://") {
            return Err(format!("controller_url {} is not a ws:// or wss:// URL", self.controller_url));
        }
        if self.controller_url.starts_with("wss://")
            && self.controller_tls_sha256.is_none()
            && self.controller_ca_file.is_none()
        {
            return Err("a wss:// controller_url needs controller_tls_sha256 or controller_ca_file".into());
        }
        if self.controller_identity_keys.is_empty() {
            return Err("controller_identity_keys is empty: the agent would trust no controller".into());
        }
        if self.nix_trusted_keys.is_empty() {
            return Err("nix_trusted_keys is empty: the agent would accept no store path".into());
        }
        if self.confirm_timeout == 0 {
            return Err("confirm_timeout must be at least 1 second".into());
        }
        Ok(())
    }

    /// The enrollment token, from the file if one is named (secrets stay out of the store).
    pub fn enrollment_token(&self) -> Result<Option<String>, ConfigError> {
        match &self.enrollment_token_file {
            Some(path) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|source| ConfigError::Read { path: path.clone(), source }),
            None => Ok(self.enrollment_token.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, String> {
        let c: AgentConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map(|()| c)
    }

    const OK: &str = r#"
controller_url = "ws://127.0.0.1:1/agent/v1"
allow_insecure_transport = true
controller_identity_keys = ["thymis-controller-1:AAAA"]
nix_trusted_keys = ["thymis-1:AAAA"]
"#;

    #[test]
    fn defaults_and_validation() {
        let c = parse(OK).expect("valid");
        assert_eq!(c.confirm_timeout, 120);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/thymis-agent"));
        let insecure = OK.replace("allow_insecure_transport = true", "");
        assert!(parse(&insecure).expect_err("ws without opt-in").contains("not encrypted"));
        let typo = format!("{OK}\nconfirm_timout = 5\n");
        assert!(parse(&typo).expect_err("typo").contains("unknown field"));
        let no_keys = OK.replace(r#"controller_identity_keys = ["thymis-controller-1:AAAA"]"#, "");
        assert!(parse(&no_keys).is_err());
    }
}
