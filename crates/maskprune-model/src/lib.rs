//! LLaMA-family language models on burn: strict `config.json` parsing, safetensors weights
//! (single or sharded; f32, bf16, f16), the tokenizer, and a forward pass that follows
//! transformers' `LlamaForCausalLM` and takes optional per-layer masks over query heads and
//! MLP channels.

pub mod config;
pub mod cpu_kernels;
pub mod error;
pub mod family;
pub mod llama;
pub mod output;
pub mod rope;
pub mod tokenizer;
pub mod weights;

pub use config::{ModelConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use family::{Biases, Family};
pub use llama::{KvCache, LayerLora, LayerMask, Llama, Lora, Site};
pub use tokenizer::load_tokenizer;
pub use weights::{weights_sha256, WeightStore};
