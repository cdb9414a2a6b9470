//! `maskprune`: structured pruning of LLaMA-family models with learned masks.
//! One subcommand per pipeline stage; see the README for the whole pipeline.

mod backend;
mod bench;
mod calib;
mod datasets;
mod eval_ppl;
mod eval_zeroshot;
mod finetune;
mod generate;
mod import;
mod inspect;
mod progress;
mod prune_stages;
mod report;
mod table;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::backend::DeviceArg;

// Large tensors are allocated and freed every layer; glibc returns them to the OS each time
// (page faults were a third of the forward time). mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (v2 `mimalloc.h`; libmimalloc-sys names no constant).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped instead of handing it back to the OS 10 ms later: the next
/// layer's tensors of the same sizes then reuse it without page faults (the kernel zeroing
/// fresh pages was 14% of a 1x1024 forward).
fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option; no pointer is passed.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// Structured pruning of LLaMA-family models with learned masks (MaskPrune).
#[derive(Parser)]
#[command(name = "maskprune", version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("MASKPRUNE_COMMIT"), ")"), about, long_about = None)]
struct Cli {
    /// No progress bars or informational messages (results and errors are still printed).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a GGUF file into a Hugging Face model directory (config, safetensors, tokenizer).
    ImportGguf(import::Args),
    /// Write a model directory as the GGUF file llama.cpp loads (f32, f16, bf16, q8_0, q4_0,
    /// q4_k, q6_k).
    ExportGguf(import::ExportArgs),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Print a checkpoint's architecture, parameter counts and provenance.
    Inspect(inspect::Args),
    /// Measure forward (prefill) throughput and write JSON.
    Bench(bench::Args),
    /// List the built-in datasets and where their files were found.
    Datasets(datasets::Args),
    /// Draw a seeded calibration set of token windows from calibration text (JSON).
    Calib(calib::Args),
    /// Rank units with a one-shot method and write a uniform prune plan (JSON).
    Rank(prune_stages::RankArgs),
    /// Learn masks and uniform widths under the minimax constraint (writes a run directory).
    TrainMasks(train::TrainArgs),
    /// Apply a prune plan: slice the weights and write a smaller standard checkpoint.
    Surgery(prune_stages::SurgeryArgs),
    /// Every stage at once: calibration, mask training (or a one-shot baseline), surgery.
    Prune(train::PruneArgs),
    /// Continue a prompt with the model (KV cache; greedy or sampled), printing as it goes.
    Generate(generate::GenerateArgs),
    /// Talk with the model in the terminal, with its chat template.
    Chat(generate::ChatArgs),
    /// Recovery fine-tuning of a pruned model: LoRA (next-token loss, distillation from the
    /// dense model with --teacher), merged into a standard checkpoint.
    Finetune(finetune::Args),
    /// Collect finished result rows into table.json, table.csv and table.md.
    Table(table::Args),
    /// Plot a mask-training run: RUN/report/ with SVG and PNG figures, report.md, report.html.
    Report(report::Args),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Perplexity over non-overlapping windows (LLM-Pruner / Wanda / SparseGPT protocol).
    Ppl(eval_ppl::Args),
    /// Zero-shot multiple choice (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA).
    Zeroshot(eval_zeroshot::Args),
}

/// Options shared by commands that run a model.
#[derive(clap::Args, Clone, Debug)]
pub struct RunOptions {
    /// Compute device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// Data directory (default: $MASKPRUNE_DATA, ../shared/data, ~/.cache/maskprune/data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    // A file-size limit (or a quota) then fails the write with an error we report, instead
    // of killing the process with SIGXFSZ halfway through an output.
    // A closed stdout (`maskprune inspect DIR | head`) ends the process quietly, as it ends
    // `ls`: Rust ignores SIGPIPE, and printing would then panic on the broken pipe.
    #[cfg(unix)]
    // SAFETY: setting signals' dispositions at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // Usage mistakes get one line too (clap adds a usage block and a hint).
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("error: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    progress::set_quiet(cli.quiet);
    let result = match cli.command {
        Command::ImportGguf(a) => import::run(a),
        Command::ExportGguf(a) => import::export(a),
        Command::Eval(EvalCommand::Ppl(a)) => eval_ppl::run(a),
        Command::Eval(EvalCommand::Zeroshot(a)) => eval_zeroshot::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Datasets(a) => datasets::run(a),
        Command::Calib(a) => calib::run(a),
        Command::Rank(a) => prune_stages::rank(a),
        Command::Surgery(a) => prune_stages::surgery(a),
        Command::TrainMasks(a) => train::train_masks(a),
        Command::Prune(a) => train::prune(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Generate(a) => generate::generate_run(a),
        Command::Chat(a) => generate::chat_run(a),
        Command::Table(a) => table::run(a),
        Command::Report(a) => report::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
