//! The only door for events. Whatever happens to a deployment (the copy, the agent
//! connection, cancel, supersede, expiry, restart recovery, the sweep), to its rollout
//! or to a task comes here: each event is applied to its pure machine
//! ([`crate::model`]) and stored in one transaction (`store`, whose writers only this
//! module may call), then the engine carries out the effects the machine returned, in
//! one place: it tells a device to drop a deployment that ended before activation,
//! gives back log budgets, recounts the task, and moves a staged rollout on when a
//! wave's last device finishes.
//!
//! How an event travels: an agent's message arrives on its connection
//! ([`crate::agents`]), which calls [`report`]; the engine locks the device
//! deployment's row, applies [`crate::model::device::step`], writes the new stage and
//! returns the step; its effects follow (a rollout's wave settling goes on through
//! [`rollout`]'s machine, whose `Release` wakes the deployment's delivery in
//! [`crate::deploy`]); the task is recounted within 200 ms, and live views are told.
//! What the step asks of a connection (activate, confirm) the caller holding that
//! connection sends.

mod device;
mod rollout;
mod store;
mod task;

pub use device::{close_log_budget, report};
pub use rollout::{cancel, resume_soak, start_rollout, tick};
pub use task::{refresh_task, refresh_task_soon, task_event};
