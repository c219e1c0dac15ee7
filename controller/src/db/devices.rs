//! Devices: added, reporting, revoked and re-enrolled; their history.

use anyhow::{Result, bail};

use super::enrollment::delete_tokens;
use super::*;

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

impl Db {
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

    pub(super) fn device_from_row(r: &Row) -> Result<DeviceRow> {
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
            hold: r.get::<Option<String>>(11)?.and_then(|h| serde_json::from_str(&h).ok()),
            time_zone: r.get(12)?,
            no_journal: r.get(13)?,
            no_terminal: r.get(14)?,
            commit_subject: None,
            behind_head: None,
            deployment: None,
        };
        Ok(DeviceRow { info, public_key: key })
    }

    const DEVICE_COLS: &'static str = "name, config, public_key, revoked, last_seen, system, commit_rev, generation, agent_version, agent_state, \
         boots_next, hold, time_zone, no_journal, no_terminal";

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
                 agent_state = ?7, last_sequence = ?8, boots_next = ?9, hold = ?10, time_zone = ?11,
                 no_journal = ?12, no_terminal = ?13 WHERE name = ?1",
            vals![
                name,
                now(),
                r.system.as_ref().map(|s| s.to_string()),
                r.commit.as_deref(),
                r.generation.map(|g| g as i64),
                r.agent_version.as_str(),
                r.state.as_str(),
                r.last_sequence as i64,
                r.profile_system.as_ref().map(|s| s.to_string()),
                r.hold.as_ref().map(serde_json::to_string).transpose()?,
                r.time_zone.as_deref(),
                r.no_journal.as_deref(),
                r.no_terminal.as_deref()
            ],
        )?;
        Ok(())
    }

    /// A device's hold, as its agent last said (a refused activation says it too).
    pub fn set_device_hold(&self, name: &str, hold: Option<&thymis_api::HoldReport>) -> Result<()> {
        let hold = hold.map(serde_json::to_string).transpose()?;
        self.c().execute("UPDATE devices SET hold = ?2 WHERE name = ?1", vals![name, hold])?;
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

    /// A device's last `limit` deployments, newest first.
    pub fn device_history(&self, device: &str, limit: i64) -> Result<Vec<thymis_api::DeviceDeployment>> {
        let rows = self.c().query(
            "SELECT c.task, c.deployment_id, t.commit_rev, t.message, c.stage, c.result, c.reason, c.error,
                    c.system, t.created, c.updated, c.waiting, c.reboot_needed
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
                    reason: r.get::<Option<String>>(6)?.as_deref().and_then(thymis_api::Reason::parse),
                    error: r.get(7)?,
                    system: r.get(8)?,
                    created: r.get(9)?,
                    updated: r.get(10)?,
                    waiting: r.get::<Option<String>>(11)?.and_then(|w| serde_json::from_str(&w).ok()),
                    reboot_needed: r.get(12)?,
                })
            })
            .collect()
    }
}
