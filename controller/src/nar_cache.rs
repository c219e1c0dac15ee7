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
use thymis_store::{PathInfo, StorePath, zstd_limits};

#[derive(Debug, Default)]
pub struct NarCache {
    dir: PathBuf,
    /// One lock per cache file, so concurrent deliveries wait for one compression.
    locks: std::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Compressions done since start (the fan-out benchmark reads it).
    pub compressions: AtomicU64,
    /// Deltas made since start.
    pub deltas: AtomicU64,
}

impl NarCache {
    pub fn new(dir: PathBuf) -> Self {
        NarCache { dir, ..Default::default() }
    }

    /// The compressed NAR of `path`, compressing it if no one has yet.
    pub async fn get(&self, path: &StorePath) -> Result<PathBuf> {
        let file = self.dir.join(format!("{}.nar.zst", path.digest()));
        let p = path.clone();
        self.produce(&file, &self.compressions, move |out| {
            let mut enc = zstd_limits::encoder(out)?;
            LocalStore::system().dump(&p, &mut enc).with_context(|| format!("reading {p}"))?;
            enc.finish()?;
            Ok(())
        })
        .await?;
        Ok(file)
    }

    /// `info.path`'s NAR as a delta against `base` (a path the device has; zstd with the
    /// base's NAR as reference prefix), made once per pair. Fails when this store lacks
    /// the base or it is too large to hold in memory.
    pub async fn get_delta(&self, info: &PathInfo, base: &StorePath) -> Result<PathBuf> {
        let file = self.dir.join(format!("{}.from-{}.nar.zst", info.path.digest(), base.digest()));
        let (p, new_size, base) = (info.path.clone(), info.nar_size, base.clone());
        self.produce(&file, &self.deltas, move |out| {
            let store = LocalStore::system();
            let base_info = store.path_infos(std::slice::from_ref(&base), false)?;
            let base_size = base_info.first().map(|i| i.nar_size).context("no path info for the base")?;
            let window = zstd_limits::delta_window_log(base_size, new_size)
                .with_context(|| format!("{base} is too large to be a delta base"))?;
            let mut base_nar = Vec::with_capacity(base_size as usize);
            store.dump(&base, &mut base_nar).with_context(|| format!("reading {base}"))?;
            let mut enc = zstd_limits::delta_encoder(out, &base_nar, window)?;
            store.dump(&p, &mut enc).with_context(|| format!("reading {p}"))?;
            enc.finish()?;
            Ok(())
        })
        .await?;
        Ok(file)
    }

    /// What to send for `info.path` to a device that has `base`: the delta when it is
    /// smaller than the whole compressed NAR, else the whole NAR.
    pub async fn best(&self, info: &PathInfo, base: Option<&StorePath>) -> Result<(PathBuf, Option<StorePath>)> {
        let whole = self.get(&info.path).await?;
        let Some(base) = base else { return Ok((whole, None)) };
        match self.get_delta(info, base).await {
            Ok(delta) => {
                let size = |f: &PathBuf| std::fs::metadata(f).map(|m| m.len()).unwrap_or(u64::MAX);
                if size(&delta) < size(&whole) { Ok((delta, Some(base.clone()))) } else { Ok((whole, None)) }
            }
            Err(e) => {
                tracing::debug!(path = %info.path, %base, "no delta: {e:#}");
                Ok((whole, None))
            }
        }
    }

    /// Makes `file` with `write` unless it exists (written atomically; concurrent callers
    /// wait for one), counting what it makes in `made`.
    async fn produce(
        &self,
        file: &std::path::Path,
        made: &AtomicU64,
        write: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        // Most calls find the file made: they take no lock.
        if made_already(file) {
            return Ok(());
        }
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(file.to_owned()).or_default().clone()
        };
        let held = lock.lock().await;
        let result = if made_already(file) {
            Ok(())
        } else {
            // Written atomically (a temporary file, then a rename); the lock is forgotten
            // below whatever happens.
            async {
                std::fs::create_dir_all(&self.dir)?;
                let (dest, dir) = (file.to_owned(), self.dir.clone());
                tokio::task::spawn_blocking(move || -> Result<()> {
                    let tmp = tempfile::NamedTempFile::new_in(&dir)?;
                    let mut out = std::io::BufWriter::new(tmp.as_file());
                    write(&mut out)?;
                    use std::io::Write;
                    out.flush()?;
                    drop(out);
                    tmp.persist(&dest).context("storing the compressed NAR")?;
                    Ok(())
                })
                .await??;
                made.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            .await
        };
        drop(held);
        // The last one out forgets the lock: the map holds only files being made.
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&lock) == 2 {
            locks.remove(file);
        }
        result
    }

    /// Removes entries unused for `age` (see [`TOUCH_EVERY`]).
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

/// How often a used entry's time is renewed: often enough for a day's pruning, rarely
/// enough that a fleet's thousands of reads per path do not each write to the disk.
const TOUCH_EVERY: Duration = Duration::from_secs(3600);

/// Whether `file` exists (it is written atomically: then it is complete); renews its
/// time when it is due.
fn made_already(file: &std::path::Path) -> bool {
    let Ok(meta) = std::fs::metadata(file) else { return false };
    let age = meta.modified().ok().and_then(|m| m.elapsed().ok());
    if age.is_some_and(|a| a > TOUCH_EVERY) {
        let _ = std::fs::File::open(file).and_then(|f| f.set_modified(SystemTime::now()));
    }
    true
}
