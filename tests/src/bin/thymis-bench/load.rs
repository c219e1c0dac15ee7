//! Load-generator agents: many agents speaking the real protocol from one process (their
//! own keys, enrollments and connections), checking every NAR but importing nothing.

use crate::*;

/// Handshakes the load generators hold open at once. They all come from one address,
/// where a real fleet's devices come from many: their controller lets that one address
/// hold as many ([`load_fleet_args`]), or its per-address limit (32 by default) would
/// refuse them.
pub(crate) const LOAD_HANDSHAKES: usize = 128;

/// The controller's arguments for a fleet of load generators (see [`LOAD_HANDSHAKES`]).
pub(crate) fn load_fleet_args() -> Vec<String> {
    vec![format!("--max-handshakes-per-peer={LOAD_HANDSHAKES}")]
}

pub(crate) type LoadWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An HTTP client for the bench's own controller on this machine: over TLS it takes the
/// certificate the controller shows, as the harness's scripted agents do.
pub(crate) fn http_agent() -> ureq::Agent {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = ureq::tls::TlsConfig::builder().disable_verification(true).build();
    ureq::Agent::config_builder().http_status_as_error(false).tls_config(tls).build().into()
}

/// Enrolls `n` devices of `config` through the API (one HTTP connection, kept alive):
/// their enrollment tokens.
pub(crate) fn enroll_load_agents(f: &Fleet, n: usize, config: &str) -> Vec<String> {
    let agent = http_agent();
    let auth = format!("Bearer {}", f.controller.token());
    (0..n)
        .map(|i| {
            let mut r = agent
                .post(&format!("{}/api/v1/devices", f.controller.base_url()))
                .header("Authorization", &auth)
                .send_json(json!({ "name": format!("load{i}"), "config": config }))
                .expect("add device");
            let v: Value = r.body_mut().read_json().expect("json");
            v["enrollment_token"].as_str().expect("token").to_owned()
        })
        .collect()
}

/// A load-generator agent's connection: the agent's own handshake
/// ([`AgentHandshake`]) with a fresh key and token, trusting only `controller_key`.
pub(crate) async fn load_agent_connect(url: &str, token: String, controller_key: PublicKey) -> Result<LoadWs, String> {
    use futures_util::{SinkExt, StreamExt};
    use thymis_proto::handshake::{AgentHandshake, Nonce};
    use thymis_proto::{decode_agent_bound, encode};
    use tokio_tungstenite::tungstenite::Message;
    let key = thymis_store::signing::SecretKey::generate("thymis-device").map_err(|e| e.to_string())?;
    let mut ws = thymis_fleet_tests::ws_connect(url).await.map_err(|e| format!("connect: {e:#}"))?;
    let pinned = [controller_key];
    let mut h = AgentHandshake::new(&key, &pinned, Some(token), Nonce(rand32()));
    ws.send(Message::text(encode(&h.hello("load")))).await.map_err(|e| e.to_string())?;
    async fn next(ws: &mut LoadWs) -> Result<thymis_proto::AgentBound, String> {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => decode_agent_bound(t.as_str(), false).map_err(|e| format!("{e}: {t}")),
            other => Err(format!("no answer: {other:?}")),
        }
    }
    let auth = h.on_challenge(next(&mut ws).await?).map_err(|e| e.to_string())?;
    ws.send(Message::text(encode(&auth))).await.map_err(|e| e.to_string())?;
    h.on_welcome(next(&mut ws).await?).map_err(|e| e.to_string())?;
    Ok(ws)
}

/// The controller's identity key, which load agents pin.
pub(crate) fn controller_key(f: &Fleet) -> PublicKey {
    let (status, identity) = f.controller.api("/identity", None);
    assert_eq!(status, 200, "{identity}");
    identity["identity_key"].as_str().and_then(|k| k.parse().ok()).expect("the controller's identity key")
}

/// A binary cache the load generators substitute from, as agents configured with
/// `substituters` do: its URL and the keys its narinfos must be signed with.
pub(crate) struct LoadCache {
    pub(crate) url: String,
    pub(crate) keys: Vec<thymis_store::signing::PublicKey>,
    pub(crate) http: ureq::Agent,
}

/// What a load generator took from its cache for `paths`: every path the cache has with
/// a trusted signature is fetched and checked (hash and size, after decompression) but
/// not imported. Returns the paths still missing, and the paths and compressed bytes
/// substituted.
pub(crate) fn load_substitute(
    cache: &LoadCache,
    paths: Vec<thymis_store::StorePath>,
) -> (Vec<thymis_store::StorePath>, u64, u64) {
    use std::io::Read;
    use thymis_store::narinfo::{Compression, NarInfo, narinfo_name};
    let (mut missing, mut n, mut bytes) = (Vec::new(), 0u64, 0u64);
    for path in paths {
        let fetched = (|| -> Result<u64, String> {
            let get = |url: String| -> Result<Vec<u8>, String> {
                let mut r = cache.http.get(&url).call().map_err(|e| format!("{url}: {e}"))?;
                if r.status() != 200 {
                    return Err(format!("{url}: {}", r.status()));
                }
                r.body_mut().with_config().limit(1 << 30).read_to_vec().map_err(|e| format!("{url}: {e}"))
            };
            let text =
                String::from_utf8(get(format!("{}/{}", cache.url, narinfo_name(&path)))?).map_err(|e| e.to_string())?;
            let info = NarInfo::parse(&text).map_err(|e| e.to_string())?;
            thymis_store::signing::verify_path(&info.info, &cache.keys).map_err(|e| e.to_string())?;
            let body = get(format!("{}/{}", cache.url, info.url))?;
            let reader: Box<dyn Read> = match info.compression {
                Compression::Zstd => {
                    Box::new(thymis_store::zstd_limits::decoder(&body[..]).map_err(|e| e.to_string())?)
                }
                Compression::None => Box::new(&body[..]),
                Compression::Xz => return Err("the bench's cache writes zstd".into()),
            };
            thymis_store::nar::copy_verified(reader, &mut std::io::sink(), &info.info.nar_hash, info.info.nar_size)
                .map_err(|e| e.to_string())?;
            Ok(body.len() as u64)
        })();
        match fetched {
            Ok(b) => {
                n += 1;
                bytes += b;
            }
            Err(_) => missing.push(path),
        }
    }
    (missing, n, bytes)
}

/// A load-generator agent during a copy (the compact copy of protocol 5): accepts the
/// offer, substitutes what its cache (if any) has, lacks every other path, checks each NAR it receives (zstd, then sha256
/// and size against the signed path info) without importing it, acknowledges it, and
/// ends at `activate`. Returns the compressed bytes received from the controller.
pub(crate) async fn load_agent_copy(mut ws: LoadWs, cache: Option<std::sync::Arc<LoadCache>>) -> Result<u64, String> {
    use futures_util::{SinkExt, StreamExt};
    use thymis_proto::compact::QueryIndex;
    use thymis_proto::{AgentBound, ControllerBound, CopyWindow, decode_agent_bound, encode};
    use tokio_tungstenite::tungstenite::Message;
    use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};
    let mut received = 0u64;
    // One decompression context and buffer for the connection, as an agent would keep.
    let mut dec = Decoder::new().map_err(|e| e.to_string())?;
    dec.set_parameter(DParameter::WindowLogMax(thymis_store::zstd_limits::WINDOW_LOG_MAX))
        .map_err(|e| e.to_string())?;
    let mut out = vec![0u8; 128 << 10];
    // The copy's query (paths by index, protocol 5) and the path being received.
    let mut query: Option<(String, QueryIndex)> = None;
    let mut current: Option<(u32, thymis_store::PathInfo, thymis_store::hash::NarHasher)> = None;
    loop {
        let frame = ws.next().await.ok_or("closed")?.map_err(|e| e.to_string())?;
        let reply = match frame {
            Message::Binary(b) => {
                received += b.len() as u64;
                let (_, _, hasher) = current.as_mut().ok_or("chunk outside a path")?;
                let mut input = InBuffer::around(&b);
                while input.pos < b.len() {
                    let mut o = OutBuffer::around(&mut out[..]);
                    dec.run(&mut input, &mut o).map_err(|e| e.to_string())?;
                    let n = o.pos();
                    hasher.update(&out[..n]);
                }
                continue;
            }
            Message::Text(t) => match decode_agent_bound(t.as_str(), true).map_err(|e| e.to_string())? {
                AgentBound::Offer { offer } => {
                    let id = serde_json::from_str::<Value>(&offer.payload)
                        .ok()
                        .and_then(|v| v["deployment_id"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    ControllerBound::OfferAccepted { deployment_id: id }
                }
                AgentBound::QueryPaths { deployment_id, paths } => {
                    let q = QueryIndex::new(paths.clone());
                    let (missing, substituted_paths, substituted_bytes) = match cache.clone() {
                        Some(c) => tokio::task::spawn_blocking(move || load_substitute(&c, paths))
                            .await
                            .map_err(|e| e.to_string())?,
                        None => (paths, 0, 0),
                    };
                    let missing =
                        missing.iter().map(|p| q.index(p)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
                    query = Some((deployment_id.clone(), q));
                    ControllerBound::PathsLacking {
                        deployment_id,
                        missing,
                        bases: vec![],
                        window: CopyWindow { paths: 512, bytes: 64 << 20 },
                        substituted_paths,
                        substituted_bytes,
                    }
                }
                AgentBound::PathAt(c) => {
                    let (_, q) = query.as_ref().ok_or("a path before the query")?;
                    let info = q.expand(&c).map_err(|e| e.to_string())?;
                    dec.reinit().map_err(|e| e.to_string())?;
                    current = Some((c.index, info, thymis_store::hash::NarHasher::new()));
                    continue;
                }
                AgentBound::PathDone => {
                    let (index, info, mut hasher) = current.take().ok_or("end outside a path")?;
                    loop {
                        let mut o = OutBuffer::around(&mut out[..]);
                        let left = dec.flush(&mut o).map_err(|e| e.to_string())?;
                        let n = o.pos();
                        hasher.update(&out[..n]);
                        if left == 0 {
                            break;
                        }
                    }
                    let (hash, size) = hasher.finish();
                    if hash != info.nar_hash || size != info.nar_size {
                        return Err(format!("{}: NAR hash or size mismatch", info.path));
                    }
                    let deployment_id = query.as_ref().map(|(id, _)| id.clone()).unwrap_or_default();
                    ControllerBound::PathsImported { deployment_id, paths: vec![index] }
                }
                AgentBound::Activate { .. } => return Ok(received),
                _ => continue,
            },
            Message::Close(_) => return Err("closed".into()),
            _ => continue,
        };
        ws.send(Message::text(encode(&reply))).await.map_err(|e| e.to_string())?;
    }
}

/// A fleet for load generators (see [`load_fleet_args`]), with `extra` arguments for its
/// controller. A deployment that outlives the harness's two-minute expiry would end
/// `expired` mid-copy on a slow run of this machine, measuring nothing.
pub(crate) fn load_fleet(n: usize, extra: Vec<String>) -> Fleet {
    let mut extra_args = load_fleet_args();
    extra_args.extend(extra);
    Fleet::new(FleetOptions {
        reply_timeout: 600,
        dead_after: 120,
        heartbeat: 30,
        deployment_ttl: 3600,
        parallel: Some(n),
        extra_args,
        ..Default::default()
    })
    .expect("fleet")
}

/// Builds configuration `alpha` as `cfg` says: its closure's NAR bytes.
pub(crate) fn load_build(f: &Fleet, cfg: Value) -> f64 {
    f.set_configs(&json!({ "alpha": cfg, "beta": {} })).expect("cfg");
    let _ = f.controller.ctl(&["project", "commit", "-m", "load"]);
    let b = f.controller.ctl_json(&["build", "alpha", "--wait"]);
    assert_eq!(b["result"], "succeeded", "{b}");
    let nar = sh(Command::new("nix").args(["path-info", "-S", b["system"].as_str().unwrap_or_default()]));
    nar.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0.0)
}

/// The sum of a numeric field over a task's children.
pub(crate) fn children_sum(task: &Value, key: &str) -> i64 {
    task["children"].as_array().map_or(0, |c| c.iter().filter_map(|c| c[key].as_i64()).sum())
}

/// What one deployment of `alpha` to N load generators measured.
pub(crate) struct LoadRun {
    pub(crate) secs: f64,
    pub(crate) done: usize,
    /// Compressed bytes the load generators received from the controller.
    pub(crate) bytes: u64,
    /// The controller's CPU seconds, and the load generators' (this process's).
    pub(crate) cpu: f64,
    pub(crate) gen_cpu: f64,
    pub(crate) read: u64,
    pub(crate) peak: String,
    pub(crate) idle: String,
    pub(crate) task: Value,
}

/// N load-generator agents (one process, the real protocol, hashes checked, nothing
/// imported), each substituting from `cache` first if given, connect and then take one
/// deployment of `alpha` at once: measured from `thymisctl deploy` to every copy done
/// (each agent at `activate`).
pub(crate) fn load_rollout(f: &Fleet, n: usize, cache: Option<std::sync::Arc<LoadCache>>) -> LoadRun {
    let tokens = enroll_load_agents(f, n, "alpha");
    let url = f.controller.agent_url();
    let ck = controller_key(f);
    let ctl_pid = f.controller.pid().expect("controller pid");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(LOAD_HANDSHAKES));
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut handles = Vec::new();
    for token in tokens {
        let (url, limit, ready, cache, ck) = (url.clone(), limit.clone(), ready.clone(), cache.clone(), ck.clone());
        handles.push(rt.spawn(async move {
            let permit = limit.acquire_owned().await.expect("semaphore");
            let ws = load_agent_connect(&url, token, ck).await;
            drop(permit);
            ready.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            load_agent_copy(ws.map_err(|e| format!("handshake: {e}"))?, cache).await
        }));
    }
    // Every handshake has ended, each connected or failed (a failure ends its task,
    // reported below).
    while ready.load(std::sync::atomic::Ordering::Relaxed) < n {
        std::thread::sleep(Duration::from_millis(100));
    }
    let idle = proc_field(ctl_pid, "VmRSS:");
    let (c0, g0, io0) = (cpu_ticks(ctl_pid), cpu_ticks(std::process::id()), disk_reads(ctl_pid));
    let t0 = Instant::now();
    let out = f.controller.ctl(&["--json", "deploy", "--config", "alpha", "-m", "load"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let results: Vec<Result<u64, String>> = rt
        .block_on(async { futures_util::future::join_all(handles).await })
        .into_iter()
        .map(|r| r.map_err(|e| e.to_string()).and_then(|r| r))
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(ctl_pid) - c0) as f64 / 100.0;
    let gen_cpu = (cpu_ticks(std::process::id()) - g0) as f64 / 100.0;
    let read = disk_reads(ctl_pid) - io0;
    let peak = proc_field(ctl_pid, "VmHWM:");
    rt.shutdown_background();
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        eprintln!("bench: a load agent failed: {e}");
    }
    let id = serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|t| t["id"].as_i64()).expect("task id");
    let (_, task) = f.controller.api(&format!("/tasks/{id}"), None);
    LoadRun {
        secs,
        done: results.iter().filter(|r| r.is_ok()).count(),
        bytes: results.iter().filter_map(|r| r.as_ref().ok()).sum(),
        cpu,
        gen_cpu,
        read,
        peak,
        idle,
        task,
    }
}
