//! Evaluation of a dense, masked or pruned model. For now: perplexity over fixed-length
//! windows, the protocol of LLM-Pruner, Wanda, SparseGPT and FLAP.

pub mod perplexity;

pub use perplexity::{perplexity, PerplexityResult};
