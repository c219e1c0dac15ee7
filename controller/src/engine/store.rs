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
                             failed_units = ?5, unit_logs = COALESCE(?6, unit_logs), phase = ?7, updated = ?8,
                             failed_checks = ?10
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
                            matches!(event, Event::Outcome(_)),
                            serde_json::to_string(details.failed_checks)?
                        ],
                    )?;
                }
                new => {
                    // A staged device says why it waits; any other stage waits for nothing.
                    let waiting = match new {
                        Stage::Staged => details.waiting.map(serde_json::to_string).transpose()?,
                        _ => None,
                    };
                    c.execute(
                        "UPDATE children SET stage = ?2, error = COALESCE(?3, error), updated = ?4, waiting = ?5,
                             reboot_needed = COALESCE(?6, reboot_needed)
                         WHERE id = ?1",
                        vals![child, new.as_str(), details.error, now(), waiting, details.reboot_needed],
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rollout::{Action, Event as R};
    use thymis_api::{Count, Staging};
    use thymis_proto::DeviceResult;

    fn db() -> (tempfile::TempDir, Db) {
        let tmp = tempfile::tempdir().expect("tmp");
        let db = Db::open(&tmp.path().join("db.sqlite")).expect("open");
        (tmp, db)
    }

    /// A rollout's state as stored: each step is written and read back in the task's
    /// columns, and an event seen twice (two devices finishing together, two
    /// controllers, a timer after `resume`) is refused by what is stored.
    #[test]
    fn a_rollout_is_stored_step_by_step_and_a_repeated_event_changes_nothing() {
        let (_tmp, db) = db();
        let task = db.create_task("me", "deployment", Some("c"), None, None, false, None).expect("task");
        let staging = Staging { canary: Some(Count::Devices(1)), soak: Some(60), ..Default::default() };
        db.set_task_rollout(task, &staging).expect("plan");
        for (i, wave) in [0, 1, 1].into_iter().enumerate() {
            db.add_child(task, &format!("d{i}"), "kiosk", wave, None).expect("child");
        }
        let settled = |wave| R::WaveSettled { wave, failed: vec![] };
        let (state, actions) = db.rollout_step(task, R::Start, 100).expect("stored").expect("some").expect("start");
        assert_eq!(state, Rollout::Delivering { wave: 0 });
        assert!(matches!(actions.as_slice(), [Action::Release { wave: 0, .. }]), "{actions:?}");
        let (state, _) = db.rollout_step(task, settled(0), 100).expect("stored").expect("some").expect("settled");
        assert_eq!(state, Rollout::Soaking { wave: 0, until: 160 });
        assert_eq!(db.task_rollout(task).expect("read").map(|r| (r.1, r.2)), Some((0, Some(160))));
        assert!(db.rollout_step(task, settled(0), 101).expect("stored").expect("some").is_err(), "settled twice");
        let over = R::SoakOver { wave: 0, failed: vec![] };
        let (state, _) = db.rollout_step(task, over.clone(), 160).expect("stored").expect("some").expect("soaked");
        assert_eq!(state, Rollout::Delivering { wave: 1 });
        assert_eq!(db.task_rollout(task).expect("read").map(|r| (r.1, r.2)), Some((1, None)));
        assert!(db.rollout_step(task, over, 161).expect("stored").expect("some").is_err(), "a late timer");
        let failed = R::WaveSettled { wave: 1, failed: vec!["d1 failed".into(), "d2 failed".into()] };
        let (state, actions) = db.rollout_step(task, failed, 200).expect("stored").expect("some").expect("halt");
        assert_eq!(state, Rollout::Halted);
        assert!(actions.iter().any(|a| matches!(a, Action::Halt(why) if why.contains("2 failed"))), "{actions:?}");
        assert_eq!(db.task_stopped(task).expect("read"), Some(Stopped::Halted));
        assert!(db.rollout_step(task, R::Cancel, 201).expect("stored").expect("some").is_err(), "halted for good");

        // A deployment without waves has no rollout to step.
        let plain = db.create_task("me", "deployment", Some("c"), None, None, false, None).expect("task");
        assert!(db.rollout_step(plain, R::Start, 0).expect("stored").is_none());
    }

    #[test]
    fn a_device_deployment_and_a_job_are_stored_through_their_machines() {
        let (_tmp, db) = db();
        let task = db.create_task("me", "deployment", Some("c"), None, None, false, None).expect("task");
        let child = db.add_child(task, "d1", "kiosk", 0, None).expect("child");
        let step = db.advance(child, Event::Built, &Details::default()).expect("stored").expect("built");
        assert_eq!((step.before, step.stage), (Stage::Building, Stage::Queued));
        let details = Details { reason: Some(thymis_api::Reason::Halted), ..Details::error("not offered") };
        db.advance(child, Event::Halted, &details).expect("stored").expect("halted");
        let t = db.task(task).expect("read").expect("task");
        assert_eq!(t.children[0].result, Some(DeviceResult::Cancelled));
        assert_eq!(t.children[0].reason, Some(thymis_api::Reason::Halted));
        assert_eq!(t.children[0].phase, Some(thymis_proto::Phase::Copy), "where it ended");
        assert!(db.advance(child, Event::Offered, &Details::default()).expect("stored").is_err(), "finished");

        let build = db.create_task("me", "build", Some("c"), None, Some("kiosk"), false, None).expect("task");
        db.task_step(build, task::Event::Started, None).expect("stored").expect("started");
        let ended = task::Event::Ended(TaskResult::Succeeded);
        assert_eq!(
            db.task_step(build, ended, None).expect("stored"),
            Ok((TaskState::Finished, Some(TaskResult::Succeeded)))
        );
        let late = db.task_step(build, task::Event::Interrupted, Some("a restart")).expect("stored");
        assert!(late.is_err(), "a job that ended stays ended");
        assert_eq!(db.task(build).expect("read").expect("task").result, Some(TaskResult::Succeeded));
        assert!(db.task_step(9999, task::Event::Started, None).is_err(), "no such task");
    }
}
