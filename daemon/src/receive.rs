//! Receiving store paths: each NAR streams from the connection through zstd and the
//! strict NAR check into a private staging file, and only a path whose signature,
//! hash and size all match is handed to `nix-store --import`.

use std::io::{self, Read};
use std::sync::Arc;

use thymis_proto::ControllerBound;
use thymis_store::local_store::LocalStore;
use thymis_store::nar::copy_verified;
use thymis_store::signing::verify_path;
use thymis_store::zstd_limits;
use thymis_store::{PathInfo, StorePath};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::agent::Agent;

/// What the connection forwards to the receiver, in arrival order.
#[derive(Debug)]
pub enum Incoming {
    /// With `delta_base`, the stream is a delta against that path's NAR.
    Start {
        deployment_id: String,
        info: Box<PathInfo>,
        delta_base: Option<StorePath>,
    },
    Chunk(Vec<u8>),
    End {
        deployment_id: String,
    },
}

/// A path being received.
struct InFlight {
    deployment_id: String,
    info: PathInfo,
    chunks: Option<mpsc::Sender<Vec<u8>>>,
    worker: tokio::task::JoinHandle<Result<std::fs::File, String>>,
}

/// Processes one connection's incoming paths in order, replying through `out`.
/// Ends when the connection drops; a path cut midway is discarded, never imported.
pub async fn receiver(agent: Arc<Agent>, mut rx: mpsc::Receiver<Incoming>, out: mpsc::Sender<ControllerBound>) {
    let mut current: Option<InFlight> = None;
    // After a refused path, its chunks are dropped until its end.
    let mut skipping = false;
    while let Some(msg) = rx.recv().await {
        match msg {
            Incoming::Start { deployment_id, info, delta_base } => {
                if current.is_some() {
                    refuse(&agent, &out, &deployment_id, &info, "a path started before the previous one ended".into())
                        .await;
                    current = None;
                    skipping = true;
                    continue;
                }
                if agent.current_offer(&deployment_id).is_none() {
                    let e = format!("no accepted offer {deployment_id}");
                    refuse(&agent, &out, &deployment_id, &info, e).await;
                    skipping = true;
                    continue;
                }
                if let Err(e) = verify_path(&info, &agent.nix_keys) {
                    refuse(&agent, &out, &deployment_id, &info, e.to_string()).await;
                    skipping = true;
                    continue;
                }
                skipping = false;
                let (tx, chunk_rx) = mpsc::channel::<Vec<u8>>(16);
                let (staging, expected, store) = (agent.staging_dir(), (*info).clone(), agent.store.clone());
                let worker = tokio::task::spawn_blocking(move || {
                    let mut file = tempfile::tempfile_in(&staging).map_err(|e| format!("staging file: {e}"))?;
                    let compressed = io::BufReader::new(ChannelReader { rx: chunk_rx, buf: Vec::new(), pos: 0 });
                    // The base's NAR, from this store: what the delta refers to.
                    let base_nar = match &delta_base {
                        Some(base) => Some(base_nar(&store, base)?),
                        None => None,
                    };
                    let decoder = match &base_nar {
                        Some(nar) => zstd_limits::delta_decoder(compressed, nar),
                        None => zstd_limits::decoder(compressed),
                    }
                    .map_err(|e| e.to_string())?;
                    let mut w = io::BufWriter::new(&mut file);
                    copy_verified(decoder, &mut w, &expected.nar_hash, expected.nar_size)
                        .map_err(|e| error_chain(&e))?;
                    drop(w);
                    use std::io::Seek;
                    file.rewind().map_err(|e| e.to_string())?;
                    Ok(file)
                });
                current = Some(InFlight { deployment_id, info: *info, chunks: Some(tx), worker });
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
                let staged = match c.worker.await {
                    Ok(r) => r,
                    Err(e) => Err(e.to_string()),
                };
                let result = match staged {
                    Ok(file) => {
                        let (store, info) = (agent.store.clone(), c.info.clone());
                        tokio::task::spawn_blocking(move || {
                            store.import([(&info, Box::new(file) as Box<dyn Read>)]).map_err(|e| error_chain(&e))
                        })
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()))
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => {
                        debug!(path = %c.info.path, "imported");
                        let _ = out
                            .send(ControllerBound::PathImported { deployment_id: c.deployment_id, path: c.info.path })
                            .await;
                    }
                    Err(e) => refuse(&agent, &out, &c.deployment_id, &c.info, e).await,
                }
            }
        }
    }
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

async fn refuse(agent: &Agent, out: &mpsc::Sender<ControllerBound>, id: &str, info: &PathInfo, error: String) {
    warn!(deployment = %id, path = %info.path, %error, "path refused");
    let _ = out
        .send(ControllerBound::PathRefused {
            deployment_id: id.to_owned(),
            path: info.path.clone(),
            error: error.clone(),
        })
        .await;
    agent.abort_offer(id, Some(format!("{}: {error}", info.path)));
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
