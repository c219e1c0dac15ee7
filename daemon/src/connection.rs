//! The agent's connection to the controller: connect out, authenticate both ways,
//! report, then serve the controller's requests; reconnect with backoff and jitter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use thymis_proto::compact::QueryIndex;
use thymis_proto::handshake::{AgentHandshake, Nonce};
use thymis_proto::{
    AgentBound, COMPACT_COPY_PROTOCOL, ControllerBound, DeltaBase, IndexedBase, decode_agent_bound, encode,
};
use thymis_store::StorePath;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{debug, info, warn};

use crate::agent::{Agent, LogSink};
use crate::receive::{CopyQuery, Incoming, Outbox, receiver};
use crate::streams::Streams;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How a session ended without an error.
enum End {
    /// The agent asked for a fresh connection (after activation).
    Reconnect,
    /// The controller closed the connection.
    Closed,
}

/// Keeps a connection up for as long as the agent runs.
pub async fn run_forever(agent: Arc<Agent>) {
    let min = Duration::from_secs_f64(agent.config.reconnect_min.max(0.05));
    let max = Duration::from_secs_f64(agent.config.reconnect_max.max(agent.config.reconnect_min));
    let mut backoff = min;
    // The receiver of the last connection, which may still be importing.
    let mut previous = None;
    loop {
        agent.liveness.beat();
        let started = Instant::now();
        let ended = session(&agent, &mut previous).await;
        agent.set_connected(false);
        match ended {
            Ok(End::Reconnect) => {
                backoff = min;
                continue;
            }
            Ok(End::Closed) => info!("controller closed the connection"),
            Err(e) => warn!("connection to the controller: {e:#}"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = min;
        }
        agent.liveness.idle(jitter(backoff)).await;
        backoff = (backoff * 2).min(max);
    }
}

/// Between half and all of `d`, so a fleet that lost its controller does not return
/// all at once.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let f = 0.5 + f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 2.0;
    d.mul_f64(f)
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(thymis_proto::MAX_TEXT_MESSAGE.max(thymis_proto::MAX_BINARY_FRAME)))
        .max_frame_size(Some(thymis_proto::MAX_TEXT_MESSAGE.max(thymis_proto::MAX_BINARY_FRAME)))
}

async fn send(ws: &mut Ws, msg: &ControllerBound) -> Result<()> {
    // A silently dropped link stalls writes; never wait on one for long.
    match tokio::time::timeout(Duration::from_secs(30), ws.send(Message::text(encode(msg)))).await {
        Ok(r) => r.context("sending to the controller"),
        Err(_) => bail!("sending to the controller stalled: connection declared dead"),
    }
}

/// Reads the next control message, skipping pings.
async fn recv(ws: &mut Ws, authenticated: bool) -> Result<AgentBound> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(decode_agent_bound(t.as_str(), authenticated)?),
            Some(Ok(Message::Close(_))) | None => bail!("connection closed"),
            Some(Ok(Message::Binary(_))) => bail!("unexpected binary frame during the handshake"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e).context("reading from the controller"),
        }
    }
}

/// What the handshake established.
struct Established {
    /// The protocol version the controller chose.
    protocol: u32,
    session: String,
    heartbeat: Duration,
    dead_after: Duration,
}

/// The handshake: both sides prove their keys (the steps and checks are
/// [`AgentHandshake`]'s; here the socket and what the agent keeps of the welcome).
async fn handshake(agent: &Agent, ws: &mut Ws) -> Result<Established> {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).map_err(|e| anyhow!("random nonce: {e}"))?;
    // The token never crosses the wire: a proof bound to this connection and this key.
    let token = if agent.persisted().enrolled { None } else { agent.config.enrollment_token()? };
    let mut h = AgentHandshake::new(&agent.device_key, &agent.identity_keys, token, Nonce(nonce));
    send(ws, &h.hello(env!("CARGO_PKG_VERSION"))).await?;
    let auth = h.on_challenge(recv(ws, false).await?)?;
    send(ws, &auth).await?;
    let w = h.on_welcome(recv(ws, false).await?)?;
    // The name and configuration it gives are what offers are checked against.
    agent.welcomed(&w.device, &w.config, w.time)?;
    info!(device = %w.device, config = %w.config, session = %w.session, "connected to the controller");
    Ok(Established {
        protocol: w.protocol,
        session: w.session,
        heartbeat: Duration::from_secs(w.heartbeat_secs.max(1)),
        dead_after: Duration::from_secs(w.dead_after_secs.max(2)),
    })
}

async fn session(agent: &Arc<Agent>, previous: &mut Option<tokio::task::JoinHandle<()>>) -> Result<End> {
    let timeout = Duration::from_secs(agent.config.connect_timeout.max(1));
    let url = agent.config.controller_url.clone();
    let connector = if url.starts_with("wss://") {
        Some(tokio_tungstenite::Connector::Rustls(Arc::new(crate::tls::client_config(&agent.config)?)))
    } else {
        None
    };
    let (mut ws, _) = tokio::time::timeout(
        timeout,
        tokio_tungstenite::connect_async_tls_with_config(url.as_str(), Some(ws_config()), true, connector),
    )
    .await
    .map_err(|_| anyhow!("connecting to {url} timed out"))?
    .with_context(|| format!("connecting to {url}"))?;
    let Established { protocol, session, heartbeat, dead_after } =
        tokio::time::timeout(timeout, handshake(agent, &mut ws))
            .await
            .map_err(|_| anyhow!("handshake with {url} timed out"))??;
    agent.liveness.beat();
    // The last connection's receiver imports what it had verified before this one asks
    // what is missing: those paths are not sent again.
    if let Some(mut old) = previous.take()
        && tokio::time::timeout(dead_after, &mut old).await.is_err()
    {
        warn!("the previous connection's imports did not finish; abandoning them");
        old.abort();
    }
    agent.set_connected(true);

    // The writer owns the socket's sending half: nothing that reads ever waits on it.
    // Control messages are few and bounded (replies to requests; one acknowledgement
    // per path, bounded by the copy window; a heartbeat per tick), so their queue has
    // no bound; log lines are dropped when theirs is full.
    let (sink, mut stream) = ws.split();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<ControllerBound>();
    let (log_tx, log_rx) = mpsc::channel::<ControllerBound>(256);
    // Journal entries and terminal output wait for room here: the writer serves this
    // queue in turn with the log lines, after control messages.
    let (stream_tx, stream_rx) = mpsc::channel::<ControllerBound>(16);
    // Control messages first, then log lines and the streams' messages in turn.
    let queues = thymis_ws::Queues { control: out_rx, first: log_rx, second: stream_rx };
    let mut writer = AbortOnDrop(tokio::spawn(thymis_ws::write_loop(sink, queues, dead_after, |next| {
        let (thymis_ws::Next::Control(m) | thymis_ws::Next::First(m) | thymis_ws::Next::Second(m)) = next;
        Message::text(encode(&m))
    })));
    let idle = Duration::from_secs(agent.config.terminal_idle_timeout.max(1));
    let mut streams = Streams::new(out_tx.clone(), stream_tx, agent.config.terminal, idle);
    // Chunks wait for the verifier (CPU-bound, never on the writer): a small bounded queue.
    let (in_tx, in_rx) = mpsc::channel::<Incoming>(16);
    // The compact copy's query (protocol 5), set when its answer goes out.
    let copy = Arc::new(std::sync::Mutex::new(None::<CopyQuery>));
    *previous = Some(tokio::spawn(receiver(agent.clone(), in_rx, out_tx.clone())));

    let _ = out_tx.send(ControllerBound::Report(agent.report()));
    send_outbox(agent, &out_tx);

    let on_log = LogSink(Arc::new(move |id: &str, line: String| {
        let _ = log_tx.try_send(ControllerBound::Log { deployment_id: id.to_owned(), line });
    }));
    agent.set_log_sink(Some(on_log));
    let _clear_sink = ClearSink(agent.clone());

    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut seq = 0u64;
    loop {
        agent.liveness.beat();
        tokio::select! {
            frame = stream.next() => {
                last_heard = Instant::now();
                let msg = match frame {
                    Some(Ok(Message::Text(t))) => decode_agent_bound(t.as_str(), true)?,
                    Some(Ok(Message::Binary(b))) => {
                        in_tx.send(Incoming::Chunk(b.into())).await.map_err(|_| anyhow!("receiver stopped"))?;
                        continue;
                    }
                    Some(Ok(Message::Close(_))) | None => return Ok(End::Closed),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e).context("reading from the controller"),
                };
                if !streams.handle(&msg) {
                    let link = Link { session: &session, protocol, out: &out_tx, incoming: &in_tx, copy: &copy };
                    handle(agent, &link, msg).await?;
                }
            }
            ended = &mut writer.0 => {
                return match ended {
                    Ok(Ok(())) => Ok(End::Closed),
                    Ok(Err(e)) => Err(anyhow::Error::new(e).context("sending to the controller")),
                    Err(e) => Err(anyhow!("connection writer: {e}")),
                };
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > dead_after {
                    bail!("no word from the controller for {:?}: connection declared dead", last_heard.elapsed());
                }
                seq += 1;
                let _ = out_tx.send(ControllerBound::Heartbeat { seq });
            }
            () = agent.outbox_changed.notified() => {
                // A deployment ended: what the device runs now and its state (idle) go
                // with its outcome, so the device page is not left on "awaiting".
                let _ = out_tx.send(ControllerBound::Report(agent.report()));
                send_outbox(agent, &out_tx);
            }
            () = agent.reconnect.notified() => {
                // Let queued messages (state, outcome) out before closing: the writer
                // sends what is queued, then closes, once every sender is gone.
                agent.set_log_sink(None);
                drop(streams);
                drop(in_tx);
                drop(out_tx);
                let _ = tokio::time::timeout(dead_after, &mut writer.0).await;
                return Ok(End::Reconnect);
            }
        }
    }
}

/// Stops sending log lines to a connection that has ended.
struct ClearSink(Arc<Agent>);

impl Drop for ClearSink {
    fn drop(&mut self) {
        self.0.set_log_sink(None);
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the device lacks of `paths`, after taking what its binary caches have; with
/// the missing paths, earlier versions of them that the device has (those it runs first):
/// the controller may send deltas against them.
async fn query_paths(
    agent: &Arc<Agent>,
    deployment_id: String,
    paths: Vec<StorePath>,
    out: &Outbox,
    copy: Option<&SharedCopy>,
) -> ControllerBound {
    let missing = |paths: Vec<StorePath>| {
        let (store, running) = (agent.store.clone(), agent.running());
        tokio::task::spawn_blocking(move || store.missing_with_bases(&paths, running.as_ref()))
    };
    let (mut missing_now, mut bases) = match missing(paths.clone()).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return ControllerBound::Error { message: format!("checking the store: {e}") },
        Err(e) => return ControllerBound::Error { message: format!("checking the store: {e}") },
    };
    let mut got = crate::substitute::Substituted::default();
    if !agent.config.substituters.is_empty() && !missing_now.is_empty() {
        // Progress every two seconds while bytes arrive, so the controller knows the
        // device is at work (it waits from the last real progress, not the last message).
        let progress = Arc::new(std::sync::Mutex::new(crate::substitute::Substituted::default()));
        let ticker = {
            let (progress, out, id) = (progress.clone(), out.clone(), deployment_id.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                let mut sent = None;
                loop {
                    tick.tick().await;
                    let p = *progress.lock().unwrap_or_else(|e| e.into_inner());
                    if sent.is_some_and(|s| p.bytes <= s) {
                        continue;
                    }
                    sent = Some(p.bytes);
                    let msg =
                        ControllerBound::Substituting { deployment_id: id.clone(), paths: p.paths, bytes: p.bytes };
                    if out.send(msg).is_err() {
                        break;
                    }
                }
            })
        };
        let (a, wanted) = (agent.clone(), missing_now.clone());
        let result = tokio::task::spawn_blocking(move || {
            crate::substitute::substitute(&a, &wanted, &|p| *progress.lock().unwrap_or_else(|e| e.into_inner()) = p)
        })
        .await;
        ticker.abort();
        got = result.unwrap_or_default();
        if got.paths > 0 {
            match missing(paths.clone()).await {
                Ok(Ok(m)) => (missing_now, bases) = m,
                _ => return ControllerBound::Error { message: "checking the store after substituting".into() },
            }
        }
    }
    let Some(copy) = copy else {
        return ControllerBound::PathsMissing {
            deployment_id,
            missing: missing_now,
            bases: bases.into_iter().map(|(path, base)| DeltaBase { path, base }).collect(),
            window: Some(crate::receive::WINDOW),
            substituted_paths: got.paths,
            substituted_bytes: got.bytes,
        };
    };
    // The compact copy: by index in the query, which the copy's messages then use.
    let query = QueryIndex::new(paths);
    let index = |p: &StorePath| query.index(p).ok();
    let missing = missing_now.iter().filter_map(index).collect();
    let bases: Vec<IndexedBase> =
        bases.into_iter().filter_map(|(p, base)| Some(IndexedBase(index(&p)?, base))).collect();
    let by_index = bases.iter().map(|IndexedBase(i, base)| (*i, base.clone())).collect();
    *lock(copy) = Some(CopyQuery { deployment_id: deployment_id.clone(), query, bases: by_index });
    ControllerBound::PathsLacking {
        deployment_id,
        missing,
        bases,
        window: crate::receive::WINDOW,
        substituted_paths: got.paths,
        substituted_bytes: got.bytes,
    }
}

/// The connection's compact copy query, shared with the task that answers it.
type SharedCopy = Arc<std::sync::Mutex<Option<CopyQuery>>>;

fn lock(copy: &SharedCopy) -> std::sync::MutexGuard<'_, Option<CopyQuery>> {
    copy.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a controller's message may answer or hand on to.
struct Link<'a> {
    session: &'a str,
    protocol: u32,
    out: &'a Outbox,
    incoming: &'a mpsc::Sender<Incoming>,
    copy: &'a SharedCopy,
}

fn send_outbox(agent: &Agent, out: &Outbox) {
    for outcome in agent.persisted().outbox {
        let _ = out.send(ControllerBound::Outcome(outcome));
    }
}

async fn handle(agent: &Arc<Agent>, link: &Link<'_>, msg: AgentBound) -> Result<()> {
    let Link { session, protocol, out, incoming, copy } = *link;
    let reply = |m| async { out.send(m).map_err(|_| anyhow!("connection writer stopped")) };
    match msg {
        AgentBound::Offer { offer } => match agent.accept_offer(&offer, session) {
            Ok(o) => reply(ControllerBound::OfferAccepted { deployment_id: o.deployment_id }).await?,
            Err(reason) => {
                warn!(%reason, "offer refused");
                let id = serde_json::from_str::<serde_json::Value>(&offer.payload)
                    .ok()
                    .and_then(|v| v.get("deployment_id").and_then(|d| d.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                reply(ControllerBound::OfferRefused { deployment_id: id, reason }).await?;
            }
        },
        AgentBound::QueryPaths { deployment_id, paths } => {
            // Answered by a task of its own: substituting from binary caches may take a
            // while, and the connection goes on meanwhile.
            let (agent, out) = (agent.clone(), out.clone());
            let copy = (protocol >= COMPACT_COPY_PROTOCOL).then(|| copy.clone());
            tokio::spawn(async move {
                let answer = query_paths(&agent, deployment_id, paths, &out, copy.as_ref()).await;
                let _ = out.send(answer);
            });
        }
        AgentBound::CacheQuery { query, paths } => {
            // Narinfo lookups may take a while: a task of its own.
            let (agent, out) = (agent.clone(), out.clone());
            tokio::spawn(async move {
                let answer = tokio::task::spawn_blocking(move || {
                    let invalid: std::collections::HashSet<StorePath> =
                        agent.store.invalid_paths(&paths)?.into_iter().collect();
                    let missing: Vec<StorePath> = paths.into_iter().filter(|p| invalid.contains(p)).collect();
                    anyhow::Ok(crate::substitute::would_serve(&agent, &missing))
                })
                .await;
                let _ = out.send(match answer {
                    Ok(Ok((served, bytes))) => ControllerBound::CacheAnswer { query, served, bytes },
                    Ok(Err(e)) => ControllerBound::Error { message: format!("checking the store: {e:#}") },
                    Err(e) => ControllerBound::Error { message: format!("asking the caches: {e}") },
                });
            });
        }
        AgentBound::PathStart { deployment_id, info, delta_base } => {
            incoming.send(Incoming::Start { deployment_id, info: Box::new(info), delta_base, index: None }).await?;
        }
        AgentBound::PathEnd { deployment_id, .. } => incoming.send(Incoming::End { deployment_id }).await?,
        AgentBound::PathAt(c) => {
            let start = match lock(copy).as_ref() {
                Some(q) => q.start(&c),
                None => Incoming::Refused {
                    deployment_id: String::new(),
                    path: None,
                    error: "a path before the device answered a path query".into(),
                },
            };
            incoming.send(start).await?;
        }
        AgentBound::PathDone => {
            let deployment_id = lock(copy).as_ref().map(|q| q.deployment_id.clone()).unwrap_or_default();
            incoming.send(Incoming::End { deployment_id }).await?;
        }
        AgentBound::Stage { deployment_id } => match agent.stage(&deployment_id).await {
            Ok(why) => {
                let reboot_needed = (!why.is_empty()).then(|| why.join("; "));
                reply(ControllerBound::Staged { deployment_id, reboot_needed }).await?;
            }
            Err(e) => {
                warn!(deployment = %deployment_id, "staging refused: {e:#}");
                agent.abort_offer(&deployment_id, Some(format!("staging refused: {e:#}")));
            }
        },
        AgentBound::Activate { deployment_id } => {
            // An application holds updates: nothing switches, the system stays kept,
            // and the controller hears why (a controller before staging is not told:
            // it could not take the answer, and the hold is not obeyed).
            if protocol >= thymis_proto::STAGING_PROTOCOL
                && let Some(hold) = agent.holds.holding()
            {
                info!(deployment = %deployment_id, reason = %hold.reason, "held: not activating");
                if let Err(e) = agent.stage(&deployment_id).await {
                    warn!(deployment = %deployment_id, "keeping the held system: {e:#}");
                }
                reply(ControllerBound::Held { deployment_id, reason: hold.reason }).await?;
                return Ok(());
            }
            if let Err(e) = agent.activate(&deployment_id).await {
                warn!(deployment = %deployment_id, "activation refused: {e:#}");
                agent.abort_offer(&deployment_id, Some(format!("activation refused: {e:#}")));
            }
        }
        AgentBound::Confirm { confirmation } => {
            if let Err(e) = agent.confirm(&confirmation, session).await {
                warn!("confirmation refused: {e:#}");
                reply(ControllerBound::Error { message: format!("confirmation refused: {e:#}") }).await?;
            }
        }
        AgentBound::Cancel { deployment_id } => {
            if agent.current_offer(&deployment_id).is_some() {
                info!(deployment = %deployment_id, "cancelled before activation");
            }
            // Also a staged deployment offered over an earlier connection: its kept
            // system goes.
            agent.abort_offer(&deployment_id, None);
        }
        AgentBound::OutcomeRecorded { deployment_id } => agent.outcome_recorded(&deployment_id),
        AgentBound::Heartbeat { .. } => {}
        AgentBound::Error { message } => warn!(%message, "controller reported an error"),
        AgentBound::Refused { reason } => bail!("controller refused: {reason}"),
        AgentBound::Challenge { .. } | AgentBound::Welcome { .. } => debug!("ignoring a handshake message mid-session"),
        AgentBound::JournalOpen { .. }
        | AgentBound::TerminalOpen { .. }
        | AgentBound::TerminalInput { .. }
        | AgentBound::TerminalResize { .. }
        | AgentBound::StreamClose { .. } => {}
    }
    Ok(())
}
