//! A connection's streams (a device's journal, its terminals): numbered by the
//! controller, routed from the agent's connection to the one client that opened each.
//! Nothing here ever waits: what a client is too slow to take is dropped and counted
//! (the agent's connection must keep reading, or a deployment's acknowledgements would
//! queue behind a log reader), and what the client sends the device goes through a
//! small bounded queue the client waits on.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use thymis_proto::stream::{JournalEntry, MAX_STREAMS};
use tokio::sync::mpsc;

use crate::sync::lock;

/// What reaches a stream's client.
#[derive(Debug)]
pub enum FromDevice {
    Entries(Vec<JournalEntry>),
    Output(Vec<u8>),
    /// This many entries or output chunks were dropped (over the agent's rate, or the
    /// client read too slowly).
    Dropped(u64),
    End {
        exit_status: Option<i32>,
        error: Option<String>,
    },
}

/// How many messages a stream's client may fall behind before the controller drops.
pub(crate) const CLIENT_QUEUE: usize = 256;
/// And how many bytes of them: a device's messages may be large (megabytes of journal
/// entries), so a slow client's queue is bounded in bytes too.
pub(crate) const CLIENT_BYTES: usize = 4 << 20;

#[derive(Debug)]
struct Open {
    tx: mpsc::Sender<FromDevice>,
    /// Dropped since the client last got something.
    dropped: u64,
    /// Bytes queued for the client and not yet taken.
    queued: Arc<AtomicUsize>,
}

/// The bytes a message holds for its client.
pub(crate) fn bytes(m: &FromDevice) -> usize {
    match m {
        FromDevice::Entries(entries) => entries
            .iter()
            .map(|e| {
                e.message.len() + e.unit.as_ref().map_or(0, String::len) + e.identifier.as_ref().map_or(0, String::len)
            })
            .sum(),
        FromDevice::Output(b) => b.len(),
        FromDevice::Dropped(_) | FromDevice::End { .. } => 0,
    }
}

/// A connection's open streams.
#[derive(Debug, Default)]
pub struct Streams {
    next: AtomicU32,
    open: std::sync::Mutex<HashMap<u32, Open>>,
}

impl Streams {
    /// Hands what the device sent to the stream's client, without waiting.
    pub fn route(&self, stream: u32, msg: FromDevice) {
        let mut open = lock(&self.open);
        let Some(o) = open.get_mut(&stream) else { return };
        let end = matches!(msg, FromDevice::End { .. });
        if o.dropped > 0 && o.tx.try_send(FromDevice::Dropped(o.dropped)).is_ok() {
            o.dropped = 0;
        }
        let n = match &msg {
            FromDevice::Entries(e) => e.len() as u64,
            FromDevice::Dropped(n) => *n,
            _ => 1,
        };
        let size = bytes(&msg);
        let fits = end || o.queued.load(Ordering::Relaxed) + size <= CLIENT_BYTES;
        if fits && o.tx.try_send(msg).is_ok() {
            o.queued.fetch_add(size, Ordering::Relaxed);
        } else if !end {
            o.dropped += n;
        }
        if end {
            open.remove(&stream);
        }
    }
}

impl Streams {
    /// A new stream: its number, its client's queue and the bytes queued in it; `None`
    /// when [`MAX_STREAMS`] are open already.
    pub fn add(&self) -> Option<(u32, mpsc::Receiver<FromDevice>, Arc<AtomicUsize>)> {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let mut open = lock(&self.open);
        if open.len() >= MAX_STREAMS {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        open.insert(id, Open { tx, dropped: 0, queued: queued.clone() });
        Some((id, rx, queued))
    }

    /// Forgets a stream; whether it was open.
    pub fn remove(&self, id: u32) -> bool {
        lock(&self.open).remove(&id).is_some()
    }

    /// The connection is gone: every stream ends (its sender dropped, so its client
    /// reads the end and says the device disconnected), rather than waiting for ever.
    pub fn end_all(&self) {
        lock(&self.open).clear();
    }
}
