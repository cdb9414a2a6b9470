//! Weight surgery: slice the kept heads and channels out of a checkpoint and write a smaller
//! standard Hugging Face directory (same dtypes, same tensor names, updated `config.json`).

use std::collections::HashMap;
use std::path::Path;

use maskprune_model::output::{write_dir_atomically, write_file_atomically};
use maskprune_model::{weights_sha256, ModelConfig, ModelError, Result, WeightStore};
use safetensors::tensor::TensorView;
use serde::Serialize;
use serde_json::{json, Value};

use crate::plan::{PrunePlan, PrunedShape};
use crate::widths::{decoder_linear_params, Widths};

/// What the surgery did.
#[derive(Debug, Clone, Serialize)]
pub struct SurgeryReport {
    /// The pruned architecture.
    pub shape: PrunedShape,
    /// All parameters before.
    pub params_before: usize,
    /// All parameters after.
    pub params_after: usize,
    /// Decoder-layer linear parameters before.
    pub decoder_linear_before: usize,
    /// Decoder-layer linear parameters after.
    pub decoder_linear_after: usize,
}

/// How a tensor is cut: keep these unit indices, `unit` rows (or columns) each.
enum Cut<'a> {
    Keep,
    Rows(&'a [usize], usize),
    Cols(&'a [usize], usize),
}

fn cut_for<'a>(name: &str, plan: &'a PrunePlan, d: usize) -> Cut<'a> {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return Cut::Keep;
    };
    let Some((layer, tail)) = rest.split_once('.') else {
        return Cut::Keep;
    };
    let Some(p) = layer.parse::<usize>().ok().and_then(|l| plan.layers.get(l)) else {
        return Cut::Keep;
    };
    match tail {
        "self_attn.q_proj.weight" | "self_attn.q_proj.bias" => Cut::Rows(&p.query_heads, d),
        "self_attn.k_proj.weight"
        | "self_attn.k_proj.bias"
        | "self_attn.v_proj.weight"
        | "self_attn.v_proj.bias" => Cut::Rows(&p.kv_heads, d),
        "self_attn.o_proj.weight" => Cut::Cols(&p.query_heads, d),
        "mlp.gate_proj.weight"
        | "mlp.gate_proj.bias"
        | "mlp.up_proj.weight"
        | "mlp.up_proj.bias" => Cut::Rows(&p.channels, 1),
        "mlp.down_proj.weight" => Cut::Cols(&p.channels, 1),
        _ => Cut::Keep,
    }
}

/// Slices raw row-major bytes. Returns the new shape and bytes.
fn apply_cut(cut: &Cut, shape: &[usize], bytes: &[u8], elem: usize) -> (Vec<usize>, Vec<u8>) {
    let cols = if shape.len() == 2 { shape[1] } else { 1 };
    match cut {
        Cut::Keep => (shape.to_vec(), bytes.to_vec()),
        Cut::Rows(units, unit) => {
            let row_bytes = cols * elem;
            let mut out = Vec::with_capacity(units.len() * unit * row_bytes);
            for &u in *units {
                out.extend_from_slice(&bytes[u * unit * row_bytes..(u + 1) * unit * row_bytes]);
            }
            let mut s = shape.to_vec();
            s[0] = units.len() * unit;
            (s, out)
        }
        Cut::Cols(units, unit) => {
            let row_bytes = cols * elem;
            let mut out = Vec::with_capacity(shape[0] * units.len() * unit * elem);
            for row in bytes.chunks_exact(row_bytes) {
                for &u in *units {
                    out.extend_from_slice(&row[u * unit * elem..(u + 1) * unit * elem]);
                }
            }
            (vec![shape[0], units.len() * unit], out)
        }
    }
}

/// Prunes the checkpoint in `src` with `plan` into a new directory `out` (atomically).
pub fn prune_checkpoint(
    src: &Path,
    plan: &PrunePlan,
    out: &Path,
    overwrite: bool,
) -> Result<SurgeryReport> {
    let config_path = src.join("config.json");
    let config = ModelConfig::from_file(&config_path)?;
    let shape = plan
        .validate(&config)
        .map_err(|m| ModelError::new(src, format!("invalid prune plan: {m}")))?;
    let store = WeightStore::open(src)?;
    let d = config.head_dim;
    let mut tensors = Vec::new();
    for name in store.names() {
        let (dtype, tshape, bytes) = store.raw(name).expect("listed tensor exists");
        if dtype.bitsize() % 8 != 0 || tshape.len() > 2 {
            return Err(ModelError::new(
                src,
                format!("tensor `{name}` ({dtype:?}, {tshape:?}) cannot be sliced"),
            ));
        }
        let (new_shape, new_bytes) =
            apply_cut(&cut_for(name, plan, d), tshape, bytes, dtype.bitsize() / 8);
        tensors.push((name.to_string(), dtype, new_shape, new_bytes));
    }
    let mut fields = config.raw.clone();
    fields.insert(
        "num_attention_heads".into(),
        json!(shape.num_attention_heads),
    );
    fields.insert(
        "num_key_value_heads".into(),
        json!(shape.num_key_value_heads),
    );
    fields.insert("intermediate_size".into(), json!(shape.intermediate_size));
    fields.insert("head_dim".into(), json!(d));
    let pruned_config = ModelConfig::from_json_str(&Value::Object(fields.clone()).to_string())
        .map_err(|m| ModelError::new(&config_path, format!("pruned config is invalid: {m}")))?;
    let dense_w = Widths {
        query_heads: config.num_attention_heads,
        kv_heads: config.num_key_value_heads,
        channels: config.intermediate_size,
    };
    let pruned_w = Widths {
        query_heads: shape.num_attention_heads,
        kv_heads: shape.num_key_value_heads,
        channels: shape.intermediate_size,
    };
    let report = SurgeryReport {
        shape,
        params_before: config.total_params(),
        params_after: pruned_config.total_params(),
        decoder_linear_before: decoder_linear_params(&config, dense_w),
        decoder_linear_after: decoder_linear_params(&config, pruned_w),
    };
    let provenance = json!({
        "tool": concat!("maskprune ", env!("CARGO_PKG_VERSION")),
        "method": plan.method,
        "granularity": plan.granularity,
        "source": {
            "dir": src, "weights_sha256": weights_sha256(&store),
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "intermediate_size": config.intermediate_size,
        },
        "pruned": shape,
        "params": {
            "total_before": report.params_before, "total_after": report.params_after,
            "decoder_linear_before": report.decoder_linear_before, "decoder_linear_after": report.decoder_linear_after,
            "sparsity_decoder_linear": 1.0 - report.decoder_linear_after as f64 / report.decoder_linear_before as f64,
            "sparsity_total": 1.0 - report.params_after as f64 / report.params_before as f64,
        },
        "kept": plan.layers,
    });
    write_dir_atomically(out, overwrite, |dir| {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, dt, s, b)| {
                TensorView::new(*dt, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| ModelError::new(dir, format!("tensor `{n}`: {e}")))
            })
            .collect::<Result<_>>()?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let st = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, Some(meta), &st)
            .map_err(|e| ModelError::new(&st, format!("cannot write: {e}")))?;
        let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON values serialise");
        write_file_atomically(&dir.join("config.json"), &pretty(&Value::Object(fields)))?;
        write_file_atomically(&dir.join("maskprune.json"), &pretty(&provenance))?;
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
        ] {
            let from = src.join(f);
            if from.is_file() {
                std::fs::copy(&from, dir.join(f))
                    .map_err(|e| ModelError::new(&from, format!("cannot copy: {e}")))?;
            }
        }
        Ok(())
    })?;
    Ok(report)
}
