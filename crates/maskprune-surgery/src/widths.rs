//! Uniform target widths for a parameter budget.

use maskprune_model::ModelConfig;

use crate::plan::Granularity;

pub use maskprune_records::Widths;

/// Parameters of the decoder layers' linear weights at the given widths.
pub fn decoder_linear_params(c: &ModelConfig, w: Widths) -> usize {
    let (h, d) = (c.hidden_size, c.head_dim);
    c.num_hidden_layers * (2 * h * w.query_heads * d + 2 * h * w.kv_heads * d + 3 * h * w.channels)
}

/// Widths that remove at least `sparsity` of the decoder-layer linear parameters: attention
/// units are cut by the same fraction (rounded, at least one kept), then the MLP keeps the
/// largest multiple of `round_to` channels that fits the budget.
pub fn uniform_widths(
    c: &ModelConfig,
    granularity: Granularity,
    sparsity: f64,
    round_to: usize,
) -> Result<Widths, String> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(format!("sparsity {sparsity} must be in [0, 1)"));
    }
    let round_to = round_to.max(1);
    let group = c.group_size();
    let keep = |n: usize| (((1.0 - sparsity) * n as f64).round() as usize).clamp(1, n);
    let (query_heads, kv_heads) = match granularity {
        Granularity::KvGroup => {
            let kv = keep(c.num_key_value_heads);
            (kv * group, kv)
        }
        Granularity::QueryHead => (keep(group) * c.num_key_value_heads, c.num_key_value_heads),
    };
    let dense = decoder_linear_params(
        c,
        Widths {
            query_heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            channels: c.intermediate_size,
        },
    );
    let budget = ((1.0 - sparsity) * dense as f64).floor() as usize;
    let attention = decoder_linear_params(
        c,
        Widths {
            query_heads,
            kv_heads,
            channels: 0,
        },
    );
    let per_channel = 3 * c.hidden_size * c.num_hidden_layers;
    let channels = budget.saturating_sub(attention) / per_channel / round_to * round_to;
    if channels == 0 {
        return Err(format!(
            "a budget of {budget} decoder-layer linear parameters (sparsity {sparsity}) leaves no room for {round_to} MLP channels"
        ));
    }
    Ok(Widths {
        query_heads,
        kv_heads,
        channels: channels.min(c.intermediate_size),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,
                "num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152}"#,
        )
        .unwrap()
    }

    #[test]
    fn widths_meet_the_budget_with_kernel_friendly_channels() {
        let c = smollm2();
        let dense = c.num_hidden_layers * c.layer_linear_params();
        for (g, s) in [
            (Granularity::KvGroup, 0.2),
            (Granularity::QueryHead, 0.5),
            (Granularity::KvGroup, 0.5),
        ] {
            let w = uniform_widths(&c, g, s, 64).unwrap();
            let p = decoder_linear_params(&c, w);
            assert!(p as f64 <= (1.0 - s) * dense as f64, "{w:?}");
            assert!(
                p as f64 > (1.0 - s) * dense as f64 - (3 * 576 * 30 * 64) as f64,
                "{w:?} wastes budget"
            );
            assert_eq!(w.channels % 64, 0);
        }
        let w = uniform_widths(&c, Granularity::QueryHead, 0.5, 64).unwrap();
        assert_eq!((w.query_heads, w.kv_heads), (6, 3));
        assert!(uniform_widths(&c, Granularity::KvGroup, 0.99, 64)
            .unwrap_err()
            .contains("no room"));
        assert!(uniform_widths(&c, Granularity::KvGroup, 1.5, 64).is_err());
    }
}
