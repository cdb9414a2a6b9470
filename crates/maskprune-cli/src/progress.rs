//! Progress bars (indicatif) with rate and ETA; silent with `--quiet`, plain when stderr is
//! not a terminal (indicatif draws nothing there, so a final line is printed instead).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Sets `--quiet` for the whole process.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether informational output is suppressed.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Prints an informational line to stderr unless `--quiet`.
pub fn info(message: impl AsRef<str>) {
    if !quiet() {
        eprintln!("{}", message.as_ref());
    }
}

/// A bar of `total` `unit`s labelled `label`.
pub fn bar(label: &str, total: u64, unit: &str) -> ProgressBar {
    if quiet() || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} ({{per_sec}}, ETA {{eta}}) {{msg}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// Whether long stages should print periodic plain lines (stderr is not a terminal and not
/// `--quiet`), since no bar is drawn there.
pub fn plain_log() -> bool {
    !quiet() && !std::io::stderr().is_terminal()
}
