//! The fleet's project: a git repository holding a flake and `thymis.toml`.
//! Driven through the real `git` command with argument vectors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

const STARTER_FLAKE: &str = include_str!("starter/flake.nix");
const STARTER_TOML: &str = include_str!("starter/thymis.toml");

/// `thymis.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectToml {
    #[serde(default)]
    pub configs: BTreeMap<String, ConfigEntry>,
    /// What a tag says about its configurations' devices (`[tags.NAME]`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, TagEntry>,
}

/// `[tags.NAME]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagEntry {
    /// The maintenance window its devices switch in ([`crate::model::window`]).
    pub window: Option<String>,
}

/// One configuration of the project.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigEntry {
    #[serde(default)]
    pub tags: Vec<String>,
    /// Flake attribute to build; see [`ProjectToml::attr`].
    pub attr: Option<String>,
    /// The maintenance window its devices switch in ([`crate::model::window`]); before
    /// its tags' windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
}

impl ProjectToml {
    /// Parses `thymis.toml`; errors name the line.
    pub fn parse(text: &str) -> Result<Self> {
        let t: ProjectToml = toml::from_str(text).map_err(|e| anyhow::anyhow!("thymis.toml: {e}"))?;
        for name in t.configs.keys() {
            if !valid_name(name) {
                bail!("thymis.toml: configuration name {name:?} must be [A-Za-z0-9_-]{{1,64}}");
            }
        }
        let windows = t.configs.iter().map(|(n, c)| (format!("configs.{n}"), &c.window));
        let windows = windows.chain(t.tags.iter().map(|(n, tag)| (format!("tags.{n}"), &tag.window)));
        for (place, window) in windows {
            if let Some(w) = window {
                crate::model::window::Window::parse(w).map_err(|e| anyhow::anyhow!("thymis.toml: [{place}]: {e}"))?;
            }
        }
        Ok(t)
    }

    /// The maintenance window of `config`'s devices: its own, else that of its first
    /// tag that has one.
    pub fn window(&self, config: &str) -> Option<String> {
        let entry = self.configs.get(config)?;
        entry.window.clone().or_else(|| entry.tags.iter().find_map(|t| self.tags.get(t)?.window.clone()))
    }

    /// The flake attribute that builds `config`.
    pub fn attr(&self, config: &str) -> Option<String> {
        let entry = self.configs.get(config)?;
        Some(entry.attr.clone().unwrap_or_else(|| format!("nixosConfigurations.{config}.config.system.build.toplevel")))
    }

    /// Configurations carrying `tag`.
    pub fn with_tag(&self, tag: &str) -> BTreeSet<String> {
        self.configs.iter().filter(|(_, c)| c.tags.iter().any(|t| t == tag)).map(|(n, _)| n.clone()).collect()
    }

    pub fn tags(&self) -> BTreeSet<String> {
        self.configs.values().flat_map(|c| c.tags.iter().cloned()).collect()
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn a_configurations_window_comes_before_its_tags() {
        let t = ProjectToml::parse(
            r#"
[configs.kiosk]
tags = ["lobby", "screens"]
[configs.sign]
tags = ["screens"]
window = "Sat,Sun 00:00-24:00"
[configs.lab]
[tags.screens]
window = "Mon-Fri 22:00-06:00"
"#,
        )
        .expect("parse");
        assert_eq!(t.window("kiosk").as_deref(), Some("Mon-Fri 22:00-06:00"));
        assert_eq!(t.window("sign").as_deref(), Some("Sat,Sun 00:00-24:00"));
        assert_eq!(t.window("lab"), None);
        let bad = ProjectToml::parse("[configs.a]\nwindow = \"whenever\"\n").expect_err("bad window");
        assert!(bad.to_string().contains("[configs.a]"), "{bad}");
    }
}

/// A commit message as a person would write it for these changes: "Edit flake.nix and
/// site/welcome.txt, add site/new.txt, remove NOTES.md".
pub fn message_for(changes: &[FileChange]) -> String {
    let mut groups: [(&str, Vec<&str>); 3] = [("edit", vec![]), ("add", vec![]), ("remove", vec![])];
    for c in changes {
        let g = match c.status {
            "new" => 1,
            "deleted" => 2,
            _ => 0,
        };
        groups[g].1.push(&c.path);
    }
    let names = |paths: &[&str]| -> String {
        match paths {
            [one] => (*one).to_owned(),
            [first @ .., last] if paths.len() <= 3 => format!("{} and {last}", first.join(", ")),
            _ => format!("{}, {} and {} more files", paths[0], paths[1], paths.len() - 2),
        }
    };
    let parts: Vec<String> =
        groups.iter().filter(|(_, p)| !p.is_empty()).map(|(verb, p)| format!("{verb} {}", names(p))).collect();
    let text = parts.join(", ");
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => "No changes".into(),
    }
}

/// Names of devices and configurations: plain, so they are safe in URLs and files.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// How a file differs from HEAD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileChange {
    pub path: String,
    /// `modified`, `new` or `deleted`.
    pub status: &'static str,
}

/// The project repository.
#[derive(Debug, Clone)]
pub struct Project {
    pub dir: PathBuf,
}

impl Project {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Project { dir: dir.into() }
    }

    fn git(&self) -> Command {
        let mut c = Command::new("git");
        c.arg("-C").arg(&self.dir);
        // Commits must work on a machine without a git identity configured.
        c.env("GIT_AUTHOR_NAME", "Thymis")
            .env("GIT_AUTHOR_EMAIL", "thymis@localhost")
            .env("GIT_COMMITTER_NAME", "Thymis")
            .env("GIT_COMMITTER_EMAIL", "thymis@localhost");
        c
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.git().args(args).output().with_context(|| format!("running git {}", args.join(" ")))?;
        if !out.status.success() {
            bail!("git {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates the starter project with an initial commit, unless it exists.
    pub fn init_if_missing(&self) -> Result<()> {
        if self.dir.join(".git").exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(self.dir.join("flake.nix"), STARTER_FLAKE)?;
        std::fs::write(self.dir.join("thymis.toml"), STARTER_TOML)?;
        self.run(&["init", "--quiet", "--initial-branch=main"])?;
        self.run(&["add", "-A"])?;
        self.run(&["commit", "--quiet", "-m", "Initial project"])?;
        Ok(())
    }

    pub fn head(&self) -> Result<String> {
        Ok(self.run(&["rev-parse", "HEAD"])?.trim().to_owned())
    }

    /// Resolves a revision (hash, branch, `HEAD~1`) to a full commit hash.
    pub fn resolve(&self, rev: &str) -> Result<String> {
        if rev.starts_with('-') {
            bail!("revision {rev:?} is not valid");
        }
        Ok(self
            .run(&["rev-parse", "--verify", "--quiet", &format!("{rev}^{{commit}}")])
            .with_context(|| format!("no commit {rev:?} in the project"))?
            .trim()
            .to_owned())
    }

    /// Uncommitted changes (new files included), as `git add -A` would commit them.
    pub fn status(&self) -> Result<Vec<FileChange>> {
        let out = self.run(&["status", "--porcelain=v1", "-z", "--untracked-files=all"])?;
        let mut changes = Vec::new();
        let mut entries = out.split('\0').filter(|e| !e.is_empty());
        while let Some(entry) = entries.next() {
            let (code, path) = entry.split_at(3.min(entry.len()));
            let code = code.trim();
            let status = match code {
                "??" | "A" | "AM" => "new",
                c if c.contains('D') => "deleted",
                c if c.starts_with('R') => {
                    entries.next(); // the rename's source
                    "new"
                }
                _ => "modified",
            };
            changes.push(FileChange { path: path.to_owned(), status });
        }
        Ok(changes)
    }

    /// The diff of one changed file against HEAD (new files in full).
    pub fn diff(&self, path: &str) -> Result<String> {
        let rel = checked_rel(path)?;
        let rel = rel.to_string_lossy();
        let tracked = self.run(&["ls-files", "--", &rel])?;
        if tracked.trim().is_empty() {
            let out = self.git().args(["diff", "--no-index", "--", "/dev/null", &rel]).output()?;
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        self.run(&["diff", "HEAD", "--", &rel])
    }

    /// Commits everything (`git add -A`); returns the new HEAD, or the old one when
    /// there was nothing to commit.
    pub fn commit(&self, message: &str) -> Result<String> {
        if self.status()?.is_empty() {
            return self.head();
        }
        let message = if message.trim().is_empty() { "Update project" } else { message };
        self.run(&["add", "-A"])?;
        self.run(&["commit", "--quiet", "-m", message])?;
        self.head()
    }

    /// A default commit message describing the changes.
    pub fn default_message(&self) -> Result<String> {
        Ok(message_for(&self.status()?))
    }

    /// `thymis.toml` at `rev`.
    pub fn toml_at(&self, rev: &str) -> Result<ProjectToml> {
        ProjectToml::parse(&self.run(&["show", &format!("{rev}:thymis.toml")])?)
    }

    /// A commit of the work tree as it is, on no branch (HEAD and the index stay):
    /// what `deploy --dry-run` builds when there are uncommitted changes.
    pub fn snapshot(&self) -> Result<String> {
        let index = tempfile::NamedTempFile::new_in(self.dir.join(".git")).context("a temporary index")?;
        let git = |args: &[&str]| -> Result<String> {
            let out = self
                .git()
                .env("GIT_INDEX_FILE", index.path())
                .args(args)
                .output()
                .with_context(|| format!("running git {}", args.join(" ")))?;
            if !out.status.success() {
                bail!("git {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        };
        git(&["read-tree", "HEAD"])?;
        git(&["add", "-A"])?;
        let tree = git(&["write-tree"])?;
        git(&["commit-tree", &tree, "-p", "HEAD", "-m", "thymis: a preview of uncommitted changes"])
    }

    /// The first line of a commit's message.
    pub fn subject(&self, rev: &str) -> Result<String> {
        if !rev.bytes().all(|b| b.is_ascii_hexdigit()) || rev.is_empty() {
            bail!("{rev:?} is not a commit hash");
        }
        Ok(self.run(&["log", "-1", "--format=%s", rev, "--"])?.trim().to_owned())
    }

    /// How many commits `to` has that `from` does not.
    pub fn commits_between(&self, from: &str, to: &str) -> Result<u32> {
        for rev in [from, to] {
            if !rev.bytes().all(|b| b.is_ascii_hexdigit()) || rev.is_empty() {
                bail!("{rev:?} is not a commit hash");
            }
        }
        Ok(self.run(&["rev-list", "--count", &format!("{from}..{to}"), "--"])?.trim().parse()?)
    }

    /// `thymis.toml` in the work tree.
    pub fn toml_worktree(&self) -> Result<ProjectToml> {
        ProjectToml::parse(&std::fs::read_to_string(self.dir.join("thymis.toml")).context("reading thymis.toml")?)
    }

    /// The recent history, newest first: (hash, subject).
    pub fn log(&self, n: usize) -> Result<Vec<(String, String)>> {
        let out = self.run(&["log", &format!("-{n}"), "--format=%H%x09%s"])?;
        Ok(out.lines().filter_map(|l| l.split_once('\t')).map(|(h, s)| (h.to_owned(), s.to_owned())).collect())
    }

    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let p = self.dir.join(checked_rel(path)?);
        std::fs::read(&p).with_context(|| format!("reading {path}"))
    }

    pub fn write_file(&self, path: &str, bytes: &[u8]) -> Result<()> {
        let p = self.dir.join(checked_rel(path)?);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, bytes).with_context(|| format!("writing {path}"))
    }

    pub fn delete_file(&self, path: &str) -> Result<()> {
        let p = self.dir.join(checked_rel(path)?);
        std::fs::remove_file(&p).with_context(|| format!("deleting {path}"))
    }

    /// The flake reference of the project at a commit: never the dirty work tree.
    pub fn flake_ref(&self, rev: &str) -> String {
        format!("git+file://{}?rev={rev}", self.dir.display())
    }
}

/// A project-relative path that cannot leave the project or touch `.git`.
fn checked_rel(path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && p.components().next().is_some_and(|c| c.as_os_str() != ".git");
    if !ok {
        bail!("{path:?} is not a path inside the project");
    }
    Ok(p.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_errors_name_the_line() {
        let err = ProjectToml::parse("[configs.a]\ntags = [\"x\"]\nbogus = 1\n").expect_err("unknown key");
        assert!(format!("{err:#}").contains("line 3"), "{err:#}");
        let t = ProjectToml::parse(STARTER_TOML).expect("starter parses");
        assert_eq!(t.with_tag("demo"), BTreeSet::from(["kiosk".to_owned()]));
        assert_eq!(t.attr("kiosk").as_deref(), Some("nixosConfigurations.kiosk.config.system.build.toplevel"));
    }

    #[test]
    fn paths_cannot_escape() {
        for bad in ["../x", "/etc/passwd", ".git/config", "", "a/../../b"] {
            assert!(checked_rel(bad).is_err(), "{bad}");
        }
        assert!(checked_rel("hosts/kiosk.nix").is_ok());
    }

    #[test]
    fn status_commit_and_history_with_real_git() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = Project::new(tmp.path().join("project"));
        p.init_if_missing().expect("init");
        let first = p.head().expect("head");
        assert!(p.status().expect("status").is_empty());
        p.write_file("new.nix", b"{}").expect("write");
        p.write_file("thymis.toml", b"[configs.kiosk]\ntags = [\"x\"]\n").expect("write");
        p.delete_file("flake.nix").expect("rm");
        let mut st = p.status().expect("status");
        st.sort_by(|a, b| a.path.cmp(&b.path));
        let got: Vec<(&str, &str)> = st.iter().map(|c| (c.path.as_str(), c.status)).collect();
        assert_eq!(got, [("flake.nix", "deleted"), ("new.nix", "new"), ("thymis.toml", "modified")]);
        assert_eq!(message_for(&st), "Edit thymis.toml, add new.nix, remove flake.nix");
        assert!(p.diff("new.nix").expect("diff").contains("+{}"));
        let second = p.commit("change things").expect("commit");
        assert_ne!(first, second);
        assert!(p.status().expect("status").is_empty(), "git add -A semantics");
        assert_eq!(p.log(5).expect("log")[0].1, "change things");
        assert_eq!(p.resolve("HEAD~1").expect("resolve"), first);
        assert_eq!(p.toml_at(&first).expect("old toml").with_tag("demo").len(), 1);
    }
}
