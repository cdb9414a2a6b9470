//! GGUF in and out. Import: a bounds-checked reader, dequantisation of the common ggml
//! encodings (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), and a LLaMA
//! GGUF turned into a standard Hugging Face directory (config, safetensors, tokenizer) that
//! `transformers` loads with its stock classes. Export: a Hugging Face directory written as
//! the GGUF llama.cpp loads (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K).

pub mod export;
pub mod import;
pub mod quant;
pub mod reader;
pub mod tokenizer;
pub mod writer;

pub use export::{export_gguf, ExportReport};
pub use import::{import_gguf, ImportReport, OutDtype};
pub use quant::GgmlType;
pub use reader::{GgufFile, MetaValue, TensorInfo};
