//! One attempt over one connection: offer, query what the device lacks, copy it in
//! chunks within the device's window, acknowledged as it goes.

use super::*;
use thymis_proto::compact::{CompactError, QueryIndex};
use thymis_proto::{COMPACT_COPY_PROTOCOL, IndexedBase};

/// One attempt over one connection: offer, query, copy what is missing, activate.
pub(super) async fn send_to(
    ctl: &Arc<Controller>,
    conn: &Arc<Conn>,
    child: &ChildRow,
    offer: &Offer,
    closure: &[PathInfo],
    unacked: &mut HashMap<StorePath, u64>,
) -> Result<(), Stop> {
    let id = &child.deployment_id;
    let t = ctl.settings.reply_timeout;
    let mut rx = conn.subscribe(id);
    if !conn.send(AgentBound::Offer { offer: Signed::sign(offer, &ctl.identity) }).await {
        return Err(Stop::Disconnected);
    }
    match reply(&mut rx, t).await? {
        ControllerBound::OfferAccepted { .. } => {}
        ControllerBound::OfferRefused { reason, .. } => return Err(Stop::Refused(format!("offer refused: {reason}"))),
        other => return Err(Stop::Refused(format!("unexpected reply to the offer: {other:?}"))),
    }
    let paths: Vec<StorePath> = closure.iter().map(|i| i.path.clone()).collect();
    // Protocol 5 names the copy's paths by their index in this query.
    let query = QueryIndex::new(paths.clone());
    let compact = conn.protocol >= COMPACT_COPY_PROTOCOL;
    if !conn.send(AgentBound::QueryPaths { deployment_id: id.clone(), paths }).await {
        return Err(Stop::Disconnected);
    }
    // What this attempt's substitution adds to earlier attempts'.
    let (base_paths, base_bytes) = ctl.db.substituted(child.id).unwrap_or((0, 0));
    let substituted = |paths: u64, bytes: u64| {
        let _ = ctl.db.set_substituted(child.id, base_paths + paths as i64, base_bytes + bytes as i64);
        ctl.notify_task(child.task);
    };
    // The device may substitute from its binary caches first. It is given `t` from its
    // last real progress (more bytes than before), not from its last message: a device
    // or cache that only says it is at work cannot hold the deployment.
    let mut deadline = tokio::time::Instant::now() + t;
    let mut progress = None;
    let answer = loop {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match reply(&mut rx, wait).await? {
            ControllerBound::Substituting { paths, bytes, .. } => {
                if progress.is_none_or(|p| bytes > p) {
                    progress = Some(bytes);
                    deadline = tokio::time::Instant::now() + t;
                    substituted(paths, bytes);
                }
            }
            m => {
                break Lacking::read(m, &query).map_err(|e| Stop::Refused(format!("answer to the path query: {e}")))?;
            }
        }
    };
    let Lacking { missing, bases, window, substituted_paths, substituted_bytes } = answer;
    if substituted_paths > 0 {
        substituted(substituted_paths, substituted_bytes);
        let line = format!(
            "{}: got {substituted_paths} paths ({substituted_bytes} bytes) from its binary caches",
            child.device
        );
        let _ = ctl.db.log(child.task, Some(child.id), &line);
    }
    let bases = known_bases(ctl, &child.device, &offer.system, bases).await;
    let mut acks = Acks { ctl, child, query: &query, paths: 0, bytes: 0 };
    for (path, bytes) in unacked.drain() {
        if !missing.contains(&path) {
            acks.paths += 1;
            acks.bytes += bytes;
        }
    }
    acks.flush();
    let to_send: Vec<&PathInfo> = closure.iter().filter(|i| missing.contains(&i.path)).collect();
    let _ = ctl.db.set_paths_total(child.id, to_send.len() as i64);
    // Live progress in NAR bytes while this attempt streams, gone when it ends.
    ctl.copies.start(child.id, to_send.iter().map(|i| i.nar_size).sum());
    let _live = LiveCopy { ctl, child: child.id };
    let _ = ctl.db.log(
        child.task,
        Some(child.id),
        &format!("{}: lacks {} of {} paths", child.device, to_send.len(), closure.len()),
    );
    ctl.notify_task(child.task);
    // Paths sent and not yet acknowledged (`unacked`) stay within the agent's window;
    // acknowledgements are taken as they come, without waiting for each.
    let mut in_flight_bytes = 0u64;
    // The next path is compressed (when no one has yet) while this one is sent; a path
    // the device has an earlier version of goes as a delta against it when smaller.
    // Its file is opened and its first chunk read then too (most NARs are one chunk).
    let prefetch = |info: &&PathInfo| {
        let (ctl, info, base) = (ctl.clone(), (*info).clone(), bases.get(&info.path).cloned());
        tokio::spawn(async move {
            let (file, delta_base) = ctl.nar_cache.best(&info, base.as_ref()).await?;
            let nar = Outgoing::open(&file).await?;
            anyhow::Ok((nar, delta_base))
        })
    };
    let mut next = to_send.first().map(prefetch);
    let (mut as_deltas, mut sent_bytes) = (0usize, 0u64);
    for (n, info) in to_send.iter().enumerate() {
        let compressed = match next.take() {
            Some(handle) => handle.await.map_err(|e| anyhow::anyhow!("compression task: {e}")).and_then(|r| r),
            None => Err(anyhow::anyhow!("no compression started")),
        };
        next = to_send.get(n + 1).map(prefetch);
        let (nar, delta_base) = match compressed {
            Ok(f) => f,
            Err(e) => return Err(Stop::Refused(format!("reading {}: {e:#}", info.path))),
        };
        let size = nar.size;
        while let Ok(m) = rx.try_recv() {
            acks.take(m, unacked, &mut in_flight_bytes)?;
        }
        while !window.admits(unacked.len(), in_flight_bytes, size) {
            acks.flush();
            let m = ack_reply(&mut rx, t, in_flight_bytes).await?;
            acks.take(m, unacked, &mut in_flight_bytes)?;
        }
        acks.flush();
        as_deltas += usize::from(delta_base.is_some());
        let start = if compact {
            let c =
                query.compact(info, delta_base.is_some()).map_err(|e| Stop::Refused(format!("{}: {e}", info.path)))?;
            AgentBound::PathAt(c)
        } else {
            AgentBound::PathStart { deployment_id: id.clone(), info: (*info).clone(), delta_base }
        };
        if conn.data.send(Out::Msg(start)).await.is_err() {
            return Err(Stop::Disconnected);
        }
        // This path's share of the NAR bytes, in proportion to what of it was streamed.
        let (nar_size, task) = (info.nar_size, child.task);
        let (done0, streamed0) = ctl.copies.get(child.id).map_or((0, 0), |p| (p.nar_bytes_done, p.bytes_streamed));
        let mut streamed = |offset: u64, size: u64| {
            let told = ctl.copies.update(child.id, |p| {
                p.bytes_streamed = streamed0 + offset;
                p.nar_bytes_done = done0 + nar_size * offset / size.max(1);
            });
            if told {
                ctl.notify_task(task);
            }
        };
        let bytes = nar.send(&conn.data, &mut streamed).await?;
        ctl.copies.update(child.id, |p| p.nar_bytes_done = done0 + nar_size);
        let end = if compact {
            AgentBound::PathDone
        } else {
            AgentBound::PathEnd { deployment_id: id.clone(), path: info.path.clone() }
        };
        if conn.data.send(Out::Msg(end)).await.is_err() {
            return Err(Stop::Disconnected);
        }
        unacked.insert(info.path.clone(), bytes);
        in_flight_bytes += bytes;
        sent_bytes += bytes;
    }
    while !unacked.is_empty() {
        acks.flush();
        let m = ack_reply(&mut rx, t, in_flight_bytes).await?;
        acks.take(m, unacked, &mut in_flight_bytes)?;
    }
    acks.flush();
    if !to_send.is_empty() {
        let line = format!(
            "{}: sent {} paths in {sent_bytes} bytes, {as_deltas} of them as deltas against the versions it has",
            child.device,
            to_send.len()
        );
        let _ = ctl.db.log(child.task, Some(child.id), &line);
    }
    // Not yet (stage-only, outside its window, held on the device): staged.
    match super::gate::waiting(ctl, child) {
        Ok(Some(w)) => return stage(ctl, conn, child, &w, &mut rx).await,
        Ok(None) => {}
        Err(e) => return Err(Stop::Refused(format!("deciding whether it may switch: {e:#}"))),
    }
    // Recorded before the device is told: from here on a restart must not interrupt it,
    // and only a recorded activation is ever confirmed. Unrecorded, the device is not
    // told (it would roll back for want of a confirmation).
    match report(ctl, child, Event::Activating, &Details::default()) {
        // The machine asks for the activation to be sent (it always does on this step).
        Ok(Ok(step)) if step.effects.contains(&Effect::Activate) => {}
        Ok(Ok(_)) => return Ok(()),
        // Ended meanwhile (cancelled, superseded, expired): the device is not told.
        Ok(Err(refused)) => {
            debug!(device = %child.device, "not activating: {refused}");
            return Ok(());
        }
        Err(e) => {
            conn.send(AgentBound::Cancel { deployment_id: id.clone() }).await;
            return Err(Stop::Refused(format!("not activated: recording the activation failed: {e:#}")));
        }
    }
    let _ = ctl.db.log(child.task, Some(child.id), &format!("{}: activating", child.device));
    ctl.notify_task(child.task);
    if !conn.send(AgentBound::Activate { deployment_id: id.clone() }).await {
        // Activation may or may not have reached the device; its report will tell.
        warn!(device = %child.device, "connection lost while sending activate");
    }
    Ok(())
}

/// The device's answer to the path query, in either protocol's form.
struct Lacking {
    missing: BTreeSet<StorePath>,
    /// For some missing paths, the path of the same package the device named as a base.
    bases: HashMap<StorePath, StorePath>,
    window: CopyWindow,
    substituted_paths: u64,
    substituted_bytes: u64,
}

impl Lacking {
    fn read(m: ControllerBound, query: &QueryIndex) -> Result<Lacking, String> {
        Ok(match m {
            ControllerBound::PathsMissing { missing, bases, window, substituted_paths, substituted_bytes, .. } => {
                Lacking {
                    missing: missing.into_iter().collect(),
                    bases: bases.into_iter().map(|b| (b.path, b.base)).collect(),
                    window: window.unwrap_or(CopyWindow::LEGACY),
                    substituted_paths,
                    substituted_bytes,
                }
            }
            ControllerBound::PathsLacking { missing, bases, window, substituted_paths, substituted_bytes, .. } => {
                Lacking {
                    missing: query.paths(&missing).map_err(|e| e.to_string())?.into_iter().collect(),
                    bases: bases
                        .into_iter()
                        .map(|IndexedBase(i, base)| Ok((query.path(i)?.clone(), base)))
                        .collect::<Result<_, CompactError>>()
                        .map_err(|e| e.to_string())?,
                    window,
                    substituted_paths,
                    substituted_bytes,
                }
            }
            other => return Err(format!("unexpected reply: {other:?}")),
        })
    }
}

/// Ends an attempt's live progress, however it ends.
struct LiveCopy<'a> {
    ctl: &'a Controller,
    child: i64,
}

impl Drop for LiveCopy<'_> {
    fn drop(&mut self) {
        self.ctl.copies.finish(self.child);
    }
}

/// Stops a copied device before its switch: the device keeps the system (an agent
/// before staging is not told, and keeps it only until its next garbage collection),
/// and the deployment is staged, saying why.
async fn stage(
    ctl: &Arc<Controller>,
    conn: &Conn,
    child: &ChildRow,
    waiting: &thymis_api::Waiting,
    rx: &mut mpsc::UnboundedReceiver<ControllerBound>,
) -> Result<(), copy::Stop> {
    let id = &child.deployment_id;
    let mut reboot_needed = None;
    if conn.protocol >= thymis_proto::STAGING_PROTOCOL {
        if !conn.send(AgentBound::Stage { deployment_id: id.clone() }).await {
            return Err(Stop::Disconnected);
        }
        match reply(rx, ctl.settings.reply_timeout).await? {
            ControllerBound::Staged { reboot_needed: r, .. } => reboot_needed = r,
            other => return Err(Stop::Refused(format!("unexpected reply to staging: {other:?}"))),
        }
    }
    let details = Details { waiting: Some(waiting), reboot_needed: reboot_needed.as_deref(), ..Default::default() };
    if let Ok(Ok(_)) = report(ctl, child, Event::Stage, &details) {
        let mut line = format!("{}: {}", child.device, waiting.describe());
        if let Some(r) = &reboot_needed {
            line.push_str(&format!("; reboot needed: {r}"));
        }
        let _ = ctl.db.log(child.task, Some(child.id), &line);
    }
    Ok(())
}

/// Acknowledged paths and their bytes, written to the database a batch at a time (the
/// agent acknowledges a whole import at once; a write per path would cost thousands of
/// writes per device).
pub(super) struct Acks<'a> {
    ctl: &'a Controller,
    child: &'a ChildRow,
    query: &'a QueryIndex,
    paths: i64,
    bytes: u64,
}

impl Acks<'_> {
    fn take(
        &mut self,
        m: ControllerBound,
        unacked: &mut HashMap<StorePath, u64>,
        in_flight: &mut u64,
    ) -> Result<(), Stop> {
        match m {
            ControllerBound::PathImported { path, .. } => {
                self.imported(&path, unacked, in_flight);
                Ok(())
            }
            ControllerBound::PathsImported { paths, .. } => {
                let paths = self.query.paths(&paths).map_err(|e| Stop::Refused(format!("acknowledgement: {e}")))?;
                for path in &paths {
                    self.imported(path, unacked, in_flight);
                }
                Ok(())
            }
            ControllerBound::PathRefused { path, error, .. } => Err(Stop::Refused(format!("{path} refused: {error}"))),
            other => Err(Stop::Refused(format!("unexpected reply during the copy: {other:?}"))),
        }
    }

    fn imported(&mut self, path: &StorePath, unacked: &mut HashMap<StorePath, u64>, in_flight: &mut u64) {
        let bytes = unacked.remove(path).unwrap_or(0);
        *in_flight = in_flight.saturating_sub(bytes);
        self.paths += 1;
        self.bytes += bytes;
    }

    fn flush(&mut self) {
        if self.paths > 0 {
            let _ = self.ctl.db.add_progress(self.child.id, self.paths, self.bytes as i64);
            self.ctl.notify_task(self.child.task);
            (self.paths, self.bytes) = (0, 0);
        }
    }
}

/// The lowest rate at which a device must take in a copy before the wait for an
/// acknowledgement gives up on it (on top of the reply timeout): what is in flight
/// must cross the link first.
pub(super) const SLOWEST_LINK_BYTES_PER_SEC: u64 = 32 << 10;

/// The next acknowledgement; the connection's own liveness checks end a dead link
/// sooner (the waiter closes with it).
pub(super) async fn ack_reply(
    rx: &mut mpsc::UnboundedReceiver<ControllerBound>,
    reply_timeout: Duration,
    in_flight: u64,
) -> Result<ControllerBound, Stop> {
    reply(rx, reply_timeout + Duration::from_secs(in_flight / SLOWEST_LINK_BYTES_PER_SEC)).await
}

/// A compressed NAR on its way to a device: the open file, its size and its first
/// chunk.
pub(super) struct Outgoing {
    file: std::sync::Arc<std::fs::File>,
    size: u64,
    first: Vec<u8>,
}

impl Outgoing {
    /// Opens a cached NAR (on this thread, like the cache's check that it exists, which
    /// has just looked it up) and reads its first chunk.
    async fn open(path: &std::path::Path) -> Result<Outgoing> {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        let file = std::sync::Arc::new(file);
        let first =
            read_chunk(&file, 0, size.min(FIRST_CHUNK)).await.with_context(|| format!("reading {}", path.display()))?;
        Ok(Outgoing { file, size, first })
    }

    /// Sends it as binary frames on the copy stream, telling `streamed` how many of its
    /// bytes are on their way after each chunk (and its size); returns the bytes sent.
    async fn send(self, data: &mpsc::Sender<Out>, streamed: &mut (dyn FnMut(u64, u64) + Send)) -> Result<u64, Stop> {
        let Outgoing { file, size, first } = self;
        let mut offset = first.len() as u64;
        if !first.is_empty() {
            data.send(Out::Bin(first)).await.map_err(|_| Stop::Disconnected)?;
            streamed(offset, size);
        }
        while offset < size {
            // Read once the queue has room: no chunk waits in hand.
            let room = data.reserve().await.map_err(|_| Stop::Disconnected)?;
            let buf =
                read_chunk(&file, offset, size).await.map_err(|e| Stop::Refused(format!("reading a NAR: {e:#}")))?;
            offset += buf.len() as u64;
            room.send(Out::Bin(buf));
            streamed(offset, size);
        }
        Ok(size)
    }
}

/// How much of a NAR is read ahead, while the path before it is sent: all of a small
/// one (most are), a little of a large one (a thousand devices each hold one).
pub(super) const FIRST_CHUNK: u64 = 64 << 10;

/// The chunk of `file` at `offset`, up to `end`: sized to what is left, so that a
/// small NAR costs a small buffer. Read on this thread when the page cache holds it
/// (the usual case: a fleet's copies read the same NARs), so that a chunk costs no trip
/// to a blocking thread and back; on a blocking thread when the read would wait for the
/// disk.
pub(super) async fn read_chunk(file: &std::sync::Arc<std::fs::File>, offset: u64, end: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let len = (end - offset).min(thymis_proto::CHUNK_SIZE as u64) as usize;
    let mut buf = vec![0; len];
    let cached = rustix::io::preadv2(
        &**file,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        offset,
        rustix::io::ReadWriteFlags::NOWAIT,
    );
    if cached.is_ok_and(|n| n == len) {
        return Ok(buf);
    }
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        file.read_exact_at(&mut buf, offset).context("the cached NAR is shorter than it was")?;
        Ok(buf)
    })
    .await?
}

/// Why one attempt to deliver to a device stopped.
pub(super) enum Stop {
    /// The connection went away: wait for the device to come back.
    Disconnected,
    /// The device refused: the deployment ends for it.
    Refused(String),
}

/// The device's next message about this deployment, within `timeout`.
pub(super) async fn reply(
    rx: &mut mpsc::UnboundedReceiver<ControllerBound>,
    timeout: Duration,
) -> Result<ControllerBound, Stop> {
    match tokio::time::timeout(timeout, rx.recv()).await {
        Ok(Some(m)) => Ok(m),
        Ok(None) | Err(_) => Err(Stop::Disconnected),
    }
}

/// How many of a device's latest deployments' systems count as known to be on it, beside
/// the one it reports.
const RECENT_SYSTEMS: i64 = 4;

/// The bases the device named that the controller knows it has, of each path's package:
/// in the closure of the system it reports or of one of its latest deployments' systems
/// (a system rolled back from stays in its store, and the next deployment is mostly its
/// versions), but not `deploying`: a path of the system being sent is no base for
/// another (the preview reckons without them). A device cannot make the controller
/// read, hold and compress against any store path it likes.
pub(super) async fn known_bases(
    ctl: &Arc<Controller>,
    device: &str,
    deploying: &StorePath,
    mut bases: HashMap<StorePath, StorePath>,
) -> HashMap<StorePath, StorePath> {
    let named = bases.len();
    bases.retain(|path, base| base.package() == path.package());
    let reported = ctl.db.device(device).ok().flatten().and_then(|d| d.info.system);
    let recent = ctl.db.device_history(device, RECENT_SYSTEMS).unwrap_or_default().into_iter().filter_map(|d| d.system);
    let mut systems: Vec<StorePath> = Vec::new();
    for s in reported.into_iter().chain(recent).filter_map(|s| s.parse::<StorePath>().ok()) {
        if s != *deploying && !systems.contains(&s) {
            systems.push(s);
        }
    }
    let mut kept = HashMap::new();
    // The reported system first: the others' closures are read only for bases it lacks.
    for system in systems {
        if bases.is_empty() {
            break;
        }
        let closure =
            tokio::task::spawn_blocking(move || thymis_store::local_store::LocalStore::system().closure(&system)).await;
        let Ok(Ok(paths)) = closure else { continue };
        let has: std::collections::HashSet<StorePath> = paths.into_iter().collect();
        let (known, rest): (HashMap<_, _>, _) = bases.into_iter().partition(|(_, base)| has.contains(base));
        kept.extend(known);
        bases = rest;
    }
    if kept.len() < named {
        debug!(%device, named, kept = kept.len(), "delta bases the device is not known to have were ignored");
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NAR is read back whole and in order, in chunks of at most CHUNK_SIZE, whether
    /// the page cache holds it or the read falls back to a blocking thread.
    #[tokio::test]
    async fn chunks_read_back_the_whole_file_cached_or_not() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tmp");
        let path = dir.path().join("nar.zst");
        let data: Vec<u8> = (0..(3 * thymis_proto::CHUNK_SIZE + 12345)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        for evict in [false, true] {
            if evict {
                let f = std::fs::File::open(&path).expect("open");
                f.sync_all().expect("sync");
                let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
            }
            let nar = Outgoing::open(&path).await.expect("open");
            assert_eq!(nar.first, data[..FIRST_CHUNK as usize]);
            let (tx, mut rx) = mpsc::channel(1);
            let sender = tokio::spawn(async move { nar.send(&tx, &mut |_, _| {}).await.map_err(|_| ()) });
            let mut got = Vec::new();
            while let Some(out) = rx.recv().await {
                let Out::Bin(b) = out else { panic!("not a chunk") };
                assert!(b.len() <= thymis_proto::CHUNK_SIZE);
                got.extend_from_slice(&b);
            }
            assert_eq!(sender.await.expect("join"), Ok(data.len() as u64));
            assert!(got == data, "the chunks differ from the file (evicted: {evict})");
        }
        // A file that shrank after it was opened is an error, not a short NAR.
        let nar = Outgoing::open(&path).await.expect("open");
        std::fs::write(&path, &data[..1000]).expect("truncate");
        let (tx, mut rx) = mpsc::channel(1);
        let sender = tokio::spawn(async move { nar.send(&tx, &mut |_, _| {}).await.map_err(|_| ()) });
        while rx.recv().await.is_some() {}
        assert!(sender.await.expect("join").is_err());
    }
}
