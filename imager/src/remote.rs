//! A configuration of the controller's project as the closure of an image. The
//! controller builds it at the commit and hands over the closure as a signed bundle (its
//! API's "download bundle"); every path is checked against the controller's keys, its
//! signed hash and size before it is staged, so the imager needs no store of its own
//! that holds the closure, and no copy of the project.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, bail};
use thymis_api::{ArtifactRequest, Identity, Task};
use thymis_client::{Client, Connection, Progress};
use thymis_store::bundle::{self, Target};
use thymis_store::signing::PublicKey;
use thymis_store::{PathInfo, StorePath};

/// A closure fetched from the controller, its NARs verified and staged.
#[derive(Debug)]
pub struct Fetched {
    pub system: StorePath,
    pub commit: Option<String>,
    /// Dependencies first.
    pub infos: Vec<PathInfo>,
    /// Each path's uncompressed NAR, positioned at its start.
    pub nars: HashMap<StorePath, File>,
}

/// Asks the controller to build `config` (at `commit`, default its project's HEAD) and
/// fetches the closure. `scratch` holds the bundle and the staged NARs.
pub fn fetch(connection: &Connection, config: &str, commit: Option<&str>, scratch: &Path) -> Result<Fetched> {
    let client = Client::new(connection)?;
    let identity: Identity = client.get("/identity")?;
    let key = |field: &str, text: &str| -> Result<PublicKey> {
        text.parse().with_context(|| format!("the controller's {field} {text:?}"))
    };
    let (identity_key, nix_key) =
        (key("identity_key", &identity.identity_key)?, key("nix_signing_key", &identity.nix_signing_key)?);

    eprintln!("thymis-imager: the controller builds {config} at {}", commit.unwrap_or("its HEAD"));
    let req =
        ArtifactRequest { config: Some(config.to_owned()), commit: commit.map(str::to_owned), ..Default::default() };
    let task: Task = client.post("/bundles", Some(&req))?;
    let file = scratch.join("closure.bundle");
    let done = thymis_client::artifacts(
        &client,
        task.id,
        |_| file.clone(),
        |p| {
            if let Progress::Log(line) = p {
                eprintln!("  {}", thymis_client::safe_text::printable(line));
            }
        },
    )
    .with_context(|| format!("building {config} on the controller"))?;
    // The bundle was only the way over: don't keep a copy on the controller.
    if let Err(e) = client.delete::<thymis_api::ArtifactsDeleted>(&format!("/tasks/{}/artifacts", done.id)) {
        eprintln!("thymis-imager: could not delete task {}'s bundle on the controller: {e:#}", done.id);
    }

    let input = File::open(&file).with_context(|| format!("opening {}", file.display()))?;
    let (manifest, verified) = bundle::read(input, &[identity_key], &[nix_key], scratch, |m| {
        Ok(m.paths.iter().map(|p| p.path.clone()).collect())
    })
    .context("checking the closure the controller sent")?;
    if manifest.target != Target::Config(config.to_owned()) {
        bail!("the controller sent a closure for {:?}, not configuration {config}", manifest.target);
    }
    if let Some(system) = &done.system
        && *system != manifest.system.to_string()
    {
        bail!("the controller's task names system {system}, its bundle {}", manifest.system);
    }
    let mut nars = HashMap::new();
    let mut infos = Vec::new();
    for v in verified {
        nars.insert(v.info.path.clone(), v.nar);
        infos.push(v.info);
    }
    let infos = thymis_store::closure::sort_dependencies_first(infos)?;
    let commit = manifest.commit.clone().or(done.commit);
    Ok(Fetched { system: manifest.system, commit, infos, nars })
}
