//! Reading weights from `model.safetensors` or a sharded `model.safetensors.index.json`,
//! converting bf16/f16/f32 to f32 on the way.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::Value;

use burn::tensor::TensorData;

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

    /// Hands the mapped pages of tensor `name` back to the kernel (after its bytes from
    /// [`WeightStore::raw`] have been used), so a pass over every tensor does not leave the
    /// whole checkpoint resident.
    pub fn release(&self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            release_pages(&self.files[e.file].1, e.start, e.end);
        }
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

    /// Tensor `name` (PyTorch layout, shape checked) in its stored dtype when that is bf16 or
    /// f16, else f32, transposed from `[rows, cols]` to `[cols, rows]` when `transposed`
    /// (the layout of our linear layers). The pages of the file it was read from are handed
    /// back to the kernel, so loading holds at most one tensor twice.
    pub fn read_stored(&self, name: &str, shape: &[usize], transposed: bool) -> Result<TensorData> {
        let entry = self.entry(name, shape)?;
        let map = &self.files[entry.file].1;
        let bytes = &map[entry.start..entry.end];
        let dims: Vec<usize> = if transposed {
            shape.iter().rev().copied().collect()
        } else {
            shape.to_vec()
        };
        let (rows, cols) = (shape[0], shape.iter().skip(1).product::<usize>().max(1));
        // The values of one element type, transposed if asked, as tensor data.
        fn tensor<T: Copy + Default + burn::tensor::Element>(
            v: Vec<T>,
            [rows, cols]: [usize; 2],
            transposed: bool,
            dims: Vec<usize>,
        ) -> TensorData {
            let v = if transposed {
                transpose(&v, rows, cols)
            } else {
                v
            };
            TensorData::new(v, dims)
        }
        let m = [rows, cols];
        let data = match entry.dtype {
            Dtype::BF16 => tensor(
                halves(bytes, half::bf16::from_le_bytes),
                m,
                transposed,
                dims,
            ),
            Dtype::F16 => tensor(halves(bytes, half::f16::from_le_bytes), m, transposed, dims),
            _ => tensor(self.read_f32(name, shape)?, m, transposed, dims),
        };
        release_pages(map, entry.start, entry.end);
        Ok(data)
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let entry = self.entries.get(name).ok_or_else(|| {
            ModelError::new(&self.files[0].0, format!("tensor `{name}` is missing"))
        })?;
        if entry.shape != shape {
            return Err(ModelError::new(
                &self.files[entry.file].0,
                format!(
                    "tensor `{name}` has shape {:?}, expected {:?}",
                    entry.shape, shape
                ),
            ));
        }
        Ok(entry)
    }

    /// Reads tensor `name` as f32, checking it has exactly `shape`.
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let entry = self.entry(name, shape)?;
        let (path, map) = &self.files[entry.file];
        let bytes = &map[entry.start..entry.end];
        let values = match entry.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => halves(bytes, |b| half::bf16::from_le_bytes(b).to_f32()),
            Dtype::F16 => halves(bytes, |b| half::f16::from_le_bytes(b).to_f32()),
            other => {
                return Err(ModelError::new(
                    path,
                    format!(
                        "tensor `{name}` has dtype {other:?}; only F32, BF16 and F16 are supported"
                    ),
                ))
            }
        };
        release_pages(map, entry.start, entry.end);
        Ok(values)
    }
}

/// A 16-bit float type's little-endian values (bf16 or f16), each decoded by `decode`.
fn halves<T>(bytes: &[u8], decode: impl Fn([u8; 2]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(2)
        .map(|c| decode([c[0], c[1]]))
        .collect()
}

/// Drops the mapped pages wholly inside `start..end` from this process (the file is
/// read-only and shared: a later read maps them again), so reading a checkpoint tensor by
/// tensor does not leave the whole file resident.
fn release_pages(map: &Mmap, start: usize, end: usize) {
    const PAGE: usize = 4096;
    let first = start.div_ceil(PAGE) * PAGE;
    let last = end / PAGE * PAGE;
    if last > first {
        // SAFETY: DONTNEED on a read-only shared file mapping only drops cached pages; the
        // bytes read back afterwards are the file's, unchanged.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
        };
    }
}

/// Row-major transpose of a `rows x cols` matrix.
pub fn transpose<T: Copy + Default>(data: &[T], rows: usize, cols: usize) -> Vec<T> {
    const BLOCK: usize = 32;
    let mut out = vec![T::default(); data.len()];
    for r0 in (0..rows).step_by(BLOCK) {
        for c0 in (0..cols).step_by(BLOCK) {
            for r in r0..(r0 + BLOCK).min(rows) {
                for c in c0..(c0 + BLOCK).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    out
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
    const CHUNK: usize = 64 << 20;
    for (_, map) in &store.files {
        for start in (0..map.len()).step_by(CHUNK) {
            let end = (start + CHUNK).min(map.len());
            hasher.update(&map[start..end]);
            release_pages(map, start, end);
        }
    }
    format!("{:x}", hasher.finalize())
}
