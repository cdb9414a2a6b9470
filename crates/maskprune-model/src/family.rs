//! Model-family adapters: everything that differs between `llama`, `mistral`, `qwen2` and
//! `qwen3` lives here, so the rest of the code never tests `model_type`.

use serde_json::{Map, Value};

/// Which bias vectors a family's linear layers carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Biases {
    /// q_proj, k_proj and v_proj have a bias.
    pub qkv: bool,
    /// o_proj has a bias.
    pub o: bool,
    /// gate_proj, up_proj and down_proj have a bias.
    pub mlp: bool,
}

/// The units pruning removes: a query head, a KV head (with its query heads) or an MLP
/// channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// `head_dim` rows of `q_proj`, columns of `o_proj`.
    QueryHead,
    /// `head_dim` rows of `k_proj` and `v_proj`.
    KvHead,
    /// One row of `gate_proj` and `up_proj`, one column of `down_proj`.
    Channel,
}

/// How pruning slices a tensor, in the Hugging Face `[out, in]` layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slicing {
    /// Untouched (embeddings, norms, the LM head, per-head norms shared by the heads).
    Whole,
    /// Each unit owns a block of rows (of a bias: of entries).
    Rows(Unit),
    /// Each unit owns a block of columns.
    Cols(Unit),
}

/// The tensors of one decoder layer, named after `model.layers.{i}.`, and how units slice
/// them: the one place these names and slices are written down.
pub fn layer_tensors(family: Family, biases: Biases) -> Vec<(&'static str, Slicing)> {
    use Slicing::{Cols, Rows, Whole};
    use Unit::{Channel, KvHead, QueryHead};
    let mut t = vec![
        ("input_layernorm.weight", Whole),
        ("post_attention_layernorm.weight", Whole),
        // A buffer older transformers saved with LLaMA checkpoints (the model recomputes it).
        ("self_attn.rotary_emb.inv_freq", Whole),
        ("self_attn.q_proj.weight", Rows(QueryHead)),
        ("self_attn.k_proj.weight", Rows(KvHead)),
        ("self_attn.v_proj.weight", Rows(KvHead)),
        ("self_attn.o_proj.weight", Cols(QueryHead)),
        ("mlp.gate_proj.weight", Rows(Channel)),
        ("mlp.up_proj.weight", Rows(Channel)),
        ("mlp.down_proj.weight", Cols(Channel)),
    ];
    if biases.qkv {
        t.extend([
            ("self_attn.q_proj.bias", Rows(QueryHead)),
            ("self_attn.k_proj.bias", Rows(KvHead)),
            ("self_attn.v_proj.bias", Rows(KvHead)),
        ]);
    }
    if biases.o {
        t.push(("self_attn.o_proj.bias", Whole));
    }
    if biases.mlp {
        t.extend([
            ("mlp.gate_proj.bias", Rows(Channel)),
            ("mlp.up_proj.bias", Rows(Channel)),
            ("mlp.down_proj.bias", Whole),
        ]);
    }
    if family.qk_norm() {
        t.extend([
            ("self_attn.q_norm.weight", Whole),
            ("self_attn.k_norm.weight", Whole),
        ]);
    }
    t
}

/// The tensors outside the decoder layers (a tied checkpoint may leave out the LM head).
pub const OUTER_TENSORS: [&str; 3] = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
];

/// `(layer, name within the layer)` of a decoder-layer tensor name.
pub fn split_layer_name(name: &str) -> Option<(usize, &str)> {
    let (layer, tail) = name.strip_prefix("model.layers.")?.split_once('.')?;
    Some((layer.parse().ok()?, tail))
}

/// A supported decoder family. All share the LLaMA block (RMSNorm, RoPE, GQA, SwiGLU);
/// Qwen3 adds an RMSNorm over each query and key head before the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `model_type: llama` (LLaMA 1/2/3, SmolLM, TinyLlama, ...).
    Llama,
    /// `model_type: mistral`.
    Mistral,
    /// `model_type: qwen2`.
    Qwen2,
    /// `model_type: qwen3`.
    Qwen3,
}

impl Family {
    /// The family for a config's `model_type`, or `None` when unsupported.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Family::Llama),
            "mistral" => Some(Family::Mistral),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            _ => None,
        }
    }

    /// The `model_type` string written to `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// The transformers class that loads this family.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// llama.cpp's GGUF architecture for this family (mistral models are written as `llama`).
    pub fn gguf_architecture(self) -> &'static str {
        match self {
            Family::Llama | Family::Mistral => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// The family a GGUF architecture imports as, or `None` when unsupported.
    pub fn from_gguf_architecture(arch: &str) -> Option<Self> {
        match arch {
            "llama" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            _ => None,
        }
    }

    /// Whether llama.cpp stores this family's q/k rows interleaved per head (its `llama`
    /// rotary layout, which the converters permute into) rather than in Hugging Face's
    /// half-split order (`qwen2`, `qwen3`: NEOX-style rotary, rows as they are).
    pub fn gguf_permutes_qk(self) -> bool {
        !matches!(self, Family::Qwen2 | Family::Qwen3)
    }

    /// Whether each query and key head is RMS-normalised (weights `self_attn.q_norm` and
    /// `self_attn.k_norm`, `[head_dim]`, shared by the heads) before the rotary embedding.
    pub fn qk_norm(self) -> bool {
        matches!(self, Family::Qwen3)
    }

    /// Which linear layers carry biases, read the way transformers reads this family's config.
    pub fn biases(self, fields: &Map<String, Value>) -> Result<Biases, String> {
        let flag = |key: &str| -> Result<bool, String> {
            match fields.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(format!("`{key}` must be true or false, found {other}")),
            }
        };
        Ok(match self {
            Family::Llama | Family::Qwen3 => {
                let attention = flag("attention_bias")?;
                Biases {
                    qkv: attention,
                    o: attention,
                    mlp: flag("mlp_bias")?,
                }
            }
            Family::Mistral => Biases::default(),
            // Qwen2 always has q/k/v biases and no others.
            Family::Qwen2 => Biases {
                qkv: true,
                o: false,
                mlp: false,
            },
        })
    }

    /// The sliding attention window the family's config asks for, if any.
    pub fn sliding_window(self, fields: &Map<String, Value>) -> Result<Option<usize>, String> {
        let window =
            match fields.get("sliding_window") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| {
                    format!("`sliding_window` must be a positive integer, found {v}")
                })? as usize),
            };
        match self {
            Family::Llama => Ok(None),
            Family::Mistral => Ok(window),
            Family::Qwen2 | Family::Qwen3 => {
                let used = matches!(fields.get("use_sliding_window"), Some(Value::Bool(true)));
                if used {
                    Err("`use_sliding_window: true` (per-layer sliding-window attention) is not supported".into())
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// The RoPE base transformers uses when the config gives none.
    pub fn default_rope_theta(self) -> f64 {
        10_000.0
    }
}
