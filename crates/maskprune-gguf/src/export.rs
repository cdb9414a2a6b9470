//! Hugging Face directory to GGUF as llama.cpp reads it: the `llama` (llama, mistral) or
//! `qwen2` or `qwen3` architecture's metadata (with the pruned shapes: `attention.key_length` /
//! `value_length` when `head_dim` is not `hidden / heads`, `rope.dimension_count = head_dim`,
//! the KV heads, the feed-forward length), the byte-level BPE tokenizer rebuilt from
//! `tokenizer.json` and the chat template, q/k rows permuted into llama.cpp's rotary layout
//! (`llama` only), and the weights encoded as asked. A tensor whose rows do not fill the
//! type's blocks falls back to a type whose blocks they fill; the file lists those in
//! `maskprune.fallback_tensors`.

use std::collections::BTreeMap;
use std::path::Path;

use maskprune_model::family::{split_layer_name, GGUF_OUTER_TENSORS, ROTARY_BUFFER};
use maskprune_model::output::write_file_atomically;
use maskprune_model::{Family, ModelConfig, ModelError, WeightStore};
use serde_json::Value;

use crate::quant::{quantize, GgmlType};
use crate::reader::MetaValue;
use crate::tokenizer::pre_tokenizer_name;
use crate::writer::GgufWriter;

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of the file.
    pub bytes: usize,
    /// Tensors per type written.
    pub types: BTreeMap<String, usize>,
    /// Tensors written in another type than asked, and that type.
    pub fallbacks: Vec<(String, GgmlType)>,
}

/// llama.cpp's `general.file_type` for a requested type.
fn file_type(ty: GgmlType) -> u64 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q8_0 => 7,
        GgmlType::Q4K => 15, // Q4_K_M: what llama.cpp calls a mostly-Q4_K file
        GgmlType::Q6K => 18,
        GgmlType::BF16 => 32,
        other => panic!("no file type for {other:?}"),
    }
}

/// The type a tensor of rows of `row` values gets when `asked` is requested: 1-D tensors
/// (norms) stay F32; a quantised type whose blocks the rows do not fill falls back to Q8_0
/// (blocks of 32), then to F16.
fn tensor_type(asked: GgmlType, shape: &[usize]) -> GgmlType {
    if shape.len() < 2 {
        return GgmlType::F32;
    }
    let row = shape[shape.len() - 1];
    [asked, GgmlType::Q8_0]
        .into_iter()
        .find(|t| row.is_multiple_of(t.block_size()))
        .unwrap_or(GgmlType::F16)
}

/// llama.cpp's rotary layout for q/k rows (the inverse of
/// [`crate::import::unpermute_rows`]): within each head, HF row `p * (d/2) + i` becomes row
/// `2i + p`.
pub fn permute_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    crate::import::reorder_rotary_rows(data, heads, cols, true)
}

/// The GGUF name of a Hugging Face tensor of `family` (the family's one table of names).
fn gguf_name(family: Family, hf: &str, layers: usize) -> Option<String> {
    if let Some((g, _)) = GGUF_OUTER_TENSORS.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, tail) = split_layer_name(hf)?;
    if layer >= layers {
        return None;
    }
    let (module, kind) = tail.rsplit_once('.')?;
    let (gguf, _) = family
        .gguf_layer_modules()
        .into_iter()
        .find(|(_, h)| *h == module)?;
    Some(format!("blk.{layer}.{gguf}.{kind}"))
}

/// Writes the model directory `dir` as a GGUF file `out` (atomically) with its weights in
/// `ty` (F32, F16, BF16, Q8_0, Q4_0, Q4_K or Q6_K); `progress` is called after each tensor.
pub fn export_gguf(
    dir: &Path,
    out: &Path,
    ty: GgmlType,
    overwrite: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportReport, ModelError> {
    if out.exists() && !overwrite {
        return Err(ModelError::new(
            out,
            "output file already exists (pass --overwrite to replace it)",
        ));
    }
    if !ty.encodable() {
        return Err(ModelError::new(
            out,
            format!("cannot write {} tensors", ty.name()),
        ));
    }
    let config_path = dir.join("config.json");
    let c = ModelConfig::from_file(&config_path)?;
    let bad = |m: String| ModelError::new(&config_path, m);
    let arch = c.family.gguf_architecture();
    let extra = c.family.gguf_extra_metadata(&c).map_err(bad)?;
    // The architecture's own metadata keys: `llama.block_count`, `qwen2.block_count`, ...
    let key = |k: &str| format!("{arch}.{k}");
    if matches!(
        c.rope_scaling,
        Some(maskprune_model::RopeScaling::Llama3 { .. })
    ) {
        return Err(bad(
            "llama3 rope scaling (llama.cpp's rope_freqs tensor) is not written yet".into(),
        ));
    }
    let mut w = GgufWriter::default();
    let name = dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let u = |v: usize| MetaValue::Uint(v as u64);
    w.meta("general.architecture", MetaValue::Str(arch.into()));
    w.meta("general.name", MetaValue::Str(name));
    w.meta("general.file_type", MetaValue::Uint(file_type(ty)));
    if !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        w.meta("general.quantization_version", MetaValue::Uint(2));
    }
    w.meta(&key("context_length"), u(c.max_position_embeddings));
    w.meta(&key("embedding_length"), u(c.hidden_size));
    w.meta(&key("block_count"), u(c.num_hidden_layers));
    w.meta(&key("feed_forward_length"), u(c.intermediate_size));
    w.meta(&key("attention.head_count"), u(c.num_attention_heads));
    w.meta(&key("attention.head_count_kv"), u(c.num_key_value_heads));
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        w.meta(&key("attention.key_length"), u(c.head_dim));
        w.meta(&key("attention.value_length"), u(c.head_dim));
    }
    w.meta(&key("rope.dimension_count"), u(c.head_dim));
    w.meta(&key("rope.freq_base"), MetaValue::Float(c.rope_theta));
    if let Some(maskprune_model::RopeScaling::Linear { factor }) = &c.rope_scaling {
        w.meta(&key("rope.scaling.type"), MetaValue::Str("linear".into()));
        w.meta(&key("rope.scaling.factor"), MetaValue::Float(*factor));
    }
    w.meta(
        &key("attention.layer_norm_rms_epsilon"),
        MetaValue::Float(c.rms_norm_eps),
    );
    w.meta(&key("vocab_size"), u(c.vocab_size));
    for (k, v) in extra {
        w.meta(&key(k), MetaValue::Uint(v));
    }
    tokenizer_metadata(dir, &c, &mut w)?;

    let store = WeightStore::open(dir)?;
    let names: Vec<String> = store.names().into_iter().map(String::from).collect();
    let mut report = ExportReport {
        tensors: 0,
        bytes: 0,
        types: BTreeMap::new(),
        fallbacks: Vec::new(),
    };
    for (done, hf) in names.iter().enumerate() {
        progress(done, names.len());
        if hf.ends_with(&format!(".{ROTARY_BUFFER}")) {
            continue;
        }
        let gguf = gguf_name(c.family, hf, c.num_hidden_layers).ok_or_else(|| {
            ModelError::new(dir, format!("tensor `{hf}` has no llama.cpp equivalent"))
        })?;
        if gguf == "output.weight" && c.tie_word_embeddings {
            continue;
        }
        let shape = store.shape(hf).expect("a listed tensor").to_vec();
        let mut values = store.read_f32(hf, &shape)?;
        if hf.ends_with("norm.weight") {
            let offset = c.family.norm_weight_offset();
            values.iter_mut().for_each(|v| *v += offset);
        }
        let cols = if shape.len() == 1 {
            1
        } else {
            shape[shape.len() - 1]
        };
        // llama.cpp's `llama` rotary layout; qwen2 keeps Hugging Face's row order.
        let permuted = c.family.gguf_permutes_qk();
        if permuted && gguf.contains(".attn_q.") {
            values = permute_rows(&values, c.num_attention_heads, cols);
        } else if permuted && gguf.contains(".attn_k.") {
            values = permute_rows(&values, c.num_key_value_heads, cols);
        }
        let t = tensor_type(ty, &shape);
        if t != ty && shape.len() >= 2 {
            report.fallbacks.push((gguf.clone(), t));
        }
        *report.types.entry(t.name().to_string()).or_default() += 1;
        w.tensor(&gguf, &shape, t, quantize(t, &values));
        report.tensors += 1;
    }
    if !report.fallbacks.is_empty() {
        let list = report
            .fallbacks
            .iter()
            .map(|(n, t)| MetaValue::Str(format!("{n}={}", t.name())))
            .collect();
        w.meta("maskprune.fallback_tensors", MetaValue::Array(list));
    }
    let bytes = w.to_bytes();
    report.bytes = bytes.len();
    write_file_atomically(out, &bytes)?;
    Ok(report)
}

/// The tokenizer's GGUF metadata from `tokenizer.json` (byte-level BPE) and
/// `tokenizer_config.json` (special tokens, chat template).
fn tokenizer_metadata(dir: &Path, c: &ModelConfig, w: &mut GgufWriter) -> Result<(), ModelError> {
    let path = dir.join("tokenizer.json");
    let read = |p: &Path| -> Result<Value, ModelError> {
        let text = std::fs::read_to_string(p)
            .map_err(|e| ModelError::new(p, format!("cannot read: {e}")))?;
        serde_json::from_str(&text).map_err(|e| ModelError::new(p, format!("invalid JSON: {e}")))
    };
    let tokenizer = read(&path)?;
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() {
        read(&config_path)?
    } else {
        Value::Null
    };
    let bad = |m: String| ModelError::new(&path, m);
    let model = &tokenizer["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        return Err(bad(
            "only byte-level BPE tokenizers (llama.cpp's `gpt2` model) are exported".into(),
        ));
    }
    let pre = match config["gguf_pre_tokenizer"].as_str() {
        Some(p) => p.to_string(),
        None => pre_tokenizer_name(&tokenizer["pre_tokenizer"]).map_err(bad)?,
    };
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("no `model.vocab`".into()))?;
    let mut tokens = vec![None; c.vocab_size];
    let mut types = vec![1u64; c.vocab_size]; // normal
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("token `{token}` has no id")))? as usize;
        if id < tokens.len() {
            tokens[id] = Some(token.clone());
        }
    }
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        let id = added["id"].as_u64().unwrap_or(u64::MAX) as usize;
        if let (Some(slot), Some(content)) = (tokens.get_mut(id), added["content"].as_str()) {
            *slot = Some(content.to_string());
            // control (special) or user-defined
            types[id] = if added["special"] == true { 3 } else { 4 };
        }
    }
    // Ids the vocabulary leaves empty (a padded embedding matrix) get placeholders.
    for (id, t) in tokens.iter_mut().enumerate() {
        if t.is_none() {
            *t = Some(format!("[PAD{id}]"));
            types[id] = 5; // unused
        }
    }
    let merges: Vec<MetaValue> = model["merges"]
        .as_array()
        .ok_or_else(|| bad("no `model.merges`".into()))?
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(MetaValue::Str(s.clone())),
            Value::Array(pair) if pair.len() == 2 => Ok(MetaValue::Str(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            ))),
            other => Err(bad(format!("merge {other} is neither \"a b\" nor [a, b]"))),
        })
        .collect::<Result<_, _>>()?;
    w.meta("tokenizer.ggml.model", MetaValue::Str("gpt2".into()));
    w.meta("tokenizer.ggml.pre", MetaValue::Str(pre));
    w.meta(
        "tokenizer.ggml.tokens",
        MetaValue::Array(
            tokens
                .into_iter()
                .map(|t| MetaValue::Str(t.expect("filled")))
                .collect(),
        ),
    );
    w.meta(
        "tokenizer.ggml.token_type",
        MetaValue::Array(
            types
                .into_iter()
                .map(|t| MetaValue::Int(t as i64))
                .collect(),
        ),
    );
    w.meta("tokenizer.ggml.merges", MetaValue::Array(merges));
    let token_id = |key: &str| -> Option<u64> {
        let content = match &config[key] {
            Value::String(s) => Some(s.as_str()),
            v => v["content"].as_str(),
        }?;
        vocab.get(content).and_then(Value::as_u64).or_else(|| {
            tokenizer["added_tokens"]
                .as_array()?
                .iter()
                .find(|a| a["content"] == content)?["id"]
                .as_u64()
        })
    };
    let bos = c
        .bos_token_id
        .map(u64::from)
        .or_else(|| token_id("bos_token"));
    let eos = c
        .eos_token_ids
        .first()
        .map(|&e| e as u64)
        .or_else(|| token_id("eos_token"));
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", bos),
        ("tokenizer.ggml.eos_token_id", eos),
        ("tokenizer.ggml.unknown_token_id", token_id("unk_token")),
        ("tokenizer.ggml.padding_token_id", token_id("pad_token")),
    ] {
        if let Some(id) = id {
            w.meta(key, MetaValue::Uint(id));
        }
    }
    if let Some(add) = config["add_bos_token"].as_bool() {
        w.meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(add));
    }
    if let Some(template) = config["chat_template"].as_str() {
        w.meta("tokenizer.chat_template", MetaValue::Str(template.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::hf_tensor_name;

    #[test]
    fn permutation_inverts_the_imports() {
        let x: Vec<f32> = (0..2 * 8 * 3).map(|v| v as f32).collect(); // 2 heads of 8 rows, 3 cols
        let there = permute_rows(&x, 2, 3);
        assert_ne!(there, x);
        assert_eq!(crate::import::unpermute_rows(&there, 2, 3), x);
    }

    #[test]
    fn names_map_both_ways() {
        for g in [
            "token_embd.weight",
            "output.weight",
            "blk.3.attn_q.weight",
            "blk.0.ffn_down.weight",
            "blk.1.attn_k.bias",
        ] {
            let hf = hf_tensor_name(Family::Llama, g).unwrap();
            assert_eq!(gguf_name(Family::Llama, &hf, 4).as_deref(), Some(g), "{hf}");
        }
        assert_eq!(
            gguf_name(Family::Llama, "model.layers.9.mlp.up_proj.weight", 4),
            None
        );
        for (g, hf) in [
            (
                "blk.2.ffn_norm.weight",
                "model.layers.2.pre_feedforward_layernorm.weight",
            ),
            (
                "blk.2.post_attention_norm.weight",
                "model.layers.2.post_attention_layernorm.weight",
            ),
            (
                "blk.0.post_ffw_norm.weight",
                "model.layers.0.post_feedforward_layernorm.weight",
            ),
        ] {
            assert_eq!(hf_tensor_name(Family::Gemma3, g).as_deref(), Some(hf));
            assert_eq!(gguf_name(Family::Gemma3, hf, 4).as_deref(), Some(g));
        }
    }

    #[test]
    fn rows_that_do_not_fill_blocks_fall_back() {
        assert_eq!(tensor_type(GgmlType::Q4K, &[1536, 576]), GgmlType::Q8_0);
        assert_eq!(tensor_type(GgmlType::Q4K, &[576, 1536]), GgmlType::Q4K);
        assert_eq!(tensor_type(GgmlType::Q8_0, &[10, 20]), GgmlType::F16);
        assert_eq!(tensor_type(GgmlType::Q8_0, &[576]), GgmlType::F32);
        assert_eq!(tensor_type(GgmlType::BF16, &[3, 5]), GgmlType::BF16);
    }
}
