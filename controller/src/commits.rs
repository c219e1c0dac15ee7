//! What a commit means to a person: its subject, and how many commits the project's
//! HEAD is ahead of it. Cached by (commit, HEAD): a fleet runs a handful of commits, and
//! the devices table asks for each of its rows.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::project::Project;

/// A commit as the devices table and the task page show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub subject: String,
    /// Commits in HEAD's history that are not in this one's (0: it is HEAD, or ahead).
    pub behind: u32,
}

/// The most entries kept before the cache starts over.
const MAX_ENTRIES: usize = 4096;

#[derive(Debug, Default)]
pub struct Commits {
    cache: Mutex<HashMap<(String, String), Option<CommitInfo>>>,
}

impl Commits {
    /// `commit` against `head`; `None` for a commit the project does not have.
    pub fn info(&self, project: &Project, commit: &str, head: &str) -> Option<CommitInfo> {
        let key = (commit.to_owned(), head.to_owned());
        if let Some(v) = self.lock().get(&key) {
            return v.clone();
        }
        let info = match (project.subject(commit), project.commits_between(commit, head)) {
            (Ok(subject), Ok(behind)) => Some(CommitInfo { subject, behind }),
            _ => None,
        };
        let mut cache = self.lock();
        if cache.len() >= MAX_ENTRIES {
            cache.clear();
        }
        cache.insert(key, info.clone());
        info
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Option<CommitInfo>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
