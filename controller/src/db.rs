//! The controller's SQLite database: devices, enrollment tokens, the offer sequence,
//! tasks and their per-device children, logs. Versioned migrations; WAL mode.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thymis_proto::message::DeviceReport;

use thymis_api::{Child, ChildState, Rollout, Task};

use crate::machine::{Event, Refused, Stage};
use crate::task::{Stopped, TaskResult, TaskState};

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
];

/// Records the device's enrolled key, if it has one, as revoked.
fn revoke_key(tx: &rusqlite::Transaction<'_>, device: &str) -> Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO revoked_keys (public_key, device, revoked)
         SELECT public_key, name, ?2 FROM devices WHERE name = ?1 AND public_key IS NOT NULL",
        params![device, now()],
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

/// The database; one connection behind a mutex (the controller's writes are small).
#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
}

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

impl Db {
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
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
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
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version as usize > MIGRATIONS.len() {
            bail!("{} has schema version {version}, newer than this controller knows", path.display());
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(m).with_context(|| format!("migration {}", i + 1))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(Db { conn: Mutex::new(conn) })
    }

    fn c(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- devices -------------------------------------------------------------------

    pub fn add_device(&self, name: &str, config: &str) -> Result<()> {
        let n = self.c().execute(
            "INSERT INTO devices (name, config, created) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            params![name, config, now()],
        )?;
        if n == 0 {
            bail!("device {name} already exists");
        }
        Ok(())
    }

    /// A new single-use enrollment token for `device`, valid `ttl` seconds; earlier
    /// unused tokens of the device stop working.
    pub fn issue_token(&self, device: &str, ttl: i64) -> Result<String> {
        let token = crate::random::hex::<24>()?;
        let c = self.c();
        c.execute("DELETE FROM enrollment_tokens WHERE device = ?1", params![device])?;
        c.execute(
            "INSERT INTO enrollment_tokens (hash, device, expires) VALUES (?1, ?2, ?3)",
            params![thymis_proto::handshake::token_hash(&token).to_vec(), device, now() + ttl],
        )?;
        Ok(token)
    }

    /// Binds `public_key` to the device whose token this is; the token is used up.
    pub fn enroll(&self, token: &str, public_key: &str) -> Result<String> {
        let presented = thymis_proto::handshake::token_hash(token);
        self.enroll_with(|stored| bool::from(stored.ct_eq(&presented)), public_key)
    }

    /// Binds `public_key` to the device of the token (known by its hash) that `proves`
    /// accepts: an agent's proof is checked against each token's hash, since the
    /// token itself never arrives. The token is used up.
    pub fn enroll_with(&self, proves: impl Fn(&[u8; 32]) -> bool, public_key: &str) -> Result<String> {
        let mut c = self.c();
        let tx = c.transaction()?;
        let rows: Vec<(Vec<u8>, String, i64, bool)> = tx
            .prepare("SELECT hash, device, expires, used FROM enrollment_tokens")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let found = rows.into_iter().find(|(hash, ..)| <[u8; 32]>::try_from(hash.as_slice()).is_ok_and(|h| proves(&h)));
        let Some((presented, device, expires, used)) = found else { bail!("unknown enrollment token") };
        if used {
            bail!("enrollment token already used");
        }
        if expires < now() {
            bail!("enrollment token expired");
        }
        let revoked: bool =
            tx.query_row("SELECT revoked FROM devices WHERE name = ?1", params![device], |r| r.get(0))?;
        if revoked {
            bail!("device {device} is revoked");
        }
        let key_revoked: Option<String> = tx
            .query_row("SELECT device FROM revoked_keys WHERE public_key = ?1", params![public_key], |r| r.get(0))
            .optional()?;
        if let Some(was) = key_revoked {
            bail!("this key was revoked (it was {was}'s); enrolling takes a new key");
        }
        tx.execute("UPDATE enrollment_tokens SET used = 1 WHERE hash = ?1", params![presented])?;
        tx.execute("UPDATE devices SET public_key = NULL WHERE public_key = ?1", params![public_key])?;
        tx.execute("UPDATE devices SET public_key = ?1 WHERE name = ?2", params![public_key, device])?;
        tx.commit()?;
        Ok(device)
    }

    /// The device's key (if any) can never log in or enroll again, and its tokens are gone.
    pub fn revoke(&self, name: &str) -> Result<()> {
        let mut c = self.c();
        let tx = c.transaction()?;
        let n = tx.execute("UPDATE devices SET revoked = 1 WHERE name = ?1", params![name])?;
        if n == 0 {
            bail!("no device {name}");
        }
        revoke_key(&tx, name)?;
        tx.execute("DELETE FROM enrollment_tokens WHERE device = ?1", params![name])?;
        tx.commit()?;
        Ok(())
    }

    /// Re-enrollment (re-imaging, a replaced device): the enrolled key, if any, is
    /// revoked for good, and a new token lets the device enroll a new one.
    pub fn reenroll(&self, name: &str, ttl: i64) -> Result<String> {
        {
            let mut c = self.c();
            let tx = c.transaction()?;
            let n = tx.execute("UPDATE devices SET revoked = 0 WHERE name = ?1", params![name])?;
            if n == 0 {
                bail!("no device {name}");
            }
            revoke_key(&tx, name)?;
            tx.execute("UPDATE devices SET public_key = NULL WHERE name = ?1", params![name])?;
            tx.commit()?;
        }
        self.issue_token(name, ttl)
    }

    /// Whether this key was revoked (it can never log in again).
    pub fn key_revoked(&self, public_key: &str) -> Result<bool> {
        let n: i64 = self.c().query_row(
            "SELECT COUNT(*) FROM revoked_keys WHERE public_key = ?1",
            params![public_key],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRow> {
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
            online: false,
        };
        Ok(DeviceRow { info, public_key: key })
    }

    const DEVICE_COLS: &'static str =
        "name, config, public_key, revoked, last_seen, system, commit_rev, generation, agent_version, agent_state";

    pub fn devices(&self) -> Result<Vec<DeviceRow>> {
        let c = self.c();
        let mut st = c.prepare(&format!("SELECT {} FROM devices ORDER BY name", Self::DEVICE_COLS))?;
        let rows = st.query_map([], Self::device_from_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn device(&self, name: &str) -> Result<Option<DeviceRow>> {
        let c = self.c();
        Ok(c.query_row(
            &format!("SELECT {} FROM devices WHERE name = ?1", Self::DEVICE_COLS),
            params![name],
            Self::device_from_row,
        )
        .optional()?)
    }

    pub fn device_by_key(&self, public_key: &str) -> Result<Option<DeviceRow>> {
        let c = self.c();
        Ok(c.query_row(
            &format!("SELECT {} FROM devices WHERE public_key = ?1", Self::DEVICE_COLS),
            params![public_key],
            Self::device_from_row,
        )
        .optional()?)
    }

    /// Stores what the agent reports it runs.
    pub fn record_report(&self, name: &str, r: &DeviceReport) -> Result<()> {
        self.c().execute(
            "UPDATE devices SET last_seen = ?2, system = ?3, commit_rev = ?4, generation = ?5, agent_version = ?6,
                 agent_state = ?7, last_sequence = ?8 WHERE name = ?1",
            params![
                name,
                now(),
                r.system.as_ref().map(|s| s.to_string()),
                r.commit,
                r.generation.map(|g| g as i64),
                r.agent_version,
                r.state.as_str(),
                r.last_sequence as i64
            ],
        )?;
        Ok(())
    }

    pub fn touch_device(&self, name: &str) -> Result<()> {
        self.c().execute("UPDATE devices SET last_seen = ?2 WHERE name = ?1", params![name, now()])?;
        Ok(())
    }

    /// The next number of the controller-wide offer sequence (only grows).
    pub fn next_sequence(&self) -> Result<u64> {
        let v: i64 =
            self.c()
                .query_row("UPDATE sequence SET value = value + 1 WHERE id = 1 RETURNING value", [], |r| r.get(0))?;
        Ok(v as u64)
    }

    // ---- tasks ---------------------------------------------------------------------

    pub fn create_task(
        &self,
        kind: &str,
        commit: Option<&str>,
        message: Option<&str>,
        config: Option<&str>,
        reboot: bool,
        expires: Option<i64>,
    ) -> Result<i64> {
        let c = self.c();
        c.execute(
            "INSERT INTO tasks (kind, state, commit_rev, message, config, reboot, created, updated, expires)
             VALUES (?1, 'pending', ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
            params![kind, commit, message, config, reboot, now(), expires],
        )?;
        Ok(c.last_insert_rowid())
    }

    pub fn add_child(&self, task: i64, device: &str, config: &str, wave: usize) -> Result<i64> {
        // Opaque and short whatever the device's name (one built from the name was too
        // long for the agent past 59 characters).
        let deployment_id = format!("dp-{}", crate::random::hex::<8>()?);
        let c = self.c();
        c.execute(
            "INSERT INTO children (task, device, config, deployment_id, stage, wave, updated)
             VALUES (?1, ?2, ?3, ?4, 'building', ?5, ?6)",
            params![task, device, config, deployment_id, wave as i64, now()],
        )?;
        Ok(c.last_insert_rowid())
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
            params![task, state.as_str(), result.map(TaskResult::as_str), error, now()],
        )?;
        Ok(())
    }

    pub fn set_task_system(&self, task: i64, system: &str) -> Result<()> {
        self.c().execute("UPDATE tasks SET system = ?2, updated = ?3 WHERE id = ?1", params![task, system, now()])?;
        Ok(())
    }

    pub fn task_expires(&self, task: i64) -> Result<Option<i64>> {
        Ok(self
            .c()
            .query_row("SELECT expires FROM tasks WHERE id = ?1", params![task], |r| r.get(0))
            .optional()?
            .flatten())
    }

    pub fn task_state(&self, task: i64) -> Result<Option<TaskState>> {
        let s: Option<String> =
            self.c().query_row("SELECT state FROM tasks WHERE id = ?1", params![task], |r| r.get(0)).optional()?;
        Ok(s.and_then(|s| TaskState::parse(&s)))
    }

    pub fn set_child_system(&self, child: i64, system: &str) -> Result<()> {
        self.c()
            .execute("UPDATE children SET system = ?2, updated = ?3 WHERE id = ?1", params![child, system, now()])?;
        Ok(())
    }

    /// Why a task stopped before its devices all finished (cancelled, halted).
    pub fn set_task_stopped(&self, task: i64, stopped: Stopped) -> Result<()> {
        self.c().execute(
            "UPDATE tasks SET stopped = ?2, updated = ?3 WHERE id = ?1",
            params![task, stopped.as_str(), now()],
        )?;
        Ok(())
    }

    /// A staged rollout's plan, the wave it is at, and when its soak ends.
    pub fn set_task_rollout(&self, task: i64, staging: &thymis_api::Staging) -> Result<()> {
        let plan = serde_json::to_string(staging)?;
        self.c().execute("UPDATE tasks SET rollout = ?2 WHERE id = ?1", params![task, plan])?;
        Ok(())
    }

    /// (plan, wave, soak until), for a staged rollout.
    pub fn task_rollout(&self, task: i64) -> Result<Option<(thymis_api::Staging, usize, Option<i64>)>> {
        let row: Option<(Option<String>, i64, Option<i64>)> = self
            .c()
            .query_row("SELECT rollout, wave, soak_until FROM tasks WHERE id = ?1", params![task], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let Some((Some(plan), wave, soak_until)) = row else { return Ok(None) };
        Ok(Some((serde_json::from_str(&plan)?, wave as usize, soak_until)))
    }

    pub fn set_task_wave(&self, task: i64, wave: usize, soak_until: Option<i64>) -> Result<()> {
        self.c().execute(
            "UPDATE tasks SET wave = ?2, soak_until = ?3, updated = ?4 WHERE id = ?1",
            params![task, wave as i64, soak_until, now()],
        )?;
        Ok(())
    }

    /// Ends a soak now (`thymisctl resume`); whether one was running.
    pub fn end_soak(&self, task: i64) -> Result<bool> {
        let n = self.c().execute(
            "UPDATE tasks SET soak_until = ?2 WHERE id = ?1 AND soak_until IS NOT NULL AND soak_until > ?2",
            params![task, now()],
        )?;
        Ok(n > 0)
    }

    /// (commit, reboot) of a task.
    pub fn task_commit(&self, task: i64) -> Result<Option<(String, bool)>> {
        let row: Option<(Option<String>, bool)> = self
            .c()
            .query_row("SELECT commit_rev, reboot FROM tasks WHERE id = ?1", params![task], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        Ok(row.and_then(|(c, r)| c.map(|c| (c, r))))
    }

    pub fn task_stopped(&self, task: i64) -> Result<Option<Stopped>> {
        let s: Option<Option<String>> =
            self.c().query_row("SELECT stopped FROM tasks WHERE id = ?1", params![task], |r| r.get(0)).optional()?;
        Ok(s.flatten().and_then(|s| Stopped::parse(&s)))
    }

    pub fn add_progress(&self, child: i64, paths: i64, bytes: i64) -> Result<()> {
        self.c().execute(
            "UPDATE children SET paths_sent = paths_sent + ?2, bytes_sent = bytes_sent + ?3, updated = ?4 WHERE id = ?1",
            params![child, paths, bytes, now()],
        )?;
        Ok(())
    }

    /// How many paths the device lacked when the copy first started.
    /// Paths and bytes a device deployment got from the device's binary caches.
    pub fn substituted(&self, child: i64) -> Result<(i64, i64)> {
        Ok(self.c().query_row(
            "SELECT paths_substituted, bytes_substituted FROM children WHERE id = ?1",
            params![child],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }

    pub fn set_substituted(&self, child: i64, paths: i64, bytes: i64) -> Result<()> {
        self.c().execute(
            "UPDATE children SET paths_substituted = ?2, bytes_substituted = ?3 WHERE id = ?1",
            params![child, paths, bytes],
        )?;
        Ok(())
    }

    pub fn set_paths_total(&self, child: i64, total: i64) -> Result<()> {
        self.c().execute(
            "UPDATE children SET paths_total = COALESCE(paths_total, ?2) WHERE id = ?1",
            params![child, total],
        )?;
        Ok(())
    }

    /// A browser session; returns (session id, CSRF token). Only the id's hash is stored.
    pub fn create_session(&self, ttl: i64) -> Result<(String, String)> {
        let (id, csrf) = (crate::random::hex::<32>()?, crate::random::hex::<32>()?);
        let c = self.c();
        c.execute("DELETE FROM sessions WHERE expires < ?1", params![now()])?;
        c.execute(
            "INSERT INTO sessions (id_hash, csrf, expires) VALUES (?1, ?2, ?3)",
            params![hash_token(&id), csrf, now() + ttl],
        )?;
        Ok((id, csrf))
    }

    /// The CSRF token of a live session.
    pub fn session_csrf(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .c()
            .query_row(
                "SELECT csrf FROM sessions WHERE id_hash = ?1 AND expires >= ?2",
                params![hash_token(id), now()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Sessions were opened with the admin token: a new token (rotated) ends them all.
    /// Returns how many ended.
    pub fn end_sessions_of_other_tokens(&self, admin_token: &str) -> Result<usize> {
        let current = hash_token(&format!("admin-token:{admin_token}"));
        let mut c = self.c();
        let tx = c.transaction()?;
        let stored: Option<Vec<u8>> =
            tx.query_row("SELECT value FROM meta WHERE key = 'admin_token_hash'", [], |r| r.get(0)).optional()?;
        let mut ended = 0;
        if stored.as_deref() != Some(current.as_slice()) {
            ended = tx.execute("DELETE FROM sessions", [])?;
            tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('admin_token_hash', ?1)", params![current])?;
        }
        tx.commit()?;
        Ok(ended)
    }

    pub fn delete_session(&self, id: &str) -> Result<()> {
        self.c().execute("DELETE FROM sessions WHERE id_hash = ?1", params![hash_token(id)])?;
        Ok(())
    }

    pub fn set_child_sequence(&self, child: i64, sequence: u64) -> Result<()> {
        self.c().execute("UPDATE children SET sequence = ?2 WHERE id = ?1", params![child, sequence as i64])?;
        Ok(())
    }

    /// The one writer of a device deployment's stage: applies `event` through
    /// [`crate::machine::next`] to the stage as stored, in one transaction; a refused
    /// event changes nothing. A finishing event records `details` with its result.
    /// Returns the stages before and after, or the refusal. Only `crate::driver` calls it.
    pub fn advance(&self, child: i64, event: Event, details: &Details<'_>) -> Result<Result<(Stage, Stage), Refused>> {
        let mut c = self.c();
        let tx = c.transaction()?;
        let (stage, result): (String, Option<String>) =
            tx.query_row("SELECT stage, result FROM children WHERE id = ?1", params![child], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let stage = Stage::parse(&stage, result.as_deref().and_then(parse_result))
            .with_context(|| format!("child {child} has an unknown stage {stage:?} ({result:?})"))?;
        let new = match crate::machine::next(stage, event) {
            Ok(n) => n,
            Err(refused) => return Ok(Err(refused)),
        };
        match new {
            Stage::Finished(r) => {
                tx.execute(
                    // The device's outcome replaces whatever the controller had said.
                    "UPDATE children SET stage = 'finished', result = ?2, reason = ?3,
                         error = CASE WHEN ?9 THEN ?4 ELSE COALESCE(?4, error) END,
                         failed_units = ?5, unit_logs = COALESCE(?6, unit_logs), phase = ?7, updated = ?8
                     WHERE id = ?1",
                    params![
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
                tx.execute(
                    "UPDATE children SET stage = ?2, error = COALESCE(?3, error), updated = ?4 WHERE id = ?1",
                    params![child, new.as_str(), details.error, now()],
                )?;
            }
        }
        tx.commit()?;
        Ok(Ok((stage, new)))
    }

    fn child_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChildRow> {
        let (stage, result): (String, Option<String>) = (r.get(5)?, r.get(6)?);
        let stage = Stage::parse(&stage, result.as_deref().and_then(parse_result)).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, format!("stage {stage:?}").into())
        })?;
        Ok(ChildRow {
            id: r.get(0)?,
            task: r.get(1)?,
            device: r.get(2)?,
            config: r.get(3)?,
            deployment_id: r.get(4)?,
            stage,
            sequence: r.get(7)?,
            system: r.get(8)?,
            wave: r.get::<_, i64>(9)? as usize,
        })
    }

    const CHILD_COLS: &'static str = "id, task, device, config, deployment_id, stage, result, sequence, system, wave";

    pub fn child_by_deployment(&self, deployment_id: &str) -> Result<Option<ChildRow>> {
        let c = self.c();
        Ok(c.query_row(
            &format!("SELECT {} FROM children WHERE deployment_id = ?1", Self::CHILD_COLS),
            params![deployment_id],
            Self::child_from_row,
        )
        .optional()?)
    }

    pub fn child(&self, id: i64) -> Result<Option<ChildRow>> {
        let c = self.c();
        let sql = format!("SELECT {} FROM children WHERE id = ?1", Self::CHILD_COLS);
        Ok(c.query_row(&sql, params![id], Self::child_from_row).optional()?)
    }

    pub fn children(&self, task: i64) -> Result<Vec<ChildRow>> {
        let c = self.c();
        let mut st = c.prepare(&format!("SELECT {} FROM children WHERE task = ?1 ORDER BY id", Self::CHILD_COLS))?;
        let rows = st.query_map(params![task], Self::child_from_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// A task's children grouped by (state, result), with counts.
    /// How many of a task's children are in each stage.
    pub fn child_counts(&self, task: i64) -> Result<Vec<(Stage, usize)>> {
        let c = self.c();
        let mut st =
            c.prepare("SELECT stage, result, COUNT(*) FROM children WHERE task = ?1 GROUP BY stage, result")?;
        let rows = st
            .query_map(params![task], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, i64>(2)? as usize))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(s, r, n)| {
                let stage = Stage::parse(&s, r.as_deref().and_then(parse_result));
                Ok((stage.with_context(|| format!("unknown stage {s:?} ({r:?})"))?, n))
            })
            .collect()
    }

    /// The devices of a task's queued children.
    pub fn queued_devices(&self, task: i64) -> Result<Vec<String>> {
        let c = self.c();
        let mut st = c.prepare("SELECT device FROM children WHERE task = ?1 AND stage = 'queued'")?;
        let rows = st.query_map(params![task], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
        Ok(rows)
    }

    /// Unfinished children of other tasks for `device` (to be superseded).
    pub fn open_children_of_device(&self, device: &str, except_task: i64) -> Result<Vec<ChildRow>> {
        let c = self.c();
        let mut st = c.prepare(&format!(
            "SELECT {} FROM children WHERE device = ?1 AND task != ?2 AND result IS NULL",
            Self::CHILD_COLS
        ))?;
        let rows = st.query_map(params![device, except_task], Self::child_from_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Tasks not finished: (id, kind, expires).
    pub fn open_tasks(&self) -> Result<Vec<(i64, String, Option<i64>)>> {
        let c = self.c();
        let mut st =
            c.prepare("SELECT id, kind, expires FROM tasks WHERE state NOT IN ('finished', 'cancelled', 'halted')")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn log(&self, task: i64, child: Option<i64>, line: &str) -> Result<()> {
        self.c().execute(
            "INSERT INTO logs (task, child, line, at) VALUES (?1, ?2, ?3, ?4)",
            params![task, child, line, now()],
        )?;
        Ok(())
    }

    /// A task as the API shows it (`GET /api/v1/tasks/{id}`, docs/controller.md).
    pub fn task(&self, task: i64) -> Result<Option<Task>> {
        let c = self.c();
        type Row = (Task, Option<String>, i64, Option<i64>);
        let t: Option<Row> = c
            .query_row(
                "SELECT id, kind, state, result, commit_rev, message, config, system, error, created, updated, expires,
                        rollout, wave, soak_until
                 FROM tasks WHERE id = ?1",
                params![task],
                |r| {
                    let state: String = r.get(2)?;
                    let state = TaskState::parse(&state).ok_or_else(|| {
                        let e = format!("task state {state:?}");
                        rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
                    })?;
                    let task = Task {
                        id: r.get(0)?,
                        kind: r.get(1)?,
                        state,
                        result: r.get::<_, Option<String>>(3)?.as_deref().and_then(TaskResult::parse),
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
                    Ok((task, r.get(12)?, r.get(13)?, r.get(14)?))
                },
            )
            .optional()?;
        let Some((mut t, plan, wave, soak_until)) = t else { return Ok(None) };
        if let Some(plan) = plan {
            t.rollout = Some(Rollout { plan: serde_json::from_str(&plan)?, wave: wave as usize + 1, soak_until });
        }
        let mut st = c.prepare(
            "SELECT id, device, config, stage, phase, result, reason, error, failed_units, paths_sent, bytes_sent,
                    system, deployment_id, sequence, updated, unit_logs, paths_total, wave,
                    paths_substituted, bytes_substituted
             FROM children WHERE task = ?1 ORDER BY id",
        )?;
        t.children = st
            .query_map(params![task], |r| {
                let result: Option<String> = r.get(5)?;
                let result = result.as_deref().and_then(parse_result);
                let stage = Stage::parse(&r.get::<_, String>(3)?, result);
                let (state, phase) = match stage {
                    Some(Stage::Finished(_)) | None => (ChildState::Finished, r.get::<_, Option<String>>(4)?),
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
                    failed_units: serde_json::from_str(&r.get::<_, String>(8)?).unwrap_or_default(),
                    paths_sent: r.get(9)?,
                    bytes_sent: r.get(10)?,
                    system: r.get(11)?,
                    deployment_id: r.get(12)?,
                    sequence: r.get(13)?,
                    updated: r.get(14)?,
                    unit_logs: serde_json::from_str(&r.get::<_, String>(15)?).unwrap_or_default(),
                    paths_total: r.get(16)?,
                    wave: r.get::<_, i64>(17)? as usize + 1,
                    paths_substituted: r.get(18)?,
                    bytes_substituted: r.get(19)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(t))
    }

    /// Log lines of a task after `after` (an id), oldest first: (id, child, line).
    /// A page of a task's log after line `after`: up to 5,000 lines and about 1 MiB
    /// (at least one line); the reader asks again from the last id it got.
    pub fn logs(&self, task: i64, after: i64) -> Result<Vec<(i64, Option<i64>, String)>> {
        const PAGE_BYTES: usize = 1 << 20;
        let c = self.c();
        let mut st =
            c.prepare("SELECT id, child, line FROM logs WHERE task = ?1 AND id > ?2 ORDER BY id LIMIT 5000")?;
        let mut rows = vec![];
        let mut bytes = 0;
        for row in st.query_map(params![task, after], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?)))? {
            let row = row?;
            bytes += row.2.len();
            if bytes > PAGE_BYTES && !rows.is_empty() {
                break;
            }
            rows.push(row);
        }
        Ok(rows)
    }

    pub fn tasks(&self, limit: i64) -> Result<Vec<Task>> {
        let ids: Vec<i64> = {
            let c = self.c();
            let mut st = c.prepare("SELECT id FROM tasks ORDER BY id DESC LIMIT ?1")?;
            st.query_map(params![limit], |r| r.get(0))?.collect::<Result<Vec<_>, _>>()?
        };
        ids.into_iter().filter_map(|id| self.task(id).transpose()).collect()
    }

    /// A device's last `limit` deployments, newest first.
    pub fn device_history(&self, device: &str, limit: i64) -> Result<Vec<thymis_api::DeviceDeployment>> {
        let c = self.c();
        let mut st = c.prepare(
            "SELECT c.task, c.deployment_id, t.commit_rev, t.message, c.stage, c.result, c.reason, c.error,
                    c.system, t.created, c.updated
             FROM children c JOIN tasks t ON t.id = c.task
             WHERE c.device = ?1 ORDER BY c.id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![device, limit], |r| {
            let result = r.get::<_, Option<String>>(5)?.as_deref().and_then(parse_result);
            let state = Stage::parse(&r.get::<_, String>(4)?, result).map_or(ChildState::Finished, Stage::state);
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
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
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
    fn tokens_are_single_use_expiring_and_hashed() {
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
        let raw: Vec<u8> = db.c().query_row("SELECT hash FROM enrollment_tokens", [], |r| r.get(0)).expect("row");
        assert_ne!(raw, expired.as_bytes(), "token stored in the clear");
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
            let c = Connection::open(&path).expect("open");
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
