//! Holds on updates: an application on the device says "not now" (a kiosk mid-order, a
//! machine mid-job). While a hold is on, deployments are copied and staged, and the
//! switch waits; the controller is told (the hold travels in every
//! [`thymis_proto::message::DeviceReport`]) and switches the device once it is gone.
//!
//! Two ways to take one, whichever suits the application:
//! - D-Bus `io.thymis.Agent1.Hold(reason)` / `Release()` (root, or the agent's
//!   `hold_group`); kept in the state directory, so it outlasts agent restarts and
//!   reboots until released;
//! - the hold file (`hold_file`, default `/run/thymis/hold`): while it exists the device
//!   is held; its first line is the reason and its modification time when it was taken.
//!
//! A hold older than `hold_max_age` is no longer obeyed (an application that died
//! holding it must not freeze the device's updates forever): it is reported `overdue`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thymis_proto::HoldReport;

use crate::clock::unix_now;
use crate::persist;

/// The longest reason kept, in bytes.
const MAX_REASON: usize = 256;

/// A hold taken over D-Bus, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Taken {
    reason: String,
    since: u64,
}

/// The device's holds.
#[derive(Debug)]
pub struct Holds {
    /// Where a D-Bus hold is kept.
    stored: PathBuf,
    dbus: Mutex<Option<Taken>>,
    file: PathBuf,
    max_age: Duration,
}

fn clean(reason: &str) -> String {
    let line = reason.lines().next().unwrap_or_default().trim();
    let mut end = line.len().min(MAX_REASON);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_owned()
}

impl Holds {
    pub fn load(state_dir: &Path, file: PathBuf, max_age: Duration) -> Holds {
        let stored = state_dir.join("hold.json");
        // An unreadable stored hold is a hold (its reason says so): the device was told
        // not to switch, and a damaged file must not undo that.
        let dbus = match persist::read_json::<Taken>(&stored) {
            Ok(t) => t,
            Err(e) => Some(Taken { reason: format!("a stored hold that cannot be read ({e})"), since: unix_now() }),
        };
        Holds { stored, dbus: Mutex::new(dbus), file, max_age }
    }

    /// Takes (or renews the reason of) the D-Bus hold; it keeps its first time.
    pub fn hold(&self, reason: &str) -> std::io::Result<()> {
        let reason = match clean(reason) {
            r if r.is_empty() => "held over D-Bus".to_owned(),
            r => r,
        };
        let mut held = self.dbus.lock().unwrap_or_else(|e| e.into_inner());
        let since = held.as_ref().map_or_else(unix_now, |t| t.since);
        let taken = Taken { reason, since };
        persist::write_json(&self.stored, &taken)?;
        *held = Some(taken);
        Ok(())
    }

    /// Releases the D-Bus hold; whether there was one.
    pub fn release(&self) -> std::io::Result<bool> {
        let mut held = self.dbus.lock().unwrap_or_else(|e| e.into_inner());
        match std::fs::remove_file(&self.stored) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(held.take().is_some())
    }

    /// The hold on the device now, if any (the oldest, when both ways hold it), with
    /// whether it is past its maximum age.
    pub fn current(&self) -> Option<HoldReport> {
        let dbus = self.dbus.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let file = self.of_file();
        let taken = match (dbus, file) {
            (Some(a), Some(b)) => Some(if b.since < a.since { b } else { a }),
            (a, b) => a.or(b),
        }?;
        let overdue = unix_now().saturating_sub(taken.since) > self.max_age.as_secs();
        Some(HoldReport { reason: taken.reason, since: taken.since, overdue })
    }

    /// The hold that stops a switch now: one that is not overdue.
    pub fn holding(&self) -> Option<HoldReport> {
        self.current().filter(|h| !h.overdue)
    }

    fn of_file(&self) -> Option<Taken> {
        let meta = std::fs::metadata(&self.file).ok()?;
        let since = meta.modified().ok().and_then(|m| m.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
        // Only the start is read: an application may leave anything there.
        let mut head = vec![0; 4096];
        let n = std::fs::File::open(&self.file).and_then(|mut f| std::io::Read::read(&mut f, &mut head)).unwrap_or(0);
        let reason = match clean(&String::from_utf8_lossy(&head[..n])) {
            r if r.is_empty() => format!("hold file {}", self.file.display()),
            r => r,
        };
        Some(Taken { reason, since })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn dbus_and_file_holds_and_their_age() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("hold");
        let holds = Holds::load(dir.path(), file.clone(), Duration::from_secs(3600));
        assert_eq!(holds.current(), None);

        holds.hold("printing a label\nsecond line ignored").expect("hold");
        let h = holds.holding().expect("held");
        assert_eq!(h.reason, "printing a label");
        // It outlasts the agent: a new agent reads it back.
        let again = Holds::load(dir.path(), file.clone(), Duration::from_secs(3600));
        assert_eq!(again.current().map(|h| h.reason), Some("printing a label".into()));
        assert!(again.release().expect("release"));
        assert!(!again.release().expect("release twice"));
        assert_eq!(Holds::load(dir.path(), file.clone(), Duration::from_secs(3600)).current(), None);

        // The hold file: its first line is the reason, empty says where it is.
        std::fs::write(&file, "").expect("write");
        let h = again.current().expect("held by the file");
        assert!(h.reason.contains("hold file"), "{h:?}");
        std::fs::write(&file, "x".repeat(10_000)).expect("write");
        assert_eq!(again.current().expect("held").reason.len(), MAX_REASON);

        // Older than the maximum: reported, not obeyed.
        let old = SystemTime::now() - Duration::from_secs(7200);
        std::fs::File::options().write(true).open(&file).and_then(|f| f.set_modified(old)).expect("age it");
        let h = again.current().expect("still reported");
        assert!(h.overdue);
        assert_eq!(again.holding(), None);
        std::fs::remove_file(&file).expect("rm");
        assert_eq!(again.current(), None);
    }

    #[test]
    fn a_damaged_stored_hold_still_holds() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("hold.json"), "{not json").expect("write");
        let holds = Holds::load(dir.path(), dir.path().join("hold"), Duration::from_secs(60));
        assert!(holds.holding().expect("held").reason.contains("cannot be read"));
    }
}
