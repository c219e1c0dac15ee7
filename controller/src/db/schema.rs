//! The schema: versioned migrations, the same for SQLite and PostgreSQL.

/// Each entry moves the schema one version up; never edit a released one.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // One column for a device deployment's stage (`crate::model::device::Stage`), instead of
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
    // The wanted health checks a device deployment ended with failing.
    r#"
ALTER TABLE children ADD COLUMN failed_checks TEXT NOT NULL DEFAULT '[]';
"#,
    // Staging, maintenance windows and holds: the window a device switches in, why a
    // staged device waits, whether its switch reboots, whether it was told to activate;
    // a deployment's stage-only flag; a device's hold and time zone.
    r#"
ALTER TABLE children ADD COLUMN switch_window TEXT;
ALTER TABLE children ADD COLUMN waiting TEXT;
ALTER TABLE children ADD COLUMN reboot_needed TEXT;
ALTER TABLE children ADD COLUMN activate_now INTEGER NOT NULL DEFAULT 0;
CREATE INDEX children_stage ON children(stage);
ALTER TABLE tasks ADD COLUMN stage_only INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN warning TEXT;
ALTER TABLE devices ADD COLUMN hold TEXT;
ALTER TABLE devices ADD COLUMN time_zone TEXT;
ALTER TABLE devices ADD COLUMN no_journal TEXT;
ALTER TABLE devices ADD COLUMN no_terminal TEXT;
"#,
    // Per-device secrets: each value sealed to the controller's own key (never stored
    // in clear), for a device, a configuration or a tag.
    r#"
CREATE TABLE secrets (
    name TEXT NOT NULL,
    scope_kind TEXT NOT NULL,
    scope TEXT NOT NULL,
    owner TEXT NOT NULL,
    grp TEXT NOT NULL,
    mode INTEGER NOT NULL,
    value BLOB NOT NULL,
    updated INTEGER NOT NULL,
    PRIMARY KEY (name, scope_kind, scope)
);
"#,
    // What each device got from a deployment, by package.
    r#"
ALTER TABLE children ADD COLUMN packages TEXT;
"#,
];

/// The migrations as PostgreSQL takes them: the same statements, with its names for the
/// same types (64-bit integers, byte strings, identity columns) and idioms.
pub(super) fn postgres_migration(sql: &str) -> String {
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
pub(super) const MIGRATION_LOCK: i64 = 0x7468_796d_6973;
