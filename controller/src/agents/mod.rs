//! `/agent/v1`: the agents' WebSocket. Authenticates both sides, then records reports
//! and outcomes, confirms activated deployments over the new connection, and routes
//! replies to the deployment runners.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use thymis_proto::handshake::{
    Nonce, Proof, controller_transcript, device_transcript, enrollment_transcript, negotiate, proof_matches,
    welcome_message,
};
use thymis_proto::message::{DeviceReport, Outcome};
use thymis_proto::signed::{Confirmation, Signed};
use thymis_proto::{AgentBound, ControllerBound, decode_controller_bound, encode};
use thymis_store::signing::PublicKey;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::conn::{Conn, Out};
use crate::controller::{Controller, lock};
use crate::db::{Details, Presented};
use crate::engine;
use crate::log_budget::{LOG_BUDGET, LogBudget};
use crate::model::device::{Effect, Event};
use crate::read_cap::ReadCap;
use crate::streams::FromDevice;
use base64::Engine as _;

mod messages;

use thymis_ws::Next;

use messages::{ReportRate, handle};

pub async fn upgrade(
    State(ctl): State<Arc<Controller>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    axum::Extension(cap): axum::Extension<ReadCap>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // Agents send no Origin; browsers always do: no web page may open this socket.
    if headers.contains_key(axum::http::header::ORIGIN) {
        use axum::response::IntoResponse;
        return (axum::http::StatusCode::FORBIDDEN, "browsers may not open the agent socket").into_response();
    }
    // Until the handshake is done, the socket yields only so many bytes, whatever size a
    // message claims (the WebSocket layer would buffer up to `max` of it).
    cap.arm(thymis_proto::MAX_HANDSHAKE_BYTES);
    let max = thymis_proto::MAX_TEXT_MESSAGE.max(thymis_proto::MAX_BINARY_FRAME);
    // Small buffers: most of ten thousand connections are idle (the defaults, 128 KiB
    // each way, cost a gigabyte and a half at that scale).
    let peer = crate::client_addr::client(peer.ip(), &headers, &ctl.settings.trusted_proxies);
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(8 << 10)
        .write_buffer_size(8 << 10)
        .on_upgrade(move |socket| serve(ctl, socket, peer, cap))
}

async fn send(ws: &mut WebSocket, m: &AgentBound) -> Result<()> {
    ws.send(Message::Text(encode(m).into())).await.map_err(|e| anyhow!("sending to agent: {e}"))
}

async fn recv(ws: &mut WebSocket) -> Result<ControllerBound> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(decode_controller_bound(t.as_str(), false)?),
            Some(Ok(Message::Binary(_))) => bail!("binary frame during the handshake"),
            Some(Ok(Message::Close(_))) | None => bail!("closed during the handshake"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("reading: {e}"),
        }
    }
}

async fn serve(ctl: Arc<Controller>, mut ws: WebSocket, peer: std::net::IpAddr, cap: ReadCap) {
    // Unauthenticated connections are capped per source address (and all together),
    // and must finish the handshake quickly.
    let Some(slot) = ctl.peers.handshake(peer) else {
        let reason = "too many connections in handshake from this address".into();
        let _ = send(&mut ws, &AgentBound::Refused { reason }).await;
        return;
    };
    let Ok(permit) = ctl.handshakes.clone().try_acquire_owned() else {
        let _ = send(&mut ws, &AgentBound::Refused { reason: "too many connections in handshake".into() }).await;
        return;
    };
    let session = match crate::random::hex::<16>() {
        Ok(s) => s,
        Err(e) => {
            warn!("agent handshake: {e:#}");
            let _ = send(&mut ws, &AgentBound::Refused { reason: format!("controller: {e:#}") }).await;
            return;
        }
    };
    let handshake = handshake(&ctl, &mut ws, &session, peer);
    let (device, protocol) = match tokio::time::timeout(ctl.settings.handshake_timeout, handshake).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            warn!(%peer, "agent handshake refused: {e:#}");
            let _ = send(&mut ws, &AgentBound::Refused { reason: format!("{e:#}") }).await;
            let _ = ws.close().await;
            return;
        }
        Err(_) => {
            warn!("agent handshake timed out");
            let _ = send(&mut ws, &AgentBound::Refused { reason: "handshake timed out".into() }).await;
            return;
        }
    };
    drop((permit, slot));
    cap.lift();
    let (control_tx, control_rx) = mpsc::unbounded_channel::<AgentBound>();
    let (data_tx, data_rx) = mpsc::channel::<Out>(crate::conn::COPY_QUEUE);
    let (stream_tx, stream_rx) = mpsc::channel::<AgentBound>(STREAM_QUEUE);
    let conn = Arc::new(Conn::new(device.clone(), session, protocol, control_tx, data_tx, stream_tx));
    ctl.register(conn.clone());
    info!(%device, protocol, "agent connected");
    let queues = Queues { control: control_rx, first: data_rx, second: stream_rx };
    if let Err(e) = session_loop(&ctl, &conn, ws, queues).await {
        info!(%device, "agent connection ended: {e:#}");
    } else {
        info!(%device, "agent disconnected");
    }
    conn.streams.end_all();
    ctl.unregister(&conn);
}

/// `Error` messages from one connection that reach the log.
const ERRORS_LOGGED: u32 = 20;

/// Terminal input waiting for the connection's writer, in messages of at most
/// [`thymis_proto::stream::MAX_TERMINAL_CHUNK`] bytes.
const STREAM_QUEUE: usize = 16;

/// What the writer sends: control messages first, then the copy stream and the
/// streams' messages in turn.
type Queues = thymis_ws::Queues<AgentBound, Out, AgentBound>;

/// Returns the authenticated device's name and the protocol version agreed.
async fn handshake(
    ctl: &Controller,
    ws: &mut WebSocket,
    session: &str,
    peer: std::net::IpAddr,
) -> Result<(String, u32)> {
    let ControllerBound::Hello { protocol_min, protocol_max, device_key, client_nonce, .. } = recv(ws).await? else {
        bail!("expected hello");
    };
    let protocol = negotiate(protocol_min, protocol_max).map_err(|e| anyhow!(e))?;
    let device_key: PublicKey = device_key.parse().map_err(|e| anyhow!("device key: {e}"))?;
    let server_nonce = Nonce(crate::random::bytes()?);
    let identity = ctl.identity.public();
    let signature = ctl.identity.sign(&controller_transcript(&client_nonce, &server_nonce, session, &device_key));
    send(
        ws,
        &AgentBound::Challenge {
            protocol,
            controller_key: identity.to_string(),
            server_nonce,
            session: session.to_owned(),
            signature,
        },
    )
    .await?;
    let ControllerBound::Auth { signature, enrollment_token, enrollment_proof } = recv(ws).await? else {
        bail!("expected auth")
    };
    if !device_key.verifies(&device_transcript(&client_nonce, &server_nonce, session, &identity), &signature) {
        bail!("device failed to prove possession of its key");
    }
    let key_text = device_key.to_string();
    let device = match ctl.db.device_by_key(&key_text)? {
        Some(d) if d.revoked => bail!("device {} is revoked", d.name),
        Some(d) => d.info.name,
        None if ctl.db.key_revoked(&key_text)? => bail!("this device key was revoked; enrolling takes a new key"),
        None if enrollment_token.is_some() => bail!(
            "this agent sent its enrollment token in the clear, where whoever saw it could enroll another \
             key with it: upgrade the agent (it proves it holds the token instead)"
        ),
        None => {
            let Some(proof) = enrollment_proof else { bail!("unknown device key and no enrollment token") };
            let transcript = enrollment_transcript(&client_nonce, &server_nonce, session, &device_key, &identity);
            match Proof::parse(&proof) {
                Proof::Signed { id, signature } => {
                    let proves = |k: &PublicKey| k.verifies(&transcript, signature);
                    enroll(ctl, peer, Presented::Key { id, proves: &proves }, &key_text)?
                }
                Proof::Hmac(mac) => {
                    let proves = |token_hash: &[u8; 32]| proof_matches(mac, token_hash, &transcript);
                    enroll(ctl, peer, Presented::Hash(&proves), &key_text)?
                }
            }
        }
    };
    if !ctl.peers.log_in(&device) {
        bail!("device {device} logged in too often in the last minute; try again in a minute");
    }
    let config = ctl.db.device(&device)?.map(|d| d.info.config).unwrap_or_default();
    let time = crate::db::now().max(0) as u64;
    let signature = ctl.identity.sign(&welcome_message(session, &device_key, &device, &config, time));
    send(
        ws,
        &AgentBound::Welcome {
            device: device.clone(),
            config,
            heartbeat_secs: ctl.settings.heartbeat.as_secs().max(1),
            dead_after_secs: ctl.settings.dead_after.as_secs().max(2),
            time,
            signature: Some(signature),
        },
    )
    .await?;
    Ok((device, protocol))
}

fn enroll(ctl: &Controller, peer: std::net::IpAddr, proves: Presented, key: &str) -> Result<String> {
    if !ctl.peers.may_enroll(peer) {
        bail!("too many failed enrollments from this address; try again in a minute");
    }
    match ctl.db.enroll_with(proves, key) {
        Ok(device) => {
            let fp = key.parse::<PublicKey>().map(|k| k.short_fingerprint()).unwrap_or_default();
            info!(%device, fingerprint = %fp, %peer, "device enrolled");
            Ok(device)
        }
        Err(e) => {
            ctl.peers.enrollment_failed(peer);
            Err(e)
        }
    }
}

async fn session_loop(ctl: &Arc<Controller>, conn: &Arc<Conn>, ws: WebSocket, queues: Queues) -> Result<()> {
    // The writer owns the sending half, so that reading never waits on a write: a
    // reader that did (handling a message that sends a reply while the queue is full
    // of NAR chunks) would stop reading the acknowledgements that free that queue.
    let (sink, mut stream) = ws.split();
    let mut writer = tokio::spawn(thymis_ws::write_loop(sink, queues, ctl.settings.dead_after, |next| match next {
        Next::Control(m) | Next::Second(m) => Message::Text(encode(&m).into()),
        Next::First(Out::Msg(m)) => Message::Text(encode(&m).into()),
        Next::First(Out::Bin(b)) => Message::Binary(b.into()),
    }));
    let _abort = AbortOnDrop(writer.abort_handle());
    let mut ticker = tokio::time::interval(ctl.settings.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut seq = 0;
    let mut reports = ReportRate::new();
    loop {
        tokio::select! {
            frame = stream.next() => {
                last_heard = Instant::now();
                match frame {
                    Some(Ok(Message::Text(t))) => {
                        let msg = decode_controller_bound(t.as_str(), true)?;
                        let msg = match msg {
                            ControllerBound::Report(r) => match reports.admit(r, &conn.device) {
                                Some(r) => ControllerBound::Report(r),
                                None => continue,
                            },
                            other => other,
                        };
                        handle(ctl, conn, msg).await?;
                    }
                    Some(Ok(Message::Binary(_))) => bail!("agents send no binary frames"),
                    Some(Ok(Message::Close(_))) | None => return Ok(()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => bail!("reading: {e}"),
                }
            }
            ended = &mut writer => {
                return match ended {
                    Ok(r) => Ok(r?),
                    Err(e) => Err(anyhow!("connection writer: {e}")),
                };
            }
            () = conn.kicked.notified() => {
                // The writer closes the socket once the queue is drained.
                bail!("connection closed by the controller (revoked or replaced)");
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > ctl.settings.dead_after {
                    bail!("no word from the agent for {:?}: connection declared dead", last_heard.elapsed());
                }
                seq += 1;
                conn.send(AgentBound::Heartbeat { seq }).await;
                if let Some(r) = reports.due() {
                    handle(ctl, conn, ControllerBound::Report(r)).await?;
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
