//! Following a task to its end (its server-sent events), and downloading what an image
//! or bundle task made.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use thymis_api::{Artifact, Task};

use crate::Client;

/// What happens while a task is followed, for the caller to show.
#[derive(Debug)]
pub enum Progress<'a> {
    /// A line of the task's log.
    Log(&'a str),
    /// The task as it is now.
    Task(&'a Task),
    /// A file of the task, downloaded.
    Downloaded(&'a Path),
}

/// Follows task `id` until it settles (queued devices, offline ones, do not hold the
/// wait), through its server-sent events: its end is seen as soon as it is recorded.
pub fn follow(c: &Client, id: i64, mut on: impl FnMut(Progress<'_>)) -> Result<Task> {
    let reader = c.stream(&format!("/tasks/{id}/events")).with_context(|| format!("following task {id}"))?;
    let mut last: Option<Task> = None;
    let mut event = String::new();
    for line in reader.lines() {
        let line = line.with_context(|| format!("following task {id}"))?;
        if let Some(name) = line.strip_prefix("event: ") {
            event = name.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ") {
            match event.as_str() {
                "log" => on(Progress::Log(data)),
                "task" => {
                    let t: Task = serde_json::from_str(data)
                        .with_context(|| format!("task {id}: an event this client does not know"))?;
                    let settled = t.state.is_settled();
                    on(Progress::Task(&t));
                    last = Some(t);
                    if settled {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    // The stream ends with the task; read it once more if it ended first.
    match last {
        Some(t) if t.state.is_settled() => Ok(t),
        _ => c.get(&format!("/tasks/{id}")),
    }
}

/// Follows an image or bundle task, then downloads its files to `dest(name)`.
pub fn artifacts(
    c: &Client,
    id: i64,
    dest: impl Fn(&str) -> PathBuf,
    mut on: impl FnMut(Progress<'_>),
) -> Result<Task> {
    let done = follow(c, id, &mut on)?;
    if done.result != Some(thymis_api::TaskResult::Succeeded) {
        let result = done.result.map_or("unfinished", |r| r.as_str());
        bail!("task {id} {result}: {}", done.error.as_deref().unwrap_or("-"));
    }
    for f in c.get::<Vec<Artifact>>(&format!("/tasks/{id}/artifacts"))? {
        check_artifact_name(&f.name)?;
        let path = dest(&f.name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        c.download(&format!("/tasks/{id}/artifacts/{}", f.name), &path)?;
        on(Progress::Downloaded(&path));
    }
    Ok(done)
}

/// An artifact's name as the server gives it becomes a file name under `--out`: a
/// plain name only (no `/`, no `..`, no leading dot), or the server could write anywhere.
pub fn check_artifact_name(name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains("..")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
    if !plain {
        bail!("the controller named an artifact {name:?}, which is not a plain file name: refused");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_artifact_names_become_files() {
        for ok in ["image-kiosk-1.img.zst", "bundle-7.tar", "a+b_c-1.bmap"] {
            assert!(check_artifact_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "../etc/passwd", "a/b", "a\\b", "x..y", "\u{e9}t\u{e9}", &"a".repeat(256)] {
            assert!(check_artifact_name(bad).is_err(), "{bad:?}");
        }
    }
}
