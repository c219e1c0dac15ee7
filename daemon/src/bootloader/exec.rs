//! Performs a [`Plan`]'s steps: the profile steps here, each loader's own steps in its
//! backend. The agent supplies what only it can do (run `switch-to-configuration boot`
//! through its activation helper, log to the deployment) through [`Host`].

use std::future::Future;
use std::path::{Path, PathBuf};

use thymis_store::StorePath;

use super::{Loader, Plan, Step, Which, safety};
use crate::profile;

/// What the executor needs from the agent.
pub trait Host {
    /// Runs `system`'s `switch-to-configuration boot` (`name` tells its runs apart).
    fn install_boot(&self, name: String, system: StorePath) -> impl Future<Output = Result<(), String>> + Send;
    /// A line for the deployment's log.
    fn log(&self, line: String);
}

/// The deployment a plan is performed for.
#[derive(Debug, Clone)]
pub struct Target {
    pub deployment_id: String,
    pub new: StorePath,
    /// The rollback point (`None` on a first deployment).
    pub previous: Option<StorePath>,
    pub profile: PathBuf,
    /// Generations kept in the profile when committing (0: all).
    pub configuration_limit: usize,
    /// Systems whose generations pruning keeps whatever their age (booted, running).
    pub keep: Vec<StorePath>,
}

/// Why a plan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// The loader's files do not give the way back the plan relies on: not safe to reboot.
    Unsafe(String),
    Failed(String),
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::Unsafe(e) | Stopped::Failed(e) => f.write_str(e),
        }
    }
}

fn failed(e: anyhow::Error) -> Stopped {
    Stopped::Failed(format!("{e:#}"))
}

/// Performs `plan` in order; `after_step(n)` runs after the n-th step (tests stop the
/// agent there to check each crash window).
pub async fn perform(
    loader: &Loader,
    plan: &Plan,
    t: &Target,
    host: &impl Host,
    after_step: impl Fn(usize),
) -> Result<(), Stopped> {
    for (done, step) in plan.0.iter().enumerate() {
        perform_step(loader, *step, t, host).await?;
        after_step(done + 1);
    }
    Ok(())
}

fn system(t: &Target, w: Which) -> Result<StorePath, Stopped> {
    match w {
        Which::New => Ok(t.new.clone()),
        Which::Previous => t.previous.clone().ok_or_else(|| Stopped::Failed("there is no previous system".into())),
    }
}

fn generation_of(t: &Target, s: &StorePath) -> Result<u64, Stopped> {
    profile::generation_of(&t.profile, s)
        .map_err(failed)?
        .ok_or_else(|| Stopped::Failed(format!("no generation of {} names {s}", t.profile.display())))
}

/// Runs blocking file and `nix-env` work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> Result<T, Stopped> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Stopped::Failed(e.to_string()))?.map_err(failed)
}

async fn perform_step(loader: &Loader, step: Step, t: &Target, host: &impl Host) -> Result<(), Stopped> {
    let id = &t.deployment_id;
    let has_kernel = safety::has_kernel(Path::new(&t.new.to_absolute()));
    match (step, loader) {
        (Step::SetProfile(w), _) => {
            let (profile, system) = (t.profile.clone(), system(t, w)?);
            blocking(move || match profile::resolve(&profile) {
                Some(current) if current == system => Ok(()),
                _ => profile::set(&profile, &system).map(|_| ()),
            })
            .await
        }
        (Step::DeleteFailed, _) => {
            let (profile, failed) = (t.profile.clone(), t.new.clone());
            let removed = blocking(move || profile::delete_generations_of(&profile, &failed)).await?;
            if !removed.is_empty() {
                host.log(format!("removed the failed generation(s) {removed:?}"));
            }
            Ok(())
        }
        (Step::Prune, _) => {
            let limit = t.configuration_limit;
            if limit == 0 {
                return Ok(());
            }
            let (profile, mut keep) = (t.profile.clone(), t.keep.clone());
            keep.push(t.new.clone());
            let removed = blocking(move || profile::prune(&profile, limit, &keep.iter().collect::<Vec<_>>())).await?;
            if !removed.is_empty() {
                host.log(format!("removed generation(s) {removed:?}, beyond the configuration limit of {limit}"));
            }
            Ok(())
        }
        (Step::InstallBoot(w), _) => {
            if let Loader::SystemdBoot(sb) = loader
                && sb.remove_stale_tmp().map_err(failed)?
            {
                host.log("removed a stale loader/loader.tmp (a power cut inside the boot loader's builder)".into());
            }
            let suffix = if w == Which::New { "boot" } else { "boot-previous" };
            host.install_boot(format!("{id}-{suffix}"), system(t, w)?).await.map_err(Stopped::Failed)
        }
        // A system without a kernel is booted by none: its menu holds no entry to check.
        (Step::CheckWayBack, _) if !has_kernel => Ok(()),
        (Step::CheckWayBack, Loader::SystemdBoot(sb)) => {
            let previous = system(t, Which::Previous)?;
            sb.check_way_back(generation_of(t, &previous)?, generation_of(t, &t.new)?).map_err(Stopped::Unsafe)
        }
        (Step::CheckWayBack, Loader::Grub(grub)) => {
            grub.entry_of(Path::new(&t.new.to_absolute())).map(|_| ()).map_err(|e| Stopped::Unsafe(format!("{e:#}")))
        }
        (Step::CheckWayBack, Loader::UBoot(uboot)) => {
            uboot.label_of(Path::new(&t.new.to_absolute())).map(|_| ()).map_err(|e| Stopped::Unsafe(format!("{e:#}")))
        }
        (Step::TryNewOnce, Loader::SystemdBoot(sb)) => sb.try_once(generation_of(t, &t.new)?).map_err(failed),
        (Step::ClearTryOnce, Loader::SystemdBoot(sb)) => match profile::generation_of(&t.profile, &t.new) {
            Ok(Some(g)) => sb.clear_try(g).map_err(failed),
            // No generation of the new system (yet, or any more): no try of ours is set.
            _ => Ok(()),
        },
        (Step::TryNewOnce, Loader::Grub(grub)) => {
            let entry = grub.entry_of(Path::new(&t.new.to_absolute())).map_err(failed)?;
            grub.set_env("next_entry", Some(&entry)).map_err(failed)
        }
        (Step::ClearTryOnce, Loader::Grub(grub)) => {
            let set = grub.env().map_err(failed)?.iter().any(|(k, _)| k == "next_entry");
            if set { grub.set_env("next_entry", None).map_err(failed) } else { Ok(()) }
        }
        (Step::TryNewOnce, Loader::UBoot(uboot)) => {
            if uboot.update_script().map_err(failed)? {
                host.log("updated the U-Boot boot script".into());
            }
            let label = uboot.label_of(Path::new(&t.new.to_absolute())).map_err(failed)?;
            uboot.set_state(&thymis_uboot::TryState::try_once(&label)).map_err(failed)
        }
        (Step::ClearTryOnce, Loader::UBoot(uboot)) => {
            if uboot.state() == thymis_uboot::TryState::default() {
                return Ok(());
            }
            uboot.set_state(&thymis_uboot::TryState::default()).map_err(failed)
        }
        // Steps of another loader's plan (the loader changed under the agent): nothing to do.
        (Step::CheckWayBack | Step::TryNewOnce | Step::ClearTryOnce, Loader::Extlinux | Loader::Unknown) => Ok(()),
    }
}
