//! Streams beside deployments on the same connection (protocol 2): a device's journal
//! and terminal sessions. The controller numbers each stream; either side ends it.
//! Both directions are bounded: the agent limits what a journal stream sends per
//! second and how long an entry may be, and the controller drops (and counts) what a
//! slow client cannot take, so neither side's memory nor the link is at a chatty
//! unit's mercy.

use serde::{Deserialize, Serialize};

/// The first protocol version with streams.
pub const STREAMS_PROTOCOL: u32 = 2;

/// Most streams one connection holds open at once.
pub const MAX_STREAMS: usize = 8;
/// Most lines a journal query may ask for from the past.
pub const MAX_JOURNAL_LINES: u32 = 10_000;
/// Longest message of a journal entry sent; longer ones are cut (and marked).
pub const MAX_ENTRY_MESSAGE: usize = 8 << 10;
/// A journal stream sends at most this many entries per second; the rest are dropped
/// and counted.
pub const JOURNAL_ENTRIES_PER_SEC: u32 = 2_000;
/// Largest terminal input or output chunk (bytes before base64).
pub const MAX_TERMINAL_CHUNK: usize = 16 << 10;

/// What `journalctl` is asked for. Every field is checked by [`JournalQuery::check`]
/// on both sides, and the agent passes them as separate arguments, never to a shell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalQuery {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<String>,
    /// A `journalctl --since` time ("2026-12-01 10:00", "-1h", "today").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// How many past entries to start with (journalctl's `-n`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<u32>,
    /// Keep sending new entries until the stream is closed.
    #[serde(default)]
    pub follow: bool,
}

impl JournalQuery {
    /// Refuses what `journalctl` should never see: a bad unit name, a time that is not
    /// one, too many lines.
    pub fn check(&self) -> Result<(), String> {
        if self.units.len() > 32 {
            return Err("at most 32 units".into());
        }
        for u in &self.units {
            if !valid_unit(u) {
                return Err(format!("{u:?} is not a systemd unit name"));
            }
        }
        if let Some(s) = &self.since {
            let ok =
                !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || " :-+.".contains(c));
            if !ok {
                return Err(format!("{s:?} is not a time journalctl understands"));
            }
        }
        if self.lines.is_some_and(|n| n > MAX_JOURNAL_LINES) {
            return Err(format!("at most {MAX_JOURNAL_LINES} lines"));
        }
        Ok(())
    }
}

/// A systemd unit name (or a `journalctl -u` glob of one): letters, digits and
/// `:_.@-\*`, not starting with `-`, at most 256 bytes.
pub fn valid_unit(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 256
        && !u.starts_with('-')
        && u.chars().all(|c| c.is_ascii_alphanumeric() || ":_.@-\\*".contains(c))
}

/// One journal entry, as much of it as people read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Microseconds since the epoch (`__REALTIME_TIMESTAMP`).
    pub time_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// syslog priority, 0 (emerg) to 7 (debug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
    pub message: String,
}

impl JournalEntry {
    /// Reads one line of `journalctl --output=json`: `None` for what is not an entry.
    /// A message journald kept as bytes (not UTF-8) arrives as an array of numbers.
    pub fn from_journal_json(line: &str) -> Option<JournalEntry> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let text = |k: &str| -> Option<String> {
            match v.get(k)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(bytes) => {
                    let b: Vec<u8> = bytes.iter().filter_map(|n| n.as_u64().map(|n| n as u8)).collect();
                    Some(String::from_utf8_lossy(&b).into_owned())
                }
                _ => None,
            }
        };
        let mut message = text("MESSAGE").unwrap_or_default();
        if message.len() > MAX_ENTRY_MESSAGE {
            let mut cut = MAX_ENTRY_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [cut]");
        }
        Some(JournalEntry {
            time_us: text("__REALTIME_TIMESTAMP")?.parse().ok()?,
            unit: text("_SYSTEMD_UNIT").or_else(|| text("UNIT")),
            priority: text("PRIORITY").and_then(|p| p.parse().ok()),
            identifier: text("SYSLOG_IDENTIFIER"),
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_and_times_that_could_be_options_or_shell_are_refused() {
        for bad in ["", "-u", "--all", "a b", "web;rm", "$(x)", "a/b"] {
            assert!(!valid_unit(bad), "{bad:?}");
        }
        for good in ["web.service", "getty@tty1.service", "sys-*.mount", "a\\x2db.service"] {
            assert!(valid_unit(good), "{good:?}");
        }
        let q = |since: &str| JournalQuery { since: Some(since.into()), ..Default::default() };
        assert!(q("-1h").check().is_ok());
        assert!(q("2026-12-01 10:00:00").check().is_ok());
        assert!(q("today; reboot").check().is_err());
        assert!(JournalQuery { lines: Some(MAX_JOURNAL_LINES + 1), ..Default::default() }.check().is_err());
    }

    #[test]
    fn journal_json_lines_become_entries_and_long_messages_are_cut() {
        let e = JournalEntry::from_journal_json(
            r#"{"__REALTIME_TIMESTAMP":"1700000000000000","_SYSTEMD_UNIT":"web.service","PRIORITY":"3","MESSAGE":[104,105]}"#,
        )
        .expect("entry");
        assert_eq!(
            (e.time_us, e.unit.as_deref(), e.priority, e.message.as_str()),
            (1_700_000_000_000_000, Some("web.service"), Some(3), "hi")
        );
        let long = format!(r#"{{"__REALTIME_TIMESTAMP":"1","MESSAGE":"{}"}}"#, "x".repeat(MAX_ENTRY_MESSAGE * 2));
        let e = JournalEntry::from_journal_json(&long).expect("entry");
        assert!(e.message.len() < MAX_ENTRY_MESSAGE + 10 && e.message.ends_with("[cut]"));
        assert!(JournalEntry::from_journal_json("not json").is_none());
    }
}
