//! A model of each loader's boot decision, and every plan checked against it: a power
//! loss after any prefix of a plan boots a confirmed system (or the new one exactly
//! once, then a confirmed one), and each plan ends in the state it promises.

use super::{EfiVars, Grub, Loader, Plan, Step, SystemdBoot, UBoot, Which};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sys {
    Prev,
    New,
}

impl From<Which> for Sys {
    fn from(w: Which) -> Sys {
        match w {
            Which::New => Sys::New,
            Which::Previous => Sys::Prev,
        }
    }
}

/// What the loader and the profile hold. Each loader boots its one-shot entry (and
/// forgets it) if that entry exists, else the default of the last install.
#[derive(Debug, Clone)]
struct Device {
    generations: Vec<Option<Sys>>,
    current: usize,
    menu: Vec<Sys>,
    default: Sys,
    once: Option<Sys>,
}

impl Device {
    fn new() -> Device {
        Device { generations: vec![Some(Sys::Prev)], current: 0, menu: vec![Sys::Prev], default: Sys::Prev, once: None }
    }

    fn apply(&mut self, step: Step) {
        match step {
            Step::SetProfile(w) => {
                if self.generations[self.current] != Some(w.into()) {
                    self.generations.push(Some(w.into()));
                    self.current = self.generations.len() - 1;
                }
            }
            Step::DeleteFailed => {
                for (i, g) in self.generations.iter_mut().enumerate() {
                    if i != self.current && *g == Some(Sys::New) {
                        *g = None;
                    }
                }
            }
            Step::InstallBoot(w) => {
                self.menu = self.generations.iter().flatten().copied().collect();
                self.default = w.into();
            }
            Step::Prune | Step::CheckWayBack => {}
            Step::TryNewOnce => self.once = Some(Sys::New),
            Step::ClearTryOnce => self.once = None,
        }
    }

    fn boot(&mut self) -> Sys {
        let once = self.once.take();
        once.filter(|s| self.menu.contains(s)).unwrap_or(self.default)
    }

    fn profile(&self) -> Option<Sys> {
        self.generations[self.current]
    }
}

fn loaders() -> Vec<Loader> {
    vec![
        Loader::SystemdBoot(SystemdBoot {
            vars: EfiVars { dir: "/sys/firmware/efi/efivars".into() },
            esp: "/boot".into(),
            can_touch_efi_variables: true,
        }),
        Loader::Grub(Grub { dir: "/boot/grub".into() }),
        // The boot script counts the attempt before it boots the try: once, like GRUB's.
        Loader::UBoot(UBoot { firmware: "/boot/firmware".into(), extlinux: "/boot/extlinux/extlinux.conf".into() }),
    ]
}

fn run(mut d: Device, steps: &[Step]) -> Device {
    for s in steps {
        d.apply(*s);
    }
    d
}

/// The next two boots after a power loss: a confirmed system, or the new one once and
/// a confirmed one after it.
fn boots_safely(d: &Device, confirmed: &[Sys]) -> bool {
    let mut d = d.clone();
    let first = d.boot();
    confirmed.contains(&first) || confirmed.contains(&d.boot())
}

#[test]
fn trying_a_new_generation_boots_it_once_and_the_previous_one_after_any_power_loss() {
    for loader in loaders() {
        let plan = Plan::try_once(&loader).expect("a one-shot boot").0;
        for k in 0..plan.len() {
            let mut d = run(Device::new(), &plan[..k]);
            assert_eq!(d.boot(), Sys::Prev, "{loader:?}: power loss after {:?}", &plan[..k]);
        }
        let mut d = run(Device::new(), &plan);
        assert_eq!(d.boot(), Sys::New, "{loader:?}: the reboot tries the new system");
        assert_eq!(d.boot(), Sys::Prev, "{loader:?}: a boot after that (a panic) comes back");
        assert_eq!(d.boot(), Sys::Prev, "{loader:?}: and stays there");
    }
}

#[test]
fn committing_keeps_a_confirmed_system_at_every_step_and_makes_the_new_one_stay() {
    for loader in loaders() {
        let tried = {
            let mut d = run(Device::new(), &Plan::try_once(&loader).expect("one-shot").0);
            assert_eq!(d.boot(), Sys::New);
            d
        };
        // After a reboot deployment's trial boot, and after a plain (test) activation.
        for start in [tried, Device::new()] {
            let plan = Plan::commit(&loader).0;
            for k in 0..=plan.len() {
                let d = run(start.clone(), &plan[..k]);
                assert!(boots_safely(&d, &[Sys::Prev, Sys::New]), "{loader:?}: commit cut after {:?}", &plan[..k]);
            }
            let mut d = run(start, &plan);
            assert_eq!(
                (d.boot(), d.boot(), d.boot()),
                (Sys::New, Sys::New, Sys::New),
                "{loader:?}: the new system stays"
            );
            assert_eq!(d.profile(), Some(Sys::New));
        }
    }
}

#[test]
fn rolling_back_from_any_point_of_a_trial_boots_the_previous_system_and_forgets_the_new_one() {
    for loader in loaders() {
        let try_plan = Plan::try_once(&loader).expect("one-shot").0;
        // Rollback starts after any prefix of the trial (a failed step, an agent restart),
        // with or without the trial boot having happened.
        let mut starts = vec![];
        for k in 0..=try_plan.len() {
            let d = run(Device::new(), &try_plan[..k]);
            let mut booted = d.clone();
            booted.boot();
            starts.extend([d, booted]);
        }
        for start in starts {
            let plan = Plan::roll_back(&loader).0;
            for k in 1..=plan.len() {
                let mut d = run(start.clone(), &plan[..k]);
                assert_eq!(d.boot(), Sys::Prev, "{loader:?}: from {start:?}, rollback cut after {:?}", &plan[..k]);
            }
            let d = run(start.clone(), &plan);
            assert!(boots_safely(&start, &[Sys::Prev]), "{loader:?}: {start:?}");
            let mut after = d.clone();
            assert_eq!((after.boot(), after.boot()), (Sys::Prev, Sys::Prev), "{loader:?}: from {start:?}");
            assert_eq!(d.profile(), Some(Sys::Prev), "the profile names the previous system");
            assert!(!d.generations.contains(&Some(Sys::New)), "the failed generation is gone: {d:?}");
            assert_eq!(d.once, None, "{loader:?}: nothing left in the EFI variables or grubenv");
        }
    }
}

#[test]
fn loaders_without_a_one_shot_boot_have_no_trial_plan() {
    assert_eq!(Plan::try_once(&Loader::Extlinux), None);
    assert_eq!(Plan::try_once(&Loader::Unknown), None);
    // systemd-boot where NixOS may not touch EFI variables (canTouchEfiVariables = false).
    let no_vars = Loader::SystemdBoot(SystemdBoot {
        vars: EfiVars { dir: "/sys/firmware/efi/efivars".into() },
        esp: "/boot".into(),
        can_touch_efi_variables: false,
    });
    assert_eq!(Plan::try_once(&no_vars), None);
    // What allow_unsafe_reboot accepts: the new system is the default before the reboot.
    let mut d = run(Device::new(), &Plan::unsafe_reboot().0);
    assert_eq!((d.boot(), d.boot()), (Sys::New, Sys::New));
}
