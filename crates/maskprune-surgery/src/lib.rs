//! From "which units does each layer keep" to a smaller standard checkpoint.
//!
//! A [`PrunePlan`] lists, per layer, the query heads, KV heads and MLP channels kept. A plan is
//! *uniform* (every layer keeps the same counts, every kept KV group the same number of query
//! heads), so the pruned model is a plain LLaMA-family config. [`prune_checkpoint`] slices the
//! weights accordingly and writes a Hugging Face directory; [`rank::plan_from_scores`] builds a
//! plan from unit scores (`maskprune-baselines` computes the one-shot ones).

pub mod plan;
pub mod rank;
pub mod surgery;
pub mod widths;

pub use plan::{Granularity, LayerPlan, PrunePlan, PrunedShape};
pub use rank::{plan_from_scores, LayerScores};
pub use surgery::{
    apply_plan, mask_checkpoint_with_lora, merge_adapters, prune_checkpoint,
    prune_checkpoint_with_lora, SurgeryReport,
};
pub use widths::{decoder_linear_params, uniform_widths, Widths};
