//! Live progress of the copies under way, per device deployment, in memory only: the
//! database records paths as the device acknowledges them, which says nothing while one
//! large path crosses a slow link. The task page and `thymisctl task` show this instead
//! while a copy runs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a copy's progress wakes the live views at most.
const NOTIFY_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
pub struct Copies {
    live: Mutex<HashMap<i64, (thymis_api::CopyProgress, Instant)>>,
}

impl Copies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, (thymis_api::CopyProgress, Instant)>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of paths whose NARs hold `nar_bytes_total` bytes begins.
    pub fn start(&self, child: i64, nar_bytes_total: u64) {
        let p = thymis_api::CopyProgress { nar_bytes_total, ..Default::default() };
        self.lock().insert(child, (p, Instant::now()));
    }

    /// Changes a copy's progress; whether the live views should hear of it now.
    pub fn update(&self, child: i64, f: impl FnOnce(&mut thymis_api::CopyProgress)) -> bool {
        let mut live = self.lock();
        let Some((p, told)) = live.get_mut(&child) else { return false };
        f(p);
        if told.elapsed() < NOTIFY_EVERY {
            return false;
        }
        *told = Instant::now();
        true
    }

    pub fn get(&self, child: i64) -> Option<thymis_api::CopyProgress> {
        self.lock().get(&child).map(|(p, _)| *p)
    }

    pub fn finish(&self, child: i64) {
        self.lock().remove(&child);
    }
}
