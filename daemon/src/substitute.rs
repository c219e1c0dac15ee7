//! Substitution: before the agent tells the controller which paths it lacks, it asks the
//! Nix binary caches of its configuration (`substituters`) for them, over the standard
//! protocol (`nix-cache-info`, `HASH.narinfo`, the NAR compressed with xz, zstd or not at
//! all), and imports what they have. Each narinfo must be signed by a key of
//! `nix_trusted_keys` and each NAR must have exactly the narinfo's hash and size, as for
//! paths from the controller. Whatever goes wrong (a cache that is down or slow, a bad
//! signature, a wrong hash) leaves that path to the controller: substitution never fails
//! a deployment.

use std::collections::HashSet;
use std::io::{self, BufReader, Read};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use thymis_store::nar::copy_verified;
use thymis_store::narinfo::{Compression, NarInfo, narinfo_name};
use thymis_store::signing::verify_path;
use thymis_store::{PathInfo, StorePath};
use tracing::{debug, info, warn};

use crate::agent::Agent;

/// Narinfo and NAR downloads at once.
const PARALLEL: usize = 4;

/// What a pass got from the caches.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Substituted {
    pub paths: u64,
    /// Compressed bytes downloaded for them.
    pub bytes: u64,
}

/// One cache, as this pass sees it.
#[derive(Debug)]
struct Cache {
    url: String,
    /// Set after a failure of the cache itself (unreachable, timing out, not a Nix cache):
    /// the rest of the pass does without it.
    broken: AtomicBool,
}

/// An HTTP client for the caches: https:// ones are checked against the CA certificates
/// of `substituter_ca_file` (none readable: https caches fail, and are not used).
fn client(timeout: Duration, ca_file: &std::path::Path) -> ureq::Agent {
    // ureq takes rustls' process-wide provider; already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(ca_file).unwrap_or_default();
    let roots: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if roots.is_empty() {
        debug!(file = %ca_file.display(), "no CA certificates: https binary caches cannot be checked");
    }
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
        .build();
    ureq::Agent::config_builder()
        .timeout_connect(Some(timeout))
        .timeout_recv_response(Some(timeout))
        .http_status_as_error(false)
        // A redirect would send the device to a URL no narinfo check saw (another host,
        // its own local services): a cache that redirects is not used.
        .max_redirects(0)
        .max_redirects_will_error(false)
        .tls_config(tls)
        .build()
        .into()
}

/// Fetches `url`: the body's reader (at most `limit` bytes of it, within `body_timeout`),
/// `None` for a 404 (the cache lacks it), or an error that says the cache is unusable.
fn get(
    agent: &ureq::Agent,
    url: &str,
    body_timeout: Duration,
    limit: u64,
) -> Result<Option<Box<dyn Read + Send>>, String> {
    let resp = agent
        .get(url)
        .config()
        .timeout_recv_body(Some(body_timeout))
        .build()
        .call()
        .map_err(|e| format!("{url}: {e}"))?;
    match resp.status().as_u16() {
        200 => Ok(Some(Box::new(resp.into_body().into_with_config().limit(limit).reader()))),
        404 | 403 => Ok(None),
        s @ 300..=399 => Err(format!("{url}: HTTP {s}: redirects are not followed")),
        s => Err(format!("{url}: HTTP {s}")),
    }
}

/// The usable caches and, for each path of `missing` one of them has, which cache and
/// its narinfo (signed by a trusted key); `None` when no cache has any.
fn find(agent: &Agent, missing: &[StorePath]) -> Option<Found> {
    let config = &agent.config;
    if config.substituters.is_empty() || missing.is_empty() {
        return None;
    }
    let timeout = Duration::from_secs(config.substituter_timeout.max(1));
    let http = client(timeout, &config.substituter_ca_file);
    let caches: Vec<Cache> = config
        .substituters
        .iter()
        .map(|u| Cache { url: u.trim_end_matches('/').to_owned(), broken: AtomicBool::new(false) })
        .filter(|c| usable(&http, c, timeout))
        .collect();
    if caches.is_empty() {
        return None;
    }
    let found: Vec<Mutex<Option<(usize, NarInfo)>>> = missing.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = missing.get(i) else { break };
                    *lock(&found[i]) = lookup(agent, &http, &caches, path, timeout);
                }
            });
        }
    });
    let found: Vec<(usize, NarInfo)> = found.into_iter().filter_map(|m| m.into_inner().ok().flatten()).collect();
    (!found.is_empty()).then_some(Found { http, caches, timeout, found })
}

struct Found {
    http: ureq::Agent,
    caches: Vec<Cache>,
    timeout: Duration,
    found: Vec<(usize, NarInfo)>,
}

/// What [`substitute`] would take from the caches for `missing` (dependencies first),
/// without fetching a NAR: the paths a cache has whose references are in the store or
/// also served, and their compressed bytes (the narinfo's, else the NAR's size). For the
/// controller's preview of an update.
pub fn would_serve(agent: &Agent, missing: &[StorePath]) -> (Vec<StorePath>, u64) {
    let Some(Found { found, .. }) = find(agent, missing) else { return (vec![], 0) };
    let missing_set: HashSet<&StorePath> = missing.iter().collect();
    let mut served: HashSet<&StorePath> = HashSet::new();
    let mut bytes = 0;
    for (_, narinfo) in &found {
        if narinfo.info.dependencies().all(|r| !missing_set.contains(r) || served.contains(r)) {
            served.insert(&narinfo.info.path);
            bytes += narinfo.file_size.unwrap_or(narinfo.info.nar_size);
        }
    }
    (found.iter().map(|(_, n)| n.info.path.clone()).filter(|p| served.contains(p)).collect(), bytes)
}

/// Paths of `missing` (dependencies first) that the caches have, imported; the rest is
/// for the controller. `progress` is told (paths, bytes) as paths arrive.
pub fn substitute(agent: &Agent, missing: &[StorePath], progress: &(dyn Fn(Substituted) + Sync)) -> Substituted {
    let Some(Found { http, caches, timeout, found }) = find(agent, missing) else { return Substituted::default() };
    info!(paths = found.len(), of = missing.len(), "substituting from binary caches");

    // In chunks of at most CHUNK_PATHS paths and CHUNK_BYTES of NAR (dependencies
    // first): the chunk's NARs are checked into staging files, four at a time, then
    // imported, so staging never holds more than a chunk, whatever the closure's size.
    let missing_set: HashSet<&StorePath> = missing.iter().collect();
    let mut have: HashSet<StorePath> = HashSet::new();
    let mut got = Substituted::default();
    let mut rest = &found[..];
    while !rest.is_empty() {
        let mut n = 0;
        let mut bytes = 0;
        while n < rest.len() && n < CHUNK_PATHS && (n == 0 || bytes + rest[n].1.info.nar_size <= CHUNK_BYTES) {
            bytes += rest[n].1.info.nar_size;
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let staged = fetch_all(agent, &http, &caches, chunk, timeout, got, progress);
        // A path whose references are neither in the store nor substituted stays
        // missing (the controller sends it, and them).
        let mut batch: Vec<(&PathInfo, PathBuf, u64)> = vec![];
        let mut in_batch: HashSet<&StorePath> = HashSet::new();
        for ((_, narinfo), staged) in chunk.iter().zip(staged) {
            let Some((nar, bytes)) = staged else { continue };
            let present = |r: &StorePath| !missing_set.contains(r) || have.contains(r) || in_batch.contains(r);
            if narinfo.info.dependencies().all(present) {
                in_batch.insert(&narinfo.info.path);
                batch.push((&narinfo.info, nar, bytes));
            } else {
                let _ = std::fs::remove_file(&nar);
            }
        }
        let imported = import(agent, &batch);
        for (info, nar, bytes) in &batch {
            let _ = std::fs::remove_file(nar);
            if imported.contains(&info.path) {
                have.insert(info.path.clone());
                got.paths += 1;
                got.bytes += bytes;
            }
        }
        progress(got);
    }
    info!(paths = got.paths, bytes = got.bytes, "substituted from binary caches");
    got
}

/// Paths per chunk, and NAR bytes (a larger path goes alone).
const CHUNK_PATHS: usize = 256;
const CHUNK_BYTES: u64 = 64 << 20;

/// The chunk's NARs, downloaded and checked into staging files (`None` where that failed).
fn fetch_all(
    agent: &Agent,
    http: &ureq::Agent,
    caches: &[Cache],
    chunk: &[(usize, NarInfo)],
    timeout: Duration,
    before: Substituted,
    progress: &(dyn Fn(Substituted) + Sync),
) -> Vec<Option<(PathBuf, u64)>> {
    let staged: Vec<Mutex<Option<(PathBuf, u64)>>> = chunk.iter().map(|_| Mutex::new(None)).collect();
    let (next, done_paths, done_bytes) = (AtomicUsize::new(0), AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((c, narinfo)) = chunk.get(i) else { break };
                    let cache = &caches[*c];
                    if cache.broken.load(Ordering::Relaxed) {
                        continue;
                    }
                    match fetch(agent, http, cache, narinfo, timeout) {
                        Ok((nar, bytes)) => {
                            *lock(&staged[i]) = Some((nar, bytes));
                            let p = done_paths.fetch_add(1, Ordering::Relaxed) + 1;
                            let b = done_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
                            agent.liveness.beat();
                            progress(Substituted { paths: before.paths + p, bytes: before.bytes + b });
                        }
                        Err(e) => warn!(path = %narinfo.info.path, cache = %cache.url, "not substituted: {e}"),
                    }
                }
            });
        }
    });
    staged.into_iter().map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner())).collect()
}

/// Imports staged paths (dependencies first) with one `nix-store --import`: the paths
/// that are valid afterwards (after a failure, those that went in before it).
fn import(agent: &Agent, batch: &[(&PathInfo, PathBuf, u64)]) -> HashSet<StorePath> {
    if batch.is_empty() {
        return HashSet::new();
    }
    let files: Result<Vec<_>, String> = batch
        .iter()
        .map(|(info, nar, _)| {
            let f = std::fs::File::open(nar).map_err(|e| format!("{}: {e}", nar.display()))?;
            Ok((*info, Box::new(BufReader::new(f)) as Box<dyn Read>))
        })
        .collect();
    let paths: Vec<StorePath> = batch.iter().map(|(i, _, _)| i.path.clone()).collect();
    match files.and_then(|f| agent.store.import(f).map_err(|e| e.to_string())) {
        Ok(()) => paths.into_iter().collect(),
        Err(e) => {
            // What did not go in is still missing: the controller sends it.
            warn!("importing substituted paths: {e}");
            let invalid: HashSet<StorePath> =
                agent.store.invalid_paths(&paths).unwrap_or(paths.clone()).into_iter().collect();
            paths.into_iter().filter(|p| !invalid.contains(p)).collect()
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a cache answers as a Nix binary cache for /nix/store.
fn usable(http: &ureq::Agent, cache: &Cache, timeout: Duration) -> bool {
    let info = get(http, &format!("{}/nix-cache-info", cache.url), timeout, 64 << 10).and_then(|r| {
        let mut text = String::new();
        r.ok_or("no nix-cache-info")?.read_to_string(&mut text).map_err(|e| e.to_string())?;
        Ok(text)
    });
    match info {
        Ok(text) if text.lines().any(|l| l.trim() == "StoreDir: /nix/store") => true,
        Ok(_) => {
            warn!(cache = %cache.url, "not a binary cache for /nix/store: not used");
            false
        }
        Err(e) => {
            warn!(cache = %cache.url, "binary cache unreachable: {e}");
            false
        }
    }
}

/// The first cache (in configured order) with a narinfo for `path` signed by a trusted key.
fn lookup(
    agent: &Agent,
    http: &ureq::Agent,
    caches: &[Cache],
    path: &StorePath,
    timeout: Duration,
) -> Option<(usize, NarInfo)> {
    for (i, cache) in caches.iter().enumerate() {
        if cache.broken.load(Ordering::Relaxed) {
            continue;
        }
        let url = format!("{}/{}", cache.url, narinfo_name(path));
        let text = match get(http, &url, timeout, 1 << 20) {
            Ok(Some(mut r)) => {
                let mut text = String::new();
                match r.read_to_string(&mut text) {
                    Ok(_) => text,
                    Err(e) => {
                        debug!(%url, "{e}");
                        continue;
                    }
                }
            }
            Ok(None) => continue,
            Err(e) => {
                warn!(cache = %cache.url, "binary cache failed ({e}); not used for the rest of this deployment");
                cache.broken.store(true, Ordering::Relaxed);
                continue;
            }
        };
        match NarInfo::parse(&text) {
            Ok(n) if n.info.path != *path => warn!(%url, "narinfo for another path ({})", n.info.path),
            Ok(n) => match verify_path(&n.info, &agent.nix_keys) {
                Ok(()) => return Some((i, n)),
                Err(e) => debug!(%url, "narinfo not trusted: {e}"),
            },
            Err(e) => warn!(%url, "{e}"),
        }
    }
    None
}

/// Downloads, decompresses and checks a NAR into a staging file: (file, compressed bytes).
fn fetch(
    agent: &Agent,
    http: &ureq::Agent,
    cache: &Cache,
    n: &NarInfo,
    timeout: Duration,
) -> Result<(PathBuf, u64), String> {
    let url = format!("{}/{}", cache.url, n.url);
    // Only the signed NAR size bounds what is read, never the narinfo's unsigned
    // FileSize: a compressed NAR is at most a little larger than the NAR, and the body
    // may take its time at no less than 64 KiB/s of it.
    let limit = max_body(n.info.nar_size);
    let body_timeout = timeout + Duration::from_secs(limit / (64 << 10));
    let body = match get(http, &url, body_timeout, limit) {
        Ok(Some(b)) => b,
        Ok(None) => return Err(format!("{url}: not found")),
        Err(e) => {
            cache.broken.store(true, Ordering::Relaxed);
            return Err(e);
        }
    };
    let counted = Counted { inner: body, bytes: 0 };
    let nar = agent.staging_dir().join(format!("substitute-{}.nar", n.info.path.base_name()));
    let result = (|| -> Result<u64, String> {
        let file = std::fs::File::create(&nar).map_err(|e| format!("{}: {e}", nar.display()))?;
        let mut w = io::BufWriter::new(file);
        let mut counted = counted;
        let checked = match n.compression {
            Compression::None => copy_verified(&mut counted, &mut w, &n.info.nar_hash, n.info.nar_size),
            Compression::Zstd => {
                let d = thymis_store::zstd_limits::decoder(BufReader::new(&mut counted)).map_err(|e| e.to_string())?;
                copy_verified(d, &mut w, &n.info.nar_hash, n.info.nar_size)
            }
            Compression::Xz => {
                // liblzma decodes as a stream (what it holds is its dictionary, bounded
                // by XZ_MEMLIMIT), so the check sees each byte as it comes and stops the
                // download at the first that does not fit the signed NAR.
                let stream = liblzma::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, 0).map_err(|e| e.to_string())?;
                let d = liblzma::read::XzDecoder::new_stream(BufReader::new(&mut counted), stream);
                copy_verified(d, &mut w, &n.info.nar_hash, n.info.nar_size)
            }
        };
        checked.map_err(|e| e.to_string())?;
        io::Write::flush(&mut w).map_err(|e| e.to_string())?;
        Ok(counted.bytes)
    })();
    match result {
        Ok(bytes) => Ok((nar, bytes)),
        Err(e) => {
            let _ = std::fs::remove_file(&nar);
            Err(e)
        }
    }
}

/// What an xz decoder may hold: its dictionary (xz -9 needs 65 MiB), nothing that grows
/// with the data. A NAR compressed with a larger dictionary is refused.
const XZ_MEMLIMIT: u64 = 80 << 20;

/// The most a cache's compressed NAR of `nar_size` bytes may take: the NAR and what the
/// compression adds to incompressible data, with room for the format's own bytes.
fn max_body(nar_size: u64) -> u64 {
    nar_size + nar_size / 16 + (1 << 20)
}

/// Counts the bytes read through it.
struct Counted<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}
