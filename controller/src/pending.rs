//! What the engine has pending in this process, in memory only (a restart loses
//! nothing the database does not hold): recounts soon due, and the waves released to
//! the staged rollouts whose runs are here. It lives below the engine so that the
//! controller's shared state can hold it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio::sync::mpsc;

#[derive(Debug, Default)]
pub struct Pending {
    /// Tasks whose state will be recomputed shortly.
    pub(crate) recounts: Mutex<HashSet<i64>>,
    /// The staged rollouts whose runs are in this process.
    pub(crate) waves: Mutex<HashMap<i64, Run>>,
}

/// A staged rollout's run: where its released waves go, and the last one sent.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) tx: mpsc::UnboundedSender<usize>,
    pub(crate) last: Option<usize>,
}
