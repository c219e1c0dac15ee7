//! The terminal's WebSocket (`/api/v1/devices/{name}/terminal`): binary frames carry
//! the terminal's bytes both ways; these are its text frames.

use serde::{Deserialize, Serialize};

/// What the client sends as text: the terminal's new size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct TerminalControl {
    pub resize: Option<TerminalSize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct TerminalSize {
    pub cols: u16,
    pub rows: u16,
}

/// The controller's last frame: the command's exit status, or why it ended without one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum TerminalEnd {
    Exited { exit_status: i32 },
    Failed { error: String },
}

/// An error answer of the API (any status but 2xx): `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_as_documented() {
        let end: TerminalEnd = serde_json::from_str(r#"{"exit_status":3}"#).expect("exit");
        assert_eq!(end, TerminalEnd::Exited { exit_status: 3 });
        let end: TerminalEnd = serde_json::from_str(r#"{"error":"the device disconnected"}"#).expect("error");
        assert_eq!(end, TerminalEnd::Failed { error: "the device disconnected".into() });
        assert_eq!(
            serde_json::to_string(&TerminalEnd::Exited { exit_status: 0 }).expect("json"),
            r#"{"exit_status":0}"#
        );
        let c: TerminalControl = serde_json::from_str(r#"{"resize":{"cols":80,"rows":24}}"#).expect("resize");
        assert_eq!(c.resize, Some(TerminalSize { cols: 80, rows: 24 }));
    }
}
