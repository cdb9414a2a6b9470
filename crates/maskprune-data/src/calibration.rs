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
    /// Whether the windows cut the documents' concatenation ([`pack_windows`]) instead of
    /// being drawn at random ([`sample_windows`]).
    #[serde(default)]
    pub packed: bool,
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

/// Every token of `docs` at most once: their encodings concatenated, each document followed
/// by `separator` when given (the end-of-text token), cut into consecutive windows of
/// `seq_len` tokens (the tail dropped), in a seeded order; the first `n` of them, or all with
/// `n = None`. Uses the whole corpus where [`sample_windows`] draws overlapping windows of
/// the long documents only.
pub fn pack_windows(
    docs: &[String],
    encode: &dyn Fn(&str) -> Result<Vec<u32>>,
    n: Option<usize>,
    seq_len: usize,
    separator: Option<u32>,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if docs.is_empty() {
        return Err(DataError("calibration data is empty".into()));
    }
    let mut stream = Vec::new();
    let mut out = Vec::new();
    for doc in docs {
        stream.extend(encode(doc)?);
        stream.extend(separator);
        while stream.len() >= seq_len {
            out.push(stream[..seq_len].to_vec());
            stream.drain(..seq_len);
        }
    }
    let wanted = n.unwrap_or(out.len());
    if out.len() < wanted.max(1) {
        return Err(DataError(format!(
            "calibration data is too short: {} windows of {seq_len} tokens in all, {wanted} asked for",
            out.len()
        )));
    }
    let mut rng = SplitMix64(seed);
    for j in (1..out.len()).rev() {
        out.swap(j, rng.below(j + 1));
    }
    out.truncate(wanted);
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
    fn packed_windows_cover_the_stream_once() {
        let docs: Vec<String> = vec!["a bb ccc".into(), "dddd".into(), "ee f".into()];
        // Stream (word lengths, 9 after each document): 1 2 3 9 4 9 2 1 9 -> 4 windows of 2.
        let all = pack_windows(&docs, &words, None, 2, Some(9), 3).unwrap();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, vec![vec![1, 2], vec![2, 1], vec![3, 9], vec![4, 9]]);
        assert_eq!(
            all,
            pack_windows(&docs, &words, None, 2, Some(9), 3).unwrap()
        );
        let two = pack_windows(&docs, &words, Some(2), 2, Some(9), 3).unwrap();
        assert_eq!(two, all[..2]);
        let e = pack_windows(&docs, &words, Some(5), 2, Some(9), 3)
            .unwrap_err()
            .0;
        assert!(e.contains("too short"), "{e}");
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

/// How a calibration set is drawn.
#[derive(Debug, Clone, Copy)]
pub struct Draw<'a> {
    /// A dataset manifest of role `calibration`.
    pub dataset: &'a str,
    /// Windows (packed: at most this many, 0 for all).
    pub samples: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Seed of the draw (or of the packed windows' order).
    pub seed: u64,
    /// Consecutive windows of the documents' concatenation instead of random ones.
    pub packed: bool,
}

/// The tokenizer a calibration set is encoded with.
pub struct Encoder<'a> {
    /// The model's tokenizer.
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// SHA-256 of its `tokenizer.json` (recorded in the set).
    pub sha256: String,
    /// The token put between packed documents (the model's end-of-text), if any.
    pub separator: Option<u32>,
}

/// Draws a calibration set from a dataset of role `calibration`, skipping the rows its
/// evaluation protocol uses; `progress(done, total)` counts encoded documents.
pub fn draw_calibration(
    d: &Draw,
    encoder: &Encoder,
    data_dir: Option<&std::path::Path>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CalibrationSet> {
    if !((d.samples > 0 || d.packed) && d.seq_len > 1) {
        return Err(DataError(
            "calibration needs a positive number of samples and a seq-len of at least 2".into(),
        ));
    }
    let manifest = crate::resolve_dataset(d.dataset)?.ok_or_else(|| {
        DataError(format!(
            "{}: calibration needs a dataset manifest of role `calibration`",
            d.dataset
        ))
    })?;
    if manifest.role != crate::Role::Calibration {
        return Err(DataError(format!(
            "dataset `{}` is evaluation text; calibration must never use it (use c4 or a manifest with role = \"calibration\")",
            manifest.name
        )));
    }
    let (rows, file, sha256) = crate::load_rows(&manifest, data_dir)?;
    // Rows the manifest's evaluation protocol uses (`take`) are never calibration documents.
    let first = manifest.take.unwrap_or(0).min(rows.len());
    let docs = &rows[first..];
    let in_file = |m: String| DataError(format!("{}: {m}", file.display()));
    if docs.is_empty() {
        return Err(in_file(format!(
            "no documents left after the {first} used for evaluation"
        )));
    }
    // Sampling encodes one document per window (a few more when documents are short);
    // packing encodes each document once.
    let total = if d.packed { docs.len() } else { d.samples };
    let done = std::cell::Cell::new(0);
    let progress = std::cell::RefCell::new(progress);
    let encode = |text: &str| -> Result<Vec<u32>> {
        done.set(done.get() + 1);
        (progress.borrow_mut())(done.get(), total);
        let enc = encoder
            .tokenizer
            .encode(text, false)
            .map_err(|e| in_file(format!("tokenization failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    };
    let windows = if d.packed {
        let n = (d.samples > 0).then_some(d.samples);
        pack_windows(docs, &encode, n, d.seq_len, encoder.separator, d.seed)
    } else {
        sample_windows(docs, &encode, d.samples, d.seq_len, d.seed)
    }
    .map_err(|e| in_file(e.0))?;
    Ok(CalibrationSet {
        dataset: manifest.name.clone(),
        file: file.display().to_string(),
        sha256,
        documents: (first, rows.len()),
        seed: d.seed,
        seq_len: d.seq_len,
        tokenizer_sha256: encoder.sha256.clone(),
        samples: windows,
        packed: d.packed,
    })
}

impl CalibrationSet {
    /// Reads a calibration set written by `maskprune calib`; errors name the file.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DataError(format!("{}: cannot read: {e}", path.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| DataError(format!("{}: invalid calibration set: {e}", path.display())))
    }

    /// Refuses token ids the model's vocabulary (`vocab` entries) does not have.
    pub fn check_vocabulary(&self, vocab: usize) -> Result<()> {
        match self.samples.iter().flatten().find(|&&t| t as usize >= vocab) {
            Some(bad) => Err(DataError(format!(
                "calibration set has token id {bad} but the model's vocabulary has {vocab} entries (drawn with another tokenizer?)"
            ))),
            None => Ok(()),
        }
    }
}
