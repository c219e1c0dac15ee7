//! Controllers that share the database: heartbeats by the database's clock, which
//! device is connected where, who carries which task and delivers which child.

use anyhow::Result;

use super::*;

impl Db {
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
}
