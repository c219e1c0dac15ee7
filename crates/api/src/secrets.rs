//! Per-device secrets (`/secrets`, `thymisctl secret`): set for a device, a
//! configuration or a tag; listed without their values, which never come back.

use serde::{Deserialize, Serialize};

/// Who a secret is for. A device's own value overrides its configuration's, which
/// overrides a tag's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    Device(String),
    Config(String),
    Tag(String),
}

impl Scope {
    /// (kind, name) as stored.
    pub fn parts(&self) -> (&'static str, &str) {
        match self {
            Scope::Device(d) => ("device", d),
            Scope::Config(c) => ("config", c),
            Scope::Tag(t) => ("tag", t),
        }
    }

    pub fn from_parts(kind: &str, name: &str) -> Option<Scope> {
        Some(match kind {
            "device" => Scope::Device(name.to_owned()),
            "config" => Scope::Config(name.to_owned()),
            "tag" => Scope::Tag(name.to_owned()),
            _ => return None,
        })
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, name) = self.parts();
        write!(f, "{kind} {name}")
    }
}

/// `POST /secrets`: sets (or replaces) a secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct SetSecret {
    pub name: String,
    pub scope: Scope,
    #[serde(default = "root")]
    pub owner: String,
    #[serde(default = "root")]
    pub group: String,
    /// Octal permission bits, e.g. "0400" (the default).
    #[serde(default = "read_only")]
    pub mode: String,
    /// The value, base64 (it may be binary).
    pub value: String,
    /// Deploy the change at once to the devices it reaches (the default); otherwise it
    /// goes with their next deployment.
    #[serde(default = "yes")]
    pub deploy: bool,
}

fn yes() -> bool {
    true
}

/// What setting or removing a secret did.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct SecretChanged {
    pub secret: SecretInfo,
    /// The deployments that carry the change to its devices now (one per commit the
    /// devices run; none for devices that have a deployment under way, which carries
    /// the change, or that were never deployed).
    pub tasks: Vec<i64>,
}

fn root() -> String {
    "root".into()
}

fn read_only() -> String {
    "0400".into()
}

/// `POST /secrets/remove`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct RemoveSecret {
    pub name: String,
    pub scope: Scope,
    #[serde(default = "yes")]
    pub deploy: bool,
}

/// A secret as listed: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct SecretInfo {
    pub name: String,
    pub scope: Scope,
    pub owner: String,
    pub group: String,
    pub mode: String,
    /// When it was last set (unix seconds).
    pub updated: i64,
}
