//! Minimax mask training (MaskPrune): unit masks and the shared target widths learned
//! together under per-layer uniformity constraints and a parameter budget, with LoRA
//! adapters and distillation from the dense model. See `docs/method.md`.
//!
//! * [`config`]: the TOML configuration and its overrides;
//! * [`minimax`]: the host-side primal and dual updates;
//! * [`extract`]: the budget, the unit kinds, and the extraction of a uniform plan;
//! * [`trainer`]: the loop, the run directory, checkpoints and resume;
//! * [`parallel`]: data-parallel training over several devices (burn's collective);
//! * [`nodes`]: over several processes (machines), their gradients summed over TCP;
//! * [`finetune`]: recovery fine-tuning of a pruned checkpoint (LoRA, next-token loss and
//!   distillation), with the same run directory mechanics.

pub mod config;
pub mod extract;
pub mod finetune;
pub mod minimax;
pub mod nodes;
pub mod parallel;
mod run;
pub mod trainer;

pub use config::{ConfigFile, TrainConfig};
pub use extract::{Budget, LayerCounts};
pub use finetune::{finetune, FinetuneConfig, FinetuneRecord, FinetuneSpec, FinetuneSummary};
pub use maskprune_model::lora::Adapters;
pub use nodes::Nodes;
pub use parallel::Peers;
pub use trainer::{files, train, train_parallel, RunSpec, StepRecord, TrainSummary};
