//! Weight surgery: slice the kept heads and channels out of a checkpoint and write a smaller
//! standard Hugging Face directory (same dtypes, same tensor names, updated `config.json`).

use std::collections::HashMap;
use std::path::Path;

use maskprune_model::family::{layer_tensors, split_layer_name, Slicing, Unit, OUTER_TENSORS};
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
    /// Zero every column outside the kept units (a masked checkpoint).
    ZeroCols(&'a [usize], usize),
    Rows(&'a [usize], usize),
    Cols(&'a [usize], usize),
}

/// How `name` is cut by `plan`, from the family's tensor schema; a tensor the schema does not
/// know is an error (surgery cannot know how units slice it).
fn cut_for<'a>(
    name: &str,
    plan: &'a PrunePlan,
    c: &ModelConfig,
    masked: bool,
) -> std::result::Result<Cut<'a>, String> {
    let unknown = || {
        format!(
            "tensor `{name}` is not part of the {} architecture: surgery cannot know how pruning slices it",
            c.family.model_type()
        )
    };
    let Some((layer, tail)) = split_layer_name(name) else {
        return OUTER_TENSORS
            .contains(&name)
            .then_some(Cut::Keep)
            .ok_or_else(unknown);
    };
    let p = plan.layers.get(layer).ok_or_else(unknown)?;
    let slicing = layer_tensors(c.family, c.biases)
        .into_iter()
        .find(|(t, _)| *t == tail)
        .map(|(_, s)| s)
        .ok_or_else(unknown)?;
    let units = |u: Unit| -> (&'a [usize], usize) {
        match u {
            Unit::QueryHead => (&p.query_heads, c.head_dim),
            Unit::KvHead => (&p.kv_heads, c.head_dim),
            Unit::Channel => (&p.channels, 1),
        }
    };
    Ok(match (masked, slicing) {
        (false, Slicing::Whole) => Cut::Keep,
        (false, Slicing::Rows(u)) => {
            let (kept, n) = units(u);
            Cut::Rows(kept, n)
        }
        (false, Slicing::Cols(u)) => {
            let (kept, n) = units(u);
            Cut::Cols(kept, n)
        }
        // A masked checkpoint keeps every shape and zeroes the inputs of o_proj and down_proj
        // that belong to removed units.
        (true, Slicing::Cols(u)) => {
            let (kept, n) = units(u);
            Cut::ZeroCols(kept, n)
        }
        (true, _) => Cut::Keep,
    })
}

/// Slices raw row-major bytes. Returns the new shape and bytes.
fn apply_cut(cut: &Cut, shape: &[usize], bytes: &[u8], elem: usize) -> (Vec<usize>, Vec<u8>) {
    let cols = if shape.len() == 2 { shape[1] } else { 1 };
    match cut {
        Cut::Keep => (shape.to_vec(), bytes.to_vec()),
        Cut::ZeroCols(units, unit) => {
            // All-zero bytes are 0.0 in every float format.
            let mut out = vec![0u8; bytes.len()];
            let row_bytes = cols * elem;
            for (src, dst) in bytes
                .chunks_exact(row_bytes)
                .zip(out.chunks_exact_mut(row_bytes))
            {
                for &u in *units {
                    let r = u * unit * elem..(u + 1) * unit * elem;
                    dst[r.clone()].copy_from_slice(&src[r]);
                }
            }
            (shape.to_vec(), out)
        }
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
    prune_checkpoint_with_lora(src, plan, None, out, overwrite)
}

/// Like [`prune_checkpoint`], first merging LoRA adapters (`lora`, see [`maskprune_model::lora::read_deltas`])
/// into their weights. Merged weights are written in F32 whatever the source dtype, so the
/// pruned model computes exactly what the masked model with adapters computed.
pub fn prune_checkpoint_with_lora(
    src: &Path,
    plan: &PrunePlan,
    lora: Option<&Path>,
    out: &Path,
    overwrite: bool,
) -> Result<SurgeryReport> {
    apply_plan(src, plan, lora, out, overwrite, false, &mut |_, _| {})
}

/// Writes the model with every unit the plan drops zeroed (its `o_proj`/`down_proj` columns)
/// after merging the adapters: the same shapes and config, so any loader runs it, and its
/// outputs equal the masked model's. For plans whose layers keep different numbers of units
/// (the non-uniform ablation); the parameter counts in `maskprune.json` are the kept units'.
pub fn mask_checkpoint_with_lora(
    src: &Path,
    plan: &PrunePlan,
    lora: Option<&Path>,
    out: &Path,
    overwrite: bool,
) -> Result<SurgeryReport> {
    apply_plan(src, plan, lora, out, overwrite, true, &mut |_, _| {})
}

/// [`prune_checkpoint_with_lora`] (`masked = false`) or [`mask_checkpoint_with_lora`]
/// (`masked = true`), calling `on_tensor(done, total)` after each tensor (progress bars).
pub fn apply_plan(
    src: &Path,
    plan: &PrunePlan,
    lora: Option<&Path>,
    out: &Path,
    overwrite: bool,
    masked: bool,
    on_tensor: &mut dyn FnMut(usize, usize),
) -> Result<SurgeryReport> {
    let target = Target {
        dir: out,
        overwrite,
        provenance: &|p| p,
    };
    write_plan(src, plan, lora, masked, &target, on_tensor)
}

/// Merges LoRA adapters into a checkpoint (of any shape, pruned or not) and writes the
/// result to `out`: the same shapes and config, the adapted weights in F32. Its
/// `maskprune.json` is the source's (when it has one: what was pruned, from what) with the
/// adapters added to `lora_merged` and `recovery` (what trained them) recorded.
pub fn merge_adapters(
    src: &Path,
    lora: &Path,
    out: &Path,
    overwrite: bool,
    recovery: Value,
    on_tensor: &mut dyn FnMut(usize, usize),
) -> Result<SurgeryReport> {
    let config = ModelConfig::from_file(&src.join("config.json"))?;
    let everything = PrunePlan::keep_all(&config, "recovery");
    let earlier: Option<Value> = std::fs::read_to_string(src.join("maskprune.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let merged = lora.display().to_string();
    let provenance = move |fresh: Value| -> Value {
        let mut p = earlier.clone().unwrap_or(fresh);
        let before = match p.get("lora_merged") {
            Some(Value::String(s)) => vec![json!(s)],
            Some(Value::Array(a)) => a.clone(),
            _ => Vec::new(),
        };
        p["lora_merged"] = Value::Array(before.into_iter().chain([json!(merged)]).collect());
        p["recovery"] = recovery.clone();
        p
    };
    let target = Target {
        dir: out,
        overwrite,
        provenance: &provenance,
    };
    write_plan(src, &everything, Some(lora), false, &target, on_tensor)
}

/// Where a surgery writes, and how its `maskprune.json` is made from the one it computed.
struct Target<'a> {
    dir: &'a Path,
    overwrite: bool,
    provenance: &'a dyn Fn(Value) -> Value,
}

/// The surgery of [`apply_plan`] into `target`.
fn write_plan(
    src: &Path,
    plan: &PrunePlan,
    lora: Option<&Path>,
    masked: bool,
    target: &Target,
    on_tensor: &mut dyn FnMut(usize, usize),
) -> Result<SurgeryReport> {
    let (out, overwrite) = (target.dir, target.overwrite);
    let config_path = src.join("config.json");
    let config = ModelConfig::from_file(&config_path)?;
    let invalid = |m: String| ModelError::new(src, format!("invalid prune plan: {m}"));
    let (shape, per_layer) = if masked {
        let counts = plan.validate_masked(&config).map_err(invalid)?;
        let dense = PrunedShape {
            num_attention_heads: config.num_attention_heads,
            num_key_value_heads: config.num_key_value_heads,
            intermediate_size: config.intermediate_size,
        };
        (dense, Some(counts))
    } else {
        (plan.validate(&config).map_err(invalid)?, None)
    };
    let store = WeightStore::open(src)?;
    let mut deltas = match lora {
        Some(p) => maskprune_model::lora::read_deltas(p)?,
        None => HashMap::new(),
    };
    let d = config.head_dim;
    let cut =
        |name: &str| cut_for(name, plan, &config, masked).map_err(|m| ModelError::new(src, m));
    let mut tensors = Vec::new();
    let names = store.names();
    let total = names.len();
    for (done, name) in names.into_iter().enumerate() {
        on_tensor(done, total);
        let (dtype, tshape, bytes) = store.raw(name).expect("listed tensor exists");
        if let Some((dshape, delta)) = deltas.remove(name) {
            if dshape != tshape {
                return Err(ModelError::new(
                    lora.unwrap_or(src),
                    format!("the adapter for `{name}` is {dshape:?} but the weight is {tshape:?} (adapters from another model?)"),
                ));
            }
            let merged: Vec<u8> = store
                .read_f32(name, tshape)?
                .iter()
                .zip(&delta)
                .flat_map(|(w, d)| (w + d).to_le_bytes())
                .collect();
            let (new_shape, new_bytes) = apply_cut(&cut(name)?, tshape, &merged, 4);
            tensors.push((
                name.to_string(),
                safetensors::Dtype::F32,
                new_shape,
                new_bytes,
            ));
            continue;
        }
        if dtype.bitsize() % 8 != 0 || tshape.len() > 2 {
            return Err(ModelError::new(
                src,
                format!("tensor `{name}` ({dtype:?}, {tshape:?}) cannot be sliced"),
            ));
        }
        let (new_shape, new_bytes) = apply_cut(&cut(name)?, tshape, bytes, dtype.bitsize() / 8);
        tensors.push((name.to_string(), dtype, new_shape, new_bytes));
        store.release(name);
    }
    if let Some(name) = deltas.keys().next() {
        return Err(ModelError::new(
            lora.unwrap_or(src),
            format!("adapter for `{name}`, which the model does not have (adapters from another model?)"),
        ));
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
    let decoder_linear_before = decoder_linear_params(&config, dense_w);
    let decoder_linear_after = match &per_layer {
        // The kept units of each layer: one layer's share of the uniform formula.
        Some(counts) => counts
            .iter()
            .map(|&[q, kv, ch]| {
                let w = Widths {
                    query_heads: q,
                    kv_heads: kv,
                    channels: ch,
                };
                decoder_linear_params(&config, w) / config.num_hidden_layers
            })
            .sum(),
        None => decoder_linear_params(&config, pruned_w),
    };
    let report = SurgeryReport {
        shape,
        params_before: config.total_params(),
        params_after: if masked {
            config.total_params() - (decoder_linear_before - decoder_linear_after)
        } else {
            pruned_config.total_params()
        },
        decoder_linear_before,
        decoder_linear_after,
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
        "lora_merged": lora.map(|p| p.display().to_string()),
        "masked": masked,
        "kept": plan.layers,
    });
    let provenance = (target.provenance)(provenance);
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
