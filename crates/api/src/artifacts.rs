//! Images and bundles: the tasks that make files to download (`POST /devices/{name}/image`,
//! `POST /bundles`, `/tasks/{id}/artifacts`), and builds.

use serde::{Deserialize, Serialize};

/// An image (`POST /devices/{name}/image`: `commit`, `replace_key`) or a bundle
/// (`POST /bundles`: `device` or `config`, `commit`, `expires_in`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct ArtifactRequest {
    pub commit: Option<String>,
    /// An image for an enrolled device carries a token for a new key, which revokes the
    /// enrolled one: only when asked.
    pub replace_key: bool,
    pub device: Option<String>,
    pub config: Option<String>,
    /// Seconds a bundle may be installed after it is made.
    pub expires_in: Option<u64>,
}

/// A file a task made (`GET /tasks/{id}/artifacts`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Artifact {
    pub name: String,
    pub size: u64,
}

/// `DELETE /tasks/{id}/artifacts`: the task's files are gone from the controller.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ArtifactsDeleted {
    pub task: i64,
    pub deleted: bool,
}

/// `POST /build`: a configuration built (at `commit`, default HEAD) without deploying it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct BuildRequest {
    pub config: String,
    #[serde(default)]
    pub commit: Option<String>,
}
