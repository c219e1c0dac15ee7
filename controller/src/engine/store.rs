//! The writers of a deployment's, a rollout's and a task's state, which only the engine
//! may call (`pub(in crate::engine)`: the compiler keeps everyone else out). Each reads
//! the stored state, applies the pure machine of [`crate::model`] and writes the
//! result in one transaction (the row locked, whichever controller writes); a refused
//! event changes nothing.

use anyhow::{Context, Result};

use crate::db::{Db, Details, now, parse_result, result_str};
use crate::model::device::{self, Event, Stage, Step};
use crate::model::rollout::{self, Plan, Rollout};
use crate::model::task::{self, Stopped, TaskResult, TaskState};
use crate::sql::vals;

impl Db {
    /// Applies `event` to a device deployment's stage as stored; a finishing event
    /// records `details` with its result.
    pub(in crate::engine) fn advance(
        &self,
        child: i64,
        event: Event,
        details: &Details<'_>,
    ) -> Result<Result<Step, device::Refused>> {
        self.c().transaction(|c| {
            let r = c.query_one("SELECT stage, result FROM children WHERE id = ?1 FOR UPDATE", vals![child])?;
            let (stage, result): (String, Option<String>) = (r.get(0)?, r.get(1)?);
            let stage = Stage::parse(&stage, result.as_deref().and_then(parse_result))
                .with_context(|| format!("child {child} has an unknown stage {stage:?} ({result:?})"))?;
            let step = match device::step(stage, event) {
                Ok(s) => s,
                Err(refused) => return Ok(Err(refused)),
            };
            match step.stage {
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
                            details.reason.map(|r| r.as_str()),
                            details.error,
                            serde_json::to_string(details.failed_units)?,
                            details.unit_logs.map(serde_json::to_string).transpose()?,
                            details.phase.or(stage.phase()).map(|p| p.as_str()),
                            now(),
                            matches!(event, Event::Outcome(_))
                        ],
                    )?;
                }
                new => {
                    c.execute(
                        "UPDATE children SET stage = ?2, error = COALESCE(?3, error), updated = ?4 WHERE id = ?1",
                        vals![child, new.as_str(), details.error, now()],
                    )?;
                }
            }
            Ok(Ok(step))
        })
    }

    /// Applies `event` to a task's state (and `error`, when given, as its error).
    pub(in crate::engine) fn task_step(
        &self,
        task: i64,
        event: task::Event,
        error: Option<&str>,
    ) -> Result<Result<(TaskState, Option<TaskResult>), task::Refused>> {
        self.c().transaction(|c| {
            let Some(r) = c.query_opt("SELECT state FROM tasks WHERE id = ?1 FOR UPDATE", vals![task])? else {
                anyhow::bail!("no task {task}");
            };
            let state: String = r.get(0)?;
            let state = TaskState::parse(&state).with_context(|| format!("task {task} has state {state:?}"))?;
            let (state, result) = match task::next(state, event) {
                Ok(n) => n,
                Err(refused) => return Ok(Err(refused)),
            };
            c.execute(
                "UPDATE tasks SET state = ?2, result = ?3, error = COALESCE(?4, error), updated = ?5 WHERE id = ?1",
                vals![task, state.as_str(), result.map(TaskResult::as_str), error, now()],
            )?;
            Ok(Ok((state, result)))
        })
    }

    /// Why a deployment stopped before its devices all finished (cancelled, halted).
    pub(in crate::engine) fn set_task_stopped(&self, task: i64, stopped: Stopped) -> Result<()> {
        self.c().execute(
            "UPDATE tasks SET stopped = ?2, updated = ?3 WHERE id = ?1",
            vals![task, stopped.as_str(), now()],
        )?;
        Ok(())
    }

    /// Applies `event` to a staged rollout as stored (none: `Ok(None)`), at `now`.
    pub(in crate::engine) fn rollout_step(
        &self,
        task: i64,
        event: rollout::Event,
        now: i64,
    ) -> Result<Option<Result<rollout::Next, rollout::Refused>>> {
        self.c().transaction(|c| {
            let Some(r) = c.query_opt(
                "SELECT rollout, wave, soak_until, stopped, (SELECT COUNT(*) FROM children WHERE task = ?1)
                 FROM tasks WHERE id = ?1 FOR UPDATE",
                vals![task],
            )?
            else {
                return Ok(None);
            };
            let Some(staging) = r.get::<Option<String>>(0)? else { return Ok(None) };
            let staging: thymis_api::Staging = serde_json::from_str(&staging)?;
            let plan = Plan::new(&staging, r.get::<i64>(4)? as usize);
            let wave = r.get::<i64>(1)? as usize;
            let state = match (r.get::<Option<String>>(3)?.as_deref().and_then(Stopped::parse), r.get(2)?) {
                (Some(Stopped::Halted), _) => Rollout::Halted,
                (Some(Stopped::Cancelled), _) => Rollout::Cancelled,
                (None, Some(until)) => Rollout::Soaking { wave, until },
                (None, None) => Rollout::Delivering { wave },
            };
            let (new, actions) = match rollout::next(state, event, &plan, now) {
                Ok(n) => n,
                Err(refused) => return Ok(Some(Err(refused))),
            };
            let (wave, until, stopped) = match new {
                Rollout::Delivering { wave } => (wave, None, None),
                Rollout::Soaking { wave, until } => (wave, Some(until), None),
                // The last wave stays the one shown.
                Rollout::Done => (wave, None, None),
                Rollout::Halted => (wave, None, Some(Stopped::Halted)),
                Rollout::Cancelled => (wave, None, Some(Stopped::Cancelled)),
            };
            c.execute(
                "UPDATE tasks SET wave = ?2, soak_until = ?3, stopped = COALESCE(?4, stopped), updated = ?5
                 WHERE id = ?1",
                vals![task, wave as i64, until, stopped.map(Stopped::as_str), now],
            )?;
            Ok(Some(Ok((new, actions))))
        })
    }
}
