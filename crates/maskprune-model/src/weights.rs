//! Reading weights from `model.safetensors` or a sharded `model.safetensors.index.json`,
//! converting bf16/f16/f32 to f32 on the way.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::family::{layer_tensor_name, Projection};

/// Where one tensor lives: which file, its dtype, shape and byte range in that file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The weights of a checkpoint directory, memory-mapped and indexed by tensor name.
pub struct WeightStore {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

impl WeightStore {
    /// Opens the safetensors file(s) of a model directory and validates their headers.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_paths(&index)?
        } else {
            return Err(ModelError::new(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ));
        };
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (file_idx, path) in paths.into_iter().enumerate() {
            let file = File::open(&path)
                .map_err(|e| ModelError::new(&path, format!("cannot open: {e}")))?;
            // SAFETY: the map is read-only and the file is not modified while the store lives.
            let map = unsafe { Mmap::map(&file) }
                .map_err(|e| ModelError::new(&path, format!("cannot map: {e}")))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| ModelError::new(&path, format!("corrupt safetensors file: {e}")))?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (a, b) = info.data_offsets;
                entries.insert(
                    name,
                    Entry {
                        file: file_idx,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + a,
                        end: data_start + b,
                    },
                );
            }
            files.push((path, map));
        }
        Ok(Self { files, entries })
    }

    /// The file paths backing this store.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// A tensor's stored dtype, shape and raw little-endian bytes, if present.
    pub fn raw(&self, name: &str) -> Option<(Dtype, &[usize], &[u8])> {
        let e = self.entries.get(name)?;
        Some((e.dtype, &e.shape, &self.files[e.file].1[e.start..e.end]))
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Reads the weight of projection `p` of decoder layer `layer` as f32, PyTorch's
    /// `[out, in]`, checking its shape against `config`.
    pub fn read_projection(
        &self,
        config: &ModelConfig,
        layer: usize,
        p: Projection,
    ) -> Result<Vec<f32>> {
        let name = layer_tensor_name(layer, &format!("{}.weight", p.module()));
        self.read_f32(&name, &config.projection_shape(p))
    }

    /// Reads tensor `name` as f32, checking it has exactly `shape`.
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let entry = self.entries.get(name).ok_or_else(|| {
            ModelError::new(&self.files[0].0, format!("tensor `{name}` is missing"))
        })?;
        let (path, map) = &self.files[entry.file];
        if entry.shape != shape {
            return Err(ModelError::new(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {:?}",
                    entry.shape, shape
                ),
            ));
        }
        let bytes = &map[entry.start..entry.end];
        let values = match entry.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::new(
                    path,
                    format!(
                        "tensor `{name}` has dtype {other:?}; only F32, BF16 and F16 are supported"
                    ),
                ))
            }
        };
        Ok(values)
    }
}

/// The shard files named by a `model.safetensors.index.json`, in a stable order.
fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| ModelError::new(index, format!("cannot read: {e}")))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::new(index, format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::new(index, "missing object `weight_map`"))?;
    let mut shards = BTreeMap::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            ModelError::new(index, format!("`weight_map.{tensor}` must be a file name"))
        })?;
        if file.contains('/') || file.contains("..") {
            return Err(ModelError::new(
                index,
                format!("shard name `{file}` must be a plain file name"),
            ));
        }
        shards.insert(file.to_string(), ());
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    let paths: Vec<PathBuf> = shards.into_keys().map(|f| dir.join(f)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(ModelError::new(
            index,
            format!("shard {} does not exist", missing.display()),
        ));
    }
    Ok(paths)
}

/// Hex SHA-256 over the weight files of a store, in order: a fingerprint of the checkpoint.
pub fn weights_sha256(store: &WeightStore) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (_, map) in &store.files {
        hasher.update(&map[..]);
    }
    format!("{:x}", hasher.finalize())
}
