//! A terminal session: a PTY running a login shell (or a command, through one) as the
//! agent's user, its output sent as it comes, the controller's keystrokes and window
//! sizes applied. Only when the configuration says `terminal = true`. The session ends
//! when the command exits (its status is sent), when the controller closes the stream
//! (the PTY is hung up and the process killed), or after the idle timeout.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use base64::Engine as _;
use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;
use thymis_proto::ControllerBound;
use thymis_proto::stream::MAX_TERMINAL_CHUNK;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the controller sends a terminal.
#[derive(Debug)]
pub enum Input {
    Data(Vec<u8>),
    Resize { cols: u16, rows: u16 },
}

/// After its command exited, a terminal's remaining output is read for at most this
/// long (a background process may hold the PTY open).
const DRAIN: Duration = Duration::from_millis(500);

/// Runs the session and ends the stream with the command's exit status, or why not.
pub async fn run(
    stream: u32,
    command: Vec<String>,
    (cols, rows): (u16, u16),
    idle: Duration,
    input: mpsc::Receiver<Input>,
    out: mpsc::Sender<ControllerBound>,
) {
    let (exit_status, error) = match session(stream, &command, (cols, rows), idle, input, &out).await {
        Ok(status) => (Some(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))), None),
        Err(e) => (None, Some(e)),
    };
    let _ = out.send(ControllerBound::StreamEnd { stream, exit_status, error }).await;
}

fn winsize(cols: u16, rows: u16) -> Winsize {
    Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 }
}

/// A PTY's two ends; the controlling side is non-blocking.
fn open_pty(cols: u16, rows: u16) -> rustix::io::Result<(OwnedFd, OwnedFd)> {
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(name.as_c_str(), OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC, Mode::empty())?;
    rustix::termios::tcsetwinsize(&master, winsize(cols, rows))?;
    rustix::io::ioctl_fionbio(&master, true)?;
    Ok((master, slave))
}

/// The agent's user's shell and home directory, from /etc/passwd.
fn login_shell() -> (String, String) {
    let uid = rustix::process::getuid().as_raw().to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[2] == uid)
        .map(|f| (f[6].to_owned(), f[5].to_owned()))
        .filter(|(shell, _)| std::path::Path::new(shell).is_file())
        .unwrap_or_else(|| ("/bin/sh".to_owned(), "/".to_owned()))
}

/// Starts the login shell on the PTY as a new session, the PTY its controlling
/// terminal. A command runs through the shell (`exec "$0" "$@"`: its arguments stay
/// as given, and it gets the login environment, PATH included).
fn spawn(slave: &OwnedFd, command: &[String]) -> std::io::Result<tokio::process::Child> {
    let (shell, home) = login_shell();
    let name = std::path::Path::new(&shell).file_name().and_then(|n| n.to_str()).unwrap_or("sh").to_owned();
    let mut cmd = std::process::Command::new(&shell);
    cmd.arg0(format!("-{name}"));
    if !command.is_empty() {
        cmd.arg("-c").arg("exec \"$0\" \"$@\"").args(command);
    }
    cmd.env("TERM", "xterm-256color")
        .env("HOME", &home)
        .current_dir(if std::path::Path::new(&home).is_dir() { home.as_str() } else { "/" })
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave.try_clone()?));
    become_session_leader(&mut cmd);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    cmd.spawn()
}

/// In the child, before exec: a new session whose controlling terminal is the PTY (its
/// stdin), so the shell has job control and a hang-up reaches it.
#[allow(unsafe_code)]
fn become_session_leader(cmd: &mut std::process::Command) {
    // SAFETY: only async-signal-safe system calls run between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(BorrowedFd::borrow_raw(0))?;
            Ok(())
        });
    }
}

/// The PTY's controlling side on tokio's reactor.
#[allow(unsafe_code)]
fn register(master: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` stays open, and the same descriptor, for as long as it is owned.
    unsafe { AsyncFd::register(master).map_err(std::io::Error::from) }
}

async fn session(
    stream: u32,
    command: &[String],
    (cols, rows): (u16, u16),
    idle: Duration,
    mut input: mpsc::Receiver<Input>,
    out: &mpsc::Sender<ControllerBound>,
) -> Result<ExitStatus, String> {
    let (master, slave) = open_pty(cols, rows).map_err(|e| format!("opening a PTY: {e}"))?;
    let mut child = spawn(&slave, command).map_err(|e| format!("starting {}: {e}", login_shell().0))?;
    drop(slave);
    let master = register(master).map_err(|e| format!("PTY: {e}"))?;
    let send = |data: &[u8]| {
        let data = base64::engine::general_purpose::STANDARD.encode(data);
        out.send(ControllerBound::TerminalOutput { stream, data })
    };
    // The controller waits for a first word before it tells its client the terminal is open.
    send(&[]).await.map_err(|_| "the connection ended")?;
    let mut buf = vec![0u8; MAX_TERMINAL_CHUNK];
    let mut quiet_until = Instant::now() + idle;
    let mut exited: Option<(ExitStatus, Instant)> = None;
    loop {
        let drain_end = exited.map(|(_, t)| t);
        tokio::select! {
            ready = master.readable() => {
                let mut guard = ready.map_err(|e| format!("PTY: {e}"))?;
                match guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)) {
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => {
                        quiet_until = Instant::now() + idle;
                        send(&buf[..n]).await.map_err(|_| "the connection ended")?;
                    }
                    // EIO: every process holding the PTY has closed it.
                    Ok(Err(e)) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => break,
                    Ok(Err(e)) => return Err(format!("reading the PTY: {e}")),
                    Err(_would_block) => {}
                }
            }
            m = input.recv() => match m {
                Some(Input::Data(d)) => {
                    quiet_until = Instant::now() + idle;
                    write_all(&master, &d).await.map_err(|e| format!("writing to the PTY: {e}"))?;
                }
                Some(Input::Resize { cols, rows }) => {
                    let _ = rustix::termios::tcsetwinsize(master.get_ref(), winsize(cols, rows));
                }
                None => return Err("closed by the controller".into()),
            },
            status = child.wait(), if exited.is_none() => {
                let status = status.map_err(|e| format!("waiting for the shell: {e}"))?;
                exited = Some((status, Instant::now() + DRAIN));
            }
            () = tokio::time::sleep_until(drain_end.unwrap_or(quiet_until)) => {
                if exited.is_some() {
                    break;
                }
                return Err(format!("idle for {} s: closed", idle.as_secs()));
            }
        }
    }
    match exited {
        Some((status, _)) => Ok(status),
        None => child.wait().await.map_err(|e| format!("waiting for the shell: {e}")),
    }
}

async fn write_all(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = master.writable().await?;
        match guard.try_io(|fd| rustix::io::write(fd.get_ref().as_fd(), data).map_err(std::io::Error::from)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}
