//! The per-device children of a deployment: stage, sequence, progress.

use anyhow::Result;

use super::*;

impl Db {
    /// A device's part of a deployment; `window`: the maintenance window it switches in.
    pub fn add_child(&self, task: i64, device: &str, config: &str, wave: usize, window: Option<&str>) -> Result<i64> {
        // Opaque and short whatever the device's name (one built from the name was too
        // long for the agent past 59 characters).
        let deployment_id = format!("dp-{}", crate::random::hex::<8>()?);
        self.c()
            .query_one(
                "INSERT INTO children (task, device, config, deployment_id, stage, wave, updated, switch_window)
                 VALUES (?1, ?2, ?3, ?4, 'building', ?5, ?6, ?7) RETURNING id",
                vals![task, device, config, deployment_id, wave as i64, now(), window],
            )?
            .get(0)
    }

    pub fn set_child_system(&self, child: i64, system: &str) -> Result<()> {
        self.c().execute("UPDATE children SET system = ?2, updated = ?3 WHERE id = ?1", vals![child, system, now()])?;
        Ok(())
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

    /// What the device gets, by package.
    pub fn set_child_packages(&self, child: i64, packages: &thymis_api::preview::Packages) -> Result<()> {
        let p = serde_json::to_string(packages)?;
        self.c().execute("UPDATE children SET packages = ?2 WHERE id = ?1", vals![child, p])?;
        Ok(())
    }

    /// Marks a device deployment told to activate (`thymisctl activate`).
    pub fn set_activate_now(&self, child: i64) -> Result<()> {
        self.c().execute("UPDATE children SET activate_now = 1 WHERE id = ?1", vals![child])?;
        Ok(())
    }

    /// Why a staged device waits, when that changes while it stays staged (a window
    /// that closed while it was released, a hold taken meanwhile).
    pub fn set_waiting(&self, child: i64, waiting: &thymis_api::Waiting) -> Result<()> {
        let w = serde_json::to_string(waiting)?;
        self.c().execute("UPDATE children SET waiting = ?2 WHERE id = ?1 AND stage = 'staged'", vals![child, w])?;
        Ok(())
    }

    /// The staged device deployments of open tasks, of `device` or all.
    pub fn staged_children(&self, device: Option<&str>) -> Result<Vec<ChildRow>> {
        match device {
            Some(d) => self.children_where("stage = 'staged' AND device = ?1", vals![d]),
            None => self.children_where("stage = 'staged'", &[]),
        }
    }

    /// How many paths the device lacked when the copy first started.
    pub fn set_paths_total(&self, child: i64, total: i64) -> Result<()> {
        self.c().execute(
            "UPDATE children SET paths_total = COALESCE(paths_total, ?2) WHERE id = ?1",
            vals![child, total],
        )?;
        Ok(())
    }

    pub fn set_child_sequence(&self, child: i64, sequence: u64) -> Result<()> {
        self.c().execute("UPDATE children SET sequence = ?2 WHERE id = ?1", vals![child, sequence as i64])?;
        Ok(())
    }

    pub(super) fn child_from_row(r: &Row) -> Result<ChildRow> {
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
            activate_now: r.get(10)?,
            window: r.get(11)?,
        })
    }

    pub(super) const CHILD_COLS: &'static str =
        "id, task, device, config, deployment_id, stage, result, sequence, system, wave, activate_now, switch_window";

    pub(super) fn children_where(&self, condition: &str, params: &[Value]) -> Result<Vec<ChildRow>> {
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

    /// How many devices of a task's wave have not finished.
    pub fn open_in_wave(&self, task: i64, wave: usize) -> Result<usize> {
        let n: i64 = self
            .c()
            .query_one(
                "SELECT COUNT(*) FROM children WHERE task = ?1 AND wave = ?2 AND stage != 'finished'",
                vals![task, wave as i64],
            )?
            .get(0)?;
        Ok(n as usize)
    }

    /// The devices of a task's queued children.
    pub fn queued_devices(&self, task: i64) -> Result<Vec<String>> {
        let rows = self.c().query("SELECT device FROM children WHERE task = ?1 AND stage = 'queued'", vals![task])?;
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Unfinished children of other tasks for `device` (to be superseded).
    /// Every unfinished device deployment (the newest of each device last).
    pub fn open_children(&self) -> Result<Vec<ChildRow>> {
        self.children_where("result IS NULL", &[])
    }

    pub fn open_children_of_device(&self, device: &str, except_task: i64) -> Result<Vec<ChildRow>> {
        self.children_where("device = ?1 AND task != ?2 AND result IS NULL", vals![device, except_task])
    }
}
