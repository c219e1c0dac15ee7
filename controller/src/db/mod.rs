//! The controller's database: devices, enrollment tokens, the offer sequence, tasks and
//! their per-device children, logs. SQLite by default (WAL mode), or PostgreSQL for
//! controllers that share a fleet; the same versioned migrations for both.
//!
//! One `Db`, its methods by what they keep: `schema` (migrations), `devices`,
//! `enrollment`, `sessions`, `tasks`, `children` (a deployment's per-device rows),
//! `cluster` (controllers sharing the database). The writers of a deployment's, a
//! rollout's and a task's state are the engine's (`crate::engine`), not here: only it
//! may change them.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use thymis_proto::message::DeviceReport;

use thymis_api::{Child, ChildState, Rollout, Task};

use crate::model::device::Stage;
use crate::model::task::{Stopped, TaskResult, TaskState};
use crate::sql::vals;
use crate::sql::{Conn, Location, Row, Value};

mod children;
pub use secrets::StoredSecret;
mod cluster;
mod devices;
mod enrollment;
mod schema;
mod secrets;
mod sessions;
mod tasks;
#[cfg(test)]
mod tests;

pub use enrollment::Presented;
use schema::{MIGRATION_LOCK, MIGRATIONS, postgres_migration};

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A device as stored: what the API shows of it (its `online` is the connections'
/// business, false here), and its enrolled key.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    pub info: thymis_api::Device,
    pub public_key: Option<String>,
}

impl std::ops::Deref for DeviceRow {
    type Target = thymis_api::Device;

    fn deref(&self) -> &thymis_api::Device {
        &self.info
    }
}

/// A per-device child as stored.
#[derive(Debug, Clone)]
pub struct ChildRow {
    pub id: i64,
    pub task: i64,
    pub device: String,
    pub config: String,
    pub deployment_id: String,
    pub stage: Stage,
    pub sequence: Option<i64>,
    pub system: Option<String>,
    /// Its wave in a staged rollout (0: the first, or the only one).
    pub wave: usize,
    /// Told to activate (`thymisctl activate`): stage-only and windows no longer stop it.
    pub activate_now: bool,
    /// The maintenance window it switches in (given on deploy, or its configuration's or
    /// tag's in thymis.toml at the deployed commit).
    pub window: Option<String>,
}

/// The database: one connection behind a mutex (the controller's writes are small),
/// to an SQLite file or a PostgreSQL server (`crate::sql`).
#[derive(Debug)]
pub struct Db {
    conn: Mutex<Conn>,
}

impl Db {
    /// Opens (and migrates) the database `--database` names.
    pub fn connect(location: &Location) -> Result<Db> {
        match location {
            Location::Sqlite(path) => Db::open(path),
            Location::Postgres(url) => Db::open_postgres(url),
        }
    }

    pub fn open(path: &Path) -> Result<Db> {
        // The owner's only, whatever the umask (SQLite gives its WAL the same mode).
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} private", path.display()))?;
        }
        let conn = rusqlite::Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            // Made by an older controller, perhaps under another umask.
            let _ = std::fs::set_permissions(&side, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement the controller runs stays prepared.
        conn.set_prepared_statement_cache_capacity(128);
        let mut conn = Conn::Sqlite(conn);
        let version: i64 = conn.query_one("PRAGMA user_version", &[])?.get(0)?;
        if version as usize > MIGRATIONS.len() {
            bail!("{} has schema version {version}, newer than this controller knows", path.display());
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            conn.transaction(|c| {
                c.batch(m)?;
                c.batch(&format!("PRAGMA user_version = {}", i + 1))
            })
            .with_context(|| format!("migration {}", i + 1))?;
        }
        Ok(Db { conn: Mutex::new(conn) })
    }

    /// PostgreSQL, shared by the controllers of one fleet: the same migrations, applied
    /// by whichever controller comes first.
    pub fn open_postgres(url: &str) -> Result<Db> {
        let mut conn = Conn::Postgres(crate::sql::Pg::connect(url)?);
        conn.transaction(|c| {
            c.execute("SELECT pg_advisory_xact_lock(?1)", vals![MIGRATION_LOCK])?;
            c.batch("CREATE TABLE IF NOT EXISTS thymis_schema (version BIGINT NOT NULL)")?;
            let version: i64 = match c.query_opt("SELECT version FROM thymis_schema", &[])? {
                Some(r) => r.get(0)?,
                None => {
                    c.batch("INSERT INTO thymis_schema VALUES (0)")?;
                    0
                }
            };
            if version as usize > MIGRATIONS.len() {
                bail!("the database has schema version {version}, newer than this controller knows");
            }
            for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                c.batch(&postgres_migration(m)).with_context(|| format!("migration {}", i + 1))?;
                c.execute("UPDATE thymis_schema SET version = ?1", vals![(i + 1) as i64])?;
            }
            Ok(())
        })
        .with_context(|| format!("migrating {}", crate::sql::redact(url)))?;
        Ok(Db { conn: Mutex::new(conn) })
    }

    /// Whether other controllers may share this database (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.c().is_postgres()
    }

    pub(crate) fn c(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a device deployment's event records beside its stage (a finishing one: why).
#[derive(Debug, Default, Clone, Copy)]
pub struct Details<'a> {
    pub reason: Option<thymis_api::Reason>,
    pub error: Option<&'a str>,
    pub failed_units: &'a [String],
    /// The wanted health checks that failed.
    pub failed_checks: &'a [String],
    pub unit_logs: Option<&'a std::collections::BTreeMap<String, Vec<String>>>,
    /// Where it ended (default: the phase of the stage it ended in).
    pub phase: Option<thymis_proto::Phase>,
    /// Why a device entering `staged` waits.
    pub waiting: Option<&'a thymis_api::Waiting>,
    /// Why its switch will reboot the device (as the device said when staged).
    pub reboot_needed: Option<&'a str>,
}

impl<'a> Details<'a> {
    pub fn error(error: &'a str) -> Self {
        Details { error: Some(error), ..Default::default() }
    }
}

/// The stored (and API) spelling of a result.
pub fn result_str(r: thymis_proto::DeviceResult) -> String {
    serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

pub fn parse_result(s: &str) -> Option<thymis_proto::DeviceResult> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}
