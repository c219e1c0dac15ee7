//! Two controllers, one fleet: both on one PostgreSQL database, with the same identity,
//! Nix key, admin token and certificate, behind a TCP load balancer that hands each new
//! agent connection to the next controller in turn. A deployment made on either reaches
//! the devices connected to the other; the offer sequence grows across both; and when
//! the controller that made a deployment is killed mid-copy, its devices reconnect to
//! the other, which carries the deployment to the end: nothing rolls back. A controller
//! that restarts leaves alone what the other delivers; a device revoked through one
//! controller is disconnected from the other.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use thymis_fleet_tests::balancer::Balancer;
use thymis_fleet_tests::{Controller, Fleet, FleetOptions, wait_for};

/// The devices a controller's API shows online.
fn online(c: &Controller) -> BTreeSet<String> {
    let v = c.ctl_json(&["devices"]);
    v.as_array()
        .map(|a| {
            a.iter().filter(|d| d["online"] == true).filter_map(|d| d["name"].as_str().map(str::to_owned)).collect()
        })
        .unwrap_or_default()
}

fn results(task: &Value) -> Vec<(String, String)> {
    let children = task["children"].as_array().cloned().unwrap_or_default();
    children
        .iter()
        .map(|c| (c["device"].as_str().unwrap_or("").to_owned(), c["result"].as_str().unwrap_or("").to_owned()))
        .collect()
}

/// Each device's result, in the order of `expected`; the fleet's and the second
/// controller's diagnostics when they differ.
fn assert_results(f: &Fleet, b: &Controller, task: &Value, expected: [&str; 2]) {
    let want: Vec<(String, String)> =
        ["d1", "d2"].iter().zip(expected).map(|(d, r)| (d.to_string(), r.to_owned())).collect();
    assert_eq!(results(task), want, "{task}\n{}\n{}", f.diagnostics(), b.log());
}

/// Waits until every device of the task (as controller `c` shows it) has been sent a path.
fn wait_copying(c: &Controller, task: i64) {
    wait_for("both devices to be copying", Duration::from_secs(120), || {
        let (_, t) = c.api(&format!("/tasks/{task}"), None);
        let copying = t["children"].as_array()?.iter().all(|c| c["paths_sent"].as_i64().unwrap_or(0) > 0);
        copying.then_some(())
    });
}

#[test]
fn two_controllers_serve_one_fleet_and_one_carries_on_when_the_other_dies() {
    let mut f = Fleet::new(FleetOptions { postgres: true, ..Default::default() }).expect("fleet");
    let mut b = f.second_controller().expect("second controller");
    let host = f.host_address();
    let _lb = Balancer::start(&format!("{host}:8445"), vec![format!("{host}:8443"), format!("{host}:8444")])
        .expect("balancer");
    for name in ["d1", "d2"] {
        f.add_device(name, "alpha", false).expect("device");
        let toml = f.device(name).dir.join("agent.toml");
        let text = std::fs::read_to_string(&toml).expect("agent.toml");
        assert!(text.contains(":8443/agent/v1"), "{text}");
        std::fs::write(&toml, text.replace(":8443/agent/v1", ":8445/agent/v1")).expect("agent.toml");
        f.device_mut(name).start().expect("agent");
        f.wait_online(name);
    }
    // One device on each controller, and each controller shows both online.
    let pg = f.postgres.as_ref().expect("postgres");
    let holders = pg.psql("thymis", "SELECT DISTINCT controller FROM devices").expect("psql");
    assert_eq!(holders.lines().count(), 2, "the devices are not on both controllers: {holders}");
    let both: BTreeSet<String> = ["d1", "d2"].map(str::to_owned).into();
    wait_for("both controllers to show both devices online", Duration::from_secs(20), || {
        (online(&f.controller) == both && online(&b) == both).then_some(())
    });

    // Journals and terminals are not relayed between controllers: asked of the other
    // one, the answer says where the device is.
    let b_id = std::fs::read_to_string(b.state_dir.join("controller-id")).expect("controller id");
    let on_b =
        pg.psql("thymis", &format!("SELECT name FROM devices WHERE controller = '{}'", b_id.trim())).expect("psql");
    let out = f.controller.ctl(&["logs", on_b.trim(), "-n", "5"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("connected to another controller"), "{stderr}");

    // A deployment made on the first controller reaches both devices.
    let first = f.controller.ctl_json(&["deploy", "--wait", "--device", "d1", "--device", "d2", "-m", "v1"]);
    assert_results(&f, &b, &first, ["succeeded", "succeeded"]);
    let sequences: BTreeSet<i64> =
        first["children"].as_array().expect("children").iter().filter_map(|c| c["sequence"].as_i64()).collect();
    assert_eq!(sequences.len(), 2, "{first}");

    // A deployment made on the second controller, copied slowly; the second controller
    // is killed mid-copy. The first carries it on.
    for name in ["d1", "d2"] {
        f.device(name).shape("4mbit").expect("shape");
    }
    let configs = json!({ "alpha": { "version": "2", "payloads": 12 }, "beta": {} });
    std::fs::write(b.project_dir().join("configs.json"), serde_json::to_vec_pretty(&configs).expect("json"))
        .expect("configs");
    let made = b.ctl_json(&["deploy", "--device", "d1", "--device", "d2", "-m", "v2"]);
    let task = made["id"].as_i64().expect("task id");
    wait_copying(&f.controller, task);
    b.kill();
    let done = f.wait_task(task, Duration::from_secs(180));
    for name in ["d1", "d2"] {
        f.device(name).unshape();
    }
    assert_results(&f, &b, &done, ["succeeded", "succeeded"]);
    let logs = f.controller.task_logs(task).join("\n");
    assert!(logs.contains("stopped; controller") && logs.contains("carries on"), "{logs}");
    for c in done["children"].as_array().expect("children") {
        // 14 paths lacked: what the stopped controller sent and what the other sent after
        // it add up to no more (none sent twice).
        assert!(c["paths_sent"].as_i64().is_some_and(|n| n <= 14), "a path was sent twice: {c}");
    }
    let system = Fleet::child(&done, "d1")["system"].as_str().expect("system").to_owned();
    for name in ["d1", "d2"] {
        assert_eq!(f.device(name).running_system(), system, "{name} does not run the new system");
    }
    let later: BTreeSet<i64> =
        done["children"].as_array().expect("children").iter().filter_map(|c| c["sequence"].as_i64()).collect();
    assert!(later.iter().all(|s| sequences.iter().all(|e| s > e)), "sequences {later:?} after {sequences:?}");

    // The second controller again, and d1 moved to it (its agent restarted until the
    // balancer hands it there).
    b.restart().expect("restart");
    let id_of =
        |c: &Controller| std::fs::read_to_string(c.state_dir.join("controller-id")).expect("id").trim().to_owned();
    let (a_id, b_id) = (id_of(&f.controller), id_of(&b));
    let holder = |f: &Fleet, device: &str| {
        let pg = f.postgres.as_ref().expect("postgres");
        pg.psql("thymis", &format!("SELECT controller FROM devices WHERE name = '{device}'")).expect("psql")
    };
    for _ in 0..6 {
        if holder(&f, "d1") == b_id {
            break;
        }
        f.device_mut("d1").kill9();
        f.device_mut("d1").start().expect("agent");
        wait_for("d1 to reconnect", Duration::from_secs(30), || (!holder(&f, "d1").is_empty()).then_some(()));
    }
    assert_eq!(holder(&f, "d1"), b_id, "d1 never reached the second controller");

    // The first controller restarts while the second delivers its deployment to d1: what
    // the second delivers goes on; the restart ends only what the first carried itself.
    for name in ["d1", "d2"] {
        f.device(name).shape("4mbit").expect("shape");
    }
    f.set_configs(&json!({ "alpha": { "version": "3", "payloads": 12, "payloadKiB": 300 }, "beta": {} })).expect("cfg");
    let made = f.controller.ctl_json(&["deploy", "--device", "d1", "--device", "d2", "-m", "v3"]);
    let task = made["id"].as_i64().expect("task id");
    wait_copying(&b, task);
    f.controller.restart().expect("restart");
    let done = wait_for("the deployment to end", Duration::from_secs(180), || {
        let (_, t) = b.api(&format!("/tasks/{task}"), None);
        (t["state"] == "finished").then_some(t)
    });
    for name in ["d1", "d2"] {
        f.device(name).unshape();
    }
    assert_results(&f, &b, &done, ["succeeded", "interrupted"]);

    // A device revoked through one controller loses its connection to the other within
    // a sweep.
    f.wait_online("d2");
    let (revoker, other) = if holder(&f, "d2") == a_id { (&b, &f.controller) } else { (&f.controller, &b) };
    let out = revoker.ctl(&["device", "revoke", "d2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("d2 offline on both", Duration::from_secs(20), || {
        (!online(other).contains("d2") && !online(revoker).contains("d2")).then_some(())
    });
    assert!(holder(&f, "d2").is_empty(), "d2 is still connected");
    assert!(online(&f.controller).contains("d1"), "d1 went offline too");
}

/// Controllers judge each other alive by the database's clock, not their own: a
/// controller whose clock runs ten minutes ahead (libfaketime) restarts and leaves
/// alone the tasks the other runs, a waiting deployment and a running one of another
/// kind alike; every task names the controller that runs it from the start.
#[test]
fn a_controller_with_a_wrong_clock_leaves_the_others_tasks_alone() {
    let f = Fleet::new(FleetOptions { postgres: true, ..Default::default() }).expect("fleet");
    let mut b = f.second_controller().expect("second controller");
    let mut f = f;
    f.add_device("d7", "alpha", false).expect("device");
    let pg = f.postgres.as_ref().expect("postgres");
    let id_of =
        |c: &Controller| std::fs::read_to_string(c.state_dir.join("controller-id")).expect("id").trim().to_owned();
    let a_id = id_of(&f.controller);
    // A deployment to an offline device waits on the first controller.
    let waiting = f.controller.ctl_json(&["deploy", "--device", "d7", "-m", "waits"])["id"].as_i64().expect("id");
    let built = f.controller.ctl_json(&["build", "beta", "--wait"]);
    let build_owner = pg.psql("thymis", &format!("SELECT owner FROM tasks WHERE id = {}", built["id"])).expect("psql");
    assert_eq!(build_owner.trim(), a_id, "a build task carries its controller's id");

    b.env = vec![
        ("LD_PRELOAD".into(), "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1".into()),
        ("FAKETIME".into(), "+600s".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    b.restart().expect("restart with a wrong clock");
    // Several sweeps of both.
    std::thread::sleep(Duration::from_secs(6));
    let owner = pg.psql("thymis", &format!("SELECT owner FROM tasks WHERE id = {waiting}")).expect("psql");
    assert_eq!(owner.trim(), a_id, "the other controller took the task:\n{}", b.log());
    let t = f.controller.ctl_json(&["task", &waiting.to_string()]);
    assert!(t["result"].is_null(), "the waiting deployment was ended: {t}");
    let logs = f.controller.task_logs(waiting).join("\n");
    assert!(!logs.contains("carries on"), "{logs}");
    // The first controller still delivers it: d7 comes online and gets it.
    f.device_mut("d7").start().expect("agent");
    let done = wait_for("d7's deployment to end", Duration::from_secs(120), || {
        let t = f.controller.ctl_json(&["task", &waiting.to_string()]);
        (!Fleet::child(&t, "d7")["result"].is_null()).then_some(t)
    });
    assert_eq!(Fleet::child(&done, "d7")["result"], "succeeded", "{done}\n{}", f.diagnostics());
}
