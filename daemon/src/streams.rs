//! The journal and terminal streams the controller opened on this connection. They end
//! with it: dropping the table stops journalctl and hangs up every terminal.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use thymis_proto::stream::{JournalQuery, MAX_STREAMS, MAX_TERMINAL_CHUNK};
use thymis_proto::{AgentBound, ControllerBound};
use tokio::sync::mpsc;
use tracing::info;

use crate::receive::Outbox;
use crate::terminal::Input;

/// Terminal input waiting for the PTY; a controller that sends more than a shell reads
/// ends the session rather than making the connection wait.
const INPUT_QUEUE: usize = 64;

#[derive(Debug)]
struct Open {
    task: tokio::task::JoinHandle<()>,
    input: Option<mpsc::Sender<Input>>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
pub struct Streams {
    /// Where refusals go at once (the control queue).
    control: Outbox,
    /// Where the streams' entries and output go (bounded: they wait for room).
    data: mpsc::Sender<ControllerBound>,
    terminal: bool,
    idle: Duration,
    open: HashMap<u32, Open>,
}

impl Streams {
    pub fn new(control: Outbox, data: mpsc::Sender<ControllerBound>, terminal: bool, idle: Duration) -> Self {
        Streams { control, data, terminal, idle, open: HashMap::new() }
    }

    fn refuse(&self, stream: u32, error: String) {
        let _ = self.control.send(ControllerBound::StreamEnd { stream, exit_status: None, error: Some(error) });
    }

    /// Room for one more stream (finished ones are forgotten), or a refusal sent.
    fn admit(&mut self, stream: u32) -> bool {
        self.open.retain(|_, o| !o.task.is_finished());
        if self.open.contains_key(&stream) {
            self.refuse(stream, format!("stream {stream} is open already"));
            return false;
        }
        if self.open.len() >= MAX_STREAMS {
            self.refuse(stream, format!("this device has {MAX_STREAMS} streams open already"));
            return false;
        }
        true
    }

    pub fn journal(&mut self, stream: u32, query: JournalQuery) {
        if let Err(e) = query.check() {
            return self.refuse(stream, e);
        }
        if self.admit(stream) {
            let task = tokio::spawn(crate::journal::run(stream, query, self.data.clone()));
            self.open.insert(stream, Open { task, input: None });
        }
    }

    pub fn terminal(&mut self, stream: u32, command: Vec<String>, size: (u16, u16)) {
        if !self.terminal {
            return self.refuse(stream, crate::config::NO_TERMINAL.into());
        }
        if self.admit(stream) {
            info!(stream, ?command, "terminal opened by the controller");
            let (tx, rx) = mpsc::channel(INPUT_QUEUE);
            let task = tokio::spawn(crate::terminal::run(stream, command, size, self.idle, rx, self.data.clone()));
            self.open.insert(stream, Open { task, input: Some(tx) });
        }
    }

    /// Hands a terminal its input; one that cannot take it ends.
    pub fn input(&mut self, stream: u32, input: Input) {
        let Some(tx) = self.open.get(&stream).and_then(|o| o.input.as_ref()) else { return };
        if let Input::Data(d) = &input
            && d.len() > MAX_TERMINAL_CHUNK
        {
            return self.end(stream, "terminal input chunk too large".into());
        }
        match tx.try_send(input) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.end(stream, "the terminal's input overran (its program is not reading)".into())
            }
            // The session has ended (its command exited): its end, with the exit status, is
            // on its way; input that came after it is moot.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    pub fn input_base64(&mut self, stream: u32, data: &str) {
        match base64::engine::general_purpose::STANDARD.decode(data) {
            Ok(d) => self.input(stream, Input::Data(d)),
            Err(_) => self.end(stream, "terminal input that is not base64".into()),
        }
    }

    /// Stops a stream and says why.
    fn end(&mut self, stream: u32, error: String) {
        if self.open.remove(&stream).is_some() {
            self.refuse(stream, error);
        }
    }

    /// The controller's client left: stop it without a word.
    pub fn close(&mut self, stream: u32) {
        self.open.remove(&stream);
    }

    /// Whether `msg` is a stream's, handled here.
    pub fn handle(&mut self, msg: &AgentBound) -> bool {
        match msg {
            AgentBound::JournalOpen { stream, query } => self.journal(*stream, query.clone()),
            AgentBound::TerminalOpen { stream, command, cols, rows } => {
                self.terminal(*stream, command.clone(), ((*cols).max(1), (*rows).max(1)))
            }
            AgentBound::TerminalInput { stream, data } => self.input_base64(*stream, data),
            AgentBound::TerminalResize { stream, cols, rows } => {
                self.input(*stream, Input::Resize { cols: (*cols).max(1), rows: (*rows).max(1) })
            }
            AgentBound::StreamClose { stream } => self.close(*stream),
            _ => return false,
        }
        true
    }
}
