//! GGUF (version 3) encoding: metadata key-values, tensor infos, aligned tensor data.

use crate::quant::GgmlType;
use crate::reader::MetaValue;

/// Alignment of the tensor data (GGUF's default `general.alignment`).
pub const ALIGNMENT: usize = 32;

/// A GGUF file being assembled in memory.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    /// Adds a metadata entry (in order).
    pub fn meta(&mut self, key: &str, value: MetaValue) {
        self.metadata.push((key.to_string(), value));
    }

    /// Adds a tensor: `shape` in PyTorch order (outermost first), `data` already encoded as
    /// `ty`.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ty: GgmlType, data: Vec<u8>) {
        self.tensors
            .push((name.to_string(), shape.to_vec(), ty, data));
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut out, key);
            out.extend(type_of(value).to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0usize;
        for (name, shape, ty, data) in &self.tensors {
            put_string(&mut out, name);
            out.extend((shape.len() as u32).to_le_bytes());
            // ggml's dimension order: the innermost (a row's length) first.
            for &d in shape.iter().rev() {
                out.extend((d as u64).to_le_bytes());
            }
            out.extend(ty.id().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += data.len().div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        pad(&mut out);
        for (_, _, _, data) in &self.tensors {
            out.extend_from_slice(data);
            pad(&mut out);
        }
        out
    }
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's value type ids: integers as UINT32 / INT32 (what llama.cpp reads for its counts
/// and token ids), floats as FLOAT32.
fn type_of(v: &MetaValue) -> u32 {
    match v {
        MetaValue::Uint(_) => 4,
        MetaValue::Int(_) => 5,
        MetaValue::Float(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::Str(_) => 8,
        MetaValue::Array(_) => 9,
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::Uint(x) => out.extend((*x as u32).to_le_bytes()),
        MetaValue::Int(x) => out.extend((*x as i32).to_le_bytes()),
        MetaValue::Float(x) => out.extend((*x as f32).to_le_bytes()),
        MetaValue::Bool(b) => out.push(*b as u8),
        MetaValue::Str(s) => put_string(out, s),
        MetaValue::Array(items) => {
            let elem = items.first().map_or(8, type_of);
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}
