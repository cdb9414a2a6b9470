//! A bounds-checked GGUF (v2/v3) parser: metadata key/values and tensor descriptors.
//! Every length and offset read from the file is checked before it is used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::quant::GgmlType;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Unsigned integer (u8, u16, u32 or u64 in the file).
    Uint(u64),
    /// Signed integer (i8, i16, i32 or i64).
    Int(i64),
    /// Float (f32 or f64).
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// As an unsigned integer, when it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::Uint(v) => Some(v),
            MetaValue::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    /// As a float, when numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::Float(v) => Some(v),
            MetaValue::Uint(v) => Some(v as f64),
            MetaValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }
    /// As a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    /// As a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor's descriptor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// llama.cpp name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order (fastest-varying first); the PyTorch shape is the reverse.
    pub dims: Vec<usize>,
    /// Element encoding.
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub start: usize,
    /// Length of the data in bytes.
    pub len: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
    /// The PyTorch (row-major) shape.
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A parsed GGUF file, memory-mapped.
pub struct GgufFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor descriptors in file order.
    pub tensors: Vec<TensorInfo>,
    data: Data,
}

enum Data {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl GgufFile {
    /// Opens and parses a GGUF file; errors name the file and the cause.
    pub fn open(path: &Path) -> Result<Self, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
        // SAFETY: read-only map of a file we do not modify.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| format!("cannot map: {e}"))?;
        Self::parse(path, Data::Mapped(map))
    }

    /// Parses GGUF bytes held in memory (tests and fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, String> {
        Self::parse(Path::new("<memory>"), Data::Owned(bytes))
    }

    fn parse(path: &Path, data: Data) -> Result<Self, String> {
        let (version, metadata, tensors) = {
            let bytes = data.bytes();
            parse_bytes(bytes)?
        };
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data,
        })
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.data.bytes()[info.start..info.start + info.len]
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
}

impl Data {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Mapped(m) => m,
            Data::Owned(v) => v,
        }
    }
}

/// Largest number of elements accepted for one tensor (2^40): anything above is corrupt.
const MAX_NUMEL: u128 = 1 << 40;

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "truncated: {what} needs {n} bytes at offset {} but the file has {}",
                    self.pos,
                    self.bytes.len()
                )
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(format!(
                "{what}: string length {len} at offset {} exceeds the file size",
                self.pos - 8
            ));
        }
        let raw = self.take(len as usize, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("{what}: string is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::Uint(self.u8(key)? as u64),
            1 => MetaValue::Int(self.u8(key)? as i8 as i64),
            2 => MetaValue::Uint(u16::from_le_bytes(self.take(2, key)?.try_into().unwrap()) as u64),
            3 => MetaValue::Int(i16::from_le_bytes(self.take(2, key)?.try_into().unwrap()) as i64),
            4 => MetaValue::Uint(self.u32(key)? as u64),
            5 => MetaValue::Int(self.u32(key)? as i32 as i64),
            6 => {
                MetaValue::Float(f32::from_le_bytes(self.take(4, key)?.try_into().unwrap()) as f64)
            }
            7 => match self.u8(key)? {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(format!("metadata `{key}`: invalid bool byte {b}")),
            },
            8 => MetaValue::Str(self.string(key)?),
            9 => {
                if depth > 4 {
                    return Err(format!("metadata `{key}`: arrays nested too deeply"));
                }
                let elem = self.u32(key)?;
                let count = self.u64(key)?;
                // Every element takes at least one byte: a count beyond the bytes left is a lie.
                if count > self.remaining() as u64 {
                    return Err(format!(
                        "metadata `{key}`: array of {count} elements exceeds the {} bytes left in the file",
                        self.remaining()
                    ));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::Uint(self.u64(key)?),
            11 => MetaValue::Int(self.u64(key)? as i64),
            12 => MetaValue::Float(f64::from_le_bytes(self.take(8, key)?.try_into().unwrap())),
            other => return Err(format!("metadata `{key}`: unknown value type {other}")),
        })
    }
}

type Parsed = (u32, BTreeMap<String, MetaValue>, Vec<TensorInfo>);

fn parse_bytes(bytes: &[u8]) -> Result<Parsed, String> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.take(4, "magic")?;
    if magic != b"GGUF" {
        return Err("not a GGUF file (bad magic)".into());
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (supported: 2, 3)"
        ));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // A key/value takes at least 12 bytes and a tensor descriptor at least 24.
    if n_kv.saturating_mul(12) > c.remaining() as u64
        || n_tensors.saturating_mul(24) > c.remaining() as u64
    {
        return Err(format!(
            "header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file can hold"
        ));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32(&key)?;
        let value = c.value(ty, &key, 0)?;
        metadata.insert(key, value);
    }
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!(
                "tensor `{name}`: {n_dims} dimensions (must be 1 to 4)"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut numel: u128 = 1;
        for _ in 0..n_dims {
            let d = c.u64(&name)?;
            numel = numel.saturating_mul(d as u128);
            dims.push(d);
        }
        if dims.contains(&0) || numel > MAX_NUMEL {
            return Err(format!("tensor `{name}`: absurd dimensions {dims:?}"));
        }
        let type_id = c.u32(&name)?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            format!("tensor `{name}`: unknown or unsupported ggml type {type_id}")
        })?;
        let offset = c.u64(&name)?;
        raw.push((name, dims, ggml_type, offset));
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => return Err(format!("`general.alignment` {v:?} must be a power of two")),
        },
    };
    let data_start = c.pos.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, ggml_type, offset) in raw {
        let dims: Vec<usize> = dims.into_iter().map(|d| d as usize).collect();
        let numel: usize = dims.iter().product();
        if !dims[0].is_multiple_of(ggml_type.block_size()) {
            return Err(format!(
                "tensor `{name}`: row length {} is not a multiple of the {:?} block size {}",
                dims[0],
                ggml_type,
                ggml_type.block_size()
            ));
        }
        let len = numel / ggml_type.block_size() * ggml_type.block_bytes();
        let start = (data_start as u128) + offset as u128;
        if !offset.is_multiple_of(alignment as u64) {
            return Err(format!(
                "tensor `{name}`: offset {offset} is not aligned to {alignment}"
            ));
        }
        if start + len as u128 > bytes.len() as u128 {
            return Err(format!(
                "tensor `{name}`: data at offset {start} of {len} bytes runs past the end of the file ({} bytes); the file is truncated or corrupt",
                bytes.len()
            ));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            start: start as usize,
            len,
        });
    }
    Ok((version, metadata, tensors))
}
