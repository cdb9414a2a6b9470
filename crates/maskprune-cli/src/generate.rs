//! `maskprune generate` (one prompt, tokens printed as they come) and `maskprune chat` (a
//! terminal conversation with the model's chat template). A model is a Hugging Face
//! directory or a GGUF file (imported once into the cache).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use maskprune_eval::{generate, ChatTemplate, Message, Sampling};
use maskprune_model::output::write_file_atomically;
use maskprune_model::{load_tokenizer, Kernels, Llama, ModelConfig};
use serde_json::json;
use tokenizers::Tokenizer;

use crate::backend::{dispatch, BackendJob};
use crate::{progress, RunOptions};

/// How the next token is chosen (shared by `generate` and `chat`).
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 for greedy decoding; otherwise sample from softmax(logits / T).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only from the most likely tokens whose probabilities add up to P.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn sampling(&self) -> anyhow::Result<Sampling> {
        anyhow::ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "--temperature must be 0 (greedy) or positive"
        );
        anyhow::ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "--top-p must be in (0, 1]"
        );
        Ok(Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        })
    }
}

/// Arguments of `generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Model directory (Hugging Face layout) or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// The text to continue (with --chat: the user's message).
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Also write the prompt's and the new tokens' ids, the text and the timings as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the logits at every prompt position (raw little-endian f32,
    /// `[prompt tokens, vocab]`), to compare with another runtime.
    #[arg(long)]
    logits: Option<PathBuf>,
    #[command(flatten)]
    run: RunOptions,
}

/// Arguments of `chat`.
#[derive(clap::Args)]
pub struct ChatArgs {
    /// Model directory (Hugging Face layout) or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    run: RunOptions,
}

/// A model directory: `model` itself, or a GGUF file imported (once) into the cache.
fn model_dir(model: &Path) -> anyhow::Result<PathBuf> {
    if !model.is_file() {
        return Ok(model.to_path_buf());
    }
    let bytes = std::fs::metadata(model)?.len();
    let name = model.file_stem().unwrap_or_default().to_string_lossy();
    let cache = std::env::var_os("MASKPRUNE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/maskprune")))
        .ok_or_else(|| anyhow::anyhow!("no cache directory (set MASKPRUNE_CACHE)"))?;
    let dir = cache.join("gguf-imports").join(format!("{name}-{bytes}"));
    if !dir.join("config.json").is_file() {
        progress::info(format!(
            "importing {} -> {} ...",
            model.display(),
            dir.display()
        ));
        maskprune_gguf::import_gguf(
            model,
            &dir,
            maskprune_gguf::OutDtype::F32,
            true,
            &mut |_, _| {},
        )?;
    }
    Ok(dir)
}

/// The token ids generation stops after: `eos_token_id` of the config.
fn stop_tokens(config: &ModelConfig) -> Vec<u32> {
    config.eos_token_ids.clone()
}

/// Prints decoded text as tokens come: the whole answer is decoded each time and only what
/// is new is written (a character may take several tokens), flushed at once.
struct Stream<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    ids: Vec<u32>,
    shown: usize,
}

impl Stream<'_> {
    fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true).unwrap_or_default();
        if text.ends_with('\u{FFFD}') || text.len() < self.shown {
            return String::new();
        }
        let new = text[self.shown..].to_string();
        self.shown = text.len();
        let mut out = std::io::stdout();
        let _ = write!(out, "{new}");
        let _ = out.flush();
        new
    }
}

/// The model directory (a GGUF file imported once), its config and its tokenizer.
fn open_model(model: &Path) -> anyhow::Result<(PathBuf, ModelConfig, Tokenizer)> {
    let dir = model_dir(model)?;
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let tokenizer = load_tokenizer(&dir, &config)?;
    Ok((dir, config, tokenizer))
}

struct GenerateJob(GenerateArgs);

impl BackendJob for GenerateJob {
    type Output = ();
    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<()> {
        let a = self.0;
        let sampling = a.sampling.sampling()?;
        let (dir, config, tokenizer) = open_model(&a.model)?;
        let text = if a.chat {
            let template = ChatTemplate::load(&dir).map_err(anyhow::Error::msg)?;
            let user = Message {
                role: "user".into(),
                content: a.prompt.clone(),
            };
            template.render(&[user]).map_err(anyhow::Error::msg)?
        } else {
            a.prompt.clone()
        };
        // Special tokens as the tokenizer adds them (a BOS when the model wants one); a
        // chat prompt carries its own.
        let prompt = tokenizer
            .encode(text.as_str(), !a.chat)
            .map_err(|e| anyhow::anyhow!("{}: cannot encode the prompt: {e}", dir.display()))?
            .get_ids()
            .to_vec();
        anyhow::ensure!(!prompt.is_empty(), "the prompt encodes to no tokens");
        let model = Llama::<B>::load(&dir, &device)?;
        if let Some(p) = &a.logits {
            let ids: Vec<&[u32]> = vec![&prompt];
            let logits = model.forward(maskprune_eval::perplexity::token_tensor(&ids, &device))?;
            let values: Vec<f32> = logits.into_data().convert::<f32>().to_vec().expect("f32");
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            write_file_atomically(p, &bytes)?;
        }
        let mut stream = Stream {
            tokenizer: &tokenizer,
            ids: Vec::new(),
            shown: 0,
        };
        if !a.chat {
            print!("{}", a.prompt);
        }
        let out = generate(
            &model,
            &prompt,
            a.sampling.max_new_tokens,
            sampling,
            &stop_tokens(&config),
            &mut |id| {
                stream.push(id);
                true
            },
        )?;
        println!();
        let answer = tokenizer.decode(&out.tokens, true).unwrap_or_default();
        progress::info(format!(
            "{} tokens ({}) in {:.2} s after a {}-token prompt ({:.2} s): {:.1} tokens/s",
            out.tokens.len(),
            if out.stopped {
                "end of text"
            } else {
                "length limit"
            },
            out.decode_s,
            prompt.len(),
            out.prefill_s,
            out.tokens.len() as f64 / out.decode_s.max(1e-9)
        ));
        if let Some(p) = &a.json {
            let report = json!({
                "model": dir, "prompt": a.prompt, "chat": a.chat, "prompt_ids": prompt,
                "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed},
                "generated": out, "text": answer,
            });
            write_file_atomically(p, &serde_json::to_vec_pretty(&report)?)?;
        }
        Ok(())
    }
}

pub fn generate_run(a: GenerateArgs) -> anyhow::Result<()> {
    dispatch(a.run.device, GenerateJob(a))
}

struct ChatJob(ChatArgs);

impl BackendJob for ChatJob {
    type Output = ();
    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<()> {
        let a = self.0;
        let sampling = a.sampling.sampling()?;
        let (dir, config, tokenizer) = open_model(&a.model)?;
        let template = ChatTemplate::load(&dir).map_err(anyhow::Error::msg)?;
        let model = Llama::<B>::load(&dir, &device)?;
        let mut messages: Vec<Message> = a
            .system
            .iter()
            .map(|s| Message {
                role: "system".into(),
                content: s.clone(),
            })
            .collect();
        progress::info(format!(
            "chatting with {} (an empty line or end of input quits)",
            a.model.display()
        ));
        let stdin = std::io::stdin();
        let mut turn = 0u64;
        loop {
            print!("> ");
            std::io::stdout().flush()?;
            let mut line = String::new();
            if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
                println!();
                return Ok(());
            }
            messages.push(Message {
                role: "user".into(),
                content: line.trim_end().to_string(),
            });
            let text = template.render(&messages).map_err(anyhow::Error::msg)?;
            let prompt = tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("cannot encode the conversation: {e}"))?
                .get_ids()
                .to_vec();
            let mut stream = Stream {
                tokenizer: &tokenizer,
                ids: Vec::new(),
                shown: 0,
            };
            let seeded = Sampling {
                seed: sampling.seed.wrapping_add(turn),
                ..sampling
            };
            let out = generate(
                &model,
                &prompt,
                a.sampling.max_new_tokens,
                seeded,
                &stop_tokens(&config),
                &mut |id| {
                    stream.push(id);
                    true
                },
            )?;
            println!();
            messages.push(Message {
                role: "assistant".into(),
                content: tokenizer.decode(&out.tokens, true).unwrap_or_default(),
            });
            turn += 1;
        }
    }
}

pub fn chat_run(a: ChatArgs) -> anyhow::Result<()> {
    dispatch(a.run.device, ChatJob(a))
}
