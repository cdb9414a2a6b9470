//! Calibration sets: random token windows from calibration documents, seeded, the way
//! Wanda and SparseGPT draw them (a random document longer than the window, a random start).

use serde::{Deserialize, Serialize};

use crate::{DataError, Result};

/// A small, seedable, platform-independent generator (SplitMix64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// A calibration set and where it came from (the file `maskprune calib` writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSet {
    /// Dataset name.
    pub dataset: String,
    /// Source file.
    pub file: String,
    /// Its SHA-256.
    pub sha256: String,
    /// Documents sampled from: `first..last` (row indices; the evaluation rows come before).
    pub documents: (usize, usize),
    /// Random seed.
    pub seed: u64,
    /// Tokens per sample.
    pub seq_len: usize,
    /// SHA-256 of the tokenizer that encoded the samples.
    pub tokenizer_sha256: String,
    /// The token windows, `samples x seq_len`.
    pub samples: Vec<Vec<u32>>,
}

/// Draws `n` windows of `seq_len` tokens: each from a random document among `docs` whose
/// encoding is longer than `seq_len`, at a random start.
pub fn sample_windows(
    docs: &[String],
    encode: &dyn Fn(&str) -> Result<Vec<u32>>,
    n: usize,
    seq_len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if docs.is_empty() {
        return Err(DataError("calibration data is empty".into()));
    }
    let mut rng = SplitMix64(seed);
    let mut out = Vec::with_capacity(n);
    let mut attempts = 0usize;
    while out.len() < n {
        attempts += 1;
        if attempts > 100 * n.max(1) + 1000 {
            return Err(DataError(format!(
                "calibration data is too short: only {} of {n} windows of {seq_len} tokens found after {attempts} draws",
                out.len()
            )));
        }
        let ids = encode(&docs[rng.below(docs.len())])?;
        if ids.len() <= seq_len {
            continue;
        }
        let start = rng.below(ids.len() - seq_len);
        out.push(ids[start..start + seq_len].to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Result<Vec<u32>> {
        Ok(s.split_whitespace().map(|w| w.len() as u32).collect())
    }

    #[test]
    fn windows_are_seeded_and_come_from_long_enough_documents() {
        let docs: Vec<String> = vec![
            "a bb".into(),
            "a bb ccc dddd eeeee ffffff".into(),
            "x".into(),
        ];
        let a = sample_windows(&docs, &words, 5, 3, 7).unwrap();
        assert_eq!(a, sample_windows(&docs, &words, 5, 3, 7).unwrap());
        assert_ne!(a, sample_windows(&docs, &words, 5, 3, 8).unwrap());
        for w in &a {
            assert_eq!(w.len(), 3);
            assert!(
                w.windows(2).all(|p| p[1] == p[0] + 1),
                "{w:?} is not a contiguous window"
            );
        }
    }

    #[test]
    fn too_short_data_is_an_error() {
        let docs: Vec<String> = vec!["a b".into()];
        let e = sample_windows(&docs, &words, 2, 8, 0).unwrap_err().0;
        assert!(e.contains("too short"), "{e}");
        assert!(sample_windows(&[], &words, 2, 8, 0)
            .unwrap_err()
            .0
            .contains("empty"));
    }

    #[test]
    fn splitmix_is_uniform_enough() {
        let mut r = SplitMix64(1);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[r.below(4)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
    }
}
