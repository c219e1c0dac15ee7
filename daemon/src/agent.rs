//! The agent's core: keys, persisted state, offers, activation, confirmation and
//! rollback. Connections ([`crate::connection`]) and D-Bus ([`crate::dbus`]) are thin
//! adapters that call into [`Agent`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use thymis_proto::message::{DeviceReport, Outcome, PendingReport};
use thymis_proto::signed::{Confirmation, Offer, Signed};
use thymis_proto::{AgentState, DeviceResult, Phase, RollbackReason};
use thymis_store::StorePath;
use thymis_store::local_store::LocalStore;
use thymis_store::signing::{PublicKey, SecretKey};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::activation::{self, SwitchAction};
use crate::bootloader::exec::{self, Host, Stopped, Target};
use crate::bootloader::{self, Loader, Plan, safety};
use crate::clock::{self, BootDeadline};
use crate::config::AgentConfig;
use crate::lifecycle::{self, Action, Event, Stage};
use crate::persist;
use crate::profile;
use crate::state::{HISTORY_LEN, Pending, Persisted};
use crate::status::Status;

pub use thymis_proto::DEVICE_KEY_NAME;

/// The device agent. Shared between the connection, the D-Bus service and timers.
#[derive(Debug)]
pub struct Agent {
    pub config: AgentConfig,
    pub device_key: SecretKey,
    pub identity_keys: Vec<PublicKey>,
    pub nix_keys: Vec<PublicKey>,
    pub store: LocalStore,
    persisted: Mutex<Persisted>,
    pending: Mutex<Option<Pending>>,
    /// An accepted offer whose paths are being copied (not yet activated).
    offer: Mutex<Option<Offer>>,
    /// Whether that offer came from an offline bundle (local confirmation).
    local: Mutex<bool>,
    /// The controller's clock at the last welcome, and this boot's clock then: expiry
    /// without a synchronised clock of its own.
    controller_clock: Mutex<Option<(u64, Duration)>>,
    /// Serialises lifecycle steps (confirmation vs. deadline vs. rollback request).
    lifecycle: tokio::sync::Mutex<()>,
    status: watch::Sender<Status>,
    /// Asks the connection to close and reconnect (a new connection confirms).
    pub reconnect: Notify,
    /// Tells the connection that the outbox has something new.
    pub outbox_changed: Notify,
    /// Where deployment log lines go (the current connection, if any).
    log_sink: Mutex<Option<LogSink>>,
    /// Progress of the connection loop, for the watchdog.
    pub liveness: Arc<crate::liveness::Liveness>,
    /// Holds on updates taken by applications on the device.
    pub holds: crate::hold::Holds,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Loads (or creates) keys and state from the state directory.
    pub fn new(config: AgentConfig) -> Result<Arc<Agent>> {
        let dir = &config.state_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating state directory {}", dir.display()))?;
        let staging = dir.join("staging");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)?;
        let (device_key, new_key) = load_or_create_key(&dir.join("device.key"))?;
        let parse_keys = |keys: &[String], what: &str| -> Result<Vec<PublicKey>> {
            keys.iter().map(|k| k.parse().with_context(|| format!("{what} key {k:?}"))).collect()
        };
        let identity_keys = parse_keys(&config.controller_identity_keys, "controller_identity_keys")?;
        let nix_keys = parse_keys(&config.nix_trusted_keys, "nix_trusted_keys")?;
        let mut persisted: Persisted = persist::read_json(&dir.join("state.json"))?.unwrap_or_default();
        if new_key && persisted.enrolled {
            // A new key is enrolled by nobody: it proves an enrollment token again.
            warn!("the device key is new: enrolling it with the configured enrollment token");
            persisted.enrolled = false;
        }
        // A freshly flashed device knows what it runs from its image (imager's image.json).
        if persisted.system.is_none()
            && let Ok(Some(image)) = persist::read_json::<ImageInfo>(&dir.join("image.json"))
        {
            persisted.system = Some(image.system);
            persisted.commit = image.commit;
        }
        let pending: Option<Pending> = persist::read_json(&dir.join("pending.json"))?;
        let (status, _) = watch::channel(Status::default());
        let max_age = std::time::Duration::from_secs(config.hold_max_age);
        let holds = crate::hold::Holds::load(dir, config.hold_file.clone(), max_age);
        let agent = Arc::new(Agent {
            config,
            device_key,
            identity_keys,
            nix_keys,
            store: LocalStore::system(),
            persisted: Mutex::new(persisted),
            pending: Mutex::new(pending),
            offer: Mutex::new(None),
            local: Mutex::new(false),
            controller_clock: Mutex::new(None),
            lifecycle: tokio::sync::Mutex::new(()),
            status,
            reconnect: Notify::new(),
            outbox_changed: Notify::new(),
            log_sink: Mutex::new(None),
            liveness: Default::default(),
            holds,
        });
        agent.publish(|_| {});
        Ok(agent)
    }

    /// Sets (or clears) where deployment log lines go.
    pub fn set_log_sink(&self, sink: Option<LogSink>) {
        *lock(&self.log_sink) = sink;
    }

    /// A line for the deployment's log at the controller (dropped when offline).
    pub fn log_line(&self, deployment_id: &str, line: String) {
        info!(deployment = %deployment_id, "{line}");
        if let Some(sink) = lock(&self.log_sink).as_ref() {
            (sink.0)(deployment_id, line);
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.state_dir().join("staging")
    }

    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Recomputes the status from state, then applies `tweak`.
    pub fn publish(&self, tweak: impl FnOnce(&mut Status)) {
        let persisted = lock(&self.persisted).clone();
        let pending = lock(&self.pending).clone();
        let downloading = lock(&self.offer).is_some();
        let state = match pending.as_ref().map(|p| &p.stage) {
            Some(Stage::Activating | Stage::Rebooting | Stage::Checking { .. } | Stage::Committing { .. }) => {
                AgentState::Activating
            }
            Some(Stage::AwaitingConfirmation { .. }) => AgentState::AwaitingConfirmation,
            Some(Stage::RollingBack { .. }) => AgentState::RollingBack,
            None if downloading => AgentState::Downloading,
            None => AgentState::Idle,
        };
        self.status.send_modify(|s| {
            s.state = state;
            s.current_system = self.running_system(&persisted, pending.as_ref());
            s.current_commit = match &pending {
                Some(p) if !matches!(p.stage, Stage::RollingBack { .. }) => p.offer.commit.clone(),
                _ => persisted.commit.clone(),
            };
            s.previous_system = match &pending {
                Some(p) => p.previous.clone(),
                None => None,
            };
            if state != AgentState::Downloading {
                s.progress = 100;
            }
            s.last_deployment =
                persisted.history.last().map(|o| serde_json::to_string(o).unwrap_or_default()).unwrap_or_default();
            tweak(s);
        });
    }

    /// The system the device runs: `/run/current-system` where it exists, else the one
    /// it last activated.
    fn running_system(&self, persisted: &Persisted, pending: Option<&Pending>) -> Option<StorePath> {
        if let Some(p) = profile::resolve(&self.config.current_system_link) {
            return Some(p);
        }
        match pending {
            Some(p) if !matches!(p.stage, Stage::RollingBack { .. }) => Some(p.offer.system.clone()),
            _ => persisted.system.clone(),
        }
    }

    fn save_persisted(&self, p: &Persisted) -> Result<()> {
        persist::write_json(&self.state_dir().join("state.json"), p).context("writing state.json")
    }

    fn save_pending(&self, p: Option<&Pending>) -> Result<()> {
        let path = self.state_dir().join("pending.json");
        match p {
            Some(p) => persist::write_json(&path, p).context("writing pending.json"),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).context("removing pending.json"),
                _ => Ok(()),
            },
        }
    }

    pub fn persisted(&self) -> Persisted {
        lock(&self.persisted).clone()
    }

    pub fn pending(&self) -> Option<Pending> {
        lock(&self.pending).clone()
    }

    /// Records the controller's welcome.
    pub fn welcomed(&self, device: &str, config: &str, controller_time: u64) -> Result<()> {
        *lock(&self.controller_clock) = (controller_time > 0).then(|| (controller_time, clock::boottime()));
        let mut p = lock(&self.persisted);
        if !p.enrolled || p.device_name.as_deref() != Some(device) || p.config.as_deref() != Some(config) {
            p.enrolled = true;
            p.device_name = Some(device.to_owned());
            p.config = Some(config.to_owned());
            self.save_persisted(&p)?;
        }
        Ok(())
    }

    /// An offer verified by other means (an offline bundle's signed manifest), to be
    /// activated and confirmed locally.
    pub fn stage_local_offer(&self, offer: Offer) {
        *lock(&self.offer) = Some(offer);
        *lock(&self.local) = true;
    }

    /// The system the device runs now.
    pub fn running(&self) -> Option<StorePath> {
        self.running_system(&self.persisted(), self.pending().as_ref())
    }

    /// The report sent on every connection.
    pub fn report(&self) -> DeviceReport {
        let persisted = self.persisted();
        let pending = self.pending();
        let system = self.running_system(&persisted, pending.as_ref());
        let profile_system = profile::resolve(&self.config.system_profile).filter(|p| Some(p) != system.as_ref());
        DeviceReport {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            system,
            profile_system,
            commit: self.status().current_commit,
            generation: profile::generation(&self.config.system_profile),
            state: self.status().state,
            last_sequence: persisted.last_sequence,
            pending: pending.and_then(|p| match p.stage {
                Stage::AwaitingConfirmation { .. } => Some(PendingReport {
                    seconds_left: p.deadline.as_ref().and_then(BootDeadline::remaining).unwrap_or_default().as_secs(),
                    deployment_id: p.offer.deployment_id,
                    system: p.offer.system,
                    sequence: p.offer.sequence,
                }),
                _ => None,
            }),
            hold: self.holds.current(),
            time_zone: crate::clock::time_zone(),
            no_journal: crate::journal::unavailable(),
            no_terminal: (!self.config.terminal).then(|| crate::config::NO_TERMINAL.to_owned()),
        }
    }

    /// Unix time as the controller's clock counts it (since its last welcome).
    fn controller_now(&self) -> Option<u64> {
        let (time, at) = (*lock(&self.controller_clock))?;
        Some(time + clock::boottime().saturating_sub(at).as_secs())
    }

    /// Checks a signed offer, made for the connection `session`; on success it becomes
    /// the offer being copied.
    pub fn accept_offer(&self, signed: &Signed, session: &str) -> Result<Offer, String> {
        let offer: Offer = signed.verify(&self.identity_keys).map_err(|e| e.to_string())?;
        if offer.session.as_deref() != Some(session) {
            return Err("offer was made for another connection (replayed, or from a controller that does not \
                        bind offers to connections)"
                .into());
        }
        let persisted = self.persisted();
        let me = persisted.device_name.clone().unwrap_or_default();
        if offer.device != me {
            return Err(format!("offer is for device {:?}, this is {me:?}", offer.device));
        }
        if !valid_id(&offer.deployment_id) {
            return Err(format!("deployment id {:?} is not [A-Za-z0-9._-]{{1,64}}", offer.deployment_id));
        }
        if let Some(p) = self.pending() {
            return Err(format!("deployment {} is still {:?}", p.offer.deployment_id, p.stage));
        }
        if let Some(why) = self.untried_profile() {
            return Err(why);
        }
        if offer.sequence <= persisted.last_sequence {
            return Err(format!(
                "offer sequence {} is not above the last applied {}: replayed or outdated",
                offer.sequence, persisted.last_sequence
            ));
        }
        // Without a synchronised clock of its own, the controller's signed one.
        let now = if clock::wall_clock_synchronised() { Some(clock::unix_now()) } else { self.controller_now() };
        if let Some(now) = now
            && offer.expires < now
        {
            return Err(format!("offer expired at {} (unix time; now {now})", offer.expires));
        }
        info!(deployment = %offer.deployment_id, system = %offer.system, sequence = offer.sequence, "offer accepted");
        *lock(&self.offer) = Some(offer.clone());
        self.publish(|s| s.progress = 0);
        Ok(offer)
    }

    /// The accepted offer, if it is `deployment_id`.
    pub fn current_offer(&self, deployment_id: &str) -> Option<Offer> {
        lock(&self.offer).clone().filter(|o| o.deployment_id == deployment_id)
    }

    pub fn set_progress(&self, percent: u8) {
        self.status.send_modify(|s| s.progress = percent.min(100));
    }

    pub fn set_connected(&self, connected: bool) {
        self.status.send_modify(|s| s.controller_connected = connected);
    }

    /// Drops the accepted offer; with an error, reports the deployment as failed.
    pub fn abort_offer(&self, deployment_id: &str, error: Option<String>) {
        let taken = {
            let mut o = lock(&self.offer);
            if o.as_ref().is_some_and(|o| o.deployment_id == deployment_id) { o.take() } else { None }
        };
        if valid_id(deployment_id) {
            let _ = std::fs::remove_file(self.state_dir().join("gcroots").join(staged_root(deployment_id)));
        }
        if let (Some(offer), Some(error)) = (taken, error) {
            warn!(deployment = %deployment_id, %error, "deployment aborted before activation");
            let persisted = self.persisted();
            self.record(Outcome {
                deployment_id: offer.deployment_id,
                result: DeviceResult::Failed,
                reason: None,
                phase: Some(thymis_proto::Phase::Copy),
                error: Some(error),
                failed_units: vec![],
                unit_logs: Default::default(),
                failed_checks: vec![],
                system: persisted.system.clone(),
                commit: persisted.commit.clone(),
                generation: profile::generation(&self.config.system_profile),
            });
        }
        self.publish(|_| {});
    }

    /// Starts activating the accepted offer. Returns once the helper runs; the rest of
    /// the lifecycle continues in the background.
    pub async fn activate(self: &Arc<Self>, deployment_id: &str) -> Result<()> {
        let _guard = self.lifecycle.lock().await;
        let offer = self.current_offer(deployment_id).ok_or_else(|| anyhow!("no accepted offer {deployment_id}"))?;
        let store = self.store.clone();
        let system = offer.system.clone();
        let invalid = tokio::task::spawn_blocking(move || store.invalid_paths(&[system])).await??;
        if !invalid.is_empty() {
            bail!("system {} is not complete in the store", offer.system);
        }
        // Keep the new closure from the garbage collector until it is committed.
        let roots = self.state_dir().join("gcroots");
        std::fs::create_dir_all(&roots)?;
        let (store, system, root) = (self.store.clone(), offer.system.clone(), roots.join(&offer.deployment_id));
        tokio::task::spawn_blocking(move || store.add_gc_root(&system, &root)).await??;

        // The deployment's secrets are in place before anything activates (and, for the
        // system it already runs, they are the whole deployment).
        if let Some(sealed) = offer.secrets.clone() {
            let new = crate::secrets::Sealed {
                device: offer.device.clone(),
                deployment_id: offer.deployment_id.clone(),
                sealed,
            };
            let n = crate::secrets::apply(&self.device_key, self.state_dir(), &self.config.secrets_dir, new)
                .map_err(|e| anyhow!("the deployment's secrets: {e:#}"))?;
            self.log_line(&offer.deployment_id, format!("{n} secrets in place"));
        }
        let persisted = self.persisted();
        let profile_system = profile::resolve(&self.config.system_profile);
        let running = profile::resolve(&self.config.current_system_link);
        // The rollback point is the system that really runs (a device imaged without a
        // profile generation has it only there).
        let previous = running.clone().or_else(|| profile_system.clone());
        // And the rollback point: once the profile names the new system (a reboot
        // deployment, a commit), only this root keeps the previous one from a
        // `nix-collect-garbage -d` until the deployment ends.
        if let Some(prev) = previous.clone() {
            let (store, root) = (self.store.clone(), roots.join(previous_root(&offer.deployment_id)));
            tokio::task::spawn_blocking(move || store.add_gc_root(&prev, &root)).await??;
        }
        // Already running and committed: nothing to switch, nothing that could cut the
        // device off, so nothing to confirm. Record it and report at once.
        if !offer.reboot && previous.as_ref() == Some(&offer.system) && profile_system.as_ref() == Some(&offer.system) {
            info!(deployment = %offer.deployment_id, "already running this system: nothing to activate");
            {
                let mut p = lock(&self.persisted);
                p.last_sequence = offer.sequence;
                p.commit = offer.commit.clone();
                self.save_persisted(&p)?;
            }
            *lock(&self.offer) = None;
            self.drop_roots(&offer.deployment_id);
            self.record(Outcome {
                deployment_id: offer.deployment_id.clone(),
                result: DeviceResult::Succeeded,
                reason: None,
                phase: None,
                error: None,
                failed_units: vec![],
                unit_logs: Default::default(),
                failed_checks: vec![],
                system: Some(offer.system.clone()),
                commit: offer.commit.clone(),
                generation: profile::generation(&self.config.system_profile),
            });
            return Ok(());
        }
        // What only a boot applies is compared with the system that booted; a change
        // of switch inhibitors (which NixOS refuses to switch live) reboots too.
        let changes = self.reboot_reasons(&offer.system, previous.as_ref());
        if !changes.is_empty() {
            self.log_line(&offer.deployment_id, format!("needs a reboot: {}", changes.join("; ")));
        }
        // The system it activates replaces whatever was staged before.
        self.drop_staged_roots(None);
        let reboot = offer.reboot || !changes.is_empty();
        // A reboot the boot loader would make permanent before anyone confirmed it, or
        // into a system that would hang for good: refused before anything changes,
        // unless the device's configuration accepts the risk.
        if reboot && let Err(why) = self.reboot_safety(&offer.system) {
            let error = format!(
                "this deployment needs a reboot, and {why}; nothing was changed \
                 (allow_unsafe_reboot = true in the agent's configuration reboots anyway)"
            );
            warn!(deployment = %offer.deployment_id, "{error}");
            {
                let mut p = lock(&self.persisted);
                p.last_sequence = offer.sequence;
                self.save_persisted(&p)?;
            }
            *lock(&self.offer) = None;
            self.drop_roots(&offer.deployment_id);
            self.record(Outcome {
                deployment_id: offer.deployment_id.clone(),
                result: DeviceResult::Failed,
                reason: Some(RollbackReason::NoSafeReboot),
                phase: Some(Phase::Activate),
                error: Some(error),
                failed_units: vec![],
                unit_logs: Default::default(),
                failed_checks: vec![],
                system: previous.clone(),
                commit: persisted.commit.clone(),
                generation: profile::generation(&self.config.system_profile),
            });
            return Ok(());
        }
        let pending = Pending {
            offer: offer.clone(),
            previous,
            previous_commit: persisted.commit.clone(),
            boot_id: clock::boot_id(),
            deadline: None,
            stage: Stage::Activating,
            planned_reboot: false,
            local_confirm: std::mem::take(&mut *lock(&self.local)),
            reboot,
        };
        // Written before anything changes: a restart from here on knows what to do.
        {
            let mut p = lock(&self.persisted);
            p.last_sequence = offer.sequence;
            self.save_persisted(&p)?;
        }
        self.save_pending(Some(&pending))?;
        *lock(&self.pending) = Some(pending);
        *lock(&self.offer) = None;
        self.publish(|_| {});
        let agent = self.clone();
        if reboot {
            info!(deployment = %offer.deployment_id, system = %offer.system, "preparing a reboot into the new system");
            tokio::spawn(async move {
                let event = match agent.pending() {
                    Some(p) => agent.prepare_reboot(&p).await,
                    None => Event::RebootPrepared(Err("the pending deployment vanished".into())),
                };
                agent.drive(event).await;
            });
            return Ok(());
        }
        info!(deployment = %offer.deployment_id, system = %offer.system, "activating");
        // Pending is written: whether the helper started or not, waiting for it ends the
        // activation (a helper that never started is given up after a while, and the
        // lifecycle goes back to the previous system), so the device always reports.
        let launch_error =
            activation::launch(self.state_dir(), &offer.deployment_id, &offer.system, SwitchAction::Test)
                .err()
                .map(|e| format!("{e:#}"));
        if let Some(e) = &launch_error {
            warn!(deployment = %offer.deployment_id, "starting the activation: {e}");
        }
        tokio::spawn(async move {
            let (dir, id) = (agent.state_dir().to_owned(), offer.deployment_id.clone());
            let r = activation::wait(&dir, &id, |l| agent.log_line(&id, l)).await;
            let output = match (r.exit_code, launch_error) {
                (None, Some(e)) => format!("the activation did not start: {e}"),
                _ => r.output_tail,
            };
            let failed_units =
                tokio::task::spawn_blocking(move || activation::cross_check(r.failed_units)).await.unwrap_or_default();
            let event = Event::ActivationExited { code: r.exit_code, failed_units, output };
            agent.drive(event).await;
        });
        Ok(())
    }

    /// Applies the controller's confirmation for the pending deployment.
    pub async fn confirm(self: &Arc<Self>, signed: &Signed, session: &str) -> Result<()> {
        let c: Confirmation = signed.verify(&self.identity_keys)?;
        let pending = self.pending().ok_or_else(|| anyhow!("no deployment awaits confirmation"))?;
        let o = &pending.offer;
        if c.device != o.device
            || c.deployment_id != o.deployment_id
            || c.system != o.system
            || c.sequence != o.sequence
        {
            bail!("confirmation is for another deployment ({} {})", c.deployment_id, c.system);
        }
        if c.session != session {
            bail!("confirmation was made for another connection");
        }
        // Committing runs `switch-to-configuration boot` (a boot loader install can take
        // a while): off the connection's reading loop, which must keep reading.
        let agent = self.clone();
        tokio::spawn(async move { agent.drive(Event::Confirmed).await });
        Ok(())
    }

    /// Asks to roll back the deployment awaiting confirmation.
    pub async fn rollback_requested(self: &Arc<Self>) -> Result<()> {
        match self.pending().map(|p| p.stage) {
            Some(Stage::AwaitingConfirmation { .. }) => {
                self.drive(Event::RollbackAsked).await;
                Ok(())
            }
            Some(stage) => bail!("cannot roll back now: deployment is {stage:?}"),
            None => bail!("no deployment is awaiting confirmation; nothing to roll back"),
        }
    }

    /// Feeds an event to the lifecycle and performs actions until it waits or finishes.
    pub async fn drive(self: &Arc<Self>, first: Event) {
        {
            let _guard = self.lifecycle.lock().await;
            let mut event = first;
            loop {
                let Some(pending) = self.pending() else {
                    warn!(?event, "lifecycle event without a pending deployment");
                    return;
                };
                let has_previous = pending.previous.is_some();
                let (next, action) = match lifecycle::step(&pending.stage, event, has_previous) {
                    Ok(t) => t,
                    Err(e) => {
                        warn!("{e}");
                        return;
                    }
                };
                let mut updated = pending.clone();
                if let Some(stage) = next.clone() {
                    updated.stage = stage;
                    if matches!(action, Action::AwaitConfirmation) && updated.deadline.is_none() {
                        updated.deadline = Some(BootDeadline::in_(Duration::from_secs(self.config.confirm_timeout)));
                    }
                    if let Err(e) = self.save_pending(Some(&updated)) {
                        error!("cannot persist the deployment's stage: {e:#}");
                    }
                    *lock(&self.pending) = Some(updated.clone());
                }
                self.publish(|_| {});
                event = match action {
                    Action::RunChecks => self.run_checks(&updated).await,
                    Action::AwaitConfirmation => {
                        self.spawn_deadline(&updated);
                        if updated.local_confirm {
                            self.spawn_health_check(&updated);
                        } else {
                            // Confirmation must come over a new connection.
                            self.reconnect.notify_one();
                        }
                        return;
                    }
                    Action::Reboot => Event::RebootFailed(self.reboot(&updated).await),
                    Action::PrepareReboot => {
                        // From now on this is a reboot deployment (a restart resumes the preparation).
                        let id = updated.offer.deployment_id.clone();
                        self.log_line(
                            &id,
                            "switch-to-configuration: the new system takes effect only after a reboot".into(),
                        );
                        updated.reboot = true;
                        if let Err(e) = self.save_pending(Some(&updated)) {
                            error!("cannot persist the deployment's stage: {e:#}");
                        }
                        *lock(&self.pending) = Some(updated.clone());
                        self.prepare_reboot(&updated).await
                    }
                    Action::Commit => self.commit_event(&updated).await,
                    Action::Rollback => self.rollback_event(&updated).await,
                    Action::Finish(f) => {
                        if f.result == DeviceResult::RollbackFailed {
                            self.restore_after_failed_rollback(&updated).await;
                        }
                        self.finish(&updated, f);
                        return;
                    }
                };
            }
        }
    }

    fn spawn_deadline(self: &Arc<Self>, pending: &Pending) {
        let left = pending.deadline.as_ref().and_then(BootDeadline::remaining).unwrap_or_default();
        let id = pending.offer.deployment_id.clone();
        info!(deployment = %id, seconds = left.as_secs_f32(), "awaiting confirmation");
        let agent = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(left).await;
            let still_waiting = agent
                .pending()
                .is_some_and(|p| p.offer.deployment_id == id && matches!(p.stage, Stage::AwaitingConfirmation { .. }));
            if still_waiting {
                warn!(deployment = %id, "not confirmed in time: rolling back");
                agent.drive(Event::DeadlinePassed).await;
            }
        });
    }

    /// Local confirmation (offline bundles): the configured health check must pass
    /// before the deadline; without one, a successful activation is confirmation.
    fn spawn_health_check(self: &Arc<Self>, pending: &Pending) {
        let agent = self.clone();
        let id = pending.offer.deployment_id.clone();
        let check = self.config.health_check.clone();
        tokio::spawn(async move {
            loop {
                let healthy = match check.split_first() {
                    None => true,
                    Some((prog, args)) => tokio::process::Command::new(prog)
                        .args(args)
                        .stdin(std::process::Stdio::null())
                        .status()
                        .await
                        .is_ok_and(|s| s.success()),
                };
                let waiting = agent.pending().is_some_and(|p| {
                    p.offer.deployment_id == id && matches!(p.stage, Stage::AwaitingConfirmation { .. })
                });
                if !waiting {
                    return;
                }
                if healthy {
                    info!(deployment = %id, "health check passed: confirmed locally");
                    agent.drive(Event::Confirmed).await;
                    return;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }

    /// Runs the new system's health checks (`crate::health`), their failures in the
    /// deployment's log.
    async fn run_checks(&self, p: &Pending) -> Event {
        let id = p.offer.deployment_id.clone();
        let system = std::path::PathBuf::from(p.offer.system.to_absolute());
        let verdict = crate::health::run_all(&system, |line| self.log_line(&id, line)).await;
        Event::ChecksFinished { required_failed: verdict.required_failed, wanted_failed: verdict.wanted_failed }
    }

    /// Commits, unless someone changed the system on the device meanwhile.
    async fn commit_event(&self, p: &Pending) -> Event {
        match self.changed_on_device(p) {
            Some(why) => Event::ChangedOnDevice(why),
            None => Event::CommitFinished(self.commit(p).await),
        }
    }

    /// Rolls back; if someone changed the system on the device meanwhile, leaves their
    /// profile and boot loader alone, and only takes the device off the unconfirmed
    /// system if that is what still runs.
    async fn rollback_event(&self, p: &Pending) -> Event {
        let Some(why) = self.changed_on_device(p) else {
            return Event::RollbackFinished(self.roll_back(p).await);
        };
        let running = profile::resolve(&self.config.current_system_link);
        if running.as_ref() == Some(&p.offer.system)
            && let Some(previous) = &p.previous
        {
            let name = format!("{}-rollback", p.offer.deployment_id);
            if let Err(e) = self.run_switch(&name, previous, SwitchAction::Test).await {
                return Event::ChangedOnDevice(format!("{why}; re-activating the previous system failed: {e}"));
            }
        }
        Event::ChangedOnDevice(why)
    }

    /// Whether the profile or the running system is one this deployment never set:
    /// someone ran `nixos-rebuild` on the device meanwhile. Says what they set.
    fn changed_on_device(&self, p: &Pending) -> Option<String> {
        let ours = |s: &StorePath| *s == p.offer.system || p.previous.as_ref() == Some(s);
        let profile = profile::resolve(&self.config.system_profile).filter(|s| !ours(s));
        let running = profile::resolve(&self.config.current_system_link).filter(|s| !ours(s));
        let what = match (profile, running) {
            (_, Some(r)) => format!("the device was switched to {r} by hand during the deployment"),
            (Some(s), None) => format!("the system profile was set to {s} by hand during the deployment"),
            (None, None) => return None,
        };
        warn!(deployment = %p.offer.deployment_id, "{what}: leaving the profile and the boot loader alone");
        Some(format!("{what}; the agent left the profile and the boot loader as they are"))
    }

    async fn commit(&self, p: &Pending) -> Result<(), String> {
        let loader = self.loader();
        self.perform(p, &loader, &Plan::commit(&loader), "commit").await.map_err(|e| e.to_string())?;
        let generation = profile::generation(&self.config.system_profile);
        info!(deployment = %p.offer.deployment_id, generation, "committed");
        Ok(())
    }

    async fn roll_back(&self, p: &Pending) -> Result<(), String> {
        let previous = p.previous.clone().ok_or("no previous system")?;
        info!(deployment = %p.offer.deployment_id, %previous, "re-activating the previous system");
        // The previous deployment's secrets first: its services read them as they restart.
        if let Err(e) = crate::secrets::restore_previous(
            &self.device_key,
            self.state_dir(),
            &self.config.secrets_dir,
            &p.offer.deployment_id,
        ) {
            warn!(deployment = %p.offer.deployment_id, "restoring the previous secrets: {e:#}");
        }
        let loader = self.loader();
        // The profile or the boot loader may name the new system (a reboot deployment,
        // or committing failed halfway): they name the previous one again, and the
        // failed generations leave the profile (and so the boot menu). A failed `test`
        // activation touched neither.
        let profile = &self.config.system_profile;
        let touched = profile::resolve(profile).as_ref() != Some(&previous)
            || profile::generation_of(profile, &p.offer.system).ok().flatten().is_some();
        if touched || p.reboot {
            self.perform(p, &loader, &Plan::roll_back(&loader), "rollback").await.map_err(|e| e.to_string())?;
        }
        let running = profile::resolve(&self.config.current_system_link);
        if p.reboot && running.as_ref().is_some_and(|r| *r != previous) {
            // Its kernel runs: only a reboot into the previous generation undoes it.
            // (Without a running system to tell, `test` of the previous one names it.)
            let error = self.reboot(p).await;
            return Err(format!("the reboot into the previous system did not happen: {error}"));
        }
        let name = format!("{}-rollback", p.offer.deployment_id);
        self.run_switch(&name, &previous, SwitchAction::Test).await
    }

    /// After a rollback that failed: the profile and the boot default name the previous
    /// system again as far as they still can, so that neither the next boot nor the
    /// next deployment takes the unconfirmed system for a confirmed one.
    async fn restore_after_failed_rollback(&self, p: &Pending) {
        if p.previous.is_none() {
            return;
        }
        let loader = self.loader();
        for step in Plan::roll_back(&loader).0 {
            let plan = Plan(vec![step]);
            if let Err(e) = self.perform(p, &loader, &plan, "restore").await {
                self.log_line(&p.offer.deployment_id, format!("restoring the previous system: {step:?} failed: {e}"));
            }
        }
    }

    /// The event that ends a reboot deployment's preparation: profile generation and
    /// boot entries such that the new generation boots once and the previous one stays
    /// the default until confirmation.
    async fn prepare_reboot(&self, p: &Pending) -> Event {
        let id = &p.offer.deployment_id;
        if let Err(why) = self.reboot_safety(&p.offer.system) {
            return Event::RebootUnsafe(format!("this deployment needs a reboot, and {why}"));
        }
        let loader = self.loader();
        let (plan, op, said) = match Plan::try_once(&loader) {
            Some(plan) => (plan, "try-once", "boots the new system once; the previous one stays the default"),
            None => (
                Plan::unsafe_reboot(),
                "unsafe-reboot",
                "has no one-shot entry: the new system is the boot default before the reboot",
            ),
        };
        match self.perform(p, &loader, &plan, op).await {
            Ok(()) => {
                self.log_line(id, format!("the boot loader ({}) {said}", loader.name()));
                Event::RebootPrepared(Ok(()))
            }
            Err(Stopped::Unsafe(why)) => Event::RebootUnsafe(format!("this deployment needs a reboot, and {why}")),
            Err(Stopped::Failed(e)) => Event::RebootPrepared(Err(e)),
        }
    }

    /// Why a reboot into `system` would not be safe here: the boot loader cannot boot
    /// it once while the previous generation stays the default, or nothing resets a
    /// generation that hangs. `allow_unsafe_reboot` accepts both risks.
    fn reboot_safety(&self, system: &StorePath) -> Result<(), String> {
        if self.config.allow_unsafe_reboot {
            return Ok(());
        }
        let loader = self.loader();
        if Plan::try_once(&loader).is_none() {
            let which = match loader {
                Loader::Extlinux => format!(
                    "extlinux in {}, without the Thymis U-Boot boot script in {}",
                    self.config.boot_dir.display(),
                    self.config.firmware_dir.display()
                ),
                Loader::SystemdBoot(_) => "systemd-boot, which the agent may not give a one-shot entry \
                                           (can_touch_efi_variables = false)"
                    .to_owned(),
                _ => format!(
                    "none that the agent knows: no systemd-boot in {}, no grub/grub.cfg or extlinux/extlinux.conf in {}",
                    self.config.efivars_dir.display(),
                    self.config.boot_dir.display()
                ),
            };
            return Err(format!(
                "the boot loader ({which}) cannot boot a new system once while the previous one stays the default"
            ));
        }
        // GRUB clears its one-shot at boot only where it can write grubenv.
        if let Loader::Grub(grub) = &loader {
            safety::grub_can_write(&grub.dir)?;
        }
        safety::hang_protection(Path::new(&system.to_absolute()))
    }

    /// Someone changed the system profile by hand (`nixos-rebuild boot`): it names a
    /// system that neither booted nor runs, which a deployment would take as its way
    /// back although it never ran. Says so; `None` when the profile is one that ran.
    fn untried_profile(&self) -> Option<String> {
        let profile = profile::resolve(&self.config.system_profile)?;
        let running = profile::resolve(&self.config.current_system_link)?;
        let booted = profile::resolve(&self.config.booted_system_link);
        if profile == running || booted.as_ref() == Some(&profile) {
            return None;
        }
        Some(format!(
            "the system profile names {profile}, which this device has not run (it runs {running}): someone \
             changed it by hand (nixos-rebuild boot?), and a deployment now would keep that untried system as \
             its way back; reboot into it, or set the profile back, first"
        ))
    }

    fn loader(&self) -> Loader {
        let c = &self.config;
        bootloader::detect(&c.boot_dir, &c.efivars_dir, &c.firmware_dir, c.can_touch_efi_variables)
    }

    /// Performs a plan's steps in order (docs/agent.md, "Boot loaders").
    async fn perform(&self, p: &Pending, loader: &Loader, plan: &Plan, op: &str) -> Result<(), Stopped> {
        let keep = [&self.config.booted_system_link, &self.config.current_system_link]
            .into_iter()
            .filter_map(|l| profile::resolve(l))
            .chain(p.previous.clone())
            .collect();
        let target = Target {
            deployment_id: p.offer.deployment_id.clone(),
            new: p.offer.system.clone(),
            previous: p.previous.clone(),
            profile: self.config.system_profile.clone(),
            configuration_limit: self.config.configuration_limit,
            keep,
        };
        let host = AgentHost { agent: self, deployment_id: &p.offer.deployment_id };
        exec::perform(loader, plan, &target, &host, |done| crash_point(op, done)).await
    }

    /// Reboots the device after recording that the reboot is planned. Returns only if
    /// the reboot command fails (the machine goes down otherwise).
    async fn reboot(&self, p: &Pending) -> String {
        let mut planned = p.clone();
        planned.planned_reboot = true;
        if let Err(e) = self.save_pending(Some(&planned)) {
            error!("cannot persist the planned reboot: {e:#}");
            return format!("cannot persist the planned reboot: {e:#}");
        }
        *lock(&self.pending) = Some(planned);
        self.log_line(&p.offer.deployment_id, "rebooting".into());
        // Give the connection a moment to send the line.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let error = match self.config.reboot_command.split_first() {
            None => "reboot_command is empty".to_owned(),
            Some((prog, args)) => match tokio::process::Command::new(prog).args(args).status().await {
                Ok(s) if s.success() => std::future::pending::<String>().await,
                Ok(s) => format!("the reboot command exited {s}"),
                Err(e) => format!("cannot run the reboot command: {e}"),
            },
        };
        error!(deployment = %p.offer.deployment_id, "{error}");
        // Not rebooting after all: a later boot is not the planned one.
        let mut not_planned = p.clone();
        not_planned.planned_reboot = false;
        if let Err(e) = self.save_pending(Some(&not_planned)) {
            error!("cannot persist pending.json: {e:#}");
        }
        *lock(&self.pending) = Some(not_planned);
        error
    }

    /// Runs the helper and waits; exit 0 or 4 (switched, units failed) count as done.
    async fn run_switch(&self, name: &str, system: &StorePath, action: SwitchAction) -> Result<(), String> {
        activation::launch(self.state_dir(), name, system, action).map_err(|e| format!("{e:#}"))?;
        let r = activation::wait(self.state_dir(), name, |_| {}).await;
        activation::forget(self.state_dir(), name);
        match r.exit_code {
            Some(0 | 4) => Ok(()),
            code => Err(format!(
                "switch-to-configuration {action:?} of {system} {}: {}",
                code.map_or("was killed".into(), |c| format!("exited {c}")),
                r.output_tail.trim()
            )),
        }
    }

    fn finish(&self, p: &Pending, f: lifecycle::Finish) {
        let success = f.result.is_success();
        let (system, commit) = if success {
            (Some(p.offer.system.clone()), p.offer.commit.clone())
        } else {
            (p.previous.clone(), p.previous_commit.clone())
        };
        info!(deployment = %p.offer.deployment_id, result = ?f.result, reason = ?f.reason, error = ?f.error, "deployment finished");
        {
            let mut persisted = lock(&self.persisted);
            persisted.system = system.clone();
            persisted.commit = commit.clone();
        }
        let outcome = Outcome {
            deployment_id: p.offer.deployment_id.clone(),
            result: f.result,
            reason: f.reason,
            phase: f.phase,
            error: f.error,
            unit_logs: activation::unit_logs(&f.failed_units),
            failed_checks: f.failed_checks,
            failed_units: f.failed_units,
            system,
            commit,
            generation: profile::generation(&self.config.system_profile),
        };
        activation::forget(self.state_dir(), &p.offer.deployment_id);
        self.drop_roots(&p.offer.deployment_id);
        *lock(&self.pending) = None;
        self.record(outcome);
        if let Err(e) = self.save_pending(None) {
            error!("cannot clear pending.json: {e:#}");
        }
        if success {
            restart_if_replaced();
        }
    }

    /// Lets the collector have a finished deployment's systems (unless profiles keep them).
    fn drop_roots(&self, deployment_id: &str) {
        let roots = self.state_dir().join("gcroots");
        let _ = std::fs::remove_file(roots.join(deployment_id));
        let _ = std::fs::remove_file(roots.join(previous_root(deployment_id)));
        let _ = std::fs::remove_file(roots.join(staged_root(deployment_id)));
    }

    /// The hold on updates changed (taken, released, or its file came or went): the
    /// status shows it and the controller gets a new report.
    pub fn hold_changed(&self) {
        let hold = self.holds.current().map(|h| serde_json::to_string(&h).unwrap_or_default()).unwrap_or_default();
        self.status.send_if_modified(|s| {
            let changed = s.hold != hold;
            s.hold = hold;
            changed
        });
        self.outbox_changed.notify_one();
    }

    /// Notices holds that come and go by the hold file, or age past the maximum (a
    /// D-Bus hold is announced by its method at once): every two seconds.
    pub async fn watch_holds(self: Arc<Self>) {
        let mut last = None;
        self.hold_changed();
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let now = self.holds.current();
            if now != last {
                if let Some(h) = &now {
                    info!(reason = %h.reason, overdue = h.overdue, "updates are held");
                } else if last.is_some() {
                    info!("updates are no longer held");
                }
                self.hold_changed();
                last = now;
            }
        }
    }

    /// Drops the roots of staged deployments but `keep`'s: a device keeps one staged
    /// system at a time (the newest offer replaces an older one's).
    fn drop_staged_roots(&self, keep: Option<&str>) {
        let roots = self.state_dir().join("gcroots");
        let keep = keep.map(staged_root);
        for entry in std::fs::read_dir(&roots).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(STAGED_ROOT_PREFIX) && Some(&name) != keep.as_ref() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Keeps the accepted offer's system (complete in the store) from the garbage
    /// collector until it is activated or replaced: the deployment is staged. Returns
    /// whether activating it will reboot the device, and why.
    pub async fn stage(&self, deployment_id: &str) -> Result<Vec<String>> {
        let offer = self.current_offer(deployment_id).ok_or_else(|| anyhow!("no accepted offer {deployment_id}"))?;
        let (store, system) = (self.store.clone(), offer.system.clone());
        if !tokio::task::spawn_blocking(move || store.invalid_paths(&[system])).await??.is_empty() {
            bail!("system {} is not complete in the store", offer.system);
        }
        let roots = self.state_dir().join("gcroots");
        std::fs::create_dir_all(&roots)?;
        let (store, system, root) = (self.store.clone(), offer.system.clone(), roots.join(staged_root(deployment_id)));
        tokio::task::spawn_blocking(move || store.add_gc_root(&system, &root)).await??;
        self.drop_staged_roots(Some(deployment_id));
        let running = profile::resolve(&self.config.current_system_link).or_else(|| self.persisted().system);
        let mut why = self.reboot_reasons(&offer.system, running.as_ref());
        if offer.reboot {
            why.insert(0, "the deployment asks for a reboot".into());
        }
        info!(deployment = %deployment_id, system = %offer.system, "staged");
        Ok(why)
    }

    /// Why activating `system` over `running` needs a reboot, if it does: parts only a
    /// boot applies changed against the system that booted, or the new system's switch
    /// inhibitors differ from the running one's (NixOS's `switch-to-configuration`
    /// refuses to switch then).
    fn reboot_reasons(&self, system: &StorePath, running: Option<&StorePath>) -> Vec<String> {
        let new = system.to_absolute();
        let booted = profile::resolve(&self.config.booted_system_link).or_else(|| running.cloned());
        let mut why: Vec<String> = booted.as_ref().map_or(vec![], |b| {
            let changed = safety::boot_changes(Path::new(&b.to_absolute()), Path::new(&new));
            changed.into_iter().map(|c| format!("{c} changed")).collect()
        });
        if let Some(r) = running {
            let inhibitors = safety::switch_inhibitors_changed(Path::new(&r.to_absolute()), Path::new(&new));
            if !inhibitors.is_empty() {
                why.push(format!("switch inhibitors changed ({})", inhibitors.join(", ")));
            }
        }
        why
    }

    /// Adds an outcome to the outbox and history, persists, and tells the connection.
    fn record(&self, outcome: Outcome) {
        {
            let mut p = lock(&self.persisted);
            p.outbox.push(outcome.clone());
            p.history.push(outcome);
            let excess = p.history.len().saturating_sub(HISTORY_LEN);
            p.history.drain(..excess);
            if let Err(e) = self.save_persisted(&p) {
                error!("cannot persist the outcome: {e:#}");
            }
        }
        self.publish(|_| {});
        self.outbox_changed.notify_one();
    }

    /// The controller recorded an outcome: stop re-sending it.
    pub fn outcome_recorded(&self, deployment_id: &str) {
        let mut p = lock(&self.persisted);
        let before = p.outbox.len();
        p.outbox.retain(|o| o.deployment_id != deployment_id);
        if p.outbox.len() != before
            && let Err(e) = self.save_persisted(&p)
        {
            error!("cannot persist state.json: {e:#}");
        }
    }

    /// Continues a deployment found in `pending.json` at start-up.
    pub async fn resume(self: &Arc<Self>) {
        let Some(p) = self.pending() else { return };
        let id = p.offer.deployment_id.clone();
        info!(deployment = %id, stage = ?p.stage, "resuming a pending deployment");
        let running = profile::resolve(&self.config.current_system_link);
        let runs_new = running.as_ref() == Some(&p.offer.system);
        if p.boot_id != clock::boot_id() {
            // Deadlines belong to a boot: the next one starts in this boot.
            let mut now = p.clone();
            now.boot_id = clock::boot_id();
            now.deadline = None;
            now.planned_reboot = false;
            if let Err(e) = self.save_pending(Some(&now)) {
                error!("cannot persist pending.json: {e:#}");
            }
            *lock(&self.pending) = Some(now);
            let runs_previous = running.is_some() && running == p.previous;
            if let Loader::SystemdBoot(sb) = self.loader()
                && let Some(entry) = sb.selected()
            {
                self.log_line(&id, format!("systemd-boot booted the entry {entry}"));
            }
            self.drive(lifecycle::after_boot(&p.stage, p.planned_reboot, runs_new, runs_previous)).await;
            return;
        }
        match p.stage {
            Stage::Rebooting => {
                let error = self.reboot(&p).await;
                self.drive(Event::RebootFailed(error)).await;
            }
            // Stopped while preparing the reboot (in this boot): each step is
            // idempotent, so the preparation goes on where it was cut.
            Stage::Activating if p.reboot => {
                let agent = self.clone();
                tokio::spawn(async move {
                    let event = agent.prepare_reboot(&p).await;
                    agent.drive(event).await;
                });
            }
            Stage::Activating => {
                let agent = self.clone();
                tokio::spawn(async move {
                    let r = activation::wait(agent.state_dir(), &id, |_| {}).await;
                    let event = Event::ActivationExited {
                        code: r.exit_code,
                        failed_units: r.failed_units,
                        output: r.output_tail,
                    };
                    agent.drive(event).await;
                });
            }
            // Stopped while checking (in this boot): the checks run again.
            Stage::Checking { .. } => {
                let agent = self.clone();
                tokio::spawn(async move {
                    let event = agent.run_checks(&p).await;
                    agent.drive(event).await;
                });
            }
            Stage::AwaitingConfirmation { .. } => {
                self.spawn_deadline(&p);
                if p.local_confirm {
                    self.spawn_health_check(&p);
                }
            }
            Stage::Committing { .. } => {
                let event = self.commit_event(&p).await;
                self.drive(event).await;
            }
            Stage::RollingBack { .. } => {
                let event = self.rollback_event(&p).await;
                self.drive(event).await;
            }
        }
    }
}

/// The agent's side of the boot-loader executor.
struct AgentHost<'a> {
    agent: &'a Agent,
    deployment_id: &'a str,
}

impl Host for AgentHost<'_> {
    async fn install_boot(&self, name: String, system: StorePath) -> Result<(), String> {
        self.agent.run_switch(&name, &system, SwitchAction::Boot).await
    }

    fn log(&self, line: String) {
        self.agent.log_line(self.deployment_id, line);
    }
}

/// Tests stop the agent between two steps of a plan (`THYMIS_TEST_CRASH_AFTER=try-once:2`)
/// to check each row of the crash-window table in docs/agent.md; with `:hold` it waits
/// there instead, for the test to cut a VM's power.
fn crash_point(op: &str, done: usize) {
    let Ok(wanted) = std::env::var("THYMIS_TEST_CRASH_AFTER") else { return };
    let here = format!("{op}:{done}");
    if wanted == here {
        error!("THYMIS_TEST_CRASH_AFTER={here}: stopping here");
        std::process::abort();
    }
    if wanted == format!("{here}:hold") {
        error!("THYMIS_TEST_CRASH_AFTER={wanted}: holding here for a power cut");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// The GC roots of staged deployments are named with this prefix.
const STAGED_ROOT_PREFIX: &str = "staged-";

/// The GC root of a staged deployment's system.
fn staged_root(deployment_id: &str) -> String {
    format!("{STAGED_ROOT_PREFIX}{deployment_id}")
}

/// The GC root of a deployment's rollback point, beside the new system's.
fn previous_root(deployment_id: &str) -> String {
    format!("{deployment_id}.previous")
}

/// Where activation output goes (the connection forwards it to the controller).
#[derive(Clone)]
pub struct LogSink(pub Arc<LogFn>);

/// Receives (deployment id, line).
pub type LogFn = dyn Fn(&str, String) + Send + Sync;

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogSink")
    }
}

/// After a confirmed deployment that changed the agent itself (its unit now starts
/// another binary), restart: the unit has `restartIfChanged = false`, so nothing else
/// will. The outcome is already in the persisted outbox, so the new agent reports it.
fn restart_if_replaced() {
    if std::env::var_os("INVOCATION_ID").is_none() {
        return; // not started by systemd
    }
    let Some(unit) = own_unit() else { return };
    let Ok(out) = std::process::Command::new("systemctl").args(["show", "-p", "ExecStart", "--value", &unit]).output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(path) = text.split_whitespace().find_map(|w| w.strip_prefix("path=")) else { return };
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let Ok(me) = std::env::current_exe() else { return };
    if canonical(Path::new(path)) == canonical(&me) {
        return;
    }
    info!(unit = %unit, new = %path, "the confirmed system runs another agent: restarting");
    let _ = std::process::Command::new("systemctl").args(["--no-block", "restart", &unit]).status();
}

/// The systemd unit this process runs in, from its cgroup.
fn own_unit() -> Option<String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup.lines().flat_map(|l| l.rsplit('/')).find(|c| c.ends_with(".service")).map(str::to_owned)
}

/// What the imager records about the system an image carries.
#[derive(Debug, serde::Deserialize)]
struct ImageInfo {
    system: StorePath,
    commit: Option<String>,
}

/// Deployment ids become file names: keep them plain.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The device key, and whether it was made just now.
fn load_or_create_key(path: &Path) -> Result<(SecretKey, bool)> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((text.trim().parse().with_context(|| format!("reading device key {}", path.display()))?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate(DEVICE_KEY_NAME)?;
            persist::write_atomic(path, key.to_secret_string().as_bytes(), 0o600)
                .with_context(|| format!("writing device key {}", path.display()))?;
            info!(fingerprint = %key.public().short_fingerprint(), "created a new device key");
            Ok((key, true))
        }
        Err(e) => Err(e).with_context(|| format!("reading device key {}", path.display())),
    }
}
