//! The agent's footprint, and the controller's scale with idle agents.

use crate::*;

pub(crate) fn proc_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l[key.len()..].trim().to_owned())
        .unwrap_or_default()
}

/// Bytes `pid` made the disk read (page-cache hits excluded).
pub(crate) fn disk_reads(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("read_bytes:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

pub(crate) fn footprint(f: &Fleet) -> String {
    let pid = f.devices[0].agent_pid().expect("agent pid");
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(20));
    let cpu = (cpu_ticks(pid) - t0) as f64 / 100.0 / 20.0 * 100.0;
    let line = format!(
        "| idle agent | {} resident | {cpu:.2} % of one core (20 s, heartbeat every 1 s) |",
        proc_field(pid, "VmRSS:")
    );
    eprintln!("bench: {line}");
    line
}

/// Idle agents speaking the real protocol from one process, against one controller.
pub(crate) fn scale(n: usize) -> Vec<String> {
    use futures_util::{SinkExt, StreamExt};
    use thymis_proto::{AgentBound, ControllerBound, decode_agent_bound, encode};
    use tokio_tungstenite::tungstenite::Message;

    let f = Fleet::new(FleetOptions {
        heartbeat: 15,
        dead_after: 45,
        reply_timeout: 300,
        extra_args: load_fleet_args(),
        ..Default::default()
    })
    .expect("fleet");
    let t0 = Instant::now();
    let tokens = enroll_load_agents(&f, n, "alpha");
    let enroll_secs = t0.elapsed().as_secs_f64();
    let url = f.controller.agent_url();
    let ck = controller_key(&f);
    let ctl_pid = f.controller.pid().expect("controller pid");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let offered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(LOAD_HANDSHAKES));
    let t_connect = Instant::now();
    for token in tokens {
        let (url, connected, offered, limit, ck) =
            (url.clone(), connected.clone(), offered.clone(), limit.clone(), ck.clone());
        rt.spawn(async move {
            let permit = limit.acquire_owned().await.expect("semaphore");
            let mut ws = match load_agent_connect(&url, token, ck).await {
                Ok(ws) => ws,
                Err(e) => return eprintln!("bench: a load agent's handshake failed: {e}"),
            };
            drop(permit);
            connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut beat = tokio::time::interval(Duration::from_secs(15));
            loop {
                tokio::select! {
                    m = ws.next() => match m {
                        Some(Ok(Message::Text(t))) => {
                            if let Ok(AgentBound::Offer { offer }) = decode_agent_bound(t.as_str(), true) {
                                offered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let id = serde_json::from_str::<Value>(&offer.payload).ok().and_then(|v| v["deployment_id"].as_str().map(str::to_owned)).unwrap_or_default();
                                let _ = ws.send(Message::text(encode(&ControllerBound::OfferRefused { deployment_id: id, reason: "load generator".into() }))).await;
                            }
                        }
                        Some(Ok(_)) => {}
                        other => {
                            let why = match other {
                                Some(Err(e)) => format!("error: {e}"),
                                None => "closed".into(),
                                _ => "?".into(),
                            };
                            eprintln!("bench: load agent connection ended: {why}");
                            return;
                        }
                    },
                    _ = beat.tick() => { let _ = ws.send(Message::text(encode(&ControllerBound::Heartbeat { seq: 0 }))).await; }
                }
            }
        });
    }
    let all = |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::Relaxed) >= n;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !all(&connected) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let connect_secs = t_connect.elapsed().as_secs_f64();
    let got = connected.load(std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(5));
    let c0 = cpu_ticks(ctl_pid);
    std::thread::sleep(Duration::from_secs(30));
    let idle_cpu = (cpu_ticks(ctl_pid) - c0) as f64 / 100.0 / 30.0 * 100.0;
    let rss = proc_field(ctl_pid, "VmRSS:");
    let t_deploy = Instant::now();
    let out = f.controller.ctl(&["--json", "deploy", "--config", "alpha", "-m", "notice"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(180);
    while !all(&offered) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let notice_secs = t_deploy.elapsed().as_secs_f64();
    let reached = offered.load(std::sync::atomic::Ordering::Relaxed);
    rt.shutdown_background();
    vec![
        format!(
            "| agents connected | {got} of {n} in {connect_secs:.1} s (enrollment through the API: {enroll_secs:.1} s) |"
        ),
        format!("| controller memory, all connected | {rss} |"),
        format!("| controller CPU, idle (heartbeats every 15 s) | {idle_cpu:.1} % of one core |"),
        format!("| signed offer delivered to every agent | {reached} of {n} in {notice_secs:.1} s (build included) |"),
    ]
}
