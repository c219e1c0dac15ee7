//! The controller's state machines, pure: no I/O, no tokio, no database. Each takes a
//! state and an event and returns the next state with what it asks of the world
//! (its effects), or a typed refusal; [`crate::engine`] persists the one and performs
//! the other. Each is tested over every (state, event) pair.
//!
//! - [`device`]: one device's deployment (building, waiting, queued, copying,
//!   activated, confirming, finished).
//! - [`rollout`]: a staged rollout's waves, soaks and halt.
//! - [`task`]: every task's state and result (deployments from their devices' stages;
//!   builds, images, bundles and terminals from their one job).
//! - [`window`]: maintenance windows, and when one opens.

pub mod device;
pub mod rollout;
pub mod task;
pub mod window;
