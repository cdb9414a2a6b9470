//! `config.json` of a Hugging Face LLaMA-family checkpoint, parsed strictly: every field
//! this crate cannot honour is an error that names it.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};
use crate::family::{
    layer_tensors, split_layer_name, Activation, Biases, Family, Projection, EMBEDDINGS,
    FINAL_NORM, HEAD_NORMS, LM_HEAD,
};

/// Frequency scaling of the rotary embedding (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `linear`: every inverse frequency divided by `factor`.
    Linear {
        /// Position interpolation factor.
        factor: f64,
    },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// Scale applied to low frequencies.
        factor: f64,
        /// Wavelength threshold (as a fraction of the original context) of the low band.
        low_freq_factor: f64,
        /// Wavelength threshold of the high band.
        high_freq_factor: f64,
        /// Context length the model was pretrained on.
        original_max_position_embeddings: f64,
    },
}

/// The architecture of a LLaMA-family decoder, as read from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The family adapter (`model_type`).
    pub family: Family,
    /// Rows of the embedding matrix and of the LM head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key/value heads per layer (grouped-query attention when smaller than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding.
    pub rope_theta: f64,
    /// Optional frequency scaling of the rotary embedding.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model was configured for.
    pub max_position_embeddings: usize,
    /// The LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Which linear layers have biases.
    pub biases: Biases,
    /// Sliding attention window (Mistral, Gemma-3) of the layers in `sliding_layers`.
    pub sliding_window: Option<usize>,
    /// Per layer, whether it attends through the sliding window (all of Mistral's layers;
    /// Gemma-3's `sliding_attention` layers).
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the sliding-window layers where it differs from the global one
    /// (Gemma-3's local base; unscaled).
    pub local_rope_theta: Option<f64>,
    /// The MLP's gate activation.
    pub activation: Activation,
    /// Factor applied to the queries so attention scales scores by the family's own
    /// constant instead of `head_dim^-1/2` (Gemma-3's `query_pre_attn_scalar`).
    pub query_scale: Option<f64>,
    /// Beginning-of-sequence token id, if any.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
    /// The whole JSON object, kept so a pruned config can be written with the same extra fields.
    pub raw: Map<String, Value>,
}

/// Largest width or count accepted in a config; anything above is surely corrupt.
const MAX_DIM: u64 = 1 << 24;

impl ModelConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::new(path, format!("cannot read config: {e}")))?;
        Self::from_json_str(&text).map_err(|message| ModelError::new(path, message))
    }

    /// Parses and validates a `config.json` document; the error is a one-line cause.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(fields) = value else {
            return Err("config.json must be a JSON object".into());
        };
        Self::from_fields(fields)
    }

    fn from_fields(fields: Map<String, Value>) -> std::result::Result<Self, String> {
        let model_type = match fields.get("model_type") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(format!("`model_type` must be a string, found {other}")),
            None => return Err("missing field `model_type`".into()),
        };
        let family = Family::from_model_type(&model_type).ok_or_else(|| {
            let hint = if model_type == "gemma3" {
                "; use the text model's config (`text_config`, model_type gemma3_text)"
            } else {
                ""
            };
            format!(
                "unsupported `model_type` \"{model_type}\" (supported: {}){hint}",
                Family::MODEL_TYPES
            )
        })?;
        family.refuse_unsupported(&fields)?;
        let dim = |key: &str| -> std::result::Result<usize, String> {
            let v = fields
                .get(key)
                .ok_or_else(|| format!("missing field `{key}`"))?;
            match v.as_u64() {
                Some(0) => Err(format!("`{key}` must be positive, found 0")),
                Some(n) if n > MAX_DIM => Err(format!("`{key}` = {n} is absurdly large")),
                Some(n) => Ok(n as usize),
                None => Err(format!("`{key}` must be a positive integer, found {v}")),
            }
        };
        let hidden_size = dim("hidden_size")?;
        let intermediate_size = dim("intermediate_size")?;
        let num_hidden_layers = dim("num_hidden_layers")?;
        let num_attention_heads = dim("num_attention_heads")?;
        let num_key_value_heads = match fields.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => dim("num_key_value_heads")?,
        };
        let vocab_size = dim("vocab_size")?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "`num_attention_heads` ({num_attention_heads}) is not a multiple of `num_key_value_heads` ({num_key_value_heads})"
            ));
        }
        let head_dim = match fields.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(format!(
                        "`hidden_size` ({hidden_size}) is not a multiple of `num_attention_heads` ({num_attention_heads}) and no `head_dim` is given"
                    ));
                }
                hidden_size / num_attention_heads
            }
            Some(_) => dim("head_dim")?,
        };
        if head_dim % 2 != 0 {
            return Err(format!(
                "`head_dim` ({head_dim}) must be even for rotary embeddings"
            ));
        }
        let activation = family.activation(&fields)?;
        let query_scale = family.query_scale(&fields, head_dim)?;
        let max_position_embeddings = match fields.get("max_position_embeddings") {
            None | Some(Value::Null) => 2048,
            Some(_) => dim("max_position_embeddings")?,
        };
        let rms_norm_eps = positive_float(&fields, "rms_norm_eps")?.unwrap_or(1e-6);
        let (rope_theta, rope_scaling, local_rope_theta) =
            parse_rope(&fields, family, max_position_embeddings)?;
        let tie_word_embeddings = match fields.get("tie_word_embeddings") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(format!(
                    "`tie_word_embeddings` must be true or false, found {other}"
                ))
            }
        };
        let biases = family.biases(&fields)?;
        let (sliding_window, sliding_layers) = family.sliding_window(&fields, num_hidden_layers)?;
        let bos_token_id = token_ids(&fields, "bos_token_id")?.first().copied();
        let eos_token_ids = token_ids(&fields, "eos_token_id")?;
        for id in bos_token_id.iter().chain(&eos_token_ids) {
            if *id as usize >= vocab_size {
                return Err(format!(
                    "special token id {id} is outside `vocab_size` ({vocab_size})"
                ));
            }
        }
        Ok(Self {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings,
            biases,
            sliding_window,
            sliding_layers,
            local_rope_theta,
            activation,
            query_scale,
            bos_token_id,
            eos_token_ids,
            raw: fields,
        })
    }

    /// Query heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parameters of one decoder layer's linear weights (biases and norms excluded).
    pub fn layer_linear_params(&self) -> usize {
        Projection::ALL
            .into_iter()
            .map(|p| self.projection_shape(p).iter().product::<usize>())
            .sum()
    }

    /// The weight shape of a projection, PyTorch's `[out, in]`.
    pub fn projection_shape(&self, p: Projection) -> [usize; 2] {
        let (h, q, kv, f) = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
            self.intermediate_size,
        );
        match p {
            Projection::Q => [q, h],
            Projection::K | Projection::V => [kv, h],
            Projection::O => [h, q],
            Projection::Gate | Projection::Up => [f, h],
            Projection::Down => [h, f],
        }
    }

    /// The shape (Hugging Face `[out, in]`) of the checkpoint tensor `name` of this
    /// architecture, or `None` when the architecture has no such tensor.
    pub fn tensor_shape(&self, name: &str) -> Option<Vec<usize>> {
        let (h, d) = (self.hidden_size, self.head_dim);
        match name {
            EMBEDDINGS | LM_HEAD => return Some(vec![self.vocab_size, h]),
            FINAL_NORM => return Some(vec![h]),
            _ => {}
        }
        let (layer, tail) = split_layer_name(name)?;
        if layer >= self.num_hidden_layers
            || !layer_tensors(self.family, self.biases)
                .iter()
                .any(|(n, _)| *n == tail)
        {
            return None;
        }
        let (module, kind) = tail.rsplit_once('.')?;
        if let Some(p) = Projection::ALL.into_iter().find(|p| p.module() == module) {
            let [out, input] = self.projection_shape(p);
            return Some(if kind == "weight" {
                vec![out, input]
            } else {
                vec![out]
            });
        }
        Some(if HEAD_NORMS.contains(&tail) {
            vec![d]
        } else if kind == "inv_freq" {
            vec![d / 2]
        } else {
            vec![h] // the layer norms
        })
    }

    /// Every parameter of the model, as transformers counts them (tied weights once).
    pub fn total_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut layer = self.layer_linear_params() + 2 * h;
        if self.biases.qkv {
            layer += q + 2 * kv;
        }
        if self.biases.o {
            layer += h;
        }
        if self.biases.mlp {
            layer += 2 * self.intermediate_size + h;
        }
        if self.family.qk_norm() {
            layer += 2 * self.head_dim;
        }
        let norms = self.family.layer_norms();
        if norms.attention_output.is_some() {
            layer += h;
        }
        if norms.mlp_output.is_some() {
            layer += h;
        }
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }
}

fn positive_float(
    fields: &Map<String, Value>,
    key: &str,
) -> std::result::Result<Option<f64>, String> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x > 0.0 && x.is_finite() => Ok(Some(x)),
            _ => Err(format!("`{key}` must be a positive number, found {v}")),
        },
    }
}

fn token_ids(fields: &Map<String, Value>, key: &str) -> std::result::Result<Vec<u32>, String> {
    let one = |v: &Value| {
        v.as_u64()
            .filter(|&n| n <= u32::MAX as u64)
            .map(|n| n as u32)
            .ok_or_else(|| format!("`{key}` must be a token id or a list of them, found {v}"))
    };
    match fields.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// Reads the RoPE base and scaling from `rope_parameters` (transformers 5), `rope_scaling`
/// (older configs) and the top-level `rope_theta`, with transformers' precedence; and, for
/// Gemma-3, the sliding layers' base (`rope_parameters.sliding_attention` or
/// `rope_local_base_freq`, default 10,000), whose RoPE must be unscaled.
fn parse_rope(
    fields: &Map<String, Value>,
    family: Family,
    max_position_embeddings: usize,
) -> std::result::Result<(f64, Option<RopeScaling>, Option<f64>), String> {
    let empty = Map::new();
    let by_layer_type = match fields.get("rope_parameters") {
        Some(Value::Object(p)) if family == Family::Gemma3 => Some(p),
        _ => None,
    };
    let sub = |kind: &str| -> std::result::Result<&Map<String, Value>, String> {
        match by_layer_type.and_then(|p| p.get(kind)) {
            None | Some(Value::Null) => Ok(&empty),
            Some(Value::Object(p)) => Ok(p),
            Some(other) => Err(format!(
                "`rope_parameters.{kind}` must be an object, found {other}"
            )),
        }
    };
    let (key, params) = match (
        by_layer_type,
        fields.get("rope_parameters"),
        fields.get("rope_scaling"),
    ) {
        (Some(_), _, _) => (
            "rope_parameters.full_attention",
            Some(sub("full_attention")?),
        ),
        (None, Some(Value::Object(p)), _) => ("rope_parameters", Some(p)),
        (None, _, Some(Value::Object(p))) => ("rope_scaling", Some(p)),
        (None, _, None | Some(Value::Null)) => ("rope_scaling", None),
        (None, _, Some(other)) => {
            return Err(format!(
                "`rope_scaling` must be an object or null, found {other}"
            ))
        }
    };
    let fallback = positive_float(fields, "rope_theta")?.unwrap_or(family.default_rope_theta());
    let (theta, scaling) = rope_params(
        key,
        params.unwrap_or(&empty),
        fields,
        fallback,
        max_position_embeddings,
    )?;
    if family != Family::Gemma3 {
        return Ok((theta, scaling, None));
    }
    let local_key = "rope_parameters.sliding_attention";
    let local_fallback = positive_float(fields, "rope_local_base_freq")?.unwrap_or(10_000.0);
    let (local, local_scaling) = rope_params(
        local_key,
        sub("sliding_attention")?,
        fields,
        local_fallback,
        max_position_embeddings,
    )?;
    if local_scaling.is_some() {
        return Err(format!(
            "`{local_key}`: scaled RoPE on sliding-window layers is not supported"
        ));
    }
    Ok((theta, scaling, Some(local)))
}

/// The base and scaling of one RoPE parameter object (`key` names it in errors).
fn rope_params(
    key: &str,
    params: &Map<String, Value>,
    fields: &Map<String, Value>,
    fallback_theta: f64,
    max_position_embeddings: usize,
) -> std::result::Result<(f64, Option<RopeScaling>), String> {
    let theta = positive_float(params, "rope_theta")
        .map_err(|e| format!("{key}: {e}"))?
        .unwrap_or(fallback_theta);
    if let Some(v) = params
        .get("partial_rotary_factor")
        .or(fields.get("partial_rotary_factor"))
    {
        if v.as_f64() != Some(1.0) {
            return Err(format!(
                "`partial_rotary_factor` {v} is not supported (only 1.0)"
            ));
        }
    }
    let rope_type = params
        .get("rope_type")
        .or(params.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |name: &str| -> std::result::Result<f64, String> {
        positive_float(params, name)
            .map_err(|e| format!("{key}: {e}"))?
            .ok_or_else(|| format!("`{key}` of type {rope_type} is missing `{name}`"))
    };
    let scaling = match rope_type {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: number("factor")?,
        }),
        "llama3" => {
            let original = match params.get("original_max_position_embeddings") {
                None | Some(Value::Null) => fields
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_f64)
                    .unwrap_or(max_position_embeddings as f64),
                Some(_) => number("original_max_position_embeddings")?,
            };
            let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
            if high <= low {
                return Err(format!(
                    "`{key}`: `high_freq_factor` ({high}) must exceed `low_freq_factor` ({low})"
                ));
            }
            Some(RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            })
        }
        other => {
            return Err(format!(
                "unsupported `{key}` type \"{other}\" (supported: default, linear, llama3)"
            ))
        }
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": [2, 3]
        })
    }

    fn parse(v: Value) -> std::result::Result<ModelConfig, String> {
        ModelConfig::from_json_str(&v.to_string())
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = base();
        v[key] = value;
        v
    }

    fn without(key: &str) -> Value {
        let mut v = base();
        v.as_object_mut().unwrap().remove(key);
        v
    }

    #[test]
    fn parses_a_gqa_llama_config() {
        let c = parse(base()).unwrap();
        assert_eq!(c.family, Family::Llama);
        assert_eq!((c.head_dim, c.group_size()), (16, 2));
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.bos_token_id, Some(1));
        assert!(c.rope_scaling.is_none());
        assert_eq!(c.biases, Biases::default());
    }

    #[test]
    fn counts_parameters_like_transformers() {
        // SmolLM2-135M: 134,515,008 parameters with tied embeddings.
        let c = parse(serde_json::json!({
            "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "vocab_size": 49152, "tie_word_embeddings": true
        }))
        .unwrap();
        assert_eq!(c.total_params(), 134_515_008);
    }

    #[test]
    fn explicit_head_dim_wins() {
        let c = parse(with("head_dim", 32.into())).unwrap();
        assert_eq!(c.head_dim, 32);
    }

    #[test]
    fn family_adapters_set_biases_and_windows() {
        let q = parse(with("model_type", "qwen2".into())).unwrap();
        assert_eq!(
            q.biases,
            Biases {
                qkv: true,
                o: false,
                mlp: false
            }
        );
        let mut m = with("model_type", "mistral".into());
        m["sliding_window"] = 4096.into();
        assert_eq!(parse(m).unwrap().sliding_window, Some(4096));
        let mut l = with("attention_bias", true.into());
        l["mlp_bias"] = true.into();
        let l = parse(l).unwrap();
        assert_eq!(
            l.biases,
            Biases {
                qkv: true,
                o: true,
                mlp: true
            }
        );
    }

    #[test]
    fn reads_gemma3_configs_old_and_new() {
        // As transformers 5 writes it: layer types and RoPE per layer type.
        let mut v = with("model_type", "gemma3_text".into());
        v["layer_types"] = serde_json::json!(["sliding_attention", "full_attention"]);
        v["sliding_window"] = 512.into();
        v["head_dim"] = 32.into();
        v["query_pre_attn_scalar"] = 8.into();
        v["rope_parameters"] = serde_json::json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}
        });
        let c = parse(v).unwrap();
        assert_eq!(c.family, Family::Gemma3);
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!(
            (c.sliding_window, c.sliding_layers.clone()),
            (Some(512), vec![true, false])
        );
        assert_eq!((c.rope_theta, c.local_rope_theta), (1e6, Some(1e4)));
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        assert_eq!(c.query_scale, Some(2.0)); // sqrt(32 / 8)
                                              // As the hub's configs have it: a pattern, top-level bases, the default window.
        let mut v = with("model_type", "gemma3_text".into());
        v["num_hidden_layers"] = 7.into();
        v["rope_local_base_freq"] = 5000.0.into();
        v["sliding_window_pattern"] = 3.into();
        let c = parse(v).unwrap();
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(
            c.sliding_layers,
            vec![true, true, false, true, true, false, true]
        );
        assert_eq!((c.rope_theta, c.local_rope_theta), (10000.0, Some(5000.0)));
        assert_eq!(c.query_scale, Some((16.0f64 / 256.0).sqrt()));
    }

    #[test]
    fn reads_rope_from_transformers5_rope_parameters() {
        let mut v = without("rope_theta");
        v["rope_parameters"] = serde_json::json!({
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
        });
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0)
        );
    }

    #[test]
    fn reads_legacy_rope_scaling() {
        let v = with(
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 2.0}),
        );
        let c = parse(v).unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(c.rope_theta, 10000.0);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(Value, &str)> = vec![
            (without("hidden_size"), "missing field `hidden_size`"),
            (
                with("model_type", "gpt2".into()),
                "unsupported `model_type` \"gpt2\"",
            ),
            (without("model_type"), "missing field `model_type`"),
            (
                with("num_key_value_heads", 3.into()),
                "not a multiple of `num_key_value_heads`",
            ),
            (
                with("hidden_size", "big".into()),
                "`hidden_size` must be a positive integer",
            ),
            (
                with("hidden_size", 0.into()),
                "`hidden_size` must be positive",
            ),
            (
                with("intermediate_size", (1u64 << 40).into()),
                "absurdly large",
            ),
            (
                with("hidden_act", "gelu".into()),
                "unsupported `hidden_act`",
            ),
            (
                with(
                    "rope_scaling",
                    serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
                ),
                "unsupported `rope_scaling` type \"yarn\"",
            ),
            (
                with("rope_scaling", serde_json::json!({"rope_type": "linear"})),
                "missing `factor`",
            ),
            (
                with("rms_norm_eps", (-1.0).into()),
                "`rms_norm_eps` must be a positive number",
            ),
            (with("eos_token_id", 999.into()), "outside `vocab_size`"),
            (with("head_dim", 15.into()), "must be even"),
            (
                with("tie_word_embeddings", "yes".into()),
                "`tie_word_embeddings` must be true or false",
            ),
            (
                with("partial_rotary_factor", 0.5.into()),
                "`partial_rotary_factor`",
            ),
        ];
        for (value, expected) in cases {
            let err = parse(value).unwrap_err();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
            assert!(!err.contains('\n'), "multi-line error: {err:?}");
        }
        let gemma = |key: &str, value: Value| {
            let mut v = with("model_type", "gemma3_text".into());
            v[key] = value;
            v
        };
        for (value, expected) in [
            (
                gemma("final_logit_softcapping", 30.0.into()),
                "`final_logit_softcapping`",
            ),
            (
                gemma("layer_types", serde_json::json!(["full_attention"])),
                "`layer_types` must be a list of 2",
            ),
            (
                gemma("layer_types", serde_json::json!(["local", "global"])),
                "`layer_types` entries",
            ),
            (
                gemma("hidden_activation", "relu".into()),
                "unsupported `hidden_activation` \"relu\"",
            ),
            (
                gemma(
                    "rope_parameters",
                    serde_json::json!({"sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
                ),
                "scaled RoPE on sliding-window layers",
            ),
            (
                with("model_type", "gemma3".into()),
                "model_type gemma3_text",
            ),
        ] {
            let err = parse(value).unwrap_err();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
        let mut qwen = with("model_type", "qwen2".into());
        qwen["use_sliding_window"] = true.into();
        assert!(parse(qwen).unwrap_err().contains("use_sliding_window"));
        assert!(ModelConfig::from_json_str("{\"model_type\": ")
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(ModelConfig::from_json_str("[1]")
            .unwrap_err()
            .contains("JSON object"));
    }
}
