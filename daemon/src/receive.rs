//! Receiving store paths, as a pipeline whose stages overlap: each NAR streams from the
//! connection through zstd and the strict NAR check into a staging file (the
//! *verifier*), and paths whose signature, hash and size all match are registered by
//! `nix-store --import` in batches, as many as are ready at once (the *importer*), while
//! the next ones arrive. Every stage hands on through a channel and none waits on the
//! connection's writer: acknowledgements go out through the unbounded outbox, whose
//! size the controller's copy window bounds ([`thymis_proto::CopyWindow`]).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

use thymis_proto::compact::{CompactPath, QueryIndex};
use thymis_proto::{ControllerBound, CopyWindow};
use thymis_store::local_store::LocalStore;
use thymis_store::nar::copy_verified;
use thymis_store::signing::verify_path;
use thymis_store::zstd_limits;
use thymis_store::{PathInfo, StorePath};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::agent::Agent;
use crate::liveness::Beating;

/// The window this agent asks for: enough to keep a link busy while a batch imports,
/// small enough for a device's disk (staged NARs). Its bytes are several of a system's
/// large paths: with 16 MiB, each path of 20 MB went alone and the link idled while it
/// was imported (docs/benchmarks.md).
pub const WINDOW: CopyWindow = CopyWindow { paths: 512, bytes: 64 << 20 };

/// At most this many paths, and this many NAR bytes, go through one `nix-store --import`.
const BATCH_PATHS: usize = 256;
const BATCH_NAR_BYTES: u64 = 64 << 20;

/// Where acknowledgements and refusals go: the connection's outbox.
pub type Outbox = mpsc::UnboundedSender<ControllerBound>;

/// What the connection forwards to the receiver, in arrival order.
#[derive(Debug)]
pub enum Incoming {
    /// With `delta_base`, the stream is a delta against that path's NAR. With `index`
    /// (the compact copy), the path is acknowledged by its index in the query.
    Start {
        deployment_id: String,
        info: Box<PathInfo>,
        delta_base: Option<StorePath>,
        index: Option<u32>,
    },
    /// A path announced by a message that could not be read (the compact copy's index
    /// outside its query, a delta against no base the device named): refused, and its
    /// chunks dropped.
    Refused {
        deployment_id: String,
        path: Option<StorePath>,
        error: String,
    },
    Chunk(Vec<u8>),
    End {
        deployment_id: String,
    },
}

/// The compact copy's query on this connection (protocol 5): the paths the controller
/// listed, numbered as in its messages, and the bases the device named for them.
#[derive(Debug)]
pub struct CopyQuery {
    pub deployment_id: String,
    pub query: QueryIndex,
    pub bases: HashMap<u32, StorePath>,
}

impl CopyQuery {
    /// What to receive for a [`thymis_proto::AgentBound::PathAt`].
    pub fn start(&self, c: &CompactPath) -> Incoming {
        let deployment_id = self.deployment_id.clone();
        let info = match self.query.expand(c) {
            Ok(info) => info,
            Err(e) => return Incoming::Refused { deployment_id, path: None, error: e.to_string() },
        };
        let delta_base = match (c.delta, self.bases.get(&c.index)) {
            (false, _) => None,
            (true, Some(base)) => Some(base.clone()),
            (true, None) => {
                let error = "a delta against no base the device named for it".to_owned();
                return Incoming::Refused { deployment_id, path: Some(info.path), error };
            }
        };
        Incoming::Start { deployment_id, info: Box::new(info), delta_base, index: Some(c.index) }
    }
}

/// A path being received.
struct InFlight {
    deployment_id: String,
    info: PathInfo,
    index: Option<u32>,
    chunks: Option<mpsc::Sender<Vec<u8>>>,
    worker: tokio::task::JoinHandle<Result<PathBuf, String>>,
}

/// A verified path waiting to be imported, its NAR in a staging file.
#[derive(Debug)]
struct Staged {
    deployment_id: String,
    info: PathInfo,
    index: Option<u32>,
    nar: PathBuf,
}

/// Processes one connection's incoming paths in order, replying through `out`.
/// Ends when the connection drops; a path cut midway is discarded, never imported,
/// and paths verified but not yet imported are imported still (the next connection
/// then finds them present).
pub async fn receiver(agent: Arc<Agent>, mut rx: mpsc::Receiver<Incoming>, out: Outbox) {
    let (staged_tx, staged_rx) = mpsc::unbounded_channel::<Staged>();
    let importer = tokio::spawn(importer(agent.clone(), staged_rx, out.clone()));
    let mut current: Option<InFlight> = None;
    // After a refused path, its chunks are dropped until its end.
    let mut skipping = false;
    while let Some(msg) = rx.recv().await {
        match msg {
            Incoming::Refused { deployment_id, path, error } => {
                current = None;
                skipping = true;
                refuse(&agent, &out, &deployment_id, path.as_ref(), error);
            }
            Incoming::Start { deployment_id, info, delta_base, index } => {
                if current.is_some() {
                    let e = "a path started before the previous one ended".into();
                    refuse(&agent, &out, &deployment_id, Some(&info.path), e);
                    current = None;
                    skipping = true;
                    continue;
                }
                if agent.current_offer(&deployment_id).is_none() {
                    let e = format!("no accepted offer {deployment_id}");
                    refuse(&agent, &out, &deployment_id, Some(&info.path), e);
                    skipping = true;
                    continue;
                }
                if let Err(e) = verify_path(&info, &agent.nix_keys) {
                    refuse(&agent, &out, &deployment_id, Some(&info.path), e.to_string());
                    skipping = true;
                    continue;
                }
                skipping = false;
                let (tx, chunk_rx) = mpsc::channel::<Vec<u8>>(8);
                let nar = agent.staging_dir().join(format!("{}.nar", info.path.base_name()));
                let (expected, store) = ((*info).clone(), agent.store.clone());
                let worker = tokio::task::spawn_blocking(move || {
                    let compressed = io::BufReader::new(ChannelReader { rx: chunk_rx, buf: Vec::new(), pos: 0 });
                    stage(&store, compressed, delta_base.as_ref(), &expected, &nar).map(|()| nar)
                });
                current = Some(InFlight { deployment_id, info: *info, index, chunks: Some(tx), worker });
            }
            Incoming::Chunk(bytes) => {
                if let Some(c) = current.as_mut().and_then(|c| c.chunks.as_ref()) {
                    // A worker that already failed has dropped its receiver; its error
                    // surfaces at the end of the path.
                    let _ = c.send(bytes).await;
                } else if !skipping {
                    warn!("binary frame outside of a path; ignored");
                }
            }
            Incoming::End { deployment_id } => {
                let Some(mut c) = current.take() else {
                    skipping = false;
                    continue;
                };
                if c.deployment_id != deployment_id {
                    warn!("path end for another deployment");
                }
                c.chunks = None; // end of stream for the worker
                match c.worker.await.unwrap_or_else(|e| Err(e.to_string())) {
                    Ok(nar) => {
                        let staged = Staged { deployment_id: c.deployment_id, info: c.info, index: c.index, nar };
                        let _ = staged_tx.send(staged);
                    }
                    Err(e) => refuse(&agent, &out, &c.deployment_id, Some(&c.info.path), e),
                }
            }
        }
    }
    // The connection is gone: what is verified still goes in (nothing is sent twice).
    drop(staged_tx);
    let _ = importer.await;
}

/// Decompresses (against the delta base, if any) and checks one NAR into `nar`.
fn stage(
    store: &LocalStore,
    compressed: impl io::BufRead,
    delta_base: Option<&StorePath>,
    expected: &PathInfo,
    nar: &std::path::Path,
) -> Result<(), String> {
    let result = (|| {
        // The base's NAR, from this store: what the delta refers to.
        let base_nar = match delta_base {
            Some(base) => Some(base_nar(store, base)?),
            None => None,
        };
        let decoder = match &base_nar {
            Some(b) => zstd_limits::delta_decoder(compressed, b),
            None => zstd_limits::decoder(compressed),
        }
        .map_err(|e| e.to_string())?;
        let file = std::fs::File::create(nar).map_err(|e| format!("staging file {}: {e}", nar.display()))?;
        let mut w = io::BufWriter::new(file);
        copy_verified(decoder, &mut w, &expected.nar_hash, expected.nar_size).map_err(|e| error_chain(&e))?;
        io::Write::flush(&mut w).map_err(|e| format!("staging file {}: {e}", nar.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(nar);
    }
    result
}

/// Imports staged paths, everything ready at once (up to a batch), and acknowledges
/// each path as the batch that held it is registered.
async fn importer(agent: Arc<Agent>, mut rx: mpsc::UnboundedReceiver<Staged>, out: Outbox) {
    let mut ready: VecDeque<Staged> = VecDeque::new();
    loop {
        if ready.is_empty() {
            match rx.recv().await {
                Some(s) => ready.push_back(s),
                None => return,
            }
        }
        while let Ok(s) = rx.try_recv() {
            ready.push_back(s);
        }
        let mut batch = Vec::new();
        let mut nar_bytes = 0;
        while let Some(s) = ready.front() {
            if !batch.is_empty() && (batch.len() >= BATCH_PATHS || nar_bytes + s.info.nar_size > BATCH_NAR_BYTES) {
                break;
            }
            nar_bytes += s.info.nar_size;
            batch.extend(ready.pop_front());
        }
        let a = agent.clone();
        let Ok(results) = tokio::task::spawn_blocking(move || {
            let _watched = a.liveness.importing();
            import_batch(&a, batch)
        })
        .await
        else {
            return; // the runtime is shutting down
        };
        debug!(paths = results.len(), nar_bytes, "imported a batch");
        // The compact copy's paths are acknowledged together, by index.
        let mut imported: Vec<(String, Vec<u32>)> = Vec::new();
        for (s, result) in results {
            let _ = std::fs::remove_file(&s.nar);
            match (result, s.index) {
                (Ok(()), Some(i)) => match imported.last_mut() {
                    Some((id, indexes)) if *id == s.deployment_id => indexes.push(i),
                    _ => imported.push((s.deployment_id, vec![i])),
                },
                (Ok(()), None) => {
                    let _ =
                        out.send(ControllerBound::PathImported { deployment_id: s.deployment_id, path: s.info.path });
                }
                (Err(e), _) => refuse(&agent, &out, &s.deployment_id, Some(&s.info.path), e),
            }
        }
        for (deployment_id, paths) in imported {
            let _ = out.send(ControllerBound::PathsImported { deployment_id, paths });
        }
    }
}

/// One `nix-store --import` for the whole batch; when that fails, each path alone (in
/// order, dependencies first), so the bad one is named and the others still go in.
fn import_batch(agent: &Agent, batch: Vec<Staged>) -> Vec<(Staged, Result<(), String>)> {
    match import(agent, &batch) {
        Ok(()) => batch.into_iter().map(|s| (s, Ok(()))).collect(),
        Err(e) if batch.len() == 1 => batch.into_iter().map(|s| (s, Err(e.clone()))).collect(),
        Err(e) => {
            warn!(paths = batch.len(), "importing a batch failed ({e}); importing its paths one by one");
            batch
                .into_iter()
                .map(|s| {
                    let r = import(agent, std::slice::from_ref(&s));
                    (s, r)
                })
                .collect()
        }
    }
}

/// One `nix-store --import` of staged paths, in order; every read is progress for the
/// watchdog ([`crate::liveness`]): a `nix-store` that stops taking data stops it.
fn import(agent: &Agent, batch: &[Staged]) -> Result<(), String> {
    let mut files = Vec::with_capacity(batch.len());
    for s in batch {
        let f = std::fs::File::open(&s.nar).map_err(|e| format!("staged NAR {}: {e}", s.nar.display()))?;
        let beating = Beating { inner: io::BufReader::new(f), liveness: &agent.liveness };
        files.push((&s.info, Box::new(beating) as Box<dyn Read>));
    }
    agent.store.import(files).map_err(|e| error_chain(&e))
}

/// The NAR of a delta's base, in memory (at most [`zstd_limits::DELTA_BASE_MAX`] bytes).
fn base_nar(store: &LocalStore, base: &StorePath) -> Result<Vec<u8>, String> {
    let mut nar = Capped { buf: Vec::new(), max: zstd_limits::DELTA_BASE_MAX as usize };
    store.dump(base, &mut nar).map_err(|e| format!("reading the delta base {base}: {}", error_chain(&e)))?;
    Ok(nar.buf)
}

/// A Vec that refuses to grow past `max`.
struct Capped {
    buf: Vec<u8>,
    max: usize,
}

impl io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > self.max {
            return Err(io::Error::other("larger than a delta base may be"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Refuses a path (or, when the message did not say which, the copy): the deployment
/// is aborted on the device.
fn refuse(agent: &Agent, out: &Outbox, id: &str, path: Option<&StorePath>, error: String) {
    let Some(path) = path else {
        warn!(deployment = %id, %error, "path refused");
        let _ = out.send(ControllerBound::Error { message: format!("path refused: {error}") });
        agent.abort_offer(id, Some(error));
        return;
    };
    warn!(deployment = %id, %path, %error, "path refused");
    let _ = out.send(ControllerBound::PathRefused {
        deployment_id: id.to_owned(),
        path: path.clone(),
        error: error.clone(),
    });
    agent.abort_offer(id, Some(format!("{path}: {error}")));
}

/// The message of an error and its causes, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Blocking reader over chunks from an async channel; EOF when the sender is gone.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
