//! Locks that outlive a panic: a thread that panicked while holding one leaves the data
//! as it was, which every user here can take (counters, maps of connections), so a
//! poisoned lock is taken rather than spreading the panic.

use std::sync::{Mutex, MutexGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
