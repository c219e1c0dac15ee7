//! A private PostgreSQL server from Debian's packages, for the controller's database:
//! its own data directory in a temporary directory, on a free loopback port, run as the
//! `postgres` user when the tests run as root (the server refuses root), gone when
//! dropped.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{run, wait_for};

/// A running server.
#[derive(Debug)]
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Server settings beyond the defaults (`-c NAME=VALUE`).
    settings: Vec<String>,
}

/// Debian puts the server's programs under /usr/lib/postgresql/VERSION/bin; the newest.
fn server_bin() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (scripts/setup.sh installs Debian's postgresql)")?
        .filter_map(|e| {
            let e = e.ok()?;
            Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b).context("no PostgreSQL server under /usr/lib/postgresql")
}

fn id(flag: &str) -> Result<u32> {
    Ok(run(Command::new("id").args([flag, "postgres"]))?.trim().parse()?)
}

impl Postgres {
    /// Where the server keeps its data (to look for what must not be there in clear).
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn start() -> Result<Postgres> {
        let bin = server_bin()?;
        let root = run(Command::new("id").arg("-u"))? == "0";
        let user = if root { Some((id("-u")?, id("-g")?)) } else { None };
        let dir = tempfile::Builder::new().prefix("thymis-pg-").tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        if let Some((uid, gid)) = user {
            std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            std::os::unix::fs::chown(&data, Some(uid), Some(gid))?;
        }
        let mut init = Command::new(bin.join("initdb"));
        init.args(["-D"]).arg(&data).args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"]);
        let out = as_user(&mut init, user).output().context("running initdb")?;
        if !out.status.success() {
            bail!("initdb: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let mut pg = Postgres { port, bin, user, dir, child: None, settings: vec![] };
        pg.restart()?;
        Ok(pg)
    }

    /// Starts the server (again, after [`Postgres::kill`]), and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let log = std::fs::File::create(self.dir.path().join("server.log"))?;
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k", ""])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"])
            .args(self.settings.iter().flat_map(|c| ["-c", c.as_str()]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(as_user(&mut cmd, self.user).spawn().context("starting postgres")?);
        wait_for("PostgreSQL to accept connections", Duration::from_secs(30), || {
            self.psql("postgres", "SELECT 1").ok()
        });
        Ok(())
    }

    /// Serves TLS on `addr` too (besides loopback), with a certificate for that address
    /// from a CA of its own, and takes connections from there only over TLS; the CA's
    /// certificate (PEM), for `sslrootcert`.
    pub fn serve_tls(&mut self, addr: &str) -> Result<PathBuf> {
        let d = self.dir.path().join("tls");
        std::fs::create_dir_all(&d)?;
        let openssl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(&d));
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"];
        openssl(
            &[&["req", "-x509"][..], &ec, &["-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=thymis test CA"]]
                .concat(),
        )?;
        std::fs::write(
            d.join("ext.cnf"),
            format!("subjectAltName=IP:{addr}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
        )?;
        openssl(
            &[&["req", "-new"][..], &ec[..5], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=db"]]
                .concat(),
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ])?;
        std::fs::set_permissions(d.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        for f in ["server.key", "server.crt"] {
            if let Some((uid, gid)) = self.user {
                std::os::unix::fs::chown(d.join(f), Some(uid), Some(gid))?;
            }
        }
        let data = self.dir.path().join("data");
        let mut hba = std::fs::read_to_string(data.join("pg_hba.conf"))?;
        hba.push_str(&format!("hostssl all all {addr}/32 trust\n"));
        std::fs::write(data.join("pg_hba.conf"), hba)?;
        self.settings = vec![
            format!("listen_addresses=127.0.0.1,{addr}"),
            "ssl=on".into(),
            format!("ssl_cert_file={}", d.join("server.crt").display()),
            format!("ssl_key_file={}", d.join("server.key").display()),
        ];
        self.restart()?;
        Ok(d.join("ca.crt"))
    }

    /// Runs one statement with psql; its output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        run(Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", database])
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql]))
    }

    /// A new empty database; its URL.
    pub fn database(&self, name: &str) -> Result<String> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(name))
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Stops the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // Its backends notice the postmaster is gone and end; wait for the port.
            wait_for("PostgreSQL's backends to end", Duration::from_secs(20), || {
                std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err().then_some(())
            });
            let _ = std::fs::remove_file(self.dir.path().join("data/postmaster.pid"));
        }
    }
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    cmd
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}
