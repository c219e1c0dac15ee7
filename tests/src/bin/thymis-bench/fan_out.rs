//! Fan-out: one configuration to N devices at once, simulated devices and load-generator
//! agents.

use crate::*;

/// The controller alone serving copies: N load generators take a deployment of one
/// configuration at once. Aggregate rate, the controller's peak memory and CPU per device.
pub(crate) fn fan_out_load(rows: &mut Vec<String>) {
    let sizes: Vec<usize> = std::env::var("THYMIS_BENCH_LOAD_DEVICES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or(vec![100, 1000]);
    for n in sizes {
        let f = load_fleet(n, vec![]);
        let nar = load_build(&f, json!({ "version": "2", "small": 500, "payloads": 24, "payloadKiB": 2048 }));
        let r = load_rollout(&f, n, None);
        rows.push(format!(
            "| {n} | {} of {n} in {:.1} s | {} compressed ({} NAR) per device | {:.2} GB/s | {} ({} before) | {:.1} ms per device ({:.2} cores) | {} | {:.2} cores |",
            r.done,
            r.secs,
            mb(r.bytes as f64 / r.done.max(1) as f64),
            mb(nar),
            r.bytes as f64 / r.secs / 1e9,
            r.peak,
            r.idle,
            r.cpu * 1000.0 / n as f64,
            r.cpu / r.secs,
            mb(r.read as f64),
            r.gen_cpu / r.secs,
        ));
        eprintln!("bench: {}", rows.last().map(String::as_str).unwrap_or(""));
    }
}

/// Returns the footprint line of the one-device run.
pub(crate) fn fan_out(rows: &mut Vec<String>) -> String {
    let mut foot = String::new();
    let mut base_secs = 0.0;
    for n in [1usize, 10, 50] {
        let mut f = Fleet::new(FleetOptions { reply_timeout: 300, ..Default::default() }).expect("fleet");
        f.set_configs(&json!({ "alpha": { "version": "2", "payloads": 10, "payloadKiB": 512 }, "beta": {} }))
            .expect("cfg");
        for i in 0..n {
            f.add_device(&format!("f{i}"), "alpha", true).expect("device");
        }
        for i in 0..n {
            f.wait_online(&format!("f{i}"));
        }
        let t0 = Instant::now();
        let t = f.controller.ctl_json(&["deploy", "--config", "alpha", "-m", "fan-out", "--wait"]);
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(t["result"], "succeeded", "{t}");
        let (_, stats) = f.controller.api("/stats", None);
        if n == 1 {
            base_secs = secs;
        }
        rows.push(format!(
            "| {n} | {:.2} s | {:.2}x | {} | {} |",
            secs,
            secs / base_secs.max(1e-9),
            stats["builds"],
            stats["compressions"]
        ));
        eprintln!("bench: {}", rows.last().map(String::as_str).unwrap_or(""));
        if n == 1 {
            foot = footprint(&f);
        }
    }
    foot
}
