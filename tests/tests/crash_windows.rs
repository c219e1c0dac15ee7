//! The crash-window table of docs/agent.md, row by row with a real agent: stopped right
//! after each step of a boot-loader plan (`THYMIS_TEST_CRASH_AFTER`) and started again,
//! it finishes the deployment and leaves the profile and the boot loader naming a
//! confirmed system, and the next deployment goes through.
//!
//! Process devices share this machine, so two things are stand-ins here: their boot
//! loader is a directory of EFI variables in which systemd-boot's `LoaderInfo` says it
//! booted (the agent writes the variables there as it does on efivarfs), and their
//! reboot command fails (so each reboot deployment ends rolled back after its
//! preparation). Real loaders and power losses: tests/tests/images.rs.

use std::time::Duration;

use serde_json::json;
use thymis_fleet_tests::{Fleet, FleetOptions, wait_for};

const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
const DEVICES: usize = 5;

fn var_path(f: &Fleet, device: &str, name: &str) -> std::path::PathBuf {
    f.device(device).dir.join("efivars").join(format!("{name}-{LOADER_GUID}"))
}

/// A loader variable's value, as systemd-boot would read it.
fn efivar(f: &Fleet, device: &str, name: &str) -> Option<String> {
    let bytes = std::fs::read(var_path(f, device, name)).ok()?;
    let units: Vec<u16> =
        bytes[4..].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
    Some(String::from_utf16_lossy(&units))
}

fn set_efivar(f: &Fleet, device: &str, name: &str, value: &str) {
    let mut bytes = 7u32.to_le_bytes().to_vec();
    value.encode_utf16().chain([0]).for_each(|u| bytes.extend(u.to_le_bytes()));
    let path = var_path(f, device, name);
    std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

fn name(i: usize) -> String {
    format!("c{i}")
}

/// Restarts every agent with `THYMIS_TEST_CRASH_AFTER=PLAN:i` (device i; the last one
/// has no such step and is the control).
fn arm(f: &mut Fleet, plan: &str) {
    for i in 1..=DEVICES {
        let dev = f.device_mut(&name(i));
        dev.kill9();
        dev.env = vec![("THYMIS_TEST_CRASH_AFTER".into(), format!("{plan}:{i}"))];
        dev.start().expect("start");
    }
    for i in 1..=DEVICES {
        f.wait_online(&name(i));
    }
}

/// Waits for each agent that has step `i` of `plan` to stop there, and starts it again
/// without the crash.
fn restart_stopped(f: &mut Fleet, plan: &str, steps: usize) {
    for i in 1..=steps {
        let marker = format!("THYMIS_TEST_CRASH_AFTER={plan}:{i}: stopping here");
        let n = name(i);
        wait_for(&format!("{n} to stop after step {i} of {plan}"), Duration::from_secs(90), || {
            f.device(&n).log().contains(&marker).then_some(())
        });
        let dev = f.device_mut(&n);
        dev.kill9();
        dev.env.clear();
        dev.start().expect("start");
    }
}

fn deploy_all(f: &Fleet, extra: &[&str], message: &str) -> String {
    let mut args = vec!["--json", "deploy", "-m", message];
    let names: Vec<String> = (1..=DEVICES).map(name).collect();
    for n in &names {
        args.extend(["--device", n.as_str()]);
    }
    args.extend(extra);
    let out = f.controller.ctl(&args);
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    task["id"].as_i64().expect("task id").to_string()
}

fn wait_all(f: &Fleet, task: &str) -> serde_json::Value {
    wait_for("the deployment to end on every device", Duration::from_secs(240), || {
        let t = f.controller.ctl_json(&["task", task]);
        (!t["result"].is_null()).then_some(t)
    })
}

/// The boot loader and the profile name `system` only: no `LoaderEntryDefault` (the
/// agent never writes one: the way back is loader.conf's default), no one-shot, no
/// other generation of `gone`.
fn assert_settled(f: &Fleet, device: &str, system: &str, gone: Option<&str>) {
    let dev = f.device(device);
    assert_eq!(dev.profile_system().as_deref(), Some(system), "{device}: the profile\n{}", dev.log());
    assert_eq!(efivar(f, device, "LoaderEntryDefault"), None, "{device}: a lasting LoaderEntryDefault");
    assert_eq!(efivar(f, device, "LoaderEntryOneShot"), None, "{device}: a one-shot left behind");
    if let Some(gone) = gone {
        let gens = dev.generations();
        assert!(gens.iter().all(|(_, s)| s != gone), "{device}: the failed system is still a generation: {gens:?}");
    }
}

#[test]
fn an_agent_stopped_after_any_step_of_a_boot_loader_plan_finishes_on_a_confirmed_system() {
    let mut f = Fleet::new(FleetOptions::default()).expect("fleet");
    for i in 1..=DEVICES {
        f.add_device(&name(i), "alpha", false).expect("device");
        set_efivar(&f, &name(i), "LoaderInfo", "systemd-boot 252 (stand-in)");
        f.device_mut(&name(i)).start().expect("start");
    }
    for i in 1..=DEVICES {
        f.wait_online(&name(i));
    }
    let t = wait_all(&f, &deploy_all(&f, &[], "v1"));
    assert_eq!(t["result"], "succeeded", "{t}\n{}", f.diagnostics());
    let v1 = f.device("c1").profile_system().expect("v1");
    for i in 1..=DEVICES {
        assert_settled(&f, &name(i), &v1, None);
    }

    // Trying v2 once (profile, the previous system's boot entries, their check, the
    // one-shot), stopped after each step:
    // started again, the agent finishes the preparation; the reboot then fails (a
    // process device) and it rolls back to v1.
    f.set_configs(&json!({ "alpha": { "version": "2" }, "beta": {} })).expect("cfg");
    arm(&mut f, "try-once");
    let task = deploy_all(&f, &["--reboot"], "v2 with a reboot");
    restart_stopped(&mut f, "try-once", 4);
    let t = wait_all(&f, &task);
    let v2 = f.controller.ctl_json(&["build", "alpha", "--wait"])["system"].as_str().expect("v2").to_owned();
    for i in 1..=DEVICES {
        let child = Fleet::child(&t, &name(i));
        assert_eq!(child["result"], "rolled-back", "c{i}: {child}\n{}", f.device(&name(i)).log());
        let error = child["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("the reboot into the new system did not happen"),
            "c{i}: the preparation did not finish: {child}"
        );
        assert_settled(&f, &name(i), &v1, Some(&v2));
    }

    // Committing v2, stopped after each step: started again, it commits again.
    arm(&mut f, "commit");
    let task = deploy_all(&f, &[], "v2");
    restart_stopped(&mut f, "commit", 4);
    let t = wait_all(&f, &task);
    for i in 1..=DEVICES {
        let child = Fleet::child(&t, &name(i));
        assert_eq!(child["result"], "succeeded", "c{i}: {child}\n{}", f.device(&name(i)).log());
        assert_settled(&f, &name(i), &v2, None);
    }

    // Rolling back (a reboot deployment of v3 whose reboot fails), stopped after each
    // step: started again, it rolls back again, to v2.
    f.set_configs(&json!({ "alpha": { "version": "3" }, "beta": {} })).expect("cfg");
    arm(&mut f, "rollback");
    let task = deploy_all(&f, &["--reboot"], "v3 with a reboot");
    restart_stopped(&mut f, "rollback", 4);
    let t = wait_all(&f, &task);
    let v3 = f.controller.ctl_json(&["build", "alpha", "--wait"])["system"].as_str().expect("v3").to_owned();
    for i in 1..=DEVICES {
        let child = Fleet::child(&t, &name(i));
        assert_eq!(child["result"], "rolled-back", "c{i}: {child}\n{}", f.device(&name(i)).log());
        assert_settled(&f, &name(i), &v2, Some(&v3));
    }
}
