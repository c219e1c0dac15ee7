//! A device's journal and terminal for the API's clients (`thymisctl logs`, `thymisctl
//! shell`, the device page): each is a stream on the device's connection
//! ([`crate::streams`]), opened only for an admin, and only on a device that is online.
//!
//! The journal is a response of one JSON [`JournalEvent`] per line (a blank line now and
//! then while following, so that a client that left is noticed). The terminal is a
//! WebSocket: binary frames are the terminal's bytes both ways; the client sends
//! `{"resize":{"cols":C,"rows":R}}` as text; the controller's last frame is the text
//! `{"exit_status":N}` or `{"error":"..."}`. Every terminal session is a task of kind
//! `terminal` (who opened it, on which device, when it ended and how; not what was
//! typed).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use thymis_api::{JournalEvent, TaskResult, TerminalControl, TerminalEnd};
use thymis_proto::AgentBound;
use thymis_proto::stream::{JournalQuery, MAX_TERMINAL_CHUNK};
use tracing::info;

use crate::caller::{ApiError, Caller};
use crate::conn::{Conn, Stream};
use crate::controller::Controller;
use crate::engine;
use crate::model::task::Event as TaskEvent;
use crate::streams::FromDevice;

/// How long the device has to say whether a stream could start.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A following journal response sends a blank line after this much silence.
const KEEPALIVE: Duration = Duration::from_secs(10);

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The connection of an enrolled device that is online (and its configuration), or why
/// there is none.
fn online(ctl: &Controller, name: &str) -> Result<(Arc<Conn>, String), ApiError> {
    let Some(device) = ctl.db.device(name)? else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no device {name:?}")));
    };
    let Some(conn) = ctl.conn(name) else {
        if ctl.online().contains(name) {
            let msg = format!(
                "{name} is connected to another controller of this fleet: open its journal or terminal there \
                 (controllers do not relay them to each other)"
            );
            return Err(ApiError::new(StatusCode::CONFLICT, msg));
        }
        let seen = device.info.last_seen.map_or("never".to_owned(), |t| format!("last seen at unix time {t}"));
        return Err(ApiError::new(StatusCode::CONFLICT, format!("{name} is offline ({seen})")));
    };
    Ok((conn, device.info.config))
}

/// Opens a stream and waits for the device's first word: an error it ends with at once
/// (no journal, terminal disabled, a command that cannot run) becomes the response.
async fn open(conn: &Arc<Conn>, msg: impl FnOnce(u32) -> AgentBound) -> Result<(Stream, Option<FromDevice>), ApiError> {
    let mut stream = Stream::open(conn, msg).map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
    match tokio::time::timeout(OPEN_TIMEOUT, stream.recv()).await {
        Ok(Some(FromDevice::End { error: Some(e), .. })) => {
            Err(ApiError::new(StatusCode::CONFLICT, format!("{}: {e}", conn.device)))
        }
        Ok(Some(first)) => Ok((stream, Some(first))),
        Ok(None) => Err(ApiError::new(StatusCode::CONFLICT, format!("{} disconnected", conn.device))),
        // A follow of a quiet journal says nothing at first: go on.
        Err(_) => Ok((stream, None)),
    }
}

#[derive(Debug, Deserialize)]
pub struct JournalParams {
    /// Comma-separated unit names.
    #[serde(default)]
    units: Option<String>,
    since: Option<String>,
    lines: Option<u32>,
    #[serde(default)]
    follow: bool,
}

pub async fn journal(
    State(ctl): State<Arc<Controller>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(p): Query<JournalParams>,
) -> Result<Response, ApiError> {
    caller.check_session(&headers, None)?;
    let units = p.units.as_deref().unwrap_or("").split(',').filter(|u| !u.is_empty()).map(str::to_owned).collect();
    let query = JournalQuery { units, since: p.since, lines: p.lines, follow: p.follow };
    query.check().map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let (conn, _) = online(&ctl, &name)?;
    let (stream, first) = open(&conn, |stream| AgentBound::JournalOpen { stream, query }).await?;

    // (stream, an event read ahead, done)
    let body = futures_util::stream::unfold((Some(stream), first), |(stream, ahead)| async move {
        let mut stream = stream?;
        let msg = match ahead {
            Some(m) => Some(m),
            None => match tokio::time::timeout(KEEPALIVE, stream.recv()).await {
                Ok(m) => m,
                Err(_) => return Some((String::from("\n"), (Some(stream), None))),
            },
        };
        let (events, go_on) = match msg {
            Some(FromDevice::Entries(entries)) => (entries.into_iter().map(JournalEvent::Entry).collect(), true),
            Some(FromDevice::Dropped(n)) => (vec![JournalEvent::Dropped(n)], true),
            Some(FromDevice::End { error, .. }) => (vec![JournalEvent::End { error }], false),
            Some(FromDevice::Output(_)) => (vec![], true),
            None => (vec![JournalEvent::End { error: Some("the device disconnected".into()) }], false),
        };
        let mut text = String::new();
        for e in events {
            text.push_str(&serde_json::to_string(&e).unwrap_or_default());
            text.push('\n');
        }
        Some((text, (go_on.then_some(stream), None)))
    });
    let body = Body::from_stream(body.map(Ok::<_, Infallible>));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson"), (header::CACHE_CONTROL, "no-cache")], body).into_response())
}

#[derive(Debug, Deserialize)]
pub struct TerminalParams {
    cols: Option<u16>,
    rows: Option<u16>,
    /// A command to run instead of a login shell: a JSON array of strings.
    command: Option<String>,
}

/// The WebSocket subprotocol of the terminal. A browser cannot set headers on a
/// WebSocket, so its session's CSRF token travels as a second offered subprotocol,
/// `csrf.TOKEN`, never in the URL (which proxies and browsers keep in their logs and
/// history); the controller answers with [`TERMINAL_PROTOCOL`] alone.
pub const TERMINAL_PROTOCOL: &str = "thymis.terminal";

/// The CSRF token a browser offered as a subprotocol.
fn csrf_protocol(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("csrf."))
}

pub async fn terminal(
    State(ctl): State<Arc<Controller>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(p): Query<TerminalParams>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    caller.check_session(&headers, csrf_protocol(&headers))?;
    let command: Vec<String> = match &p.command {
        Some(c) => serde_json::from_str(c)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("command: a JSON array of strings: {e}")))?,
        None => vec![],
    };
    if command.len() > 256 || command.iter().map(String::len).sum::<usize>() > 64 << 10 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "command too long"));
    }
    let (conn, config) = online(&ctl, &name)?;
    let (cols, rows) = (p.cols.unwrap_or(80).clamp(1, 1000), p.rows.unwrap_or(24).clamp(1, 1000));
    let what = if command.is_empty() { "a login shell".to_owned() } else { format!("{command:?}") };
    let (stream, first) =
        open(&conn, |stream| AgentBound::TerminalOpen { stream, command: command.clone(), cols, rows }).await?;

    let who = caller.describe();
    let message = format!("terminal on {name}, opened by {who}");
    let task = ctl.db.create_task(&ctl.instance, "terminal", None, Some(&message), Some(&config), false, None)?;
    engine::task_event(&ctl, task, TaskEvent::Started, None)?;
    ctl.db.log(task, None, &format!("{name}: {what} opened by {who}"))?;
    ctl.notify_task(task);
    info!(device = %name, task, "terminal opened by {who}");
    Ok(ws.protocols([TERMINAL_PROTOCOL]).on_upgrade(move |socket| async move {
        let started = Instant::now();
        let (exit_status, error) = relay(socket, stream, first).await;
        let secs = started.elapsed().as_secs();
        let (result, line) = match (exit_status, &error) {
            (Some(0), _) => (TaskResult::Succeeded, format!("{name}: exited with status 0 after {secs} s")),
            (Some(n), _) => (TaskResult::Failed, format!("{name}: exited with status {n} after {secs} s")),
            (None, Some(e)) => (TaskResult::Failed, format!("{name}: {e} after {secs} s")),
            (None, None) => (TaskResult::Cancelled, format!("{name}: closed by the client after {secs} s")),
        };
        let error = (result != TaskResult::Succeeded).then_some(line.as_str());
        let _ = ctl.db.log(task, None, &line);
        let _ = engine::task_event(&ctl, task, TaskEvent::Ended(result), error);
        ctl.notify_task(task);
    }))
}

/// Carries a terminal between the client's socket and the device until either ends:
/// the exit status, or the error that ended it, or neither when the client left.
async fn relay(socket: WebSocket, mut stream: Stream, first: Option<FromDevice>) -> (Option<i32>, Option<String>) {
    let (mut tx, mut rx) = socket.split();
    let mut ahead = first;
    let end = loop {
        let msg = match ahead.take() {
            Some(m) => Err(Some(m)),
            None => tokio::select! {
                m = rx.next() => Ok(m),
                m = stream.recv() => Err(m),
            },
        };
        match msg {
            Ok(Some(Ok(Message::Binary(b)))) => {
                for chunk in b.chunks(MAX_TERMINAL_CHUNK) {
                    let data = b64().encode(chunk);
                    if !stream.send(AgentBound::TerminalInput { stream: stream.id, data }).await {
                        break;
                    }
                }
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Ok(TerminalControl { resize: Some(r) }) = serde_json::from_str(t.as_str()) {
                    let (cols, rows) = (r.cols.clamp(1, 1000), r.rows.clamp(1, 1000));
                    stream.send(AgentBound::TerminalResize { stream: stream.id, cols, rows }).await;
                }
            }
            Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => break (None, None),
            Ok(Some(Ok(_))) => {}
            Err(Some(FromDevice::Output(b))) => {
                if !b.is_empty() && tx.send(Message::Binary(b.into())).await.is_err() {
                    break (None, None);
                }
            }
            Err(Some(FromDevice::Dropped(_) | FromDevice::Entries(_))) => {}
            Err(Some(FromDevice::End { exit_status, error })) => break (exit_status, error),
            Err(None) => break (None, Some("the device disconnected".to_owned())),
        }
    };
    let last = match &end {
        (Some(n), _) => Some(TerminalEnd::Exited { exit_status: *n }),
        (None, Some(e)) => Some(TerminalEnd::Failed { error: e.clone() }),
        (None, None) => None,
    };
    if let Some(last) = last.and_then(|l| serde_json::to_string(&l).ok()) {
        let _ = tx.send(Message::Text(last.into())).await;
        let _ = tx.close().await;
        // Until the client has read it and closed: a socket closed with the client's
        // input unread is reset, and a reset can discard the last frame before it reads it.
        let _ =
            tokio::time::timeout(Duration::from_secs(5), async { while let Some(Ok(_)) = rx.next().await {} }).await;
    }
    end
}
