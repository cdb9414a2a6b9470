//! Builds a Hugging Face `tokenizer.json` and `tokenizer_config.json` from GGUF tokenizer
//! metadata: byte-level BPE (`tokenizer.ggml.model = gpt2`, merges in the file) or
//! SentencePiece BPE (`llama`: merges recovered from the scores, `▁` for spaces, byte
//! fallback), as transformers' GGUF loader builds them.

use serde_json::{json, Map, Value};

use crate::reader::{GgufFile, MetaValue};

/// The two tokenizer files of a Hugging Face model directory.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    /// Contents of `tokenizer.json`.
    pub tokenizer: Value,
    /// Contents of `tokenizer_config.json`.
    pub tokenizer_config: Value,
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer llama.cpp applies for a `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: &str) -> Result<Value, String> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level(false)
        ]})
    };
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        // llama.cpp splits every digit, then applies the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "codeshell" | "exaone" | "minerva" | "command-r" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
        }),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3" => split(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => split(QWEN2_SPLIT),
        other => {
            return Err(format!(
                "unsupported `tokenizer.ggml.pre` \"{other}\" (supported: default, gpt-2, smollm, starcoder, refact, llama-bpe, llama3, qwen2, ...)"
            ))
        }
    })
}

/// The `tokenizer.ggml.pre` value whose pre-tokenizer is `pre` (a `tokenizer.json`'s
/// `pre_tokenizer`): the inverse of [`pre_tokenizer`] over the names it knows.
pub fn pre_tokenizer_name(pre: &Value) -> Result<String, String> {
    ["default", "smollm", "llama-bpe", "qwen2"]
        .into_iter()
        .find(|name| pre_tokenizer(name).is_ok_and(|p| &p == pre))
        .map(String::from)
        .ok_or_else(|| {
            format!("a pre-tokenizer llama.cpp has no name for: {pre} (give it as `gguf_pre_tokenizer` in tokenizer_config.json)")
        })
}

fn strings<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, String> {
    file.get(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| format!("metadata `{key}` is missing or not an array"))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| format!("metadata `{key}` must hold strings"))
        })
        .collect()
}

fn token_id(file: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<usize>, String> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < n_tokens => Ok(Some(id as usize)),
            _ => Err(format!(
                "metadata `{key}` {v:?} is not a token id below {n_tokens}"
            )),
        },
    }
}

fn floats(file: &GgufFile, key: &str, n: usize) -> Result<Vec<f64>, String> {
    let values: Vec<f64> = file
        .get(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| format!("metadata `{key}` is missing or not an array"))?
        .iter()
        .map(|v| {
            v.as_f64()
                .ok_or_else(|| format!("metadata `{key}` must hold numbers"))
        })
        .collect::<Result<_, _>>()?;
    if values.len() != n {
        return Err(format!(
            "metadata `{key}` has {} entries for {n} tokens",
            values.len()
        ));
    }
    Ok(values)
}

/// The merges a SentencePiece BPE vocabulary implies (transformers' `generate_merges` with
/// the pieces' scores): every split of a piece into two pieces, best score first, then longer
/// left and right halves; ties keep the vocabulary's order.
fn sentencepiece_merges<'a>(tokens: &[&'a str], scores: &[f64]) -> Vec<(&'a str, &'a str)> {
    use std::collections::HashMap;
    let mut index: HashMap<&'a str, usize> = HashMap::new();
    let mut score: HashMap<&'a str, f64> = HashMap::new();
    let mut order: Vec<&'a str> = Vec::new();
    for (i, (&t, &s)) in tokens.iter().zip(scores).enumerate() {
        if index.insert(t, i).is_none() {
            order.push(t);
        }
        score.insert(t, s);
    }
    let mut merges: Vec<(&'a str, &'a str, f64)> = Vec::new();
    for piece in order {
        let mut local: Vec<(&'a str, &'a str, f64)> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| piece.split_at(at))
            .filter(|(l, r)| index.contains_key(l) && index.contains_key(r))
            .map(|(l, r)| (l, r, score[piece]))
            .collect();
        local.sort_by_key(|(l, r, _)| (index[l], index[r]));
        merges.extend(local);
    }
    let chars = |s: &str| s.chars().count();
    // A stable sort, descending: equal keys keep their order (as Python's `reverse=True`).
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then(chars(b.0).cmp(&chars(a.0)))
            .then(chars(b.1).cmp(&chars(a.1)))
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

/// Builds the tokenizer files, or says why this GGUF's tokenizer cannot be converted.
pub fn build_tokenizer(file: &GgufFile) -> Result<TokenizerFiles, String> {
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .ok_or("metadata `tokenizer.ggml.model` is missing")?;
    let sentencepiece = match model {
        "gpt2" => false,
        "llama" => true,
        _ => {
            return Err(format!(
                "tokenizer.ggml.model \"{model}\" is not supported (only \"gpt2\", byte-level BPE, and \"llama\", SentencePiece BPE)"
            ))
        }
    };
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    let merges: Vec<Value> = if sentencepiece {
        let scores = floats(file, "tokenizer.ggml.scores", tokens.len())?;
        sentencepiece_merges(&tokens, &scores)
            .into_iter()
            .map(|(l, r)| json!([l, r]))
            .collect()
    } else {
        strings(file, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                let mut parts = m.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok(json!([a, b])),
                    _ => Err(format!(
                        "merge \"{m}\" is not two tokens separated by a space"
                    )),
                }
            })
            .collect::<Result<_, _>>()?
    };
    let types: Vec<i64> = match file
        .get("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_array)
    {
        Some(items) => items
            .iter()
            .map(|v| match v {
                MetaValue::Int(i) => Ok(*i),
                MetaValue::Uint(u) => Ok(*u as i64),
                _ => Err("metadata `tokenizer.ggml.token_type` must hold integers".to_string()),
            })
            .collect::<Result<_, _>>()?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(format!(
            "metadata `tokenizer.ggml.token_type` has {} entries for {} tokens",
            types.len(),
            tokens.len()
        ));
    }
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let n = tokens.len();
    let bos = token_id(file, "tokenizer.ggml.bos_token_id", n)?;
    let eos = token_id(file, "tokenizer.ggml.eos_token_id", n)?;
    let unk = token_id(file, "tokenizer.ggml.unknown_token_id", n)?;
    let pad = token_id(file, "tokenizer.ggml.padding_token_id", n)?;
    let add_bos = file
        .get("tokenizer.ggml.add_bos_token")
        .and_then(MetaValue::as_bool)
        .unwrap_or(false);
    let add_eos = file
        .get("tokenizer.ggml.add_eos_token")
        .and_then(MetaValue::as_bool)
        .unwrap_or(false);

    let mut vocab = Map::new();
    for (id, tok) in tokens.iter().enumerate() {
        if sentencepiece {
            // transformers keeps the last of duplicated pieces, llama.cpp's byte-level loaders
            // the first.
            vocab.insert(tok.to_string(), json!(id));
        } else {
            vocab.entry(tok.to_string()).or_insert(json!(id));
        }
    }
    // CONTROL (3) tokens are special, and SentencePiece's UNKNOWN (2) too; USER_DEFINED (4)
    // ones are matched whole but not special.
    let special = |t: i64| t == 3 || (sentencepiece && t == 2);
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, t))| special(**t) || **t == 4)
        .map(|(id, (tok, t))| {
            json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": special(*t)})
        })
        .collect();
    let post_processor = match (add_bos, bos) {
        (true, Some(b)) => {
            let bos_tok = tokens[b];
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos_tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_tok: {"id": bos_tok, "ids": [b], "tokens": [bos_tok]}}
            })
        }
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    let (pre_tokenizer, decoder, unk_token) = if sentencepiece {
        (
            json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}),
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]}),
            // Unknown characters fall back to byte tokens.
            Value::Null,
        )
    } else {
        (
            pre_tokenizer(pre)?,
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            json!(unk.map(|u| tokens[u])),
        )
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk_token,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": sentencepiece,
            "byte_fallback": sentencepiece, "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    });
    let name = |id: Option<usize>| id.map(|i| json!(tokens[i])).unwrap_or(Value::Null);
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(bos),
        "eos_token": name(eos),
        "unk_token": name(unk),
        "pad_token": name(pad),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": false,
        "gguf_pre_tokenizer": pre,
    });
    if let Some(ctx) = file.get("llama.context_length").and_then(MetaValue::as_u64) {
        config["model_max_length"] = json!(ctx);
    }
    if let Some(t) = file
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
    {
        config["chat_template"] = json!(t);
    }
    Ok(TokenizerFiles {
        tokenizer,
        tokenizer_config: config,
    })
}
