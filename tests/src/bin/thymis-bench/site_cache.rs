//! A fleet-wide rollout through a site cache, against the controller alone.

use crate::*;

/// The same fleet-wide rollout to N load generators through the controller alone, and
/// through a site cache the controller publishes to (`--publish-cache`, served by
/// busybox httpd): the bytes the controller sent and the devices took from the cache,
/// counted by the controller, and the time to every copy done.
pub(crate) fn site_cache_load(rows: &mut Vec<String>) {
    let n: usize = std::env::var("THYMIS_BENCH_CACHE_DEVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    for with_cache in [false, true] {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tmp");
        let publish = vec!["--publish-cache".into(), format!("file://{}?compression=zstd", dir.path().display())];
        let f = load_fleet(n, if with_cache { publish } else { vec![] });
        load_build(&f, json!({ "version": "4", "payloads": 10, "payloadKiB": 512, "small": 300 }));
        let addr = "127.0.0.1:18091";
        let mut httpd =
            Command::new("busybox").args(["httpd", "-f", "-p", addr, "-h"]).arg(dir.path()).spawn().expect("httpd");
        let cache = with_cache.then(|| {
            let (_, id) = f.controller.api("/identity", None);
            let key = id["nix_signing_key"].as_str().expect("the controller's Nix key");
            std::sync::Arc::new(LoadCache {
                url: format!("http://{addr}"),
                keys: vec![key.parse().expect("nix key")],
                http: ureq::Agent::config_builder().http_status_as_error(false).build().into(),
            })
        });
        let r = load_rollout(&f, n, cache);
        let _ = httpd.kill();
        let _ = httpd.wait();
        let sum = |k: &str| children_sum(&r.task, k);
        rows.push(format!(
            "| {} | {n} load generators | {} of {n} in {:.2} s | {} ({} paths) | {} ({} paths) | {:.2} s |",
            if with_cache { "controller + site cache" } else { "controller alone" },
            r.done,
            r.secs,
            mb(sum("bytes_sent") as f64),
            sum("paths_sent"),
            mb(sum("bytes_substituted") as f64),
            sum("paths_substituted"),
            r.cpu,
        ));
        eprintln!("bench: {}", rows.last().map(String::as_str).unwrap_or(""));
    }
}

/// One fleet-wide rollout through the controller alone, and again with the devices
/// substituting from a site cache (the controller's `--publish-cache`, served by busybox
/// httpd): time to all confirmed, and the bytes the controller sent.
pub(crate) fn site_cache(rows: &mut Vec<String>) {
    const DEVICES: usize = 20;
    for (uplink, with_cache) in [(None, false), (None, true), (Some("20mbit"), false), (Some("20mbit"), true)] {
        let cache = tempfile::tempdir_in("/var/tmp").expect("tmp");
        // Closer to the production defaults than the tests' timeouts: a capped uplink
        // queues the controller's messages behind the copies.
        let mut opts = FleetOptions {
            reply_timeout: 300,
            confirm_timeout: 120,
            heartbeat: 5,
            dead_after: 30,
            ..Default::default()
        };
        if with_cache {
            opts.extra_args =
                vec!["--publish-cache".into(), format!("file://{}?compression=zstd", cache.path().display())];
        }
        let mut f = Fleet::new(opts).expect("fleet");
        f.set_configs(
            &json!({ "alpha": { "version": "4", "payloads": 10, "payloadKiB": 512, "small": 300 }, "beta": {} }),
        )
        .expect("cfg");
        f.controller.ctl(&["project", "commit", "-m", "site cache"]);
        let built = f.controller.ctl_json(&["build", "alpha", "--wait"]);
        assert_eq!(built["result"], "succeeded", "{built}");
        let addr = format!("{}:18090", f.host_address());
        let mut httpd = Command::new("busybox")
            .args(["httpd", "-f", "-p", &addr, "-h"])
            .arg(cache.path())
            .spawn()
            .expect("busybox httpd");
        for i in 0..DEVICES {
            let name = format!("s{i}");
            f.add_device(&name, "alpha", false).expect("device");
            if with_cache {
                f.add_agent_config(&name, &format!("substituters = [\"http://{addr}\"]\n")).expect("cfg");
            }
            f.device_mut(&name).start().expect("start");
        }
        for i in 0..DEVICES {
            f.wait_online(&format!("s{i}"));
        }
        if let Some(rate) = uplink {
            f.shape_controller(rate).expect("shape");
        }
        let t0 = Instant::now();
        let t = f.controller.ctl_json(&["deploy", "--config", "alpha", "-m", "site cache", "--wait"]);
        let secs = t0.elapsed().as_secs_f64();
        let _ = httpd.kill();
        let _ = httpd.wait();
        assert_eq!(t["result"], "succeeded", "{t}");
        let sum = |k: &str| children_sum(&t, k);
        rows.push(format!(
            "| {}{} | {DEVICES} | {secs:.2} s | {} ({} paths) | {} ({} paths) |",
            if with_cache { "controller + site cache" } else { "controller alone" },
            uplink.map_or(String::new(), |r| format!(", controller's uplink {r}")),
            mb(sum("bytes_sent") as f64),
            sum("paths_sent"),
            mb(sum("bytes_substituted") as f64),
            sum("paths_substituted"),
        ));
        eprintln!("bench: {}", rows.last().map(String::as_str).unwrap_or(""));
    }
}
