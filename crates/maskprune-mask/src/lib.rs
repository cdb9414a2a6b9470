//! The pieces mask training is made of, each tested on its own:
//!
//! * [`UnitMasks`]: one real value `m` per attention unit (KV group or query head, see
//!   [`Granularity`]) and per MLP channel, for every layer;
//! * [`binary_ste`]: the forward uses `b = 1[m != 0]`, the backward passes `dL/db` to `m`
//!   unchanged (straight-through estimator);
//! * [`UnitMasks::layer_masks`]: the per-query-head and per-channel masks the model takes;
//! * [`distillation_kl`]: KL(teacher || student) with a temperature; [`next_token_loss`];
//!   [`next_token_targets`] for the fused head loss.
//!
//! LoRA adapters live in `maskprune-train` (`Adapters`), with their optimiser and checkpoints.

pub mod distill;
pub mod units;

pub use distill::{distillation_kl, next_token_loss, next_token_targets};
pub use maskprune_surgery::Granularity;
pub use units::{binary_ste, UnitMasks};
