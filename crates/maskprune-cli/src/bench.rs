//! `maskprune bench`: size, MACs, peak memory, prefill and KV-cache decode throughput of a
//! model, optionally next to a baseline (each measured in its own process), as JSON.

use std::path::PathBuf;
use std::time::Instant;

use maskprune_eval::perplexity::token_tensor;
use maskprune_model::{output::write_file_atomically, Kernels, KvCache, Llama};
use maskprune_records::bench::{
    median, pool, ratios, BenchComparison, DecodeTiming, ForwardBench, ShapeTiming, TrainStepBench,
    TrainStepTiming,
};

use crate::backend::{dispatch, dispatch_autodiff, AutodiffJob, BackendJob};
use crate::{progress, RunOptions};

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Compare with this model (e.g. the dense original): both are measured, each in its own
    /// process, and the report has the ratios model / baseline.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Shapes BATCHxLEN, comma separated, or `none`: each is timed as a full forward (logits
    /// at every position, as perplexity needs) and as a prefill (the KV cache filled, logits
    /// of the last position only, as generation needs).
    #[arg(long, default_value = "1x512,4x256")]
    shapes: String,
    /// Decode with a KV cache: BATCHxPROMPT+NEW (prefill PROMPT tokens, then NEW greedy
    /// tokens one at a time); `none` to skip.
    #[arg(long, default_value = "1x128+128")]
    decode: String,
    /// With --baseline: measure the two models this many times each, alternating processes
    /// (model, baseline, model, ...), and pool the timings, so that a drift of the machine's
    /// speed (VMs drift by 10-15% over minutes) touches both alike.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Untimed runs per shape.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs per shape (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Time real mask-training updates per shape instead (alone in the process, so peak
    /// RSS is training's): a `train-masks` run of `--updates` updates on new windows (the
    /// teacher's forward in each, as in a run's first epoch), then `--repeats` more with the
    /// teacher's hidden states cached.
    #[arg(long)]
    train_step: bool,
    /// With --train-step: updates of the timed run.
    #[arg(long, default_value_t = 20)]
    updates: usize,
    /// Write the measurements here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    run: RunOptions,
}

fn parse_shapes(s: &str) -> anyhow::Result<Vec<(usize, usize)>> {
    if s == "none" {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|p| {
            let (b, t) = p
                .trim()
                .split_once('x')
                .ok_or_else(|| anyhow::anyhow!("shape `{p}` is not BATCHxLEN"))?;
            let (b, t): (usize, usize) = (b.parse()?, t.parse()?);
            anyhow::ensure!(b > 0 && t > 0, "shape `{p}` must be positive");
            Ok((b, t))
        })
        .collect()
}

/// `BATCHxPROMPT+NEW`, or `none`.
fn parse_decode(s: &str) -> anyhow::Result<Option<(usize, usize, usize)>> {
    if s == "none" {
        return Ok(None);
    }
    let bad = || anyhow::anyhow!("--decode `{s}` is not BATCHxPROMPT+NEW (e.g. 1x128+128) or none");
    let (shape, new) = s.split_once('+').ok_or_else(bad)?;
    let (b, p) = parse_shapes(shape).map_err(|_| bad())?[0];
    let new: usize = new.parse().map_err(|_| bad())?;
    anyhow::ensure!(new > 0, "--decode `{s}`: NEW must be positive");
    Ok(Some((b, p, new)))
}

/// The largest resident set size of this process so far (Linux; 0 elsewhere).
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// Greedy decoding with a KV cache: prefill `prompt` tokens, then `new` tokens one at a time.
fn decode<B: Kernels>(
    model: &Llama<B>,
    batch: usize,
    prompt: usize,
    new: usize,
    device: &B::Device,
) -> anyhow::Result<DecodeTiming> {
    let tokens = random_rows(batch, prompt, model.config.vocab_size as u64);
    let rows: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let start = Instant::now();
    let logits = model.forward_cached(token_tensor(&rows, device), &mut cache)?;
    let mut next = logits
        .narrow(1, prompt - 1, 1)
        .argmax(2)
        .reshape([batch, 1]);
    let _ = next.clone().sum().into_scalar();
    let prefill_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..new {
        let logits = model.forward_cached(next, &mut cache)?;
        next = logits.argmax(2).reshape([batch, 1]);
    }
    let _ = next.sum().into_scalar();
    let decode_s = start.elapsed().as_secs_f64();
    let tps = (batch * new) as f64 / decode_s;
    println!(
        "decode {batch}x{prompt}+{new}: {tps:.1} tokens/s ({:.1} ms/token step, KV cache)",
        1e3 * decode_s / new as f64
    );
    Ok(DecodeTiming {
        batch,
        prompt,
        new_tokens: new,
        prefill_s,
        decode_s,
        tokens_per_s: tps,
    })
}

struct Job(Args, Vec<(usize, usize)>);
struct TrainStepJob(PathBuf, Vec<(usize, usize)>, usize, usize);

/// Runs this same program as `bench` on one model and returns its report.
fn bench_in_child(a: &Args, model: &std::path::Path) -> anyhow::Result<ForwardBench> {
    let tmp = std::env::temp_dir().join(format!("maskprune-bench-{}.json", std::process::id()));
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("bench")
        .arg("--model")
        .arg(model)
        .args(["--shapes", &a.shapes, "--decode", &a.decode])
        .args([
            "--warmup",
            &a.warmup.to_string(),
            "--repeats",
            &a.repeats.to_string(),
        ])
        .args(["--device", &a.run.device.to_string()])
        .arg("--json")
        .arg(&tmp);
    if progress::quiet() {
        cmd.arg("--quiet");
    }
    let status = cmd.status()?;
    anyhow::ensure!(
        status.success(),
        "{}: the benchmark failed",
        model.display()
    );
    let report = maskprune_records::read_json(&tmp).map_err(|m| anyhow::anyhow!(m));
    let _ = std::fs::remove_file(&tmp);
    report
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(base) = args.baseline.clone() {
        anyhow::ensure!(
            !args.train_step,
            "--train-step measures one model; drop --baseline"
        );
        anyhow::ensure!(args.rounds > 0, "--rounds must be positive");
        let (mut models, mut baselines) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            models.push(bench_in_child(&args, &args.model)?);
            baselines.push(bench_in_child(&args, &base)?);
        }
        let pooled = |r| pool(r).map_err(|m| anyhow::anyhow!(m));
        let (model, baseline) = (pooled(models)?, pooled(baselines)?);
        let ratio = ratios(&model, &baseline);
        println!("model / baseline: {}", serde_json::to_string(&ratio)?);
        let report = BenchComparison {
            model,
            baseline,
            ratio,
        };
        if let Some(p) = &args.json {
            write_file_atomically(p, &serde_json::to_vec_pretty(&report)?)?;
            progress::info(format!("wrote {}", p.display()));
        }
        return Ok(());
    }
    let shapes = parse_shapes(&args.shapes)?;
    parse_decode(&args.decode)?;
    let (device, train) = (args.run.device, args.train_step);
    anyhow::ensure!(
        args.updates > 0 && args.repeats > 0,
        "--updates and --repeats must be positive"
    );
    let job = TrainStepJob(
        args.model.clone(),
        shapes.clone(),
        args.updates,
        args.repeats,
    );
    let json = args.json.clone();
    let report = if train {
        let mut report = dispatch_autodiff(device, job)?;
        report.peak_rss_bytes = peak_rss_bytes();
        serde_json::to_value(report)?
    } else {
        serde_json::to_value(dispatch(device, Job(args, shapes))?)?
    };
    if let Some(p) = &json {
        write_file_atomically(p, &serde_json::to_vec_pretty(&report)?)?;
        progress::info(format!("wrote {}", p.display()));
    }
    Ok(())
}

/// Deterministic pseudo-random token rows.
fn random_rows(batch: usize, len: usize, vocab: u64) -> Vec<Vec<u32>> {
    let mut rng = maskprune_data::SplitMix64(0);
    (0..batch)
        .map(|_| (0..len).map(|_| rng.below(vocab as usize) as u32).collect())
        .collect()
}

impl AutodiffJob for TrainStepJob {
    type Output = TrainStepBench;

    /// A real `train-masks` run of `updates + repeats` updates on random windows, in a
    /// temporary run directory: the trainer's own loop (teacher hidden states, masked student
    /// with LoRA, fused head loss and backward, host-side minimax and Adam, log lines, a
    /// checkpoint every `CHECKPOINT_EVERY` updates). Each of the first `updates` sees new
    /// windows, so the teacher's forward runs in every one (a run's first epoch; PyTorch's
    /// step does the same work); the last `repeats` revisit windows with the teacher's
    /// hidden states cached (a run's later epochs).
    fn run<B: maskprune_model::TrainKernels>(
        self,
        device: B::Device,
    ) -> anyhow::Result<TrainStepBench> {
        const CHECKPOINT_EVERY: u64 = 10;
        let TrainStepJob(dir, shapes, updates, repeats) = self;
        let model = Llama::<B>::load(&dir, &device)?;
        let c = model.config.clone();
        let peak = gemm_peak_gflops();
        let mut out = Vec::new();
        for (batch, len) in shapes {
            let steps = updates + repeats;
            let eval = 2;
            let config = <maskprune_train::TrainConfig as maskprune_train::ConfigFile>::parse(
                &format!(
                    "[budget]\nsparsity = 0.3\n[train]\nsteps = {steps}\nbatch = {batch}\n\
                     warmup_steps = {steps}\nmask_init = \"magnitude\"\n\
                     checkpoint_every = {CHECKPOINT_EVERY}\neval_samples = {eval}\n"
                ),
                &[],
            )
            .map_err(|m| anyhow::anyhow!("bench configuration: {m}"))?;
            let calibration = maskprune_data::CalibrationSet {
                dataset: "random".into(),
                file: "random".into(),
                sha256: String::new(),
                documents: (0, 0),
                seed: 0,
                seq_len: len,
                tokenizer_sha256: String::new(),
                samples: random_rows(updates * batch + eval, len, c.vocab_size as u64),
                packed: false,
            };
            let run_dir = std::env::temp_dir().join(format!(
                "maskprune-bench-train-{}-{batch}x{len}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&run_dir);
            std::fs::create_dir_all(&run_dir)?;
            let spec = maskprune_train::RunSpec {
                model_dir: &dir,
                config: &config,
                calibration: &calibration,
                run_dir: &run_dir,
                resume: false,
            };
            let mut seconds = Vec::new();
            let started = Instant::now();
            let mut wall = 0.0;
            let result = maskprune_train::train(&model, &spec, &mut |r| {
                seconds.push(r.seconds);
                if r.step == updates as u64 {
                    wall = started.elapsed().as_secs_f64();
                }
            });
            let _ = std::fs::remove_dir_all(&run_dir);
            result.map_err(|m| anyhow::anyhow!(m))?;
            let (run, cached) = seconds.split_at(updates);
            let mean = run.iter().sum::<f64>() / updates as f64;
            let work = update_flops(&c, batch, len);
            let gflops = (work.student + work.teacher) / mean / 1e9;
            let cached_gflops = work.student / median(cached) / 1e9;
            println!(
                "train-masks update {batch}x{len}: {mean:.3}s mean of a {updates}-update run, the teacher's forward in each ({gflops:.0} GFLOP/s, {:.0}% of the gemm peak {peak:.0}); {:.3}s with it cached ({cached_gflops:.0} GFLOP/s); {:.3}s per update with logs and checkpoints",
                100.0 * gflops / peak,
                median(cached),
                wall / updates as f64,
            );
            out.push(TrainStepTiming {
                batch,
                seq_len: len,
                updates,
                seconds: run.to_vec(),
                mean_s: mean,
                median_s: median(run),
                wall_per_update_s: wall / updates as f64,
                checkpoint_every: CHECKPOINT_EVERY,
                cached_teacher_seconds: cached.to_vec(),
                cached_teacher_median_s: median(cached),
                flops: work.student + work.teacher,
                cached_teacher_flops: work.student,
                gflops_per_s: gflops,
                cached_teacher_gflops_per_s: cached_gflops,
                share_of_gemm_peak: gflops / peak,
                cached_teacher_share_of_gemm_peak: cached_gflops / peak,
            });
        }
        Ok(TrainStepBench {
            bench: "train_step".into(),
            model: dir,
            what: "real train-masks updates (the trainer's gradients and apply): teacher hidden states, student with kv_group masks (STE) and LoRA r8 on q,v, fused LM head + KL (T=1) and backward, minimax and Adam on the host, log lines and checkpoints".into(),
            backend: std::any::type_name::<B>().into(),
            threads: available_threads(),
            gemm_peak_gflops_per_s: peak,
            results: out,
            peak_rss_bytes: 0,
        })
    }
}

/// Floating-point operations of one mask-training update, counted as `2 × MACs`.
struct UpdateFlops {
    /// The teacher's forward (when its hidden states are not cached).
    teacher: f64,
    /// The student's forward and backward and the loss's two head products.
    student: f64,
}

/// The work of an update over `batch × len` tokens: every decoder linear weight once per
/// token in the teacher's and the student's forward and once in the student's backward
/// (input gradients only: the weights are frozen); attention's `QKᵀ` and `PV` over the
/// average causal context `(len + 1) / 2` in each forward and five such products in the
/// backward (`S` again, `dP`, `dQ`, `dK`, `dV`); the LM head for the teacher's and the
/// student's logits and the student's hidden-state gradient.
fn update_flops(c: &maskprune_model::ModelConfig, batch: usize, len: usize) -> UpdateFlops {
    let tokens = (batch * len) as f64;
    let linear = (c.num_hidden_layers * c.layer_linear_params()) as f64;
    let attention = (c.num_hidden_layers * c.num_attention_heads * c.head_dim) as f64
        * (len as f64 + 1.0)
        / 2.0;
    let head = (c.hidden_size * c.vocab_size) as f64;
    let macs = |passes: f64, attention_products: f64, heads: f64| {
        tokens * (passes * linear + attention_products * attention + heads * head)
    };
    UpdateFlops {
        teacher: 2.0 * macs(1.0, 2.0, 0.0),
        student: 2.0 * macs(2.0, 7.0, 3.0),
    }
}

/// The machine's f32 `gemm` rate (GFLOP/s) at a decoder projection's shape (512 tokens,
/// 576 in, 1536 out), split over the threads as the linear layers are: the median of 20.
fn gemm_peak_gflops() -> f64 {
    let [m, n, k] = [512, 1536, 576];
    let x = vec![0.5f32; m * k];
    let w = vec![0.25f32; k * n];
    let times = time_runs(3, 20, || {
        maskprune_model::cpu_kernels::on_pool(|| {
            std::hint::black_box(maskprune_model::cpu_kernels::gemm::matmul(
                &x,
                &w,
                [m, n, k],
            ));
        });
        Ok(())
    })
    .expect("no errors");
    2.0 * (m * n * k) as f64 / median(&times) / 1e9
}

impl BackendJob for Job {
    type Output = ForwardBench;
    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<ForwardBench> {
        let Job(a, shapes) = self;
        let model = Llama::<B>::load(&a.model, &device)?;
        let vocab = model.config.vocab_size as u64;
        let pb = progress::bar(
            "bench",
            (2 * shapes.len() * (a.warmup + a.repeats)) as u64,
            "runs",
        );
        let (mut forward, mut prefill) = (Vec::new(), Vec::new());
        for (batch, len) in shapes {
            let tokens = random_rows(batch, len, vocab);
            let rows: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
            let full = time_runs(a.warmup, a.repeats, || {
                let logits = model.forward(token_tensor(&rows, &device))?;
                // Reading one value back forces the (possibly asynchronous) backend to finish.
                let _ = logits.narrow(1, len - 1, 1).sum().into_scalar();
                pb.inc(1);
                Ok(())
            })?;
            let last = time_runs(a.warmup, a.repeats, || {
                let mut cache = KvCache::new(model.config.num_hidden_layers);
                let hidden =
                    model.hidden_states_cached(token_tensor(&rows, &device), &mut cache)?;
                let _ = model
                    .logits(hidden.narrow(1, len - 1, 1))
                    .sum()
                    .into_scalar();
                pb.inc(1);
                Ok(())
            })?;
            for (what, times, out) in [
                ("forward", full, &mut forward),
                ("prefill", last, &mut prefill),
            ] {
                let timing = ShapeTiming::new(batch, len, times);
                println!(
                    "{what} {batch}x{len}: {:.3}s median of {}, {:.0} tokens/s",
                    timing.median_s,
                    timing.seconds.len(),
                    timing.tokens_per_s
                );
                out.push(timing);
            }
        }
        pb.finish_and_clear();
        let decoded = match parse_decode(&a.decode)? {
            Some((b, p, n)) => Some(decode(&model, b, p, n, &device)?),
            None => None,
        };
        let c = &model.config;
        // Multiply-accumulates per token: every linear weight once (decoder layers and LM
        // head), plus attention's QK and PV products, 2·heads·head_dim per context position.
        let decoder_linear = c.num_hidden_layers * c.layer_linear_params();
        let macs_linear = decoder_linear + c.hidden_size * c.vocab_size;
        let per_position = c.num_hidden_layers * 2 * c.num_attention_heads * c.head_dim;
        // A prefill's work per token: the decoder's weights, attention over the causal
        // context (on average (len + 1) / 2 positions), the LM head for the last position.
        for p in &mut prefill {
            let len = p.seq_len as f64;
            p.macs_per_token = Some(
                decoder_linear as f64
                    + per_position as f64 * (len + 1.0) / 2.0
                    + (c.hidden_size * c.vocab_size) as f64 / len,
            );
        }
        Ok(ForwardBench {
            bench: "forward".into(),
            model: a.model,
            params: model.config.total_params(),
            macs_per_token_linear: macs_linear,
            attention_macs_per_token_per_context_position: per_position,
            backend: format!("burn {} ({})", a.run.device, std::any::type_name::<B>()),
            threads: available_threads(),
            forward,
            prefill,
            decode: decoded,
            peak_rss_bytes: peak_rss_bytes(),
            rounds: None,
        })
    }
}

/// Times `warmup + repeats` runs of `f` and returns the timed ones, in seconds.
fn time_runs(
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::new();
    for i in 0..warmup + repeats {
        let start = Instant::now();
        f()?;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

fn available_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
