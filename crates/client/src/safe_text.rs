//! Text a device sent, made safe for a terminal: its control characters (escape
//! sequences that could move the cursor, rewrite the screen or set the title) are shown
//! as `\xNN` / `\u{NNNN}` instead, as journalctl does. Newlines and tabs stay. `--raw`
//! prints such text as it came.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};

static RAW: AtomicBool = AtomicBool::new(false);

/// Print what devices sent as it came (`thymisctl --raw`).
pub fn set_raw(raw: bool) {
    RAW.store(raw, Ordering::Relaxed);
}

/// `text` with its control characters but newlines and tabs escaped.
pub fn printable(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && c != '\n' && c != '\t';
    if RAW.load(Ordering::Relaxed) || !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !unsafe_char(c) => out.push(c),
            c if (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
        }
    }
    Cow::Owned(out)
}

/// [`printable`] of an optional text, `-` for none.
pub fn printable_or_dash(text: Option<&str>) -> Cow<'_, str> {
    text.map_or(Cow::Borrowed("-"), printable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_shown_not_obeyed() {
        assert_eq!(printable("plain text\twith a tab\nand lines"), "plain text\twith a tab\nand lines");
        assert_eq!(printable("\x1b]0;owned\x07\x1b[2Jred"), "\\x1b]0;owned\\x07\\x1b[2Jred");
        assert_eq!(printable("csi \u{9b}31m and \r"), "csi \\x9b31m and \\x0d");
        assert_eq!(printable("\u{2028}"), "\u{2028}", "a separator is not a control character");
        assert_eq!(printable_or_dash(None), "-");
    }
}
