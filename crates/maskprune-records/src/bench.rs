//! `maskprune bench` results: the forward/prefill/decode report of one model
//! ([`ForwardBench`]), the pooling of several rounds of it, the ratios of a model to a
//! baseline, and the mask-training step report ([`TrainStepBench`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Timed runs of one shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapeTiming {
    /// Rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Seconds of each timed run.
    pub seconds: Vec<f64>,
    /// Their median.
    pub median_s: f64,
    /// `batch × seq_len / median_s`.
    pub tokens_per_s: f64,
    /// Prefill only: multiply-accumulates per token (see `maskprune bench`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macs_per_token: Option<f64>,
}

impl ShapeTiming {
    /// A shape's record from its timed runs.
    pub fn new(batch: usize, seq_len: usize, seconds: Vec<f64>) -> Self {
        let median_s = median(&seconds);
        Self {
            batch,
            seq_len,
            tokens_per_s: (batch * seq_len) as f64 / median_s,
            median_s,
            seconds,
            macs_per_token: None,
        }
    }
}

/// Greedy decoding with a KV cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeTiming {
    /// Rows.
    pub batch: usize,
    /// Prompt tokens per row (the prefill).
    pub prompt: usize,
    /// Tokens generated one at a time.
    pub new_tokens: usize,
    /// Seconds of the prefill.
    pub prefill_s: f64,
    /// Seconds of the generation.
    pub decode_s: f64,
    /// `batch × new_tokens / decode_s`.
    pub tokens_per_s: f64,
}

/// The forward report of one model (`bench` without `--train-step`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardBench {
    /// Always `forward`.
    pub bench: String,
    /// The model directory.
    pub model: PathBuf,
    /// Parameters.
    pub params: usize,
    /// Multiply-accumulates of the linear weights per token (decoder and LM head).
    pub macs_per_token_linear: usize,
    /// Attention's `QKᵀ` and `PV` multiply-accumulates per token and context position.
    pub attention_macs_per_token_per_context_position: usize,
    /// The backend, in words.
    pub backend: String,
    /// Threads available.
    pub threads: usize,
    /// Full forwards (logits at every position).
    pub forward: Vec<ShapeTiming>,
    /// Prefills (KV cache filled, the last position's logits).
    pub prefill: Vec<ShapeTiming>,
    /// Cached decoding, when asked for.
    pub decode: Option<DecodeTiming>,
    /// The process's peak resident set size.
    pub peak_rss_bytes: u64,
    /// Rounds pooled into this report (see [`pool`]); absent for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<usize>,
}

/// One report from several rounds on the same model: each shape's timings concatenated
/// (median and tokens/s recomputed), the decode run of the median speed, the largest peak
/// RSS. Errors when the rounds measured different shapes.
pub fn pool(mut reports: Vec<ForwardBench>) -> Result<ForwardBench, String> {
    let rounds = reports.len();
    let mut out = reports.first().cloned().ok_or("no reports to pool")?;
    let same_shapes = |a: &[ShapeTiming], b: &[ShapeTiming]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x.batch, x.seq_len) == (y.batch, y.seq_len))
    };
    if !reports
        .iter()
        .all(|r| same_shapes(&r.forward, &out.forward) && same_shapes(&r.prefill, &out.prefill))
    {
        return Err("the rounds measured different shapes".into());
    }
    for (which, shapes) in [(0, &mut out.forward), (1, &mut out.prefill)] {
        for (i, shape) in shapes.iter_mut().enumerate() {
            let seconds: Vec<f64> = reports
                .iter()
                .flat_map(|r| [&r.forward, &r.prefill][which][i].seconds.clone())
                .collect();
            let macs = shape.macs_per_token;
            *shape = ShapeTiming::new(shape.batch, shape.seq_len, seconds);
            shape.macs_per_token = macs;
        }
    }
    let speed = |r: &ForwardBench| r.decode.as_ref().map_or(0.0, |d| d.tokens_per_s);
    reports.sort_by(|a, b| speed(a).total_cmp(&speed(b)));
    out.decode = reports[rounds / 2].decode.clone();
    out.peak_rss_bytes = reports.iter().map(|r| r.peak_rss_bytes).max().unwrap_or(0);
    out.rounds = Some(rounds);
    Ok(out)
}

/// `model / baseline` for every throughput and size figure both reports have (`None` where
/// the baseline's is zero).
pub fn ratios(model: &ForwardBench, base: &ForwardBench) -> BTreeMap<String, Option<f64>> {
    let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
    let mut out = BTreeMap::new();
    out.insert(
        "params".into(),
        ratio(model.params as f64, base.params as f64),
    );
    out.insert(
        "macs_per_token_linear".into(),
        ratio(
            model.macs_per_token_linear as f64,
            base.macs_per_token_linear as f64,
        ),
    );
    out.insert(
        "peak_rss_bytes".into(),
        ratio(model.peak_rss_bytes as f64, base.peak_rss_bytes as f64),
    );
    for (what, m, b) in [
        ("forward", &model.forward, &base.forward),
        ("prefill", &model.prefill, &base.prefill),
    ] {
        for (m, b) in m.iter().zip(b) {
            let shape = format!("{what}_{}x{}", m.batch, m.seq_len);
            out.insert(
                format!("{shape}_tokens_per_s"),
                ratio(m.tokens_per_s, b.tokens_per_s),
            );
            if let (Some(mm), Some(bm)) = (m.macs_per_token, b.macs_per_token) {
                // The inverse is the speed-up that doing proportionally less work allows.
                out.insert(format!("{shape}_macs_per_token"), ratio(mm, bm));
            }
        }
    }
    if let (Some(m), Some(b)) = (&model.decode, &base.decode) {
        out.insert(
            "decode_tokens_per_s".into(),
            ratio(m.tokens_per_s, b.tokens_per_s),
        );
    }
    out
}

/// A model measured against a baseline (`bench --baseline`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchComparison {
    /// The model's pooled report.
    pub model: ForwardBench,
    /// The baseline's.
    pub baseline: ForwardBench,
    /// [`ratios`] of the two.
    pub ratio: BTreeMap<String, Option<f64>>,
}

/// Real mask-training updates of one shape (`bench --train-step`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainStepTiming {
    /// Windows per update.
    pub batch: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Updates of the timed run (the teacher's forward in each).
    pub updates: usize,
    /// Seconds of each of them.
    pub seconds: Vec<f64>,
    /// Their mean.
    pub mean_s: f64,
    /// Their median.
    pub median_s: f64,
    /// Wall time of the run per update, logs and checkpoints included.
    pub wall_per_update_s: f64,
    /// Checkpoint interval of the run.
    pub checkpoint_every: u64,
    /// Seconds of the updates after them, with the teacher's hidden states cached.
    pub cached_teacher_seconds: Vec<f64>,
    /// Their median.
    pub cached_teacher_median_s: f64,
    /// Floating-point operations of one update.
    pub flops: f64,
    /// The same without the teacher's forward.
    pub cached_teacher_flops: f64,
    /// `flops / mean_s`, in GFLOP/s.
    pub gflops_per_s: f64,
    /// The same with the teacher cached.
    pub cached_teacher_gflops_per_s: f64,
    /// `gflops_per_s` over the machine's gemm rate.
    pub share_of_gemm_peak: f64,
    /// The same with the teacher cached.
    pub cached_teacher_share_of_gemm_peak: f64,
}

/// The mask-training step report (`bench --train-step`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainStepBench {
    /// Always `train_step`.
    pub bench: String,
    /// The model directory.
    pub model: PathBuf,
    /// What one update does, in words.
    pub what: String,
    /// The backend's type.
    pub backend: String,
    /// Threads available.
    pub threads: usize,
    /// The machine's f32 gemm rate at a projection's shape, GFLOP/s.
    pub gemm_peak_gflops_per_s: f64,
    /// One entry per shape.
    pub results: Vec<TrainStepTiming>,
    /// The process's peak resident set size.
    #[serde(default)]
    pub peak_rss_bytes: u64,
}

/// The median of `values` (the upper one of an even count; NaN for none).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(forward: &[f64], decode_tps: f64, rss: u64) -> ForwardBench {
        let mut prefill = ShapeTiming::new(1, 4, forward.iter().map(|s| s / 2.0).collect());
        prefill.macs_per_token = Some(10.0);
        ForwardBench {
            bench: "forward".into(),
            model: "m".into(),
            params: 100,
            macs_per_token_linear: 50,
            attention_macs_per_token_per_context_position: 8,
            backend: "test".into(),
            threads: 1,
            forward: vec![ShapeTiming::new(2, 8, forward.to_vec())],
            prefill: vec![prefill],
            decode: Some(DecodeTiming {
                batch: 1,
                prompt: 4,
                new_tokens: 4,
                prefill_s: 0.1,
                decode_s: 4.0 / decode_tps,
                tokens_per_s: decode_tps,
            }),
            peak_rss_bytes: rss,
            rounds: None,
        }
    }

    #[test]
    fn pooling_concatenates_timings_and_takes_the_median_decode_and_largest_rss() {
        let pooled = pool(vec![
            report(&[1.0, 5.0], 30.0, 7),
            report(&[2.0], 10.0, 9),
            report(&[4.0, 3.0], 20.0, 8),
        ])
        .unwrap();
        let f = &pooled.forward[0];
        assert_eq!(f.seconds, vec![1.0, 5.0, 2.0, 4.0, 3.0]);
        assert_eq!(f.median_s, 3.0);
        assert_eq!(f.tokens_per_s, 16.0 / 3.0);
        assert_eq!(pooled.prefill[0].median_s, 1.5);
        assert_eq!(pooled.prefill[0].macs_per_token, Some(10.0));
        assert_eq!(pooled.decode.unwrap().tokens_per_s, 20.0);
        assert_eq!(pooled.peak_rss_bytes, 9);
        assert_eq!(pooled.rounds, Some(3));
    }

    #[test]
    fn pooling_refuses_rounds_of_different_shapes() {
        let mut other = report(&[1.0], 1.0, 1);
        other.forward[0].seq_len = 16;
        assert!(pool(vec![report(&[1.0], 1.0, 1), other]).is_err());
        assert!(pool(Vec::new()).is_err());
    }

    #[test]
    fn ratios_divide_model_by_baseline() {
        let (m, b) = (report(&[1.0], 30.0, 4), report(&[2.0], 10.0, 8));
        let r = ratios(&m, &b);
        assert_eq!(r["forward_2x8_tokens_per_s"], Some(2.0));
        assert_eq!(r["prefill_1x4_tokens_per_s"], Some(2.0));
        assert_eq!(r["prefill_1x4_macs_per_token"], Some(1.0));
        assert_eq!(r["decode_tokens_per_s"], Some(3.0));
        assert_eq!(r["peak_rss_bytes"], Some(0.5));
        let mut zero = b.clone();
        zero.peak_rss_bytes = 0;
        assert_eq!(ratios(&m, &zero)["peak_rss_bytes"], None);
    }

    #[test]
    fn a_report_survives_json() {
        let r = report(&[1.0, 2.0], 5.0, 3);
        let back: ForwardBench = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
