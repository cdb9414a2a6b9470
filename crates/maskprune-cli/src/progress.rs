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

/// Runs `work` with a bar over the tensors it converts; `work` reports (done, total).
pub fn over_tensors<T>(label: &str, work: impl FnOnce(&mut dyn FnMut(usize, usize)) -> T) -> T {
    let pb = bar(label, 0, "tensors");
    let out = work(&mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    });
    pb.finish_and_clear();
    out
}

/// A bar over training updates; where no bar is drawn (stderr not a terminal), a plain line
/// every 10 updates and at the last.
pub struct StepBar {
    pb: ProgressBar,
    plain: bool,
    label: &'static str,
}

impl StepBar {
    /// A bar of `steps` updates labelled `label` ("train", "finetune").
    pub fn new(label: &'static str, steps: u64) -> Self {
        Self {
            pb: bar(label, steps, "steps"),
            plain: plain_log(),
            label,
        }
    }

    /// Shows update `step` of `steps`, which took `seconds`, with the run's `message`.
    pub fn update(&self, step: u64, steps: u64, seconds: f64, message: String) {
        self.pb.set_position(step);
        if self.plain && (step.is_multiple_of(10) || step == steps) {
            info(format!(
                "{} step {step}/{steps}: {message} ({seconds:.1} s/step)",
                self.label
            ));
        }
        self.pb.set_message(message);
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.pb.finish_and_clear();
    }
}
