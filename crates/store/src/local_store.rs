//! A local Nix store, driven only through commands a stock NixOS has without
//! experimental features (`nix-store --import`, `--check-validity`), plus the
//! controller-side `nix path-info --json`.
//!
//! `nix-store --import` checks no signature and trusts the metadata it is given: every
//! caller must have verified signature, NAR hash and size (see [`crate::signing`] and
//! [`crate::nar`]) before handing a path to [`LocalStore::import`].

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

use crate::nar::encode_path;
use crate::path_info::{PathInfo, PathInfoError, parse_nix_path_info_json};
use crate::store_path::StorePath;

/// Marker between a NAR and its metadata in `nix-store --export` streams.
const EXPORT_MAGIC: u64 = 0x4558_494e;

/// Why a store operation failed. `command` is what was run.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("could not run {command}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed { command: String, status: std::process::ExitStatus, stderr: String },
    #[error("{command} printed output that is not store paths: {line:?}")]
    BadOutput { command: String, line: String },
    #[error("reading path info from {command}")]
    PathInfo {
        command: String,
        #[source]
        source: PathInfoError,
    },
    #[error("streaming {path} into nix-store --import")]
    Stream {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("listing the store directory {dir}")]
    List {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The store at `/nix/store`, or a chroot store rooted elsewhere (`--store DIR`).
#[derive(Debug, Clone, Default)]
pub struct LocalStore {
    root: Option<PathBuf>,
}

impl LocalStore {
    /// The machine's own store.
    pub fn system() -> Self {
        LocalStore { root: None }
    }

    /// A chroot store whose `/nix` lives under `root` (as `nix --store ROOT`).
    pub fn chroot(root: impl Into<PathBuf>) -> Self {
        LocalStore { root: Some(root.into()) }
    }

    /// Where `path`'s files are on this machine.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        let abs = path.to_absolute();
        match &self.root {
            Some(root) => root.join(abs.trim_start_matches('/')),
            None => PathBuf::from(abs),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        if let Some(root) = &self.root {
            c.arg("--store").arg(root);
        }
        c
    }

    /// Which of `paths` this store lacks, and for each of those a valid path of the same
    /// name that it has, if any: usually the version the new one replaces, a good base
    /// for a delta. Where several versions qualify, the one in `running`'s closure wins,
    /// then the first by file name. One directory listing and one `nix-store` call
    /// (a second, for the closure, only when there is a choice to make).
    #[allow(clippy::type_complexity)]
    pub fn missing_with_bases(
        &self,
        paths: &[StorePath],
        running: Option<&StorePath>,
    ) -> Result<(Vec<StorePath>, Vec<(StorePath, StorePath)>), StoreError> {
        use std::collections::{HashMap, HashSet};
        let Some(first) = paths.first() else { return Ok((vec![], vec![])) };
        let real = self.real_path(first);
        let dir = real.parent().unwrap_or(Path::new("/"));
        // Earlier versions by package, the version in the name left out: a package whose
        // version moved (a nixpkgs bump) still finds the one the device has.
        // Several paths may share a package (outputs named alike, two versions of one
        // library): each of them gets its candidates.
        let mut by_package: HashMap<String, Vec<&StorePath>> = HashMap::new();
        for p in paths {
            by_package.entry(p.package()).or_default().push(p);
        }
        let mut candidates: Vec<(StorePath, StorePath)> = Vec::new();
        let list = |source| StoreError::List { dir: dir.to_owned(), source };
        // A store that does not exist yet (a device's first deployment) has no bases.
        let entries = match std::fs::read_dir(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            other => Some(other.map_err(list)?),
        };
        for entry in entries.into_iter().flatten() {
            let name = entry.map_err(list)?.file_name();
            let Ok(have) = StorePath::from_base_name(&name.to_string_lossy()) else { continue };
            for &want in by_package.get(&have.package()).into_iter().flatten() {
                if *want != have {
                    candidates.push((want.clone(), have.clone()));
                }
            }
        }
        let mut query: Vec<StorePath> = paths.to_vec();
        query.extend(candidates.iter().map(|(_, have)| have.clone()));
        query.sort();
        query.dedup();
        let invalid: HashSet<StorePath> = self.invalid_paths(&query)?.into_iter().collect();
        let missing: Vec<StorePath> = paths.iter().filter(|p| invalid.contains(*p)).cloned().collect();
        let lacking: HashSet<&StorePath> = missing.iter().collect();
        candidates.retain(|(want, have)| lacking.contains(want) && !invalid.contains(have));
        let mut versions: HashMap<&StorePath, usize> = HashMap::new();
        for (want, _) in &candidates {
            *versions.entry(want).or_default() += 1;
        }
        let prefer: HashSet<StorePath> = match running {
            Some(r) if versions.values().any(|n| *n > 1) => self.closure(r)?.into_iter().collect(),
            _ => HashSet::new(),
        };
        // The same name first (the version the new one replaces), then what it runs.
        candidates.sort_by_key(|(want, have)| {
            (want.name() != have.name(), !prefer.contains(have), have.base_name().to_owned())
        });
        let mut bases: Vec<(StorePath, StorePath)> = Vec::new();
        for (want, have) in candidates {
            if !bases.iter().any(|(w, _)| *w == want) {
                bases.push((want, have));
            }
        }
        Ok((missing, bases))
    }

    /// The closure of `path` (`nix-store -qR`, which every Nix has).
    pub fn closure(&self, path: &StorePath) -> Result<Vec<StorePath>, StoreError> {
        let mut c = self.command("nix-store");
        c.args(["--query", "--requisites"]).arg(path.to_absolute());
        store_paths_of(&mut c)
    }

    /// Which of `paths` are not valid in this store.
    pub fn invalid_paths(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, StoreError> {
        if paths.is_empty() {
            return Ok(vec![]);
        }
        let mut c = self.command("nix-store");
        c.args(["--check-validity", "--print-invalid"]).args(paths.iter().map(StorePath::to_absolute));
        store_paths_of(&mut c)
    }

    /// Path infos of `paths` (and with `recursive`, their whole closure), via
    /// `nix path-info --json`, in either of its output shapes.
    pub fn path_infos(&self, paths: &[StorePath], recursive: bool) -> Result<Vec<PathInfo>, StoreError> {
        let mut c = self.command("nix");
        c.args(["--extra-experimental-features", "nix-command", "path-info", "--json"]);
        if recursive {
            c.arg("--recursive");
        }
        c.args(paths.iter().map(StorePath::to_absolute));
        let out = run(&mut c)?;
        parse_nix_path_info_json(&out).map_err(|source| StoreError::PathInfo { command: describe(&c), source })
    }

    /// Writes `path`'s NAR, encoded by us from the files (no Nix command involved).
    pub fn dump<W: Write>(&self, path: &StorePath, out: &mut W) -> Result<(), crate::nar::NarError> {
        encode_path(&self.real_path(path), out)
    }

    /// Registers already-verified paths, in the order given (dependencies first), by
    /// streaming them to `nix-store --import`. Each item gives a path's info and a reader
    /// of its NAR. Paths already valid are skipped by Nix.
    pub fn import<'a, I>(&self, items: I) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = (&'a PathInfo, Box<dyn Read + 'a>)>,
    {
        let mut c = self.command("nix-store");
        c.arg("--import").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
        let command = describe(&c);
        let mut child = c.spawn().map_err(|source| StoreError::Spawn { command: command.clone(), source })?;
        let mut stderr = child.stderr.take();
        let stderr_reader = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut s);
            }
            s
        });
        let mut stream_result = Ok(());
        if let Some(stdin) = child.stdin.take() {
            let mut w = io::BufWriter::with_capacity(256 * 1024, stdin);
            for (info, mut nar) in items {
                if let Err(source) = write_export(&mut w, info, &mut nar) {
                    stream_result = Err(StoreError::Stream { path: info.path.to_string(), source });
                    break;
                }
            }
            if stream_result.is_ok()
                && let Err(source) = w.write_all(&0u64.to_le_bytes()).and_then(|()| w.flush())
            {
                stream_result = Err(StoreError::Stream { path: "end of stream".into(), source });
            }
            // Dropping stdin closes it; a cut-short stream makes nix-store fail, not hang.
        }
        let status = child.wait().map_err(|source| StoreError::Spawn { command: command.clone(), source })?;
        let stderr = stderr_reader.join().unwrap_or_default();
        if !status.success() {
            return Err(StoreError::Failed { command, status, stderr: stderr.trim().to_owned() });
        }
        stream_result
    }

    /// Makes `link` an indirect GC root for `path`, so the collector keeps it (and its
    /// closure) until the link is removed.
    pub fn add_gc_root(&self, path: &StorePath, link: &Path) -> Result<(), StoreError> {
        let mut c = self.command("nix-store");
        c.args(["--realise", "--indirect", "--add-root"]).arg(link).arg(path.to_absolute());
        run(&mut c).map(|_| ())
    }
}

/// One path in `nix-store --export` framing: a "more follows" flag, the NAR, then its
/// metadata. Signatures are not part of this legacy format.
fn write_export<W: Write>(w: &mut W, info: &PathInfo, nar: &mut dyn Read) -> io::Result<()> {
    use crate::nar::encode_str as s;
    w.write_all(&1u64.to_le_bytes())?;
    let copied = io::copy(nar, w)?;
    if copied != info.nar_size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("NAR of {} is {copied} bytes, expected {}", info.path, info.nar_size),
        ));
    }
    w.write_all(&EXPORT_MAGIC.to_le_bytes())?;
    s(w, info.path.to_absolute().as_bytes())?;
    w.write_all(&(info.references.len() as u64).to_le_bytes())?;
    for r in &info.references {
        s(w, r.to_absolute().as_bytes())?;
    }
    s(w, info.deriver.as_ref().map(StorePath::to_absolute).unwrap_or_default().as_bytes())?;
    w.write_all(&0u64.to_le_bytes())
}

/// Runs `c`, which prints store paths a line each, and parses them.
fn store_paths_of(c: &mut Command) -> Result<Vec<StorePath>, StoreError> {
    let out = run(c)?;
    String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().map_err(|_| StoreError::BadOutput { command: describe(c), line: l.to_owned() }))
        .collect()
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args().take(6) {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if c.get_args().len() > 6 {
        s.push_str(" ...");
    }
    s
}

fn run(c: &mut Command) -> Result<Vec<u8>, StoreError> {
    let command = describe(c);
    let out =
        c.stdin(Stdio::null()).output().map_err(|source| StoreError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(StoreError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}
