//! GGUF import: a bounds-checked reader, dequantisation of the common ggml encodings
//! (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), and export of a LLaMA
//! GGUF to a standard Hugging Face directory (config, safetensors, tokenizer) that
//! `transformers` loads with its stock classes.

pub mod export;
pub mod quant;
pub mod reader;
pub mod tokenizer;

pub use export::{import_gguf, ImportReport, OutDtype};
pub use quant::GgmlType;
pub use reader::{GgufFile, MetaValue, TensorInfo};
