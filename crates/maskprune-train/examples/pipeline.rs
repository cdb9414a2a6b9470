//! The pipeline from Rust, without the CLI: calibrate, train masks and widths, surgery,
//! evaluate — the stages `maskprune prune` and `maskprune eval` run, here a short run.
//!
//! cargo run --release -p maskprune-train --example pipeline -- MODEL_DIR OUT_DIR [DATA_DIR]

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use maskprune_data::{draw_calibration, load_dataset, text::sha256_hex, windows, Draw, Encoder};
use maskprune_eval::perplexity::perplexity;
use maskprune_model::{load_tokenizer, Llama, ModelConfig};
use maskprune_surgery::{prune_checkpoint_with_lora, PrunePlan};
use maskprune_train::{files, train, ConfigFile, RunSpec, TrainConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [model_dir, out, ..] = &args[..] else {
        return Err("usage: pipeline MODEL_DIR OUT_DIR [DATA_DIR]".into());
    };
    let data_dir = args.get(2).map(PathBuf::as_path);

    // 1. Calibrate: 72 windows of 128 tokens from C4's calibration rows (64 train, 8 held out).
    let config = ModelConfig::from_file(&model_dir.join("config.json"))?;
    let tokenizer = load_tokenizer(model_dir, &config)?;
    let encoder = Encoder {
        tokenizer: &tokenizer,
        sha256: sha256_hex(&std::fs::read(model_dir.join("tokenizer.json"))?),
        separator: config.eos_token_ids.first().copied(),
    };
    let draw = Draw {
        dataset: "c4",
        samples: 72,
        seq_len: 128,
        seed: 0,
        packed: false,
    };
    let calibration = draw_calibration(&draw, &encoder, data_dir, &mut |_, _| {})?;

    // 2. Train masks and shared widths at 30% sparsity (20 updates; the configs use 200).
    let settings = "[budget]\nsparsity = 0.3\n[train]\nsteps = 20\nwarmup_steps = 10\n";
    let train_config = TrainConfig::parse(settings, &[])?;
    let run_dir = out.join("run");
    std::fs::create_dir_all(&run_dir)?;
    let student = Llama::<Autodiff<Flex>>::load(model_dir, &Default::default())?;
    let spec = RunSpec {
        model_dir,
        config: &train_config,
        calibration: &calibration,
        run_dir: &run_dir,
        resume: false,
    };
    let summary = train(&student, &spec, &mut |r| {
        println!("update {}: KL {:.4}", r.step, r.distill)
    })?;

    // 3. Surgery: the learned plan sliced out of the weights, the adapters merged.
    let plan = PrunePlan::read(&run_dir.join(files::PLAN))?;
    let pruned_dir = out.join("pruned");
    prune_checkpoint_with_lora(
        model_dir,
        &plan,
        Some(&run_dir.join(files::LORA)),
        &pruned_dir,
        true,
    )?;

    // 4. Evaluate: WikiText-2 perplexity of the pruned model, first 32 windows of 128.
    let pruned = Llama::<Flex>::load(&pruned_dir, &Default::default())?;
    let text = load_dataset("wikitext2", data_dir)?;
    let ids = tokenizer
        .encode(text.text.as_str(), true)
        .map_err(|e| e.to_string())?
        .get_ids()
        .to_vec();
    let result = perplexity(&pruned, &windows(&ids, 128, Some(32)), 8, None, &mut |_| {})?;
    println!(
        "{:?} in every layer; WikiText-2 mean NLL {:.4} (perplexity {:.2}) -> {}",
        summary.widths,
        result.mean_nll,
        result.ppl,
        pruned_dir.display()
    );
    Ok(())
}
