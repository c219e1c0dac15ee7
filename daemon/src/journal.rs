//! A journal stream: `journalctl --output=json` with the controller's (checked) query as
//! separate arguments, its entries sent in batches, at most
//! [`JOURNAL_ENTRIES_PER_SEC`] a second (the rest dropped and counted). A batch waits
//! for room in the connection's stream queue, which the writer serves in turn with
//! everything else: journalctl is slowed down, never the deployment.

use std::process::Stdio;
use std::time::{Duration, Instant};

use thymis_proto::ControllerBound;
use thymis_proto::stream::{JOURNAL_ENTRIES_PER_SEC, JournalEntry, JournalQuery};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

/// Entries per message.
const BATCH: usize = 64;
/// Longest line of journalctl's output read; the rest of a longer one is skipped.
const MAX_LINE: usize = 1 << 20;
/// Past entries sent when the query names neither a time nor a count.
const DEFAULT_LINES: u32 = 100;

/// Runs the query and ends the stream, saying why if it failed.
pub async fn run(stream: u32, query: JournalQuery, out: mpsc::Sender<ControllerBound>) {
    let error = journal(stream, &query, &out).await.err();
    let _ = out.send(ControllerBound::StreamEnd { stream, exit_status: None, error }).await;
}

/// `journalctl`'s arguments for a query: one argument per value, `--opt=value`, so a
/// value can never be read as another option.
pub fn arguments(query: &JournalQuery) -> Vec<String> {
    let mut args = vec!["--output=json".to_owned(), "--no-pager".to_owned(), "--quiet".to_owned()];
    args.extend(query.units.iter().map(|u| format!("--unit={u}")));
    if let Some(s) = &query.since {
        args.push(format!("--since={s}"));
    }
    let lines = query.lines.unwrap_or(if query.since.is_some() {
        thymis_proto::stream::MAX_JOURNAL_LINES
    } else {
        DEFAULT_LINES
    });
    args.push(format!("--lines={lines}"));
    if query.follow {
        args.push("--follow".to_owned());
    }
    args
}

/// journald's socket: without it, nothing writes a journal on this device.
const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// Why this device cannot serve its journal, if it cannot.
pub fn unavailable() -> Option<String> {
    if !std::path::Path::new(JOURNALD_SOCKET).exists() {
        return Some(format!("this device has no journal (journald does not run: no {JOURNALD_SOCKET})"));
    }
    None
}

async fn journal(stream: u32, query: &JournalQuery, out: &mpsc::Sender<ControllerBound>) -> Result<(), String> {
    query.check()?;
    if let Some(why) = unavailable() {
        return Err(why);
    }
    let mut child = Command::new("journalctl")
        .args(arguments(query))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "this device has no journal (journalctl is not installed)".to_owned(),
            _ => format!("running journalctl: {e}"),
        })?;
    let stderr = child.stderr.take().map(|e| tokio::spawn(read_some(e)));
    let stdout = child.stdout.take().ok_or("journalctl has no output")?;
    let mut reader = BufReader::with_capacity(64 << 10, stdout);
    let (mut batch, mut dropped) = (Vec::new(), 0u64);
    let mut rate = Rate::new(JOURNAL_ENTRIES_PER_SEC);
    let mut line = Vec::new();
    loop {
        line.clear();
        if read_line(&mut reader, &mut line).await.map_err(|e| format!("reading journalctl: {e}"))? == 0 {
            break;
        }
        let Some(entry) = std::str::from_utf8(&line).ok().and_then(JournalEntry::from_journal_json) else { continue };
        if !rate.admit(Instant::now()) {
            dropped += 1;
            continue;
        }
        batch.push(entry);
        // What journalctl has written so far goes out together; a follow then sends
        // each new entry as it comes.
        if batch.len() >= BATCH || reader.buffer().is_empty() {
            let entries = std::mem::take(&mut batch);
            let msg = ControllerBound::JournalEntries { stream, entries, dropped: std::mem::take(&mut dropped) };
            out.send(msg).await.map_err(|_| "the connection ended")?;
        }
    }
    if !batch.is_empty() || dropped > 0 {
        out.send(ControllerBound::JournalEntries { stream, entries: batch, dropped })
            .await
            .map_err(|_| "the connection ended")?;
    }
    let status = child.wait().await.map_err(|e| format!("journalctl: {e}"))?;
    if !status.success() {
        let said = match stderr {
            Some(t) => t.await.unwrap_or_default(),
            None => String::new(),
        };
        let said = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("no message").to_owned();
        return Err(format!("journalctl failed ({status}): {said}"));
    }
    Ok(())
}

/// At most `per_sec` admitted in each second (counted from the first admitted in it).
#[derive(Debug)]
struct Rate {
    per_sec: u32,
    second: Option<Instant>,
    admitted: u32,
}

impl Rate {
    fn new(per_sec: u32) -> Self {
        Rate { per_sec, second: None, admitted: 0 }
    }

    fn admit(&mut self, now: Instant) -> bool {
        if self.second.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1)) {
            (self.second, self.admitted) = (Some(now), 0);
        }
        self.admitted += 1;
        self.admitted <= self.per_sec
    }
}

/// One line into `line` (without its newline), at most [`MAX_LINE`] bytes of it kept:
/// the bytes read, 0 at the end.
async fn read_line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, line: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(total);
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = done.unwrap_or(buf.len());
        total += used;
        reader.consume(used);
        if done.is_some() {
            return Ok(total);
        }
    }
}

/// The first 4 KiB of what a process says on a pipe (the rest is read and dropped).
async fn read_some(mut r: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = 4096usize.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_is_one_argument_that_cannot_be_an_option() {
        let q =
            JournalQuery { units: vec!["web.service".into()], since: Some("-1h".into()), lines: None, follow: true };
        assert_eq!(
            arguments(&q),
            [
                "--output=json",
                "--no-pager",
                "--quiet",
                "--unit=web.service",
                "--since=-1h",
                "--lines=10000",
                "--follow"
            ]
        );
        assert!(arguments(&JournalQuery::default()).contains(&"--lines=100".to_owned()));
    }

    #[test]
    fn a_chatty_unit_gets_its_rate_a_second_and_no_more() {
        let mut rate = Rate::new(3);
        let t = Instant::now();
        let admitted = (0..10).filter(|_| rate.admit(t)).count();
        assert_eq!(admitted, 3);
        assert!(!rate.admit(t + Duration::from_millis(999)));
        assert!(rate.admit(t + Duration::from_secs(1)), "a new second");
    }

    #[tokio::test]
    async fn a_line_longer_than_the_limit_is_cut_and_the_next_one_read_whole() {
        let mut text = vec![b'x'; MAX_LINE + 10];
        text.extend_from_slice(b"\n{\"a\":1}\n");
        let mut r = BufReader::with_capacity(1024, &text[..]);
        let mut line = Vec::new();
        assert_eq!(read_line(&mut r, &mut line).await.expect("read"), MAX_LINE + 11);
        assert_eq!(line.len(), MAX_LINE);
        line.clear();
        read_line(&mut r, &mut line).await.expect("read");
        assert_eq!(line, b"{\"a\":1}");
        line.clear();
        assert_eq!(read_line(&mut r, &mut line).await.expect("read"), 0);
    }
}
