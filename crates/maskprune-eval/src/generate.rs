//! Text generation with the KV cache: greedy or seeded temperature / top-p sampling, tokens
//! handed out as they come, and chat prompts rendered with the model's own template
//! (`chat_template` in `tokenizer_config.json`, Jinja).

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use maskprune_data::SplitMix64;
use maskprune_model::{Kernels, KvCache, Llama, Result};
use serde::Serialize;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy (the most likely token); otherwise the softmax of `logits / temperature`.
    pub temperature: f32,
    /// Sample only from the smallest set of tokens whose probabilities reach `top_p`.
    pub top_p: f32,
    /// Seed of the draws.
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
}

/// What a generation did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generated {
    /// The new tokens (an end-of-text token that stopped it included).
    pub tokens: Vec<u32>,
    /// Whether an end-of-text token stopped it (else the length limit).
    pub stopped: bool,
    /// Seconds of the prompt's forward (prefill) and of the new tokens.
    pub prefill_s: f64,
    /// See `prefill_s`.
    pub decode_s: f64,
}

/// Continues `prompt` by up to `max_new` tokens, stopping after any of `stop`; `on_token`
/// sees each new token as it comes and may end the generation by returning `false`.
pub fn generate<B: Kernels>(
    model: &Llama<B>,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    stop: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generated> {
    let device = model.device();
    let ids = |t: &[u32]| {
        let data: Vec<i64> = t.iter().map(|&x| x as i64).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, t.len()]), &device)
    };
    let mut rng = SplitMix64(sampling.seed);
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let mut tokens = Vec::new();
    let mut stopped = false;
    let start = std::time::Instant::now();
    let mut input = prompt.to_vec();
    let (mut prefill_s, mut first) = (0.0, true);
    while tokens.len() < max_new && !input.is_empty() {
        let hidden = model.hidden_states_cached(ids(&input), &mut cache)?;
        let last = hidden.narrow(1, input.len() - 1, 1);
        let logits: Vec<f32> = model
            .logits(last)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 logits");
        if first {
            prefill_s = start.elapsed().as_secs_f64();
            first = false;
        }
        let next = choose(&logits, sampling, &mut rng);
        tokens.push(next);
        if stop.contains(&next) {
            stopped = true;
            on_token(next);
            break;
        }
        if !on_token(next) {
            break;
        }
        input = vec![next];
    }
    Ok(Generated {
        tokens,
        stopped,
        prefill_s,
        decode_s: start.elapsed().as_secs_f64() - prefill_s,
    })
}

/// The next token from one position's logits.
fn choose(logits: &[f32], s: Sampling, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, (((l - max) / s.temperature) as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // The nucleus: the most likely tokens until their mass reaches top_p.
    let mut mass = 0.0;
    let keep = probs
        .iter()
        .position(|p| {
            mass += p.1 / total;
            mass >= s.top_p as f64
        })
        .map_or(probs.len(), |i| i + 1);
    let nucleus = &probs[..keep];
    let kept: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * kept;
    for &(id, p) in nucleus {
        if u < p {
            return id;
        }
        u -= p;
    }
    nucleus[nucleus.len() - 1].0
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its text.
    pub content: String,
}

/// A model's chat template (`chat_template` in `tokenizer_config.json`) with its special
/// tokens.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Reads the template of the model directory `dir`; an error names the file when there is
    /// none.
    pub fn load(dir: &Path) -> std::result::Result<Self, String> {
        let path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: invalid JSON: {e}", path.display()))?;
        let token = |key: &str| -> String {
            match &config[key] {
                serde_json::Value::String(s) => s.clone(),
                v => v["content"].as_str().unwrap_or_default().to_string(),
            }
        };
        let source = config["chat_template"]
            .as_str()
            .ok_or_else(|| {
                format!(
                    "{}: no `chat_template`: the model has no chat format",
                    path.display()
                )
            })?
            .to_string();
        Ok(Self {
            source,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        })
    }

    /// The prompt text of `messages`, ending where the assistant's answer begins.
    pub fn render(&self, messages: &[Message]) -> std::result::Result<String, String> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |m: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    m,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| format!("the chat template does not parse: {e}"))?;
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => &self.bos_token,
                    eos_token => &self.eos_token,
                })
            })
            .map_err(|e| format!("the chat template failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top_p_keeps_the_nucleus() {
        let mut rng = SplitMix64(1);
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        assert_eq!(choose(&logits, Sampling::GREEDY, &mut rng), 1);
        // top_p small enough: only the most likely token remains.
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.1,
            seed: 0,
        };
        assert!((0..50).all(|_| choose(&logits, s, &mut rng) == 1));
        // Full nucleus at a high temperature: every token comes up.
        let s = Sampling {
            temperature: 10.0,
            top_p: 1.0,
            seed: 0,
        };
        let mut seen = [false; 4];
        for _ in 0..400 {
            seen[choose(&logits, s, &mut rng) as usize] = true;
        }
        assert!(seen.iter().all(|&x| x), "{seen:?}");
    }

    #[test]
    fn a_chat_template_renders_the_messages() {
        let t = ChatTemplate {
            source: "{% for m in messages %}<{{ m['role'] }}>{{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}".into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        };
        let m = vec![
            Message {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            Message {
                role: "user".into(),
                content: " Hi ".into(),
            },
        ];
        assert_eq!(
            t.render(&m).unwrap(),
            "<system>Be brief.\n<user>Hi\n<assistant>"
        );
    }
}
