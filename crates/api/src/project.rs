//! The project repository through the API (`/project/...`).

use serde::{Deserialize, Serialize};

/// `GET /project/status`: the work tree against HEAD.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ProjectStatus {
    pub head: String,
    pub dirty: bool,
    pub changes: Vec<FileChange>,
    /// What a commit of these changes is called when no message is given.
    pub default_message: String,
}

/// A changed file of the work tree.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FileChange {
    pub path: String,
    /// `modified`, `new` or `deleted`.
    pub status: String,
}

/// `POST /project/commit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct CommitRequest {
    /// Empty: the default message.
    #[serde(default)]
    pub message: String,
}

/// What `POST /project/commit` made.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Committed {
    pub commit: String,
}
