//! Compressed NARs, made once per store path and shared by every device that needs
//! the path (a fleet of fifty costs one compression, not fifty). Files live in
//! `STATE_DIR/nar-cache/<digest>.nar.zst`, are written atomically, and are removed after
//! a day without use.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use thymis_store::local_store::LocalStore;
use thymis_store::{StorePath, zstd_limits};

#[derive(Debug, Default)]
pub struct NarCache {
    dir: PathBuf,
    /// One lock per path, so concurrent deliveries wait for one compression.
    locks: std::sync::Mutex<HashMap<StorePath, Arc<tokio::sync::Mutex<()>>>>,
    /// Compressions done since start (the fan-out benchmark reads it).
    pub compressions: AtomicU64,
}

impl NarCache {
    pub fn new(dir: PathBuf) -> Self {
        NarCache { dir, ..Default::default() }
    }

    fn file(&self, path: &StorePath) -> PathBuf {
        self.dir.join(format!("{}.nar.zst", path.digest()))
    }

    /// The compressed NAR of `path`, compressing it if no one has yet.
    pub async fn get(&self, path: &StorePath) -> Result<PathBuf> {
        let file = self.file(path);
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(path.clone()).or_default().clone()
        };
        let _held = lock.lock().await;
        if file.exists() {
            // Touch it: recently used entries stay.
            let _ = std::fs::File::open(&file).and_then(|f| f.set_modified(SystemTime::now()));
            return Ok(file);
        }
        std::fs::create_dir_all(&self.dir)?;
        let (p, dest, dir) = (path.clone(), file.clone(), self.dir.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let tmp = tempfile::NamedTempFile::new_in(&dir)?;
            let mut enc = zstd_limits::encoder(std::io::BufWriter::new(tmp.as_file()))?;
            LocalStore::system().dump(&p, &mut enc).with_context(|| format!("reading {p}"))?;
            use std::io::Write;
            enc.finish()?.flush()?;
            tmp.persist(&dest).context("storing the compressed NAR")?;
            Ok(())
        })
        .await??;
        self.compressions.fetch_add(1, Ordering::Relaxed);
        Ok(file)
    }

    /// Removes entries unused for `age`.
    pub fn prune(&self, age: Duration) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return };
        for e in rd.flatten() {
            let old =
                e.metadata().and_then(|m| m.modified()).ok().and_then(|m| m.elapsed().ok()).is_some_and(|a| a > age);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
