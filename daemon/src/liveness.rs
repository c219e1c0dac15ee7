//! Whether the agent's connection and copy machinery makes progress, for systemd's
//! watchdog. The connection loop beats while it reads, writes, waits between attempts or
//! idles; the importer beats as it streams paths into `nix-store --import`. The
//! watchdog is fed only while the loop's last beat is recent and, during an import, the
//! importer's too: an agent wedged in either stops feeding it, and systemd restarts it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Liveness {
    start: Instant,
    /// Milliseconds after `start` of the connection loop's last beat.
    connection: AtomicU64,
    /// Whether an import runs, and the milliseconds of its last beat.
    importing: AtomicBool,
    import: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            start: Instant::now(),
            connection: AtomicU64::new(0),
            importing: AtomicBool::new(false),
            import: AtomicU64::new(0),
        }
    }
}

impl Liveness {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The connection loop made progress.
    pub fn beat(&self) {
        self.connection.store(self.now(), Ordering::Relaxed);
    }

    /// An import starts; it counts as stuck while it does not [`Liveness::import_beat`].
    /// The import ends when the guard drops.
    pub fn importing(&self) -> ImportGuard<'_> {
        self.import_beat();
        self.importing.store(true, Ordering::Relaxed);
        ImportGuard(self)
    }

    /// The import moved data.
    pub fn import_beat(&self) {
        self.import.store(self.now(), Ordering::Relaxed);
    }

    /// How long the machinery has been without progress: the connection loop's silence,
    /// or a running import's, whichever is longer.
    pub fn silent_for(&self) -> Duration {
        let now = self.now();
        let mut since = self.connection.load(Ordering::Relaxed);
        if self.importing.load(Ordering::Relaxed) {
            since = since.min(self.import.load(Ordering::Relaxed));
        }
        Duration::from_millis(now.saturating_sub(since))
    }

    /// Sleeps for `d`, beating at least every second: waiting between attempts is idling,
    /// not being stuck.
    pub async fn idle(&self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        loop {
            self.beat();
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        }
    }
}

/// Ends an import's watch when dropped.
#[derive(Debug)]
pub struct ImportGuard<'a>(&'a Liveness);

impl Drop for ImportGuard<'_> {
    fn drop(&mut self) {
        self.0.importing.store(false, Ordering::Relaxed);
    }
}

/// A reader that beats the import's liveness at every read.
#[derive(Debug)]
pub struct Beating<'a, R> {
    pub inner: R,
    pub liveness: &'a Liveness,
}

impl<R: std::io::Read> std::io::Read for Beating<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.liveness.import_beat();
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAUSE: Duration = Duration::from_millis(60);

    #[test]
    fn silence_grows_until_the_next_beat() {
        let l = Liveness::default();
        l.beat();
        std::thread::sleep(PAUSE);
        assert!(l.silent_for() >= PAUSE);
        l.beat();
        assert!(l.silent_for() < PAUSE);
    }

    #[test]
    fn a_stalled_import_counts_even_while_the_connection_beats() {
        let l = Liveness::default();
        let guard = l.importing();
        std::thread::sleep(PAUSE);
        l.beat();
        assert!(l.silent_for() >= PAUSE, "an import that moved nothing is silent");
        let mut r = Beating { inner: &b"nar"[..], liveness: &l };
        std::io::Read::read(&mut r, &mut [0; 8]).expect("read");
        assert!(l.silent_for() < PAUSE, "reading is progress");
        std::thread::sleep(PAUSE);
        drop(guard);
        l.beat();
        assert!(l.silent_for() < PAUSE, "a finished import no longer counts");
    }
}
