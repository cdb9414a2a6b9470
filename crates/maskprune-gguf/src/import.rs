//! GGUF to Hugging Face directory: config, dequantised safetensors, tokenizer files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use maskprune_model::family::{
    layer_tensor_name, layer_tensors, EMBEDDINGS, FINAL_NORM, GGUF_OUTER_TENSORS, ROTARY_BUFFER,
};
use maskprune_model::output::{write_dir_atomically, write_file_atomically};
use maskprune_model::{Family, ModelConfig, ModelError};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use crate::quant::dequantize;
use crate::reader::{GgufFile, MetaValue, TensorInfo};
use crate::tokenizer::build_tokenizer;

/// Element type of the written `model.safetensors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    /// 32-bit float: exact for every GGUF encoding.
    F32,
    /// bfloat16: half the size, rounds the dequantised values.
    BF16,
    /// IEEE float16.
    F16,
}

impl OutDtype {
    /// The name used in `config.json` (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::BF16 => "bfloat16",
            OutDtype::F16 => "float16",
        }
    }
}

/// What an import produced.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// Tensors written.
    pub tensors: usize,
    /// Parameters written.
    pub params: usize,
    /// Count of source tensors per ggml encoding.
    pub source_types: BTreeMap<String, usize>,
    /// The `config.json` written.
    pub config: Value,
}

/// The Hugging Face name of a llama.cpp tensor of `family` (the family's one table of names).
pub fn hf_tensor_name(family: Family, gguf_name: &str) -> Option<String> {
    if let Some((_, h)) = GGUF_OUTER_TENSORS.iter().find(|(g, _)| *g == gguf_name) {
        return Some(h.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = tail.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (_, module) = family
        .gguf_layer_modules()
        .into_iter()
        .find(|(g, _)| *g == part)?;
    Some(layer_tensor_name(layer, &format!("{module}.{kind}")))
}

/// Undoes llama.cpp's q/k row permutation: within each head, GGUF row `2i + p` is HF row
/// `p * (d/2) + i` (transformers' `reverse_permute_weights`).
pub fn unpermute_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    reorder_rotary_rows(data, heads, cols, false)
}

/// Moves q/k rows between Hugging Face's half-split rotary order (HF row `p * (d/2) + i` of
/// each head) and llama.cpp's interleaved one (row `2i + p`): to llama.cpp's when
/// `to_interleaved`, back otherwise.
pub(crate) fn reorder_rotary_rows(
    data: &[f32],
    heads: usize,
    cols: usize,
    to_interleaved: bool,
) -> Vec<f32> {
    let rows = data.len() / cols;
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0.0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for p in 0..2 {
                let split = (h * d + p * half + i) * cols;
                let interleaved = (h * d + 2 * i + p) * cols;
                let (src, dst) = if to_interleaved {
                    (split, interleaved)
                } else {
                    (interleaved, split)
                };
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

fn meta_u64(file: &GgufFile, key: &str) -> Result<Option<u64>, String> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("metadata `{key}` must be an integer, found {v:?}")),
    }
}

fn required(file: &GgufFile, key: &str) -> Result<u64, String> {
    meta_u64(file, key)?.ok_or_else(|| format!("metadata `{key}` is missing"))
}

/// The `config.json` a GGUF of a supported architecture (`llama`, `qwen2`, `qwen3`) describes.
pub fn hf_config(file: &GgufFile, dtype: OutDtype) -> Result<Value, String> {
    let arch = file
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or("metadata `general.architecture` is missing")?;
    let family = Family::from_gguf_architecture(arch).ok_or_else(|| {
        format!(
            "architecture \"{arch}\" is not supported (only \"llama\", \"qwen2\", \"qwen3\" and \"gemma3\")"
        )
    })?;
    // The architecture's own metadata keys: `llama.block_count`, `qwen2.block_count`, ...
    let key = |k: &str| format!("{arch}.{k}");
    if file.tensors.iter().any(|t| t.name == "rope_freqs.weight") {
        return Err(
            "tensor `rope_freqs.weight` (llama3 rope scaling stored as a tensor) is not supported"
                .into(),
        );
    }
    let hidden = required(file, &key("embedding_length"))?;
    let heads = required(file, &key("attention.head_count"))?;
    let kv_heads = meta_u64(file, &key("attention.head_count_kv"))?.unwrap_or(heads);
    let head_dim = match meta_u64(file, &key("attention.key_length"))? {
        Some(k) => k,
        None => meta_u64(file, &key("rope.dimension_count"))?
            .unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
    };
    let n_tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .map(|a| a.len() as u64);
    let vocab = match meta_u64(file, &key("vocab_size"))? {
        Some(v) => v,
        None => n_tokens.ok_or_else(|| {
            format!("neither `{arch}.vocab_size` nor `tokenizer.ggml.tokens` is present")
        })?,
    };
    let eps = file
        .get(&key("attention.layer_norm_rms_epsilon"))
        .and_then(MetaValue::as_f64)
        .ok_or_else(|| format!("metadata `{arch}.attention.layer_norm_rms_epsilon` is missing"))?;
    // GGUF stores the epsilon as f32; print it as the decimal it was written from.
    let eps: f64 = format!("{}", eps as f32).parse().unwrap_or(eps);
    let theta = file
        .get(&key("rope.freq_base"))
        .and_then(MetaValue::as_f64)
        .unwrap_or(10000.0);
    let rope_scaling = match file
        .get(&key("rope.scaling.type"))
        .and_then(MetaValue::as_str)
    {
        None | Some("none") => Value::Null,
        Some("linear") => {
            let factor = file
                .get(&key("rope.scaling.factor"))
                .and_then(MetaValue::as_f64)
                .ok_or_else(|| format!("metadata `{arch}.rope.scaling.factor` is missing"))?;
            json!({"rope_type": "linear", "factor": factor})
        }
        Some(other) => return Err(format!("rope scaling type \"{other}\" is not supported")),
    };
    let tied = !file.tensors.iter().any(|t| t.name == "output.weight");
    let id = |key: &str| meta_u64(file, key).map(|v| v.map(Value::from).unwrap_or(Value::Null));
    let has_bias = |part: &str| {
        file.tensors
            .iter()
            .any(|t| t.name.ends_with(&format!("{part}.bias")))
    };
    let window = meta_u64(file, &key("attention.sliding_window"))?;
    let mut config = json!({
        "architectures": [family.architecture()],
        "model_type": family.model_type(),
        "hidden_size": hidden,
        "intermediate_size": required(file, &key("feed_forward_length"))?,
        "num_hidden_layers": required(file, &key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": meta_u64(file, &key("context_length"))?.unwrap_or(2048),
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tied,
        "vocab_size": vocab,
        "bos_token_id": id("tokenizer.ggml.bos_token_id")?,
        "eos_token_id": id("tokenizer.ggml.eos_token_id")?,
        "pad_token_id": id("tokenizer.ggml.padding_token_id")?,
        "attention_bias": has_bias("attn_q"),
        "attention_dropout": 0.0,
        "mlp_bias": has_bias("ffn_up"),
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
        "torch_dtype": dtype.torch_name(),
    });
    let fields = config.as_object_mut().expect("an object");
    fields.extend(family.gguf_config_entries(head_dim, window));
    Ok(config)
}

fn encode(values: &[f32], dtype: OutDtype) -> Vec<u8> {
    match dtype {
        OutDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        OutDtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        OutDtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// One tensor converted to its Hugging Face name, shape and values.
fn convert_tensor(
    file: &GgufFile,
    info: &TensorInfo,
    config: &ModelConfig,
) -> Result<(String, Vec<usize>, Vec<f32>), String> {
    let name = hf_tensor_name(config.family, &info.name).ok_or_else(|| {
        format!(
            "tensor `{}` has no Hugging Face `{}` equivalent",
            info.name,
            config.family.model_type()
        )
    })?;
    let shape = info.torch_shape();
    let expected = config.tensor_shape(&name).ok_or_else(|| {
        format!(
            "tensor `{}` ({name}) does not belong to this architecture",
            info.name
        )
    })?;
    if shape != expected {
        return Err(format!(
            "tensor `{}` has shape {shape:?}, but the metadata implies {expected:?}",
            info.name
        ));
    }
    let mut values = dequantize(info.ggml_type, file.tensor_bytes(info));
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "tensor `{}` holds a non-finite value at element {bad}",
            info.name
        ));
    }
    if name.ends_with("norm.weight") {
        let offset = config.family.norm_weight_offset();
        values.iter_mut().for_each(|v| *v -= offset);
    }
    let cols = *shape.last().unwrap_or(&1);
    // llama.cpp's `llama` rotary layout; qwen2 keeps Hugging Face's row order.
    let permuted = config.family.gguf_permutes_qk();
    if permuted && info.name.contains(".attn_q.") {
        values = unpermute_rows(
            &values,
            config.num_attention_heads,
            if shape.len() == 1 { 1 } else { cols },
        );
    } else if permuted && info.name.contains(".attn_k.") {
        values = unpermute_rows(
            &values,
            config.num_key_value_heads,
            if shape.len() == 1 { 1 } else { cols },
        );
    }
    Ok((name, shape, values))
}

/// Converts GGUF file `src` into a Hugging Face model directory `out`, atomically.
/// `progress` is called after each tensor with (done, total).
pub fn import_gguf(
    src: &Path,
    out: &Path,
    dtype: OutDtype,
    overwrite: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ImportReport, ModelError> {
    let err = |m: String| ModelError::new(src, m);
    if out.exists() && !overwrite {
        return Err(ModelError::new(
            out,
            "output directory already exists (pass --overwrite to replace it)",
        ));
    }
    let file = GgufFile::open(src).map_err(err)?;
    let config_json = hf_config(&file, dtype).map_err(err)?;
    let config = ModelConfig::from_json_str(&config_json.to_string())
        .map_err(|m| err(format!("metadata describes an invalid model: {m}")))?;
    let tokenizer = build_tokenizer(&file).map_err(err)?;

    let mut names: HashMap<String, &TensorInfo> = HashMap::new();
    let mut source_types = BTreeMap::new();
    for t in &file.tensors {
        if names.insert(t.name.clone(), t).is_some() {
            return Err(err(format!("tensor `{}` appears twice", t.name)));
        }
        *source_types
            .entry(format!("{:?}", t.ggml_type))
            .or_insert(0) += 1;
    }
    let mut converted = Vec::with_capacity(file.tensors.len());
    let total = file.tensors.len();
    for (i, info) in file.tensors.iter().enumerate() {
        let (name, shape, values) = convert_tensor(&file, info, &config).map_err(err)?;
        converted.push((name, shape, encode(&values, dtype)));
        progress(i + 1, total);
    }
    // Every tensor transformers will ask for must be there.
    let have: std::collections::HashSet<&str> =
        converted.iter().map(|(n, _, _)| n.as_str()).collect();
    let mut required_names = vec![EMBEDDINGS.to_string(), FINAL_NORM.to_string()];
    for l in 0..config.num_hidden_layers {
        for (tail, _) in layer_tensors(config.family, config.biases) {
            if tail != ROTARY_BUFFER {
                required_names.push(layer_tensor_name(l, tail));
            }
        }
    }
    if let Some(missing) = required_names.iter().find(|n| !have.contains(n.as_str())) {
        return Err(err(format!(
            "tensor for `{missing}` is missing from the file"
        )));
    }
    let st_dtype = match dtype {
        OutDtype::F32 => Dtype::F32,
        OutDtype::BF16 => Dtype::BF16,
        OutDtype::F16 => Dtype::F16,
    };
    let params: usize = converted
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum();
    let generation = json!({
        "_from_model_config": true,
        "bos_token_id": config_json["bos_token_id"],
        "eos_token_id": config_json["eos_token_id"],
    });
    let provenance = json!({
        "source": src.file_name().map(|n| n.to_string_lossy().into_owned()),
        "gguf_version": file.version,
        "source_tensor_types": source_types,
        "general.name": file.get("general.name").and_then(MetaValue::as_str),
        "dtype": dtype.torch_name(),
        "tool": concat!("maskprune ", env!("CARGO_PKG_VERSION")),
    });
    write_dir_atomically(out, overwrite, |dir| {
        let views: Vec<(String, TensorView)> = converted
            .iter()
            .map(|(n, s, b)| {
                TensorView::new(st_dtype, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| ModelError::new(dir, format!("tensor `{n}`: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let st_path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, Some(meta), &st_path)
            .map_err(|e| ModelError::new(&st_path, format!("cannot write: {e}")))?;
        let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON values serialise");
        write_file_atomically(&dir.join("config.json"), &pretty(&config_json))?;
        write_file_atomically(&dir.join("generation_config.json"), &pretty(&generation))?;
        write_file_atomically(
            &dir.join("tokenizer.json"),
            &serde_json::to_vec(&tokenizer.tokenizer).expect("JSON"),
        )?;
        write_file_atomically(
            &dir.join("tokenizer_config.json"),
            &pretty(&tokenizer.tokenizer_config),
        )?;
        write_file_atomically(&dir.join("maskprune_import.json"), &pretty(&provenance))?;
        Ok(())
    })?;
    Ok(ImportReport {
        tensors: converted.len(),
        params,
        source_types,
        config: config_json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_transformers() {
        assert_eq!(
            hf_tensor_name(Family::Llama, "blk.3.attn_output.weight").unwrap(),
            "model.layers.3.self_attn.o_proj.weight"
        );
        assert_eq!(
            hf_tensor_name(Family::Llama, "blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_tensor_name(Family::Llama, "token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_tensor_name(Family::Llama, "blk.x.attn_q.weight").is_none());
        assert!(hf_tensor_name(Family::Llama, "rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, d/2, 2, cols)... is the inverse of HF row p*(d/2)+i -> 2i+p.
        let (heads, d, cols) = (2, 4, 3);
        let hf: Vec<f32> = (0..heads * d * cols).map(|v| v as f32).collect();
        let mut gguf = vec![0.0f32; hf.len()];
        for h in 0..heads {
            for p in 0..2 {
                for i in 0..d / 2 {
                    let src = (h * d + p * (d / 2) + i) * cols;
                    let dst = (h * d + 2 * i + p) * cols;
                    gguf[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, heads, cols), hf);
    }
}
