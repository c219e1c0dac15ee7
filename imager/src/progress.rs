//! Progress bars for the long steps (staging, compressing, flashing, reading back),
//! drawn on stderr only when it is a terminal, so logs and pipes stay clean.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar counting `total` bytes of the step `what`.
pub fn bytes(what: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("thymis-imager: {msg:<12} [{bar:24}] {bytes}/{total_bytes} {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}
