//! One authenticated agent connection as the rest of the controller uses it: its
//! queues (control messages, the copy stream, stream messages), the replies routed to
//! whoever waits for them, and the journal and terminal streams clients open on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use thymis_proto::stream::{MAX_STREAMS, STREAMS_PROTOCOL};
use thymis_proto::{AgentBound, ControllerBound};
use tokio::sync::mpsc;

use crate::streams::{FromDevice, Streams, bytes};
use crate::sync::lock;

/// What goes on a connection's copy stream: a path's start, its NAR chunks, its end.
#[derive(Debug)]
pub enum Out {
    Msg(AgentBound),
    Bin(Vec<u8>),
}

/// A copy stream's queue holds this many frames: one waits while the writer sends
/// another, and the socket's own buffer keeps the link busy. Each frame held is up to
/// a 128 KiB chunk per connection: at a thousand copies at once, every one counts.
pub const COPY_QUEUE: usize = 1;

/// One authenticated agent connection. Its writer sends control messages first, then
/// the copy stream: control messages never wait behind NAR chunks.
#[derive(Debug)]
pub struct Conn {
    pub device: String,
    pub session: String,
    /// Control messages: few, small, and bounded by the protocol (requests, replies,
    /// one heartbeat a tick), so the queue has no bound and nobody waits on it.
    control: mpsc::UnboundedSender<AgentBound>,
    /// The copy stream, in order (see [`COPY_QUEUE`]).
    pub data: mpsc::Sender<Out>,
    /// Journal and terminal messages to the device (terminal input): bounded, and sent
    /// in turn with the copy stream, so neither waits behind the other.
    pub stream_out: mpsc::Sender<AgentBound>,
    /// The protocol version the handshake settled on.
    pub protocol: u32,
    /// Its open journal and terminal streams.
    pub streams: Streams,
    /// Replies routed to the deployment runner waiting for them, by deployment id.
    waiters: Mutex<HashMap<String, mpsc::UnboundedSender<ControllerBound>>>,
    /// Ends the connection (device revoked, or replaced by a newer connection).
    pub kicked: tokio::sync::Notify,
    /// When "last seen" was last written for this connection.
    pub last_touch: Mutex<std::time::Instant>,
    /// `Error` messages it sent (only the first few are logged).
    pub errors_logged: std::sync::atomic::AtomicU32,
}

impl Conn {
    pub fn new(
        device: String,
        session: String,
        protocol: u32,
        control: mpsc::UnboundedSender<AgentBound>,
        data: mpsc::Sender<Out>,
        stream_out: mpsc::Sender<AgentBound>,
    ) -> Self {
        Conn {
            device,
            session,
            control,
            data,
            stream_out,
            protocol,
            streams: Default::default(),
            waiters: Mutex::new(HashMap::new()),
            kicked: tokio::sync::Notify::new(),
            last_touch: Mutex::new(std::time::Instant::now()),
            errors_logged: Default::default(),
        }
    }

    /// Receives this connection's replies about `deployment_id` until dropped; the
    /// channel closes when the connection ends.
    pub fn subscribe(&self, deployment_id: &str) -> mpsc::UnboundedReceiver<ControllerBound> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.waiters).insert(deployment_id.to_owned(), tx);
        rx
    }

    /// Stops routing replies about `id` (a waiter that is done).
    pub fn unsubscribe(&self, id: &str) {
        lock(&self.waiters).remove(id);
    }

    /// Hands a reply to its waiter; false when nobody waits for it.
    pub fn route(&self, deployment_id: &str, msg: ControllerBound) -> bool {
        lock(&self.waiters).get(deployment_id).is_some_and(|tx| tx.send(msg).is_ok())
    }

    /// Closes every waiter and ends the connection.
    pub fn close(&self) {
        lock(&self.waiters).clear();
        self.kicked.notify_one();
    }

    /// Queues a control message; false when the connection is gone.
    pub async fn send(&self, m: AgentBound) -> bool {
        self.send_control(m)
    }

    /// [`Conn::send`] where there is no `async`.
    pub fn send_control(&self, m: AgentBound) -> bool {
        self.control.send(m).is_ok()
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
        let Some((id, rx, queued)) = conn.streams.add() else {
            return Err(format!("{} has {MAX_STREAMS} streams open already; close one", conn.device));
        };
        if !conn.send_control(open(id)) {
            conn.streams.remove(id);
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
        if self.conn.streams.remove(self.id) {
            self.conn.send_control(AgentBound::StreamClose { stream: self.id });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::{CLIENT_BYTES, CLIENT_QUEUE};
    use thymis_proto::stream::JournalEntry;

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
