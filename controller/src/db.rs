//! The controller's database: devices, enrollment tokens, the offer sequence, tasks and
//! their per-device children, logs. SQLite by default (WAL mode), or PostgreSQL for
//! controllers that share a fleet; the same versioned migrations for both.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use thymis_proto::message::DeviceReport;

use thymis_api::{Child, ChildState, Rollout, Task};

use crate::machine::{Event, Refused, Stage};
use crate::sql::{Conn, Location, Row, Value};
use crate::task::{Stopped, TaskResult, TaskState};
use crate::vals;

/// Each entry moves the schema one version up; never edit a released one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE devices (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    public_key TEXT UNIQUE,
    created INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    last_seen INTEGER,
    system TEXT,
    commit_rev TEXT,
    generation INTEGER,
    agent_version TEXT,
    agent_state TEXT,
    last_sequence INTEGER
);
CREATE TABLE enrollment_tokens (
    hash BLOB PRIMARY KEY,
    device TEXT NOT NULL REFERENCES devices(name) ON DELETE CASCADE,
    expires INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE sequence (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
INSERT INTO sequence VALUES (1, 0);
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT,
    commit_rev TEXT,
    message TEXT,
    config TEXT,
    system TEXT,
    error TEXT,
    reboot INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    expires INTEGER
);
CREATE TABLE children (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task INTEGER NOT NULL REFERENCES tasks(id),
    device TEXT NOT NULL,
    config TEXT NOT NULL,
    deployment_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    phase TEXT,
    result TEXT,
    reason TEXT,
    error TEXT,
    failed_units TEXT NOT NULL DEFAULT '[]',
    paths_sent INTEGER NOT NULL DEFAULT 0,
    bytes_sent INTEGER NOT NULL DEFAULT 0,
    system TEXT,
    sequence INTEGER,
    activated INTEGER NOT NULL DEFAULT 0,
    updated INTEGER NOT NULL
);
CREATE INDEX children_task ON children(task);
CREATE INDEX children_device ON children(device);
CREATE TABLE logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task INTEGER NOT NULL,
    child INTEGER,
    line TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX logs_task ON logs(task);
"#,
    r#"
ALTER TABLE children ADD COLUMN unit_logs TEXT NOT NULL DEFAULT '{}';
"#,
    r#"
CREATE TABLE sessions (
    id_hash BLOB PRIMARY KEY,
    csrf TEXT NOT NULL,
    expires INTEGER NOT NULL
);
ALTER TABLE children ADD COLUMN paths_total INTEGER;
"#,
    r#"
CREATE TABLE revoked_keys (
    public_key TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    revoked INTEGER NOT NULL
);
INSERT OR IGNORE INTO revoked_keys (public_key, device, revoked)
    SELECT public_key, name, strftime('%s', 'now') FROM devices WHERE revoked = 1 AND public_key IS NOT NULL;
"#,
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"#,
    // One column for a device deployment's stage (`crate::machine::Stage`), instead of
    // `state`, `activated` and the phase (which now says only where a finished one
    // ended); a task says why it stopped early.
    r#"
ALTER TABLE children ADD COLUMN stage TEXT NOT NULL DEFAULT 'building';
UPDATE children SET stage = CASE
    WHEN result IS NOT NULL THEN 'finished'
    WHEN activated = 1 AND phase = 'confirm' THEN 'confirming'
    WHEN activated = 1 THEN 'activated'
    WHEN state = 'queued' THEN 'queued'
    WHEN phase = 'copy' THEN 'copying'
    ELSE 'building' END;
UPDATE children SET phase = NULL WHERE result IS NULL;
ALTER TABLE children DROP COLUMN state;
ALTER TABLE children DROP COLUMN activated;
ALTER TABLE tasks ADD COLUMN stopped TEXT;
UPDATE tasks SET stopped = 'cancelled' WHERE state = 'cancelled';
"#,
    // Staged rollouts (`crate::rollout`): the plan, the wave running, the end of a soak;
    // each device deployment's wave.
    r#"
ALTER TABLE tasks ADD COLUMN rollout TEXT;
ALTER TABLE tasks ADD COLUMN wave INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN soak_until INTEGER;
ALTER TABLE children ADD COLUMN wave INTEGER NOT NULL DEFAULT 0;
"#,
    // Paths (and their compressed bytes) a device got from its binary caches.
    r#"
ALTER TABLE children ADD COLUMN paths_substituted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE children ADD COLUMN bytes_substituted INTEGER NOT NULL DEFAULT 0;
"#,
    // Controllers sharing the database (`docs/scale.md`): each one's last sign of life;
    // the controller carrying a task, the one delivering a device deployment, and the
    // one a device is connected to.
    r#"
CREATE TABLE controllers (id TEXT PRIMARY KEY, seen INTEGER NOT NULL);
ALTER TABLE tasks ADD COLUMN owner TEXT;
ALTER TABLE children ADD COLUMN owner TEXT;
ALTER TABLE devices ADD COLUMN controller TEXT;
CREATE INDEX children_open ON children(stage) WHERE result IS NULL;
"#,
    // The system a device's profile names when it is not the one it runs (set by hand).
    r#"
ALTER TABLE devices ADD COLUMN boots_next TEXT;
"#,
    // Enrollment tokens kept as the public half of the key each derives, found by id:
    // nothing stored can make a proof (enrollment_tokens' hashes could, for older agents).
    r#"
CREATE TABLE enrollment_keys (
    token_id TEXT PRIMARY KEY,
    verify_key TEXT NOT NULL,
    device TEXT NOT NULL REFERENCES devices(name) ON DELETE CASCADE,
    expires INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
"#,
];

/// The enrollment token an agent proves it holds.
pub enum Presented<'a> {
    /// Named by its id ([`thymis_proto::handshake::token_id`]); `proves` checks the proof
    /// with the public half of the token's key.
    Key { id: &'a str, proves: &'a dyn Fn(&thymis_store::signing::PublicKey) -> bool },
    /// An older agent's proof, keyed with the token's hash: checked against the tokens
    /// issued before token keys, which were kept by their hash.
    Hash(&'a dyn Fn(&[u8; 32]) -> bool),
}

/// A token found: its key column's value, its device, expiry and whether it was used.
type TokenRow = (Value, String, i64, bool);

impl std::fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Presented::Key { id, .. } => write!(f, "Presented::Key({id})"),
            Presented::Hash(_) => f.write_str("Presented::Hash"),
        }
    }
}

/// The migrations as PostgreSQL takes them: the same statements, with its names for the
/// same types (64-bit integers, byte strings, identity columns) and idioms.
fn postgres_migration(sql: &str) -> String {
    let mut out = String::new();
    for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let mut s = stmt
            .replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
            .replace("INTEGER", "BIGINT")
            .replace("BLOB", "BYTEA")
            .replace("strftime('%s', 'now')", "CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)");
        if s.contains("INSERT OR IGNORE INTO") {
            s = s.replace("INSERT OR IGNORE INTO", "INSERT INTO") + " ON CONFLICT DO NOTHING";
        }
        out.push_str(&s);
        out.push_str(";\n");
    }
    out
}

/// Serializes migrations between controllers that start at once on one PostgreSQL.
const MIGRATION_LOCK: i64 = 0x7468_796d_6973;

/// Forgets the device's enrollment tokens, of either kind.
fn delete_tokens(c: &mut Conn, device: &str) -> Result<()> {
    c.execute("DELETE FROM enrollment_tokens WHERE device = ?1", vals![device])?;
    c.execute("DELETE FROM enrollment_keys WHERE device = ?1", vals![device])?;
    Ok(())
}

/// Records the device's enrolled key, if it has one, as revoked.
fn revoke_key(c: &mut Conn, device: &str) -> Result<()> {
    c.execute(
        "INSERT INTO revoked_keys (public_key, device, revoked)
         SELECT public_key, name, CAST(?2 AS BIGINT) FROM devices WHERE name = ?1 AND public_key IS NOT NULL
         ON CONFLICT DO NOTHING",
        vals![device, now()],
    )?;
    Ok(())
}

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
}

/// The database: one connection behind a mutex (the controller's writes are small),
/// to an SQLite file or a PostgreSQL server (`crate::sql`).
#[derive(Debug)]
pub struct Db {
    conn: Mutex<Conn>,
}

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
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

    fn c(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- devices -------------------------------------------------------------------

    pub fn add_device(&self, name: &str, config: &str) -> Result<()> {
        let n = self.c().execute(
            "INSERT INTO devices (name, config, created) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            vals![name, config, now()],
        )?;
        if n == 0 {
            bail!("device {name} already exists");
        }
        Ok(())
    }

    /// A new single-use enrollment token for `device`, valid `ttl` seconds; earlier
    /// unused tokens of the device stop working. Kept: its id and its key's public half.
    pub fn issue_token(&self, device: &str, ttl: i64) -> Result<String> {
        use thymis_proto::handshake::{token_id, token_key};
        let token = crate::random::hex::<24>()?;
        let (id, verify_key) = (token_id(&token), token_key(&token).public().to_string());
        self.c().transaction(|c| {
            delete_tokens(c, device)?;
            c.execute(
                "INSERT INTO enrollment_keys (token_id, verify_key, device, expires) VALUES (?1, ?2, ?3, ?4)",
                vals![id, verify_key, device, now() + ttl],
            )
        })?;
        Ok(token)
    }

    /// Binds `public_key` to the device whose token this is; the token is used up.
    pub fn enroll(&self, token: &str, public_key: &str) -> Result<String> {
        use thymis_proto::handshake::{token_id, token_key};
        let (id, key) = (token_id(token), token_key(token).public());
        self.enroll_with(Presented::Key { id: &id, proves: &|k| *k == key }, public_key)
    }

    /// Binds `public_key` to the device of the token the agent proved it holds (the token
    /// itself never arrives). The token is used up.
    pub fn enroll_with(&self, presented: Presented, public_key: &str) -> Result<String> {
        self.c().transaction(|c| {
            let (table, column, found): (&str, &str, Option<TokenRow>) = match &presented {
                Presented::Key { id, proves } => {
                    let row = c.query_opt(
                        "SELECT verify_key, device, expires, used FROM enrollment_keys WHERE token_id = ?1 FOR UPDATE",
                        vals![*id],
                    )?;
                    let found = match row {
                        Some(r) => {
                            let key: String = r.get(0)?;
                            let proved = key.parse().is_ok_and(|k| proves(&k));
                            proved.then(|| -> Result<_> {
                                Ok((Value::from(id.to_string()), r.get(1)?, r.get(2)?, r.get(3)?))
                            })
                        }
                        None => None,
                    };
                    ("enrollment_keys", "token_id", found.transpose()?)
                }
                Presented::Hash(proves) => {
                    let rows = c.query("SELECT hash, device, expires, used FROM enrollment_tokens FOR UPDATE", &[])?;
                    let mut found = None;
                    for r in rows {
                        let hash: Vec<u8> = r.get(0)?;
                        if <[u8; 32]>::try_from(hash.as_slice()).is_ok_and(|h| proves(&h)) {
                            found = Some((Value::from(hash), r.get(1)?, r.get(2)?, r.get(3)?));
                            break;
                        }
                    }
                    ("enrollment_tokens", "hash", found)
                }
            };
            let Some((presented, device, expires, used)) = found else { bail!("unknown enrollment token") };
            if used {
                bail!("enrollment token already used");
            }
            if expires < now() {
                bail!("enrollment token expired");
            }
            let revoked: bool = c.query_one("SELECT revoked FROM devices WHERE name = ?1", vals![&device])?.get(0)?;
            if revoked {
                bail!("device {device} is revoked");
            }
            let key_revoked =
                c.query_opt("SELECT device FROM revoked_keys WHERE public_key = ?1", vals![public_key])?;
            if let Some(was) = key_revoked {
                bail!("this key was revoked (it was {}'s); enrolling takes a new key", was.get::<String>(0)?);
            }
            c.execute(&format!("UPDATE {table} SET used = 1 WHERE {column} = ?1"), &[presented])?;
            c.execute("UPDATE devices SET public_key = NULL WHERE public_key = ?1", vals![public_key])?;
            c.execute("UPDATE devices SET public_key = ?1 WHERE name = ?2", vals![public_key, &device])?;
            Ok(device)
        })
    }

    /// The device's key (if any) can never log in or enroll again, and its tokens are gone.
    pub fn revoke(&self, name: &str) -> Result<()> {
        self.c().transaction(|c| {
            let n = c.execute("UPDATE devices SET revoked = 1 WHERE name = ?1", vals![name])?;
            if n == 0 {
                bail!("no device {name}");
            }
            revoke_key(c, name)?;
            delete_tokens(c, name)?;
            Ok(())
        })
    }

    /// Re-enrollment (re-imaging, a replaced device): the enrolled key, if any, is
    /// revoked for good, and a new token lets the device enroll a new one.
    pub fn reenroll(&self, name: &str, ttl: i64) -> Result<String> {
        self.c().transaction(|c| {
            let n = c.execute("UPDATE devices SET revoked = 0 WHERE name = ?1", vals![name])?;
            if n == 0 {
                bail!("no device {name}");
            }
            revoke_key(c, name)?;
            c.execute("UPDATE devices SET public_key = NULL WHERE name = ?1", vals![name])?;
            Ok(())
        })?;
        self.issue_token(name, ttl)
    }

    /// Whether this key was revoked (it can never log in again).
    pub fn key_revoked(&self, public_key: &str) -> Result<bool> {
        Ok(self.c().query_opt("SELECT 1 FROM revoked_keys WHERE public_key = ?1", vals![public_key])?.is_some())
    }

    fn device_from_row(r: &Row) -> Result<DeviceRow> {
        let key: Option<String> = r.get(2)?;
        let info = thymis_api::Device {
            name: r.get(0)?,
            config: r.get(1)?,
            key_fingerprint: key
                .as_deref()
                .and_then(|k| k.parse::<thymis_store::signing::PublicKey>().ok())
                .map(|k| k.short_fingerprint()),
            enrolled: key.is_some(),
            revoked: r.get(3)?,
            last_seen: r.get(4)?,
            system: r.get(5)?,
            commit: r.get(6)?,
            generation: r.get(7)?,
            agent_version: r.get(8)?,
            agent_state: r.get(9)?,
            boots_next: r.get(10)?,
            online: false,
        };
        Ok(DeviceRow { info, public_key: key })
    }

    const DEVICE_COLS: &'static str = "name, config, public_key, revoked, last_seen, system, commit_rev, generation, agent_version, agent_state, \
         boots_next";

    pub fn devices(&self) -> Result<Vec<DeviceRow>> {
        let rows = self.c().query(&format!("SELECT {} FROM devices ORDER BY name", Self::DEVICE_COLS), &[])?;
        rows.iter().map(Self::device_from_row).collect()
    }

    pub fn device(&self, name: &str) -> Result<Option<DeviceRow>> {
        let sql = format!("SELECT {} FROM devices WHERE name = ?1", Self::DEVICE_COLS);
        self.c().query_opt(&sql, vals![name])?.as_ref().map(Self::device_from_row).transpose()
    }

    pub fn device_by_key(&self, public_key: &str) -> Result<Option<DeviceRow>> {
        let sql = format!("SELECT {} FROM devices WHERE public_key = ?1", Self::DEVICE_COLS);
        self.c().query_opt(&sql, vals![public_key])?.as_ref().map(Self::device_from_row).transpose()
    }

    /// Stores what the agent reports it runs.
    pub fn record_report(&self, name: &str, r: &DeviceReport) -> Result<()> {
        self.c().execute(
            "UPDATE devices SET last_seen = ?2, system = ?3, commit_rev = ?4, generation = ?5, agent_version = ?6,
                 agent_state = ?7, last_sequence = ?8, boots_next = ?9 WHERE name = ?1",
            vals![
                name,
                now(),
                r.system.as_ref().map(|s| s.to_string()),
                r.commit.as_deref(),
                r.generation.map(|g| g as i64),
                r.agent_version.as_str(),
                r.state.as_str(),
                r.last_sequence as i64,
                r.profile_system.as_ref().map(|s| s.to_string())
            ],
        )?;
        Ok(())
    }

    pub fn touch_device(&self, name: &str) -> Result<()> {
        self.c().execute("UPDATE devices SET last_seen = ?2 WHERE name = ?1", vals![name, now()])?;
        Ok(())
    }

    /// The next number of the fleet-wide offer sequence (only grows, whichever
    /// controller asks: the row is updated in place, under its lock).
    pub fn next_sequence(&self) -> Result<u64> {
        let v: i64 =
            self.c().query_one("UPDATE sequence SET value = value + 1 WHERE id = 1 RETURNING value", &[])?.get(0)?;
        Ok(v as u64)
    }

    // ---- tasks ---------------------------------------------------------------------

    /// A new task, carried by controller `owner` (the one that runs it: another one that
    /// restarts leaves it alone while `owner` is alive).
    #[allow(clippy::too_many_arguments)]
    pub fn create_task(
        &self,
        owner: &str,
        kind: &str,
        commit: Option<&str>,
        message: Option<&str>,
        config: Option<&str>,
        reboot: bool,
        expires: Option<i64>,
    ) -> Result<i64> {
        self.c()
            .query_one(
                "INSERT INTO tasks (kind, state, commit_rev, message, config, reboot, created, updated, expires, owner)
                 VALUES (?1, 'pending', ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8) RETURNING id",
                vals![kind, commit, message, config, reboot, now(), expires, owner],
            )?
            .get(0)
    }

    pub fn add_child(&self, task: i64, device: &str, config: &str, wave: usize) -> Result<i64> {
        // Opaque and short whatever the device's name (one built from the name was too
        // long for the agent past 59 characters).
        let deployment_id = format!("dp-{}", crate::random::hex::<8>()?);
        self.c()
            .query_one(
                "INSERT INTO children (task, device, config, deployment_id, stage, wave, updated)
                 VALUES (?1, ?2, ?3, ?4, 'building', ?5, ?6) RETURNING id",
                vals![task, device, config, deployment_id, wave as i64, now()],
            )?
            .get(0)
    }

    pub fn set_task_state(
        &self,
        task: i64,
        state: TaskState,
        result: Option<TaskResult>,
        error: Option<&str>,
    ) -> Result<()> {
        self.c().execute(
            "UPDATE tasks SET state = ?2, result = ?3, error = COALESCE(?4, error), updated = ?5 WHERE id = ?1",
            vals![task, state.as_str(), result.map(TaskResult::as_str), error, now()],
        )?;
        Ok(())
    }

    pub fn set_task_system(&self, task: i64, system: &str) -> Result<()> {
        self.c().execute("UPDATE tasks SET system = ?2, updated = ?3 WHERE id = ?1", vals![task, system, now()])?;
        Ok(())
    }

    pub fn task_expires(&self, task: i64) -> Result<Option<i64>> {
        let row = self.c().query_opt("SELECT expires FROM tasks WHERE id = ?1", vals![task])?;
        Ok(row.map(|r| r.get(0)).transpose()?.flatten())
    }

    pub fn task_state(&self, task: i64) -> Result<Option<TaskState>> {
        let row = self.c().query_opt("SELECT state FROM tasks WHERE id = ?1", vals![task])?;
        Ok(row.map(|r| r.get::<String>(0)).transpose()?.and_then(|s| TaskState::parse(&s)))
    }

    pub fn set_child_system(&self, child: i64, system: &str) -> Result<()> {
        self.c().execute("UPDATE children SET system = ?2, updated = ?3 WHERE id = ?1", vals![child, system, now()])?;
        Ok(())
    }

    /// Why a task stopped before its devices all finished (cancelled, halted).
    pub fn set_task_stopped(&self, task: i64, stopped: Stopped) -> Result<()> {
        self.c().execute(
            "UPDATE tasks SET stopped = ?2, updated = ?3 WHERE id = ?1",
            vals![task, stopped.as_str(), now()],
        )?;
        Ok(())
    }

    /// A staged rollout's plan, the wave it is at, and when its soak ends.
    pub fn set_task_rollout(&self, task: i64, staging: &thymis_api::Staging) -> Result<()> {
        let plan = serde_json::to_string(staging)?;
        self.c().execute("UPDATE tasks SET rollout = ?2 WHERE id = ?1", vals![task, plan])?;
        Ok(())
    }

    /// (plan, wave, soak until), for a staged rollout.
    pub fn task_rollout(&self, task: i64) -> Result<Option<(thymis_api::Staging, usize, Option<i64>)>> {
        let Some(r) = self.c().query_opt("SELECT rollout, wave, soak_until FROM tasks WHERE id = ?1", vals![task])?
        else {
            return Ok(None);
        };
        let Some(plan) = r.get::<Option<String>>(0)? else { return Ok(None) };
        Ok(Some((serde_json::from_str(&plan)?, r.get::<i64>(1)? as usize, r.get(2)?)))
    }

    pub fn set_task_wave(&self, task: i64, wave: usize, soak_until: Option<i64>) -> Result<()> {
        self.c().execute(
            "UPDATE tasks SET wave = ?2, soak_until = ?3, updated = ?4 WHERE id = ?1",
            vals![task, wave as i64, soak_until, now()],
        )?;
        Ok(())
    }

    /// Ends a soak now (`thymisctl resume`); whether one was running.
    pub fn end_soak(&self, task: i64) -> Result<bool> {
        let n = self.c().execute(
            "UPDATE tasks SET soak_until = ?2 WHERE id = ?1 AND soak_until IS NOT NULL AND soak_until > ?2",
            vals![task, now()],
        )?;
        Ok(n > 0)
    }

    /// (commit, reboot) of a task.
    pub fn task_commit(&self, task: i64) -> Result<Option<(String, bool)>> {
        let row = self.c().query_opt("SELECT commit_rev, reboot FROM tasks WHERE id = ?1", vals![task])?;
        let Some(r) = row else { return Ok(None) };
        let Some(commit) = r.get::<Option<String>>(0)? else { return Ok(None) };
        Ok(Some((commit, r.get(1)?)))
    }

    pub fn task_stopped(&self, task: i64) -> Result<Option<Stopped>> {
        let row = self.c().query_opt("SELECT stopped FROM tasks WHERE id = ?1", vals![task])?;
        Ok(row.map(|r| r.get::<Option<String>>(0)).transpose()?.flatten().and_then(|s| Stopped::parse(&s)))
    }

    pub fn add_progress(&self, child: i64, paths: i64, bytes: i64) -> Result<()> {
        self.c().execute(
            "UPDATE children SET paths_sent = paths_sent + ?2, bytes_sent = bytes_sent + ?3, updated = ?4 WHERE id = ?1",
            vals![child, paths, bytes, now()],
        )?;
        Ok(())
    }

    /// Paths and bytes a device deployment got from the device's binary caches.
    pub fn substituted(&self, child: i64) -> Result<(i64, i64)> {
        let r = self
            .c()
            .query_one("SELECT paths_substituted, bytes_substituted FROM children WHERE id = ?1", vals![child])?;
        Ok((r.get(0)?, r.get(1)?))
    }

    pub fn set_substituted(&self, child: i64, paths: i64, bytes: i64) -> Result<()> {
        self.c().execute(
            "UPDATE children SET paths_substituted = ?2, bytes_substituted = ?3 WHERE id = ?1",
            vals![child, paths, bytes],
        )?;
        Ok(())
    }

    /// How many paths the device lacked when the copy first started.
    pub fn set_paths_total(&self, child: i64, total: i64) -> Result<()> {
        self.c().execute(
            "UPDATE children SET paths_total = COALESCE(paths_total, ?2) WHERE id = ?1",
            vals![child, total],
        )?;
        Ok(())
    }

    /// A browser session; returns (session id, CSRF token). Only the id's hash is stored.
    pub fn create_session(&self, ttl: i64) -> Result<(String, String)> {
        let (id, csrf) = (crate::random::hex::<32>()?, crate::random::hex::<32>()?);
        let mut c = self.c();
        c.execute("DELETE FROM sessions WHERE expires < ?1", vals![now()])?;
        c.execute(
            "INSERT INTO sessions (id_hash, csrf, expires) VALUES (?1, ?2, ?3)",
            vals![hash_token(&id), csrf.as_str(), now() + ttl],
        )?;
        Ok((id, csrf))
    }

    /// The CSRF token of a live session.
    pub fn session_csrf(&self, id: &str) -> Result<Option<String>> {
        let row = self.c().query_opt(
            "SELECT csrf FROM sessions WHERE id_hash = ?1 AND expires >= ?2",
            vals![hash_token(id), now()],
        )?;
        row.map(|r| r.get(0)).transpose()
    }

    /// Sessions were opened with the admin token: a new token (rotated) ends them all.
    /// Returns how many ended.
    pub fn end_sessions_of_other_tokens(&self, admin_token: &str) -> Result<usize> {
        let current = hash_token(&format!("admin-token:{admin_token}"));
        self.c().transaction(|c| {
            let stored = c.query_opt("SELECT value FROM meta WHERE key = 'admin_token_hash' FOR UPDATE", &[])?;
            if stored.map(|r| r.get::<Vec<u8>>(0)).transpose()?.as_deref() == Some(current.as_slice()) {
                return Ok(0);
            }
            let ended = c.execute("DELETE FROM sessions", &[])?;
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('admin_token_hash', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                vals![current.clone()],
            )?;
            Ok(ended as usize)
        })
    }

    pub fn delete_session(&self, id: &str) -> Result<()> {
        self.c().execute("DELETE FROM sessions WHERE id_hash = ?1", vals![hash_token(id)])?;
        Ok(())
    }

    pub fn set_child_sequence(&self, child: i64, sequence: u64) -> Result<()> {
        self.c().execute("UPDATE children SET sequence = ?2 WHERE id = ?1", vals![child, sequence as i64])?;
        Ok(())
    }

    /// The one writer of a device deployment's stage: applies `event` through
    /// [`crate::machine::next`] to the stage as stored, in one transaction (the row
    /// locked, whichever controller writes); a refused event changes nothing. A
    /// finishing event records `details` with its result. Returns the stages before and
    /// after, or the refusal. Only `crate::driver` calls it.
    pub fn advance(&self, child: i64, event: Event, details: &Details<'_>) -> Result<Result<(Stage, Stage), Refused>> {
        self.c().transaction(|c| {
            let r = c.query_one("SELECT stage, result FROM children WHERE id = ?1 FOR UPDATE", vals![child])?;
            let (stage, result): (String, Option<String>) = (r.get(0)?, r.get(1)?);
            let stage = Stage::parse(&stage, result.as_deref().and_then(parse_result))
                .with_context(|| format!("child {child} has an unknown stage {stage:?} ({result:?})"))?;
            let new = match crate::machine::next(stage, event) {
                Ok(n) => n,
                Err(refused) => return Ok(Err(refused)),
            };
            match new {
                Stage::Finished(r) => {
                    c.execute(
                        // The device's outcome replaces whatever the controller had said.
                        "UPDATE children SET stage = 'finished', result = ?2, reason = ?3,
                             error = CASE WHEN ?9 = 1 THEN ?4 ELSE COALESCE(?4, error) END,
                             failed_units = ?5, unit_logs = COALESCE(?6, unit_logs), phase = ?7, updated = ?8
                         WHERE id = ?1",
                        vals![
                            child,
                            result_str(r),
                            details.reason,
                            details.error,
                            serde_json::to_string(details.failed_units)?,
                            details.unit_logs.map(serde_json::to_string).transpose()?,
                            details.phase.or(stage.phase()),
                            now(),
                            matches!(event, Event::Outcome(_))
                        ],
                    )?;
                }
                _ => {
                    c.execute(
                        "UPDATE children SET stage = ?2, error = COALESCE(?3, error), updated = ?4 WHERE id = ?1",
                        vals![child, new.as_str(), details.error, now()],
                    )?;
                }
            }
            Ok(Ok((stage, new)))
        })
    }

    fn child_from_row(r: &Row) -> Result<ChildRow> {
        let (stage, result): (String, Option<String>) = (r.get(5)?, r.get(6)?);
        let stage = Stage::parse(&stage, result.as_deref().and_then(parse_result))
            .with_context(|| format!("unknown stage {stage:?} ({result:?})"))?;
        Ok(ChildRow {
            id: r.get(0)?,
            task: r.get(1)?,
            device: r.get(2)?,
            config: r.get(3)?,
            deployment_id: r.get(4)?,
            stage,
            sequence: r.get(7)?,
            system: r.get(8)?,
            wave: r.get::<i64>(9)? as usize,
        })
    }

    const CHILD_COLS: &'static str = "id, task, device, config, deployment_id, stage, result, sequence, system, wave";

    fn children_where(&self, condition: &str, params: &[Value]) -> Result<Vec<ChildRow>> {
        let sql = format!("SELECT {} FROM children WHERE {condition} ORDER BY id", Self::CHILD_COLS);
        self.c().query(&sql, params)?.iter().map(Self::child_from_row).collect()
    }

    pub fn child_by_deployment(&self, deployment_id: &str) -> Result<Option<ChildRow>> {
        Ok(self.children_where("deployment_id = ?1", vals![deployment_id])?.pop())
    }

    pub fn child(&self, id: i64) -> Result<Option<ChildRow>> {
        Ok(self.children_where("id = ?1", vals![id])?.pop())
    }

    pub fn children(&self, task: i64) -> Result<Vec<ChildRow>> {
        self.children_where("task = ?1", vals![task])
    }

    /// How many of a task's children are in each stage.
    pub fn child_counts(&self, task: i64) -> Result<Vec<(Stage, usize)>> {
        let rows = self.c().query(
            "SELECT stage, result, COUNT(*) FROM children WHERE task = ?1 GROUP BY stage, result",
            vals![task],
        )?;
        rows.iter()
            .map(|r| {
                let (s, res): (String, Option<String>) = (r.get(0)?, r.get(1)?);
                let stage = Stage::parse(&s, res.as_deref().and_then(parse_result));
                Ok((stage.with_context(|| format!("unknown stage {s:?} ({res:?})"))?, r.get::<i64>(2)? as usize))
            })
            .collect()
    }

    /// The devices of a task's queued children.
    pub fn queued_devices(&self, task: i64) -> Result<Vec<String>> {
        let rows = self.c().query("SELECT device FROM children WHERE task = ?1 AND stage = 'queued'", vals![task])?;
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Unfinished children of other tasks for `device` (to be superseded).
    pub fn open_children_of_device(&self, device: &str, except_task: i64) -> Result<Vec<ChildRow>> {
        self.children_where("device = ?1 AND task != ?2 AND result IS NULL", vals![device, except_task])
    }

    /// Tasks not finished: (id, kind, expires).
    /// Open tasks that controller `me` carries: (id, kind, expiry by its clock).
    pub fn open_tasks(&self, me: &str) -> Result<Vec<(i64, String, Option<i64>)>> {
        let rows = self.c().query(
            "SELECT id, kind, expires FROM tasks
             WHERE state NOT IN ('finished', 'cancelled', 'halted') AND owner = ?1",
            vals![me],
        )?;
        rows.iter().map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).collect()
    }

    pub fn log(&self, task: i64, child: Option<i64>, line: &str) -> Result<()> {
        self.c().execute(
            "INSERT INTO logs (task, child, line, at) VALUES (?1, ?2, ?3, ?4)",
            vals![task, child, line, now()],
        )?;
        Ok(())
    }

    /// A task as the API shows it (`GET /api/v1/tasks/{id}`, docs/controller.md).
    pub fn task(&self, task: i64) -> Result<Option<Task>> {
        let mut c = self.c();
        let Some(r) = c.query_opt(
            "SELECT id, kind, state, result, commit_rev, message, config, system, error, created, updated, expires,
                    rollout, wave, soak_until
             FROM tasks WHERE id = ?1",
            vals![task],
        )?
        else {
            return Ok(None);
        };
        let state: String = r.get(2)?;
        let mut t = Task {
            id: r.get(0)?,
            kind: r.get(1)?,
            state: TaskState::parse(&state).with_context(|| format!("task state {state:?}"))?,
            result: r.get::<Option<String>>(3)?.as_deref().and_then(TaskResult::parse),
            commit: r.get(4)?,
            message: r.get(5)?,
            config: r.get(6)?,
            system: r.get(7)?,
            error: r.get(8)?,
            created: r.get(9)?,
            updated: r.get(10)?,
            expires: r.get(11)?,
            rollout: None,
            children: vec![],
        };
        if let Some(plan) = r.get::<Option<String>>(12)? {
            let wave = r.get::<i64>(13)? as usize + 1;
            t.rollout = Some(Rollout { plan: serde_json::from_str(&plan)?, wave, soak_until: r.get(14)? });
        }
        let rows = c.query(
            "SELECT id, device, config, stage, phase, result, reason, error, failed_units, paths_sent, bytes_sent,
                    system, deployment_id, sequence, updated, unit_logs, paths_total, wave,
                    paths_substituted, bytes_substituted
             FROM children WHERE task = ?1 ORDER BY id",
            vals![task],
        )?;
        t.children = rows
            .iter()
            .map(|r| {
                let result: Option<String> = r.get(5)?;
                let result = result.as_deref().and_then(parse_result);
                let stage = Stage::parse(&r.get::<String>(3)?, result);
                let (state, phase) = match stage {
                    Some(Stage::Finished(_)) | None => (ChildState::Finished, r.get::<Option<String>>(4)?),
                    Some(s) => (s.state(), s.phase().map(str::to_owned)),
                };
                Ok(Child {
                    id: r.get(0)?,
                    device: r.get(1)?,
                    config: r.get(2)?,
                    state,
                    phase,
                    result,
                    reason: r.get(6)?,
                    error: r.get(7)?,
                    failed_units: serde_json::from_str(&r.get::<String>(8)?).unwrap_or_default(),
                    paths_sent: r.get(9)?,
                    bytes_sent: r.get(10)?,
                    system: r.get(11)?,
                    deployment_id: r.get(12)?,
                    sequence: r.get(13)?,
                    updated: r.get(14)?,
                    unit_logs: serde_json::from_str(&r.get::<String>(15)?).unwrap_or_default(),
                    paths_total: r.get(16)?,
                    wave: r.get::<i64>(17)? as usize + 1,
                    paths_substituted: r.get(18)?,
                    bytes_substituted: r.get(19)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(t))
    }

    /// A page of a task's log after line `after`: up to 5,000 lines and about 1 MiB
    /// (at least one line), oldest first, as (id, child, line); the reader asks again
    /// from the last id it got.
    pub fn logs(&self, task: i64, after: i64) -> Result<Vec<(i64, Option<i64>, String)>> {
        const PAGE_BYTES: usize = 1 << 20;
        let rows = self.c().query(
            "SELECT id, child, line FROM logs WHERE task = ?1 AND id > ?2 ORDER BY id LIMIT 5000",
            vals![task, after],
        )?;
        let mut page = vec![];
        let mut bytes = 0;
        for r in rows {
            let row: (i64, Option<i64>, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
            bytes += row.2.len();
            if bytes > PAGE_BYTES && !page.is_empty() {
                break;
            }
            page.push(row);
        }
        Ok(page)
    }

    pub fn tasks(&self, limit: i64) -> Result<Vec<Task>> {
        let ids = self.c().query("SELECT id FROM tasks ORDER BY id DESC LIMIT ?1", vals![limit])?;
        ids.iter().filter_map(|r| r.get(0).and_then(|id| self.task(id)).transpose()).collect()
    }

    // ---- controllers sharing the database ---------------------------------------

    /// The time by the database's clock (PostgreSQL's, which every controller sharing it
    /// reads alike; SQLite's is this machine's): what controllers judge each other's
    /// heartbeats by, so that two machines' clocks never need to agree.
    pub fn clock(&self) -> Result<i64> {
        let mut c = self.c();
        if !c.is_postgres() {
            return Ok(now());
        }
        c.query_one("SELECT CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)", &[])?.get(0)
    }

    /// This controller is alive (every sweep), at the database's time.
    pub fn heartbeat(&self, me: &str) -> Result<()> {
        let at = self.clock()?;
        self.c().execute(
            "INSERT INTO controllers (id, seen) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET seen = excluded.seen",
            vals![me, at],
        )?;
        Ok(())
    }

    /// The device is connected to controller `me` (`None`: no longer, if it was to `me`).
    pub fn set_device_controller(&self, device: &str, me: &str, connected: bool) -> Result<()> {
        let sql = if connected {
            "UPDATE devices SET controller = ?2 WHERE name = ?1"
        } else {
            "UPDATE devices SET controller = NULL WHERE name = ?1 AND controller = ?2"
        };
        self.c().execute(sql, vals![device, me])?;
        Ok(())
    }

    /// Devices connected to another controller that is alive (seen since `alive_since`).
    pub fn devices_connected_elsewhere(&self, me: &str, alive_since: i64) -> Result<Vec<String>> {
        let rows = self.c().query(
            "SELECT d.name FROM devices d JOIN controllers c ON c.id = d.controller
             WHERE d.controller != ?1 AND c.seen >= ?2",
            vals![me, alive_since],
        )?;
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Whether `me` may deliver this device deployment: it takes it unless another live
    /// controller holds it. One deliverer at a time, whichever controller the device
    /// is connected to.
    pub fn claim_child(&self, child: i64, me: &str, alive_since: i64) -> Result<bool> {
        let n = self.c().execute(
            "UPDATE children SET owner = ?2 WHERE id = ?1 AND (owner IS NULL OR owner = ?2
                 OR owner NOT IN (SELECT id FROM controllers WHERE seen >= ?3))",
            vals![child, me, alive_since],
        )?;
        Ok(n > 0)
    }

    /// A task's device deployments that another live controller is delivering now.
    pub fn delivered_elsewhere(&self, task: i64, me: &str, alive_since: i64) -> Result<Vec<i64>> {
        let rows = self.c().query(
            "SELECT id FROM children WHERE task = ?1 AND owner != ?2
                 AND owner IN (SELECT id FROM controllers WHERE seen >= ?3)",
            vals![task, me, alive_since],
        )?;
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// `me` no longer delivers it (its connection went away).
    pub fn release_child(&self, child: i64, me: &str) -> Result<()> {
        self.c().execute("UPDATE children SET owner = NULL WHERE id = ?1 AND owner = ?2", vals![child, me])?;
        Ok(())
    }

    pub fn set_task_owner(&self, task: i64, me: &str) -> Result<()> {
        self.c().execute("UPDATE tasks SET owner = ?2 WHERE id = ?1", vals![task, me])?;
        Ok(())
    }

    /// Open tasks whose controller is neither `me` nor alive: (task, its controller).
    /// With `unowned`, also those of no controller (from before controllers had ids).
    pub fn orphaned_tasks(&self, me: &str, alive_since: i64, unowned: bool) -> Result<Vec<(i64, Option<String>)>> {
        let rows = self.c().query(
            "SELECT id, owner FROM tasks WHERE state NOT IN ('finished', 'cancelled', 'halted')
                 AND ((owner IS NULL AND ?3 = 1) OR (owner != ?1
                      AND owner NOT IN (SELECT id FROM controllers WHERE seen >= ?2)))
             ORDER BY id",
            vals![me, alive_since, unowned],
        )?;
        rows.iter().map(|r| Ok((r.get(0)?, r.get(1)?))).collect()
    }

    /// Open tasks carried by controller `me`.
    pub fn tasks_of(&self, me: &str) -> Result<Vec<i64>> {
        let rows = self.c().query(
            "SELECT id FROM tasks WHERE owner = ?1 AND state NOT IN ('finished', 'cancelled', 'halted')",
            vals![me],
        )?;
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Takes over a task from controller `from` (none: an unowned one); false when
    /// another controller took it first.
    pub fn take_task(&self, task: i64, me: &str, from: Option<&str>) -> Result<bool> {
        let n = self.c().execute(
            "UPDATE tasks SET owner = ?2 WHERE id = ?1 AND (owner = ?3 OR (owner IS NULL AND ?3 IS NULL))",
            vals![task, me, from],
        )?;
        Ok(n > 0)
    }

    /// Device deployments this controller can deliver now: of another controller's
    /// running task, built, their turn, their device connected here, nobody alive
    /// delivering them.
    pub fn deliverable_here(&self, me: &str, alive_since: i64) -> Result<Vec<ChildRow>> {
        let sql = format!(
            "SELECT {} FROM children
             WHERE result IS NULL AND stage IN ('queued', 'copying') AND system IS NOT NULL
               AND device IN (SELECT name FROM devices WHERE controller = ?1)
               AND (owner IS NULL OR owner = ?1 OR owner NOT IN (SELECT id FROM controllers WHERE seen >= ?2))
               AND task IN (SELECT id FROM tasks WHERE state NOT IN ('finished', 'cancelled', 'halted')
                            AND stopped IS NULL AND owner != ?1)
             ORDER BY id",
            Self::CHILD_COLS
        );
        self.c().query(&sql, vals![me, alive_since])?.iter().map(Self::child_from_row).collect()
    }

    /// A device's last `limit` deployments, newest first.
    pub fn device_history(&self, device: &str, limit: i64) -> Result<Vec<thymis_api::DeviceDeployment>> {
        let rows = self.c().query(
            "SELECT c.task, c.deployment_id, t.commit_rev, t.message, c.stage, c.result, c.reason, c.error,
                    c.system, t.created, c.updated
             FROM children c JOIN tasks t ON t.id = c.task
             WHERE c.device = ?1 ORDER BY c.id DESC LIMIT ?2",
            vals![device, limit],
        )?;
        rows.iter()
            .map(|r| {
                let result = r.get::<Option<String>>(5)?.as_deref().and_then(parse_result);
                let state = Stage::parse(&r.get::<String>(4)?, result).map_or(ChildState::Finished, Stage::state);
                Ok(thymis_api::DeviceDeployment {
                    task: r.get(0)?,
                    deployment_id: r.get(1)?,
                    commit: r.get(2)?,
                    message: r.get(3)?,
                    state,
                    result,
                    reason: r.get(6)?,
                    error: r.get(7)?,
                    system: r.get(8)?,
                    created: r.get(9)?,
                    updated: r.get(10)?,
                })
            })
            .collect()
    }
}

/// What a device deployment's event records beside its stage (a finishing one: why).
#[derive(Debug, Default, Clone, Copy)]
pub struct Details<'a> {
    pub reason: Option<&'a str>,
    pub error: Option<&'a str>,
    pub failed_units: &'a [String],
    pub unit_logs: Option<&'a std::collections::BTreeMap<String, Vec<String>>>,
    /// Where it ended (default: the phase of the stage it ended in).
    pub phase: Option<&'a str>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_expiring_and_kept_as_a_key_that_cannot_prove() {
        let tmp = tempfile::tempdir().expect("tmp");
        let db = Db::open(&tmp.path().join("db.sqlite")).expect("open");
        db.add_device("d1", "kiosk").expect("add");
        assert!(db.add_device("d1", "kiosk").is_err(), "duplicate device");
        let t = db.issue_token("d1", 60).expect("token");
        assert_eq!(db.enroll(&t, "k:1").expect("enroll"), "d1");
        assert!(db.enroll(&t, "k:2").expect_err("reuse").to_string().contains("already used"));
        assert!(db.enroll("nope", "k:2").is_err());
        let expired = db.issue_token("d1", -1).expect("token");
        assert!(db.enroll(&expired, "k:3").expect_err("expired").to_string().contains("expired"));
        // Kept: the token's id and its key's public half, neither of which can make a
        // proof; the older agents' HMAC path does not reach tokens kept so.
        let row = db.c().query_one("SELECT token_id, verify_key FROM enrollment_keys", &[]).expect("row");
        let (id, verify_key): (String, String) = (row.get(0).expect("id"), row.get(1).expect("key"));
        assert!(!id.contains(&expired) && !verify_key.contains(&expired), "token stored in the clear");
        assert_eq!(id, thymis_proto::handshake::token_id(&expired));
        let fresh = db.issue_token("d1", 60).expect("token");
        let anything = |_: &[u8; 32]| true;
        let err = db.enroll_with(Presented::Hash(&anything), "k:5").expect_err("the HMAC path");
        assert!(err.to_string().contains("unknown enrollment token"), "{err}");
        let wrong = |_: &thymis_store::signing::PublicKey| false;
        let id = thymis_proto::handshake::token_id(&fresh);
        assert!(db.enroll_with(Presented::Key { id: &id, proves: &wrong }, "k:5").is_err(), "a wrong proof");
        // A token issued before token keys (kept by its hash) still enrolls an older agent.
        let old = "an older controller's token";
        let hash = thymis_proto::handshake::token_hash(old).to_vec();
        db.c()
            .execute(
                "INSERT INTO enrollment_tokens (hash, device, expires) VALUES (?1, 'd1', ?2)",
                vals![hash, now() + 60],
            )
            .expect("insert");
        let matches = |h: &[u8; 32]| *h == thymis_proto::handshake::token_hash(old);
        assert_eq!(db.enroll_with(Presented::Hash(&matches), "k:6").expect("older agent"), "d1");
        db.revoke("d1").expect("revoke");
        let again = db.reenroll("d1", 60).expect("reenroll");
        db.revoke("d1").expect("revoke");
        assert!(db.enroll(&again, "k:4").is_err(), "revoked device enrolled");
    }

    #[test]
    fn a_revoked_key_never_comes_back() {
        let tmp = tempfile::tempdir().expect("tmp");
        let db = Db::open(&tmp.path().join("db.sqlite")).expect("open");
        db.add_device("d1", "kiosk").expect("add");
        db.enroll(&db.issue_token("d1", 60).expect("token"), "k:old").expect("enroll");
        db.revoke("d1").expect("revoke");
        assert!(db.key_revoked("k:old").expect("query"));
        // Re-enrolled: the old key is not the device's any more, and cannot enroll again.
        let token = db.reenroll("d1", 60).expect("reenroll");
        assert_eq!(db.device_by_key("k:old").expect("query"), None, "the revoked key still logs in");
        let err = db.enroll(&token, "k:old").expect_err("the revoked key enrolled again");
        assert!(err.to_string().contains("revoked"), "{err}");
        assert_eq!(db.enroll(&token, "k:new").expect("a new key enrolls"), "d1");
        // Re-enrolling an enrolled device (never revoked) revokes its key too.
        let token = db.reenroll("d1", 60).expect("reenroll");
        assert!(db.key_revoked("k:new").expect("query"));
        assert_eq!(db.device_by_key("k:new").expect("query"), None);
        assert!(db.enroll(&token, "k:new").is_err());
    }

    #[test]
    fn sequence_only_grows_across_reopen() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("db.sqlite");
        let a = Db::open(&path).expect("open").next_sequence().expect("seq");
        let b = Db::open(&path).expect("reopen").next_sequence().expect("seq");
        assert!(b > a);
    }

    /// A database of the controller before the stage column: each child's state,
    /// activation and phase become the one stage, cancelled tasks say so.
    #[test]
    fn the_stage_migration_keeps_every_device_deployment_where_it_was() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("db.sqlite");
        {
            let c = rusqlite::Connection::open(&path).expect("open");
            for m in &MIGRATIONS[..5] {
                c.execute_batch(m).expect("old migration");
            }
            c.pragma_update(None, "user_version", 5).expect("version");
            c.execute_batch(
                "INSERT INTO tasks (kind, state, created, updated) VALUES ('deployment', 'cancelled', 0, 0);
                 INSERT INTO children (task, device, config, deployment_id, state, phase, result, activated, updated)
                 VALUES (1, 'b', 'c', 'i1', 'running', 'build', NULL, 0, 0),
                        (1, 'q', 'c', 'i2', 'queued', 'copy', NULL, 0, 0),
                        (1, 'c', 'c', 'i3', 'running', 'copy', NULL, 0, 0),
                        (1, 'a', 'c', 'i4', 'running', 'activate', NULL, 1, 0),
                        (1, 'f', 'c', 'i5', 'running', 'confirm', NULL, 1, 0),
                        (1, 'r', 'c', 'i6', 'finished', 'activate', 'rolled-back', 1, 0);",
            )
            .expect("old rows");
        }
        let db = Db::open(&path).expect("migrate");
        let stages: Vec<Stage> = db.children(1).expect("children").iter().map(|c| c.stage).collect();
        use thymis_proto::DeviceResult as R;
        assert_eq!(
            stages,
            [
                Stage::Building,
                Stage::Queued,
                Stage::Copying,
                Stage::Activated,
                Stage::Confirming,
                Stage::Finished(R::RolledBack)
            ]
        );
        assert_eq!(db.task_stopped(1).expect("stopped"), Some(Stopped::Cancelled));
        let t = db.task(1).expect("read").expect("task");
        assert_eq!(t.children[5].phase.as_deref(), Some("activate"), "where the finished one ended");
        assert_eq!(t.children[3].state, ChildState::Running);
    }
}
