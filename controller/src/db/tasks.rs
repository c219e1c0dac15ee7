//! Tasks (deployments, builds, images, bundles, terminals), their rollouts and logs.

use anyhow::Result;

use thymis_proto::Phase;

use super::*;

impl Db {
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

    pub fn set_task_system(&self, task: i64, system: &str) -> Result<()> {
        self.c().execute("UPDATE tasks SET system = ?2, updated = ?3 WHERE id = ?1", vals![task, system, now()])?;
        Ok(())
    }

    /// What a task that succeeded wants its reader to know (an image that cannot boot).
    pub fn set_task_warning(&self, task: i64, warning: &str) -> Result<()> {
        self.c().execute("UPDATE tasks SET warning = ?2 WHERE id = ?1", vals![task, warning])?;
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

    /// A staged rollout's plan, the wave it is at, and when its soak ends.
    pub fn set_task_rollout(&self, task: i64, staging: &thymis_api::Staging) -> Result<()> {
        let plan = serde_json::to_string(staging)?;
        self.c().execute("UPDATE tasks SET rollout = ?2 WHERE id = ?1", vals![task, plan])?;
        Ok(())
    }

    /// Marks a deployment stage-only: its devices switch when told to.
    pub fn set_task_stage_only(&self, task: i64) -> Result<()> {
        self.c().execute("UPDATE tasks SET stage_only = 1 WHERE id = ?1", vals![task])?;
        Ok(())
    }

    pub fn task_stage_only(&self, task: i64) -> Result<bool> {
        self.c().query_one("SELECT stage_only FROM tasks WHERE id = ?1", vals![task])?.get(0)
    }

    /// Gives a deployment until at least `at` before it expires (a staged device that
    /// may switch now gets a deployment's lifetime from now).
    pub fn extend_task_expiry(&self, task: i64, at: i64) -> Result<()> {
        self.c().execute("UPDATE tasks SET expires = ?2 WHERE id = ?1 AND expires < ?2", vals![task, at])?;
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
                    rollout, wave, soak_until, warning
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
            commit_subject: None,
            warning: r.get(15)?,
        };
        if let Some(plan) = r.get::<Option<String>>(12)? {
            let wave = r.get::<i64>(13)? as usize + 1;
            t.rollout = Some(Rollout { plan: serde_json::from_str(&plan)?, wave, soak_until: r.get(14)? });
        }
        let rows = c.query(
            "SELECT id, device, config, stage, phase, result, reason, error, failed_units, paths_sent, bytes_sent,
                    system, deployment_id, sequence, updated, unit_logs, paths_total, wave,
                    paths_substituted, bytes_substituted, failed_checks, waiting, reboot_needed, packages
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
                    Some(Stage::Finished(_)) | None => {
                        (ChildState::Finished, r.get::<Option<String>>(4)?.as_deref().and_then(Phase::parse))
                    }
                    Some(s) => (s.state(), s.phase()),
                };
                Ok(Child {
                    id: r.get(0)?,
                    device: r.get(1)?,
                    config: r.get(2)?,
                    state,
                    phase,
                    result,
                    reason: r.get::<Option<String>>(6)?.as_deref().and_then(thymis_api::Reason::parse),
                    error: r.get(7)?,
                    failed_units: serde_json::from_str(&r.get::<String>(8)?).unwrap_or_default(),
                    failed_checks: serde_json::from_str(&r.get::<String>(20)?).unwrap_or_default(),
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
                    waiting: r.get::<Option<String>>(21)?.and_then(|w| serde_json::from_str(&w).ok()),
                    reboot_needed: r.get(22)?,
                    online: false,
                    copy: None,
                    packages: r.get::<Option<String>>(23)?.and_then(|p| serde_json::from_str(&p).ok()),
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
}
