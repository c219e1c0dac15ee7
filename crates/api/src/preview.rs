//! `thymisctl deploy --dry-run` (`POST /deploy/dry-run`): what an update would change
//! and cost, from the built systems, before anything is sent or switched.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct DryRun {
    /// The task that built the configurations (its log has the build output).
    pub task: i64,
    /// The commit built (uncommitted changes: a commit made for the preview only, on
    /// no branch).
    pub commit: String,
    pub configs: Vec<ConfigChange>,
    pub devices: Vec<DeviceChange>,
}

/// What one configuration's update changes, against the system most of its devices run.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ConfigChange {
    pub config: String,
    pub system: String,
    /// The system compared with; none when its devices run nothing the controller has.
    pub before: Option<String>,
    pub closure_paths: usize,
    /// NAR bytes of the new closure, and of the one before.
    pub closure_bytes: u64,
    pub before_bytes: Option<u64>,
    pub added: Vec<Package>,
    pub removed: Vec<Package>,
    pub changed: Vec<PackageChange>,
    /// Why switching to it reboots the devices (kernel, initrd, ...); none: it switches
    /// live.
    pub reboot: Option<String>,
}

/// What a device got from a deployment, by package (`Child::packages`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Packages {
    pub changed: Vec<PackageChange>,
    pub added: Vec<Package>,
    pub removed: Vec<Package>,
}

impl Packages {
    /// From a [`thymis_store`]-style diff: (name, version) and (name, old, new).
    pub fn from_parts(
        added: Vec<(String, String)>,
        removed: Vec<(String, String)>,
        changed: Vec<(String, String, String)>,
    ) -> Packages {
        Packages {
            changed: changed.into_iter().map(|(name, old, new)| PackageChange { name, old, new }).collect(),
            added: added.into_iter().map(|(name, version)| Package { name, version }).collect(),
            removed: removed.into_iter().map(|(name, version)| Package { name, version }).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct PackageChange {
    pub name: String,
    pub old: String,
    pub new: String,
}

/// Paths a device's binary caches would serve of an update, and their compressed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct FromCaches {
    pub paths: usize,
    pub bytes: u64,
}

/// What one device would receive.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct DeviceChange {
    pub device: String,
    pub config: String,
    /// The system it runs now.
    pub runs: Option<String>,
    /// Paths of the new closure it lacks, and their NAR bytes (before compression and
    /// deltas).
    pub paths: usize,
    pub bytes: u64,
    /// What the controller would send it: each path compressed, or as a delta against
    /// the version the device has where that is smaller (its binary caches may serve
    /// some paths instead).
    #[serde(default)]
    pub send_bytes: u64,
    /// How many of the paths would go as deltas.
    #[serde(default)]
    pub deltas: usize,
    /// What its binary caches would serve instead (paths, compressed bytes), as the
    /// device answered; `None` when it could not be asked (offline, an older agent, no
    /// answer in time). `send_bytes` leaves those paths out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_caches: Option<FromCaches>,
    /// Whether the controller knew its system's closure (otherwise: the whole closure).
    pub known: bool,
}
