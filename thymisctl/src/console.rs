//! A device's journal (`thymisctl logs`) and terminal (`thymisctl shell`) through the
//! controller (see `docs/controller.md`, "Journal and terminal").

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use thymis_api::{ErrorBody, JournalEvent, TerminalControl, TerminalEnd, TerminalSize};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::safe_text::{printable, printable_or_dash};
use thymis_client::Client;

/// What `thymisctl logs` asks for.
#[derive(Debug, Default)]
pub struct LogsQuery<'a> {
    pub units: &'a [String],
    pub since: Option<&'a str>,
    pub lines: Option<u32>,
    pub follow: bool,
}

/// Percent-encodes a query parameter's value.
pub fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prints the device's journal entries as they come: one line each, or one JSON
/// object per line with `json`. Fails with the controller's or the device's error.
pub fn logs(c: &Client, device: &str, q: &LogsQuery<'_>, json: bool) -> Result<()> {
    let mut path = format!("/devices/{}/journal?follow={}", encode(device), q.follow);
    if !q.units.is_empty() {
        path.push_str(&format!("&units={}", encode(&q.units.join(","))));
    }
    if let Some(s) = q.since {
        path.push_str(&format!("&since={}", encode(s)));
    }
    if let Some(n) = q.lines {
        path.push_str(&format!("&lines={n}"));
    }
    let reader = c.stream(&path)?;
    let stdout = std::io::stdout();
    for line in reader.lines() {
        let line = line.context("reading the journal")?;
        if line.trim().is_empty() {
            continue;
        }
        let event: JournalEvent = serde_json::from_str(&line).with_context(|| format!("journal event {line:?}"))?;
        let mut out = stdout.lock();
        match event {
            JournalEvent::Entry(e) if json => writeln!(out, "{}", serde_json::to_string(&e)?)?,
            JournalEvent::Entry(e) => {
                let who = printable_or_dash(e.identifier.as_deref().or(e.unit.as_deref()));
                writeln!(out, "{} {who}: {}", utc(e.time_us / 1_000_000), printable(&e.message))?
            }
            JournalEvent::Dropped(n) => eprintln!("thymisctl: {n} journal entries dropped (over the rate limit)"),
            JournalEvent::End { error: Some(e) } => bail!("{device}: {}", printable(&e)),
            JournalEvent::End { error: None } => return Ok(()),
        }
        // A follow shows each entry when it comes, also through a pipe.
        out.flush()?;
    }
    bail!("the controller ended the journal without its end")
}

pub use thymis_api::utc;

/// Restores the local terminal's settings when dropped.
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enter() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, &self.0);
    }
}

fn window_size() -> (u16, u16) {
    match rustix::termios::tcgetwinsize(std::io::stdout()) {
        Ok(w) if w.ws_col > 0 && w.ws_row > 0 => (w.ws_col, w.ws_row),
        _ => (80, 24),
    }
}

/// A terminal on the device: the command's exit status (a login shell's when
/// `command` is empty).
pub fn shell(c: &Client, device: &str, command: &[String]) -> Result<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let status = rt.block_on(shell_session(c, device, command));
    // Reading stdin blocks a thread that would keep the runtime from shutting down.
    rt.shutdown_background();
    status
}

async fn shell_session(c: &Client, device: &str, command: &[String]) -> Result<u8> {
    let interactive = std::io::stdin().is_terminal();
    let (cols, rows) = window_size();
    let base = c.base().replacen("https://", "wss://", 1).replacen("http://", "ws://", 1);
    let mut url = format!("{base}/api/v1/devices/{}/terminal?cols={cols}&rows={rows}", encode(device));
    if !command.is_empty() {
        url.push_str(&format!("&command={}", encode(&serde_json::to_string(command)?)));
    }
    let mut request = url.as_str().into_client_request()?;
    request.headers_mut().insert("Authorization", c.bearer().parse()?);
    let connector = c.tls_config()?.map(tokio_tungstenite::Connector::Rustls);
    let (ws, _) = match tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
            let msg = serde_json::from_str::<ErrorBody>(&body).map(|b| b.error).unwrap_or(body);
            bail!("{msg}");
        }
        Err(e) => return Err(e).with_context(|| format!("opening a terminal on {device}")),
    };
    let (mut tx, mut rx) = ws.split();
    let _raw = if interactive { Some(RawMode::enter()?) } else { None };
    let mut resized = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut stdin = tokio::io::stdin();
    let mut stdout = std::io::stdout();
    let mut buf = vec![0u8; 4096];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    stdout.write_all(&b)?;
                    stdout.flush()?;
                }
                Some(Ok(Message::Text(t))) => {
                    let e = match serde_json::from_str::<TerminalEnd>(t.as_str()) {
                        Ok(TerminalEnd::Exited { exit_status }) => return Ok(exit_status.clamp(0, 255) as u8),
                        Ok(TerminalEnd::Failed { error }) => error,
                        Err(_) => t.as_str().to_owned(),
                    };
                    drop(_raw);
                    bail!("{device}: {}", printable(&e));
                }
                Some(Ok(Message::Close(_))) | None => bail!("{device}: the terminal was closed without an exit status"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(anyhow!(e)).context("the terminal's connection"),
            },
            n = stdin.read(&mut buf), if stdin_open => match n? {
                0 => {
                    // Input ends (a script piped in): the end of a line, then end of file.
                    stdin_open = false;
                    tx.send(Message::Binary(vec![4u8].into())).await?;
                }
                n => tx.send(Message::Binary(buf[..n].to_vec().into())).await?,
            },
            _ = resized.recv() => {
                let (cols, rows) = window_size();
                let resize = TerminalControl { resize: Some(TerminalSize { cols, rows }) };
                tx.send(Message::Text(serde_json::to_string(&resize)?.into())).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::utc(1_796_245_261), "2026-12-02T21:01:01Z");
    }
}
