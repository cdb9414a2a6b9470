//! LLaMA-family language models on burn: strict `config.json` parsing, safetensors weights
//! (single or sharded; f32, bf16, f16), the tokenizer, and a forward pass that follows
//! transformers' `LlamaForCausalLM` and takes optional per-layer masks over query heads and
//! MLP channels.

pub mod config;
pub mod cpu_kernels;
pub mod error;
pub mod family;
pub mod kernels;
pub mod llama;
pub mod lora;
pub mod output;
pub mod rope;
pub mod tokenizer;
pub mod weights;

pub use config::{ModelConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use family::{Activation, Biases, Family, Projection};
pub use kernels::{HeadLoss, HeadTerms, Kernels, TrainKernels};
pub use llama::{Extras, KvCache, LayerExtras, LayerMask, Llama, Site};
pub use lora::{Adapters, LayerLora, Lora, LoraSettings};
pub use tokenizer::load_tokenizer;
pub use weights::{weights_sha256, WeightStore};

/// `n` reproducible pseudo-random values in `[-0.5, 0.5)` for the unit tests.
#[cfg(test)]
pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}
