//! Evaluation of a dense, masked or pruned model: perplexity over fixed-length windows (the
//! protocol of LLM-Pruner, Wanda, SparseGPT and FLAP), zero-shot multiple choice scored as
//! lm-eval-harness 0.4 scores it, and text generation with the KV cache (greedy or sampled,
//! chat prompts from the model's own template).

pub mod generate;
pub mod perplexity;
pub mod zeroshot;

pub use generate::{generate, ChatTemplate, Generated, Message, Sampling};
pub use perplexity::{perplexity, PerplexityResult};
