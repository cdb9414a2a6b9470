//! `maskprune bench`: dense forward (prefill) throughput at given shapes, as JSON.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::backend::Backend;
use maskprune_eval::perplexity::token_tensor;
use maskprune_model::{output::write_file_atomically, Llama};
use serde_json::json;

use crate::backend::{dispatch, dispatch_autodiff, AutodiffJob, BackendJob};
use crate::{progress, RunOptions};

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Shapes BATCHxLEN, comma separated.
    #[arg(long, default_value = "1x1024,4x256")]
    shapes: String,
    /// Untimed runs per shape.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs per shape (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Also time one mask-training step per shape: teacher forward, student forward and
    /// backward with straight-through masks (kv_group) and LoRA rank 8 on q and v.
    #[arg(long)]
    train_step: bool,
    /// Write the measurements here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    run: RunOptions,
}

fn parse_shapes(s: &str) -> anyhow::Result<Vec<(usize, usize)>> {
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

struct Job(Args, Vec<(usize, usize)>);
struct TrainStepJob(PathBuf, Vec<(usize, usize)>, usize, usize);

pub fn run(args: Args) -> anyhow::Result<()> {
    let shapes = parse_shapes(&args.shapes)?;
    let (device, train) = (args.run.device, args.train_step);
    let job = TrainStepJob(
        args.model.clone(),
        shapes.clone(),
        args.warmup,
        args.repeats,
    );
    let json = args.json.clone();
    let mut report = dispatch(device, Job(args, shapes))?;
    if train {
        report["train_step"] = dispatch_autodiff(device, job)?;
    }
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
    type Output = serde_json::Value;
    fn run<B: burn::tensor::backend::AutodiffBackend>(
        self,
        device: B::Device,
    ) -> anyhow::Result<serde_json::Value> {
        use maskprune_mask::{distillation_kl, Granularity, UnitMasks};
        use maskprune_train::{config::LoraSettings, Adapters};
        let TrainStepJob(dir, shapes, warmup, repeats) = self;
        let model = Llama::<B>::load(&dir, &device)?;
        let config = model.config.clone();
        let mut out = Vec::new();
        for (batch, len) in shapes {
            let tokens = random_rows(batch, len, config.vocab_size as u64);
            let rows: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
            let masks = UnitMasks::<B>::ones(&config, Granularity::KvGroup, &device).require_grad();
            let (lora, _) = Adapters::new(&config, &LoraSettings::default(), 0).to_tensors::<B>(
                config.num_hidden_layers,
                &device,
                burn::tensor::Tensor::require_grad,
            );
            let mut times = Vec::new();
            for i in 0..warmup + repeats {
                let start = Instant::now();
                let teacher = model.forward(token_tensor(&rows, &device))?.detach();
                let student = model.forward_with(
                    token_tensor(&rows, &device),
                    Some(&masks.layer_masks()),
                    Some(&lora),
                )?;
                let loss = distillation_kl(student, teacher, 2.0);
                let grads = loss.backward();
                // Reading a gradient back forces the backend to finish.
                let _ = masks.channels[0]
                    .grad(&grads)
                    .map(|g| g.sum().into_scalar());
                if i >= warmup {
                    times.push(start.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            println!("train step {batch}x{len}: {median:.3}s median of {} (teacher fwd + student fwd/bwd)", times.len());
            out.push(json!({"batch": batch, "seq_len": len, "seconds": times, "median_s": median}));
        }
        Ok(
            json!({"what": "teacher forward + student forward and backward, kv_group masks (STE) + LoRA r8 on q,v, KL T=2", "results": out}),
        )
    }
}

impl BackendJob for Job {
    type Output = serde_json::Value;
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<serde_json::Value> {
        let Job(a, shapes) = self;
        let model = Llama::<B>::load(&a.model, &device)?;
        let vocab = model.config.vocab_size as u64;
        let mut rows_out = Vec::new();
        for (batch, len) in shapes {
            let tokens = random_rows(batch, len, vocab);
            let rows: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
            let mut times = Vec::new();
            for i in 0..a.warmup + a.repeats {
                let start = Instant::now();
                let logits = model.forward(token_tensor(&rows, &device))?;
                // Reading one value back forces the (possibly asynchronous) backend to finish.
                let _ = logits.narrow(1, len - 1, 1).sum().into_scalar();
                if i >= a.warmup {
                    times.push(start.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            let tps = (batch * len) as f64 / median;
            println!(
                "forward {batch}x{len}: {median:.3}s median of {}, {tps:.0} tokens/s",
                times.len()
            );
            rows_out.push(json!({"batch": batch, "seq_len": len, "seconds": times, "median_s": median, "tokens_per_s": tps}));
        }
        let report = json!({
            "bench": "dense_forward",
            "model": a.model,
            "params": model.config.total_params(),
            "backend": format!("burn {} ({})", a.run.device, std::any::type_name::<B>()),
            "threads": available_threads(),
            "results": rows_out,
        });
        Ok(report)
    }
}

fn available_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
