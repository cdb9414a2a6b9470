//! The pieces mask training is made of, each tested on its own:
//!
//! * [`UnitMasks`]: one real value `m` per attention unit (KV group or query head, see
//!   [`Granularity`]) and per MLP channel, for every layer;
//! * [`binary_ste`]: the forward uses `b = 1[m != 0]`, the backward passes `dL/db` to `m`
//!   unchanged (straight-through estimator);
//! * [`UnitMasks::layer_masks`]: the per-query-head and per-channel masks the model takes;
//! * [`LoraSet`]: LoRA adapters (rank 8 on q and v by default), `B = 0` at the start;
//! * [`distillation_kl`]: KL(teacher || student) with a temperature.

pub mod distill;
pub mod lora;
pub mod units;

pub use distill::{distillation_kl, next_token_loss};
pub use lora::{LoraConfig, LoraSet};
pub use maskprune_surgery::Granularity;
pub use units::{binary_ste, UnitMasks};
