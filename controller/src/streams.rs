//! A connection's streams (a device's journal, its terminals): numbered by the
//! controller, routed from the agent's connection to the one client that opened each.
//! Nothing here ever waits: what a client is too slow to take is dropped and counted
//! (the agent's connection must keep reading, or a deployment's acknowledgements would
//! queue behind a log reader), and what the client sends the device goes through a
//! small bounded queue the client waits on.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use thymis_proto::AgentBound;
use thymis_proto::stream::{JournalEntry, MAX_STREAMS, STREAMS_PROTOCOL};
use tokio::sync::mpsc;

use crate::controller::Conn;
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
const CLIENT_QUEUE: usize = 256;
/// And how many bytes of them: a device's messages may be large (megabytes of journal
/// entries), so a slow client's queue is bounded in bytes too.
const CLIENT_BYTES: usize = 4 << 20;

#[derive(Debug)]
struct Open {
    tx: mpsc::Sender<FromDevice>,
    /// Dropped since the client last got something.
    dropped: u64,
    /// Bytes queued for the client and not yet taken.
    queued: Arc<AtomicUsize>,
}

/// The bytes a message holds for its client.
fn bytes(m: &FromDevice) -> usize {
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
    /// The connection is gone: every stream ends (its sender dropped, so its client
    /// reads the end and says the device disconnected), rather than waiting for ever.
    pub fn end_all(&self) {
        lock(&self.open).clear();
    }
}

/// A client's end of one stream. Dropping it (the client left) closes the stream on
/// the device.
#[derive(Debug)]
pub struct Stream {
    conn: Arc<Conn>,
    pub id: u32,
    rx: mpsc::Receiver<FromDevice>,
    queued: Arc<AtomicUsize>,
}

impl Stream {
    /// Opens a stream on `conn` with the message `open(id)` makes.
    pub fn open(conn: &Arc<Conn>, open: impl FnOnce(u32) -> AgentBound) -> Result<Stream, String> {
        if conn.protocol < STREAMS_PROTOCOL {
            return Err(format!(
                "the agent on {} speaks protocol {}, which has no journal or terminal: upgrade it",
                conn.device, conn.protocol
            ));
        }
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let id = {
            let mut streams = lock(&conn.streams.open);
            if streams.len() >= MAX_STREAMS {
                return Err(format!("{} has {MAX_STREAMS} streams open already; close one", conn.device));
            }
            let id = conn.streams.next.fetch_add(1, Ordering::Relaxed);
            streams.insert(id, Open { tx, dropped: 0, queued: queued.clone() });
            id
        };
        if !conn.send_control(open(id)) {
            lock(&conn.streams.open).remove(&id);
            return Err(format!("{} disconnected", conn.device));
        }
        Ok(Stream { conn: conn.clone(), id, rx, queued })
    }

    /// The next message from the device; `None` once the stream or its connection ended.
    pub async fn recv(&mut self) -> Option<FromDevice> {
        let m = self.rx.recv().await;
        self.took(m.as_ref());
        m
    }

    /// [`Self::recv`] without waiting.
    pub fn try_recv(&mut self) -> Result<FromDevice, mpsc::error::TryRecvError> {
        let m = self.rx.try_recv();
        self.took(m.as_ref().ok());
        m
    }

    fn took(&self, m: Option<&FromDevice>) {
        if let Some(m) = m {
            self.queued.fetch_sub(bytes(m), Ordering::Relaxed);
        }
    }

    /// Sends the device a message of this stream, waiting while the connection's stream
    /// queue is full (terminal input: the client slows down, nothing is lost). False
    /// when the connection is gone.
    pub async fn send(&self, m: AgentBound) -> bool {
        self.conn.stream_out.send(m).await.is_ok()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if lock(&self.conn.streams.open).remove(&self.id).is_some() {
            self.conn.send_control(AgentBound::StreamClose { stream: self.id });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(protocol: u32) -> (Arc<Conn>, mpsc::UnboundedReceiver<AgentBound>) {
        let (control, rx) = mpsc::unbounded_channel();
        let (data, _) = mpsc::channel(1);
        let (streams, _) = mpsc::channel(1);
        (Arc::new(Conn::new("d1".into(), "s".into(), protocol, control, data, streams)), rx)
    }

    fn entry(n: u64) -> JournalEntry {
        JournalEntry { time_us: n, unit: None, priority: None, identifier: None, message: format!("line {n}") }
    }

    #[test]
    fn a_slow_client_loses_counted_entries_and_never_holds_up_the_connection() {
        let (conn, mut control) = conn(STREAMS_PROTOCOL);
        let mut stream =
            Stream::open(&conn, |stream| AgentBound::JournalOpen { stream, query: Default::default() }).expect("open");
        assert!(matches!(control.try_recv(), Ok(AgentBound::JournalOpen { .. })));
        // Routing returns at once, whatever the client reads.
        for n in 0..(CLIENT_QUEUE as u64 + 10) {
            conn.streams.route(stream.id, FromDevice::Entries(vec![entry(n)]));
        }
        let mut got = 0;
        while let Ok(FromDevice::Entries(e)) = stream.try_recv() {
            got += e.len();
        }
        assert_eq!(got, CLIENT_QUEUE);
        conn.streams.route(stream.id, FromDevice::Entries(vec![entry(0)]));
        assert!(matches!(stream.try_recv(), Ok(FromDevice::Dropped(10))), "the client is told what it lost");
        assert!(matches!(stream.try_recv(), Ok(FromDevice::Entries(_))));

        // Another device's connection reaches none of this one's streams.
        let (other, _) = self::conn(STREAMS_PROTOCOL);
        other.streams.route(stream.id, FromDevice::Output(b"not yours".to_vec()));
        assert!(stream.try_recv().is_err());

        // The client leaves: the device is told to stop.
        let id = stream.id;
        drop(stream);
        assert!(matches!(control.try_recv(), Ok(AgentBound::StreamClose { stream }) if stream == id));

        // The connection ends: every stream's client learns it, instead of waiting for ever.
        let mut left = Stream::open(&conn, |stream| AgentBound::StreamClose { stream }).expect("open");
        conn.streams.route(left.id, FromDevice::Output(b"last".to_vec()));
        conn.streams.end_all();
        assert!(matches!(left.try_recv(), Ok(FromDevice::Output(_))), "what came first is still read");
        assert!(matches!(left.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)));
    }

    #[test]
    fn a_slow_clients_queue_is_bounded_in_bytes() {
        let (conn, _control) = conn(STREAMS_PROTOCOL);
        let mut stream = Stream::open(&conn, |stream| AgentBound::StreamClose { stream }).expect("open");
        let big = |n| JournalEntry { message: "x".repeat(1 << 20), ..entry(n) };
        for n in 0..100 {
            conn.streams.route(stream.id, FromDevice::Entries(vec![big(n)]));
        }
        let (mut got, mut dropped) = (0, 0);
        while let Ok(m) = stream.try_recv() {
            match m {
                FromDevice::Entries(e) => got += e.len(),
                FromDevice::Dropped(n) => dropped += n,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, CLIENT_BYTES >> 20, "at most CLIENT_BYTES queued for a client that does not read");
        // What the client took is room again; it is told what it lost (the last count
        // goes with the next message).
        conn.streams.route(stream.id, FromDevice::Entries(vec![big(0)]));
        if let Ok(FromDevice::Dropped(n)) = stream.try_recv() {
            dropped += n;
        }
        assert_eq!(dropped, 96, "the client is told what it lost");
        assert!(matches!(stream.try_recv(), Ok(FromDevice::Entries(_))));
    }

    #[test]
    fn streams_need_protocol_2_and_are_bounded_per_connection() {
        let (old, _) = conn(1);
        let err = Stream::open(&old, |stream| AgentBound::StreamClose { stream }).expect_err("protocol 1");
        assert!(err.contains("protocol 1"), "{err}");
        let (conn, _control) = conn(STREAMS_PROTOCOL);
        let open: Vec<_> = (0..MAX_STREAMS)
            .map(|_| Stream::open(&conn, |stream| AgentBound::StreamClose { stream }).expect("open"))
            .collect();
        let err = Stream::open(&conn, |stream| AgentBound::StreamClose { stream }).expect_err("one too many");
        assert!(err.contains("streams open already"), "{err}");
        drop(open);
        assert!(Stream::open(&conn, |stream| AgentBound::StreamClose { stream }).is_ok());
    }
}
