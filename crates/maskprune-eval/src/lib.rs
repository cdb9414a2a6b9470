//! Evaluation of a dense, masked or pruned model: perplexity over fixed-length windows (the
//! protocol of LLM-Pruner, Wanda, SparseGPT and FLAP) and zero-shot multiple choice scored
//! as lm-eval-harness 0.4 scores it.

pub mod perplexity;
pub mod zeroshot;

pub use perplexity::{perplexity, PerplexityResult};
