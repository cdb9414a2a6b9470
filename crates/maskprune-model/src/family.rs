//! Model-family adapters: everything that differs between `llama`, `mistral`, `qwen2`,
//! `qwen3` and `gemma3_text` lives here, so the rest of the code never tests `model_type`.

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

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU).
    Silu,
    /// `gelu_pytorch_tanh`: GELU with the tanh approximation (GeGLU, Gemma).
    GeluTanh,
}

/// The RMSNorms of one decoder layer, by role, named after `model.layers.{i}.`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerNorms {
    /// Before attention.
    pub attention_input: &'static str,
    /// Before the MLP.
    pub mlp_input: &'static str,
    /// On the attention output, before the residual add (Gemma's sandwich norms).
    pub attention_output: Option<&'static str>,
    /// On the MLP output, before the residual add.
    pub mlp_output: Option<&'static str>,
}

/// The tensors of one decoder layer, named after `model.layers.{i}.`, and how units slice
/// them: the one place these names and slices are written down.
pub fn layer_tensors(family: Family, biases: Biases) -> Vec<(&'static str, Slicing)> {
    use Slicing::{Cols, Rows, Whole};
    use Unit::{Channel, KvHead, QueryHead};
    let norms = family.layer_norms();
    let mut t: Vec<(&'static str, Slicing)> = [
        Some(norms.attention_input),
        Some(norms.mlp_input),
        norms.attention_output,
        norms.mlp_output,
    ]
    .into_iter()
    .flatten()
    .map(|n| (n, Whole))
    .collect();
    t.extend([
        (ROTARY_BUFFER, Whole),
        ("self_attn.q_proj.weight", Rows(QueryHead)),
        ("self_attn.k_proj.weight", Rows(KvHead)),
        ("self_attn.v_proj.weight", Rows(KvHead)),
        ("self_attn.o_proj.weight", Cols(QueryHead)),
        ("mlp.gate_proj.weight", Rows(Channel)),
        ("mlp.up_proj.weight", Rows(Channel)),
        ("mlp.down_proj.weight", Cols(Channel)),
    ]);
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
        t.extend(HEAD_NORMS.map(|n| (n, Whole)));
    }
    t
}

/// A buffer older transformers saved with LLaMA checkpoints (the model recomputes it, and
/// llama.cpp from `rope.freq_base`): kept by surgery, never exported or required.
pub const ROTARY_BUFFER: &str = "self_attn.rotary_emb.inv_freq";

/// The per-head RMSNorms of the queries and the keys (Qwen3, Gemma-3), `[head_dim]` each.
pub const HEAD_NORMS: [&str; 2] = ["self_attn.q_norm.weight", "self_attn.k_norm.weight"];

/// The token embeddings, `[vocab, hidden]`.
pub const EMBEDDINGS: &str = "model.embed_tokens.weight";
/// The final norm, `[hidden]`.
pub const FINAL_NORM: &str = "model.norm.weight";
/// The LM head, `[vocab, hidden]` (absent when tied to the embeddings).
pub const LM_HEAD: &str = "lm_head.weight";
/// The tensors outside the decoder layers (a tied checkpoint may leave out the LM head).
pub const OUTER_TENSORS: [&str; 3] = [EMBEDDINGS, FINAL_NORM, LM_HEAD];

/// The seven projections of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl Projection {
    /// All seven, attention first.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The short name (`q_proj`), as LoRA targets are written.
    pub fn short(self) -> &'static str {
        self.module().split_once('.').expect("module.proj").1
    }

    /// The module within a layer (`self_attn.q_proj`).
    pub fn module(self) -> &'static str {
        match self {
            Projection::Q => "self_attn.q_proj",
            Projection::K => "self_attn.k_proj",
            Projection::V => "self_attn.v_proj",
            Projection::O => "self_attn.o_proj",
            Projection::Gate => "mlp.gate_proj",
            Projection::Up => "mlp.up_proj",
            Projection::Down => "mlp.down_proj",
        }
    }

    /// The projection of a short name, `None` for anything else.
    pub fn from_short(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.short() == name)
    }
}

/// The full name of tensor `tail` (`mlp.up_proj.weight`) of decoder layer `layer`: the
/// inverse of [`split_layer_name`].
pub fn layer_tensor_name(layer: usize, tail: &str) -> String {
    format!("model.layers.{layer}.{tail}")
}

/// llama.cpp's `gemma3`: every 6th layer global, the others sliding.
const GEMMA3_GGUF_PATTERN: u64 = 6;
/// llama.cpp's `gemma3`: the RoPE base of the sliding layers.
const GEMMA3_GGUF_LOCAL_BASE: f64 = 10_000.0;

/// llama.cpp's names of the tensors outside the layers (`token_embd.weight`, ...).
pub const GGUF_OUTER_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", EMBEDDINGS),
    ("output_norm.weight", FINAL_NORM),
    ("output.weight", LM_HEAD),
];

/// `(layer, name within the layer)` of a decoder-layer tensor name.
pub fn split_layer_name(name: &str) -> Option<(usize, &str)> {
    let (layer, tail) = name.strip_prefix("model.layers.")?.split_once('.')?;
    Some((layer.parse().ok()?, tail))
}

/// A supported decoder family. All share the LLaMA block (RMSNorm, RoPE, GQA, a gated MLP);
/// Qwen3 adds an RMSNorm over each query and key head before the rotary embedding; Gemma-3
/// adds those too, GeGLU, norms after attention and MLP, `1 + w` norm weights, embeddings
/// scaled by `sqrt(hidden)`, `query_pre_attn_scalar`, and sliding-window layers with their
/// own RoPE base between global ones.
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
    /// `model_type: gemma3_text` (Gemma-3 270M and 1B, and the text part of larger ones).
    Gemma3,
}

impl Family {
    /// The family for a config's `model_type`, or `None` when unsupported.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Family::Llama),
            "mistral" => Some(Family::Mistral),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            "gemma3_text" => Some(Family::Gemma3),
            _ => None,
        }
    }

    /// Every `model_type` this crate reads.
    pub const MODEL_TYPES: &'static str = "llama, mistral, qwen2, qwen3, gemma3_text";

    /// The `model_type` string written to `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3_text",
        }
    }

    /// The transformers class that loads this family.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// llama.cpp's GGUF architecture for this family (mistral models are written as `llama`).
    pub fn gguf_architecture(self) -> &'static str {
        match self {
            Family::Llama | Family::Mistral => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3",
        }
    }

    /// The family a GGUF architecture imports as, or `None` when unsupported.
    pub fn from_gguf_architecture(arch: &str) -> Option<Self> {
        match arch {
            "llama" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            "gemma3" => Some(Family::Gemma3),
            _ => None,
        }
    }

    /// Whether llama.cpp stores this family's q/k rows interleaved per head (its `llama`
    /// rotary layout, which the converters permute into) rather than in Hugging Face's
    /// half-split order (`qwen2`, `qwen3`: NEOX-style rotary, rows as they are).
    pub fn gguf_permutes_qk(self) -> bool {
        !matches!(self, Family::Qwen2 | Family::Qwen3 | Family::Gemma3)
    }

    /// Whether each query and key head is RMS-normalised (weights `self_attn.q_norm` and
    /// `self_attn.k_norm`, `[head_dim]`, shared by the heads) before the rotary embedding.
    pub fn qk_norm(self) -> bool {
        matches!(self, Family::Qwen3 | Family::Gemma3)
    }

    /// The names of a layer's RMSNorms by role. Gemma's `post_attention_layernorm` is the
    /// norm on the attention *output*; LLaMA's is the one before the MLP.
    pub fn layer_norms(self) -> LayerNorms {
        match self {
            Family::Gemma3 => LayerNorms {
                attention_input: "input_layernorm.weight",
                mlp_input: "pre_feedforward_layernorm.weight",
                attention_output: Some("post_attention_layernorm.weight"),
                mlp_output: Some("post_feedforward_layernorm.weight"),
            },
            _ => LayerNorms {
                attention_input: "input_layernorm.weight",
                mlp_input: "post_attention_layernorm.weight",
                attention_output: None,
                mlp_output: None,
            },
        }
    }

    /// llama.cpp's module names within a layer and the Hugging Face ones they stand for
    /// (`blk.{i}.{gguf}.weight` ↔ `model.layers.{i}.{hf}.weight`, and `.bias`).
    pub fn gguf_layer_modules(self) -> Vec<(&'static str, &'static str)> {
        let mut m = vec![
            ("attn_norm", "input_layernorm"),
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("attn_q_norm", "self_attn.q_norm"),
            ("attn_k_norm", "self_attn.k_norm"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
        ];
        match self {
            Family::Gemma3 => m.extend([
                ("post_attention_norm", "post_attention_layernorm"),
                ("ffn_norm", "pre_feedforward_layernorm"),
                ("post_ffw_norm", "post_feedforward_layernorm"),
            ]),
            _ => m.push(("ffn_norm", "post_attention_layernorm")),
        }
        m
    }

    /// The `config.json` entries a GGUF of this family implies beyond the shared ones:
    /// llama.cpp keeps them implicit (Gemma-3: GeGLU, a global layer every 6th, local RoPE
    /// base 10,000, attention scaled by `head_dim^-1/2`, as its `gemma3` loader assumes for
    /// every size but 27B).
    pub fn gguf_config_entries(
        self,
        head_dim: u64,
        sliding_window: Option<u64>,
    ) -> Map<String, Value> {
        let mut m = Map::new();
        match self {
            Family::Gemma3 => {
                m.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
                m.insert("sliding_window".into(), sliding_window.into());
                m.insert("sliding_window_pattern".into(), GEMMA3_GGUF_PATTERN.into());
                m.insert("rope_local_base_freq".into(), GEMMA3_GGUF_LOCAL_BASE.into());
                m.insert("query_pre_attn_scalar".into(), head_dim.into());
            }
            _ => {
                m.insert("hidden_act".into(), "silu".into());
            }
        }
        m
    }

    /// The architecture metadata (after `{arch}.`) a GGUF export of `config` needs beyond
    /// the shared keys, or why llama.cpp's loader cannot represent it.
    pub fn gguf_extra_metadata(
        self,
        config: &crate::ModelConfig,
    ) -> Result<Vec<(&'static str, u64)>, String> {
        if self != Family::Gemma3 {
            return Ok(Vec::new());
        }
        let pattern: Vec<bool> = (0..config.num_hidden_layers)
            .map(|i| (i + 1) % GEMMA3_GGUF_PATTERN as usize != 0)
            .collect();
        if config.sliding_layers != pattern {
            return Err(
                "llama.cpp's gemma3 makes every 6th layer global; `layer_types` differ".into(),
            );
        }
        if config.local_rope_theta != Some(GEMMA3_GGUF_LOCAL_BASE) {
            return Err(format!(
                "llama.cpp's gemma3 uses RoPE base {GEMMA3_GGUF_LOCAL_BASE} on sliding layers, not {:?}",
                config.local_rope_theta
            ));
        }
        if config.query_scale.is_some() {
            return Err("llama.cpp's gemma3 scales attention by head_dim^-1/2; `query_pre_attn_scalar` differs from `head_dim`".into());
        }
        let window = config
            .sliding_window
            .ok_or("llama.cpp's gemma3 needs a `sliding_window`")?;
        Ok(vec![("attention.sliding_window", window as u64)])
    }

    /// What every stored RMSNorm weight is offset by: Gemma scales by `1 + w` (llama.cpp's
    /// converter stores `1 + w`, so GGUF import subtracts it and export adds it).
    pub fn norm_weight_offset(self) -> f32 {
        match self {
            Family::Gemma3 => 1.0,
            _ => 0.0,
        }
    }

    /// The factor the token embeddings are multiplied by on the way in (Gemma: `sqrt(hidden)`,
    /// rounded to f32 as transformers does); the tied LM head uses them unscaled.
    pub fn embedding_scale(self, hidden_size: usize) -> Option<f32> {
        match self {
            Family::Gemma3 => Some((hidden_size as f64).sqrt() as f32),
            _ => None,
        }
    }

    /// The MLP's activation, read the way transformers reads this family's config.
    pub fn activation(self, fields: &Map<String, Value>) -> Result<Activation, String> {
        let (key, default) = match self {
            Family::Gemma3 => ("hidden_activation", "gelu_pytorch_tanh"),
            _ => ("hidden_act", "silu"),
        };
        match fields.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(other) => Err(format!("`{key}` must be a string, found {other}")),
        }
        .and_then(|name| match name {
            "silu" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            other => Err(format!(
                "unsupported `{key}` \"{other}\" (supported: silu, gelu_pytorch_tanh)"
            )),
        })
    }

    /// The factor queries are multiplied by so that attention, which scales scores by
    /// `head_dim^-1/2`, scales them by the family's `query_pre_attn_scalar^-1/2` (Gemma).
    pub fn query_scale(
        self,
        fields: &Map<String, Value>,
        head_dim: usize,
    ) -> Result<Option<f64>, String> {
        if self != Family::Gemma3 {
            return Ok(None);
        }
        let scalar = match fields.get("query_pre_attn_scalar") {
            None | Some(Value::Null) => 256.0,
            Some(v) => v.as_f64().filter(|x| *x > 0.0).ok_or_else(|| {
                format!("`query_pre_attn_scalar` must be a positive number, found {v}")
            })?,
        };
        Ok(Some((head_dim as f64 / scalar).sqrt()).filter(|s| *s != 1.0))
    }

    /// Config switches of this family that this crate cannot honour, as an error naming one.
    pub fn refuse_unsupported(self, fields: &Map<String, Value>) -> Result<(), String> {
        if self != Family::Gemma3 {
            return Ok(());
        }
        for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if !matches!(fields.get(key), None | Some(Value::Null)) {
                return Err(format!("`{key}` (tanh soft-capping) is not supported"));
            }
        }
        if matches!(
            fields.get("use_bidirectional_attention"),
            Some(Value::Bool(true))
        ) {
            return Err("`use_bidirectional_attention: true` is not supported".into());
        }
        Ok(())
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
            Family::Llama | Family::Qwen3 | Family::Gemma3 => {
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

    /// The sliding attention window the family's config asks for, if any, and which of the
    /// `layers` layers attend through it (Mistral: all; Gemma-3: its `layer_types`).
    pub fn sliding_window(
        self,
        fields: &Map<String, Value>,
        layers: usize,
    ) -> Result<(Option<usize>, Vec<bool>), String> {
        let window = self.window(fields)?;
        let sliding = match (self, window) {
            (_, None) => vec![false; layers],
            (Family::Gemma3, Some(_)) => gemma_layer_types(fields, layers)?,
            (_, Some(_)) => vec![true; layers],
        };
        Ok((window, sliding))
    }

    fn window(self, fields: &Map<String, Value>) -> Result<Option<usize>, String> {
        let window =
            match fields.get("sliding_window") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| {
                    format!("`sliding_window` must be a positive integer, found {v}")
                })? as usize),
            };
        match self {
            Family::Llama => Ok(None),
            // transformers' Gemma-3 default window when the key is absent (null: none).
            Family::Gemma3 if !fields.contains_key("sliding_window") => Ok(Some(4096)),
            Family::Gemma3 => Ok(window),
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
        match self {
            Family::Gemma3 => 1_000_000.0,
            _ => 10_000.0,
        }
    }
}

/// Gemma-3's `layer_types` (`sliding_attention` / `full_attention` per layer), or, in older
/// configs, every `sliding_window_pattern`-th layer (default 6) global.
fn gemma_layer_types(fields: &Map<String, Value>, layers: usize) -> Result<Vec<bool>, String> {
    match fields.get("layer_types") {
        None | Some(Value::Null) => {
            let pattern = match fields.get("sliding_window_pattern") {
                None | Some(Value::Null) => 6,
                Some(v) => v.as_u64().filter(|&p| p > 0).ok_or_else(|| {
                    format!("`sliding_window_pattern` must be a positive integer, found {v}")
                })? as usize,
            };
            Ok((0..layers).map(|i| (i + 1) % pattern != 0).collect())
        }
        Some(Value::Array(kinds)) if kinds.len() == layers => kinds
            .iter()
            .map(|k| match k.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(format!(
                    "`layer_types` entries must be \"sliding_attention\" or \"full_attention\", found {k}"
                )),
            })
            .collect(),
        Some(other) => Err(format!(
            "`layer_types` must be a list of {layers} layer types, found {other}"
        )),
    }
}
