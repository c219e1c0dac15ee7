//! The wire protocol between `thymis-controller` and `thymis-agent` (see
//! `docs/protocol.md`). Pure types and pure functions, no I/O: both sides and the
//! tests share exactly these definitions.
//!
//! A connection is a WebSocket on `/agent/v1`. Text frames carry one JSON [`Message`]
//! each; binary frames carry the zstd-compressed NAR of the path announced by the
//! preceding [`PathStart`](AgentBound::PathStart) or, in the compact copy of protocol 5,
//! [`PathAt`](AgentBound::PathAt). The handshake ([`handshake`]) makes
//! both sides prove their keys before anything else is acted on.

pub mod bounds;
pub mod compact;
pub mod handshake;
pub mod message;
pub mod outcome;
pub mod secrets;
pub mod signed;
pub mod stream;

pub use message::{
    AgentBound, ControllerBound, CopyWindow, DeltaBase, HoldReport, IndexedBase, ProtoError, decode_agent_bound,
    decode_controller_bound, encode,
};
pub use outcome::{AgentState, DeviceResult, Phase, RollbackReason};

/// The name under which a device key signs (and is written: `thymis-device:BASE64`).
pub const DEVICE_KEY_NAME: &str = "thymis-device";

/// Protocol versions this build speaks. A peer whose range does not overlap is refused
/// with a message that says which side to upgrade.
pub const PROTOCOL_MIN: u32 = 1;
pub const PROTOCOL_MAX: u32 = 5;
/// The first protocol with staging and holds ([`AgentBound::Stage`],
/// [`ControllerBound::Held`], [`message::DeviceReport`]'s `hold`).
pub const STAGING_PROTOCOL: u32 = 3;
/// The first protocol in which the controller may ask what the device's binary caches
/// would serve ([`AgentBound::CacheQuery`]).
pub const CACHE_QUERY_PROTOCOL: u32 = 4;
/// The first protocol with the compact copy ([`compact`]): paths by index in the query.
pub const COMPACT_COPY_PROTOCOL: u32 = 5;

/// Largest text (JSON) message accepted, in bytes. A query for a closure of tens of
/// thousands of paths fits.
pub const MAX_TEXT_MESSAGE: usize = 8 << 20;
/// Largest message before the handshake is done: unauthenticated peers get little.
pub const MAX_HANDSHAKE_MESSAGE: usize = 16 << 10;
/// Bytes a peer may send in all before its handshake is done (two messages with their
/// framing, and room for pings): the controller stops reading past it, so nothing
/// larger is ever buffered for an unauthenticated peer.
pub const MAX_HANDSHAKE_BYTES: usize = 3 * MAX_HANDSHAKE_MESSAGE;
/// Largest binary frame (a chunk of compressed NAR).
pub const MAX_BINARY_FRAME: usize = 1 << 20;
/// Size of the NAR chunks a sender puts in one binary frame. Each connection holds a
/// few of them on their way out (queued, framed, encrypted): at a thousand copies at
/// once, 128 KiB kept the controller's peak at 0.6 GB where 256 KiB took 0.96 GB, with
/// no measurable cost in CPU or rate (docs/benchmarks.md).
pub const CHUNK_SIZE: usize = 128 << 10;
