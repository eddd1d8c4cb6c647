//! Parameter store: the named tensors (parameters and buffers) a graph reads, keyed by their
//! state-dict names.
//!
//! * [`ParamStore::load_safetensors`] loads weights whose keys are exactly the graph's parameter
//!   names (detectron2's state-dict keys). Keys ending in `.num_batches_tracked` (a counter
//!   PyTorch BatchNorm layers keep in their state dicts, unused at inference) are ignored.
//!   Keys under a top-level module the graph does not build at all (e.g. `roi_heads.*` when
//!   the graph is a backbone, so a whole detectron2 checkpoint loads into it) are skipped and
//!   listed by [`ParamStore::skipped_keys`]; an unexpected key under a module the graph does
//!   build is an error.
//!   Float tensors stored in another float width (f16, bf16, f32, f64) are converted to the
//!   graph's dtype, as users converting checkpoints expect; any other dtype difference is an
//!   error.
//! * [`ParamStore::init_random`] follows each parameter's `Init`, seeded per parameter *name*
//!   (so adding a parameter never changes the others).
//! * [`ParamStore::save_safetensors`] writes atomically: a temporary file in the same directory,
//!   flushed to disk, then renamed over the destination.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType as CDType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};
use vitdet_ir::ops::Init;
use vitdet_ir::{DType, Graph, TensorType};

use crate::dtype::{describe, from_candle, to_candle};
use crate::error::RuntimeError;

/// Named parameter tensors.
#[derive(Debug, Clone, Default)]
pub struct ParamStore {
    tensors: BTreeMap<String, Tensor>,
    /// Keys of the loaded file that belong to top-level modules the graph does not build.
    skipped: Vec<String>,
}

/// Suffix of BatchNorm state-dict entries that are ignored when loading.
pub const IGNORED_SUFFIX: &str = ".num_batches_tracked";

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding these tensors.
    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        ParamStore {
            tensors: tensors.into_iter().collect(),
            skipped: Vec::new(),
        }
    }

    /// Keys the last load skipped because their top-level module is not part of the graph.
    pub fn skipped_keys(&self) -> &[String] {
        &self.skipped
    }

    /// Adds or replaces a tensor, returning the previous one.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) -> Option<Tensor> {
        self.tensors.insert(name.into(), t)
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// (name, tensor) in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// A copy of the store on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self, RuntimeError> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.tensors {
            out.insert(k.clone(), v.to_device(device)?);
        }
        Ok(ParamStore::from_tensors(out))
    }

    /// The store with each of `graph`'s parameters converted to the dtype the graph declares for
    /// it (e.g. f32 weights for an inference graph whose weight casts were folded into its
    /// parameters), other entries as they are. Missing parameters and shape mismatches are left
    /// to [`ParamStore::check`]; a conversion between float and integer dtypes is refused.
    pub fn cast_to(&self, graph: &Graph) -> Result<Self, RuntimeError> {
        let mut out = self.tensors.clone();
        for (_, p) in graph.parameters() {
            let Some(t) = out.get_mut(&p.name) else { continue };
            let want = to_candle(p.ty.dtype);
            if t.dtype() == want {
                continue;
            }
            if !(t.dtype().is_float() && want.is_float()) {
                return Err(RuntimeError::ParameterDtype {
                    name: p.name.clone(),
                    expected: p.ty.dtype.to_string(),
                    found: describe(t),
                });
            }
            *t = t.to_dtype(want)?;
        }
        Ok(ParamStore {
            tensors: out,
            skipped: self.skipped.clone(),
        })
    }

    /// Checks that the store holds every parameter `graph` declares, with its shape and dtype.
    /// Extra entries are allowed (a store may serve several graphs).
    pub fn check(&self, graph: &Graph) -> Result<(), RuntimeError> {
        let mut missing: Vec<String> = graph
            .parameters()
            .filter(|(_, p)| !self.tensors.contains_key(&p.name))
            .map(|(_, p)| p.name.clone())
            .collect();
        if !missing.is_empty() {
            missing.sort();
            return Err(RuntimeError::MissingParameters {
                source_name: "the parameter store".into(),
                count: missing.len(),
                names: missing,
            });
        }
        let mut params: Vec<_> = graph.parameters().map(|(_, p)| p).collect();
        params.sort_by(|a, b| a.name.cmp(&b.name));
        for p in params {
            let t = &self.tensors[&p.name];
            check_shape(&p.name, &p.ty, t.dims())?;
            if t.dtype() != to_candle(p.ty.dtype) {
                return Err(RuntimeError::ParameterDtype {
                    name: p.name.clone(),
                    expected: p.ty.dtype.to_string(),
                    found: describe(t),
                });
            }
        }
        Ok(())
    }

    /// Loads the weights for `graph` from a safetensors file onto `device` (see the module doc
    /// for the key and dtype rules). Errors, in this order: unreadable or corrupt file; missing
    /// or unexpected keys (listed together); then the first (by name) shape or dtype mismatch.
    pub fn load_safetensors(path: impl AsRef<Path>, graph: &Graph, device: &Device) -> Result<Self, RuntimeError> {
        let path = path.as_ref();
        let file_err = |message: String| RuntimeError::WeightsFile {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
        let st =
            SafeTensors::deserialize(&bytes).map_err(|e| file_err(format!("not a valid safetensors file: {e}")))?;
        let source_name = format!("`{}`", path.display());

        let wanted: BTreeMap<&str, &TensorType> = graph.parameters().map(|(_, p)| (p.name.as_str(), &p.ty)).collect();
        let present: BTreeSet<&str> = st.names().into_iter().map(|s| s.as_str()).collect();
        let missing: Vec<String> = wanted
            .keys()
            .filter(|k| !present.contains(*k))
            .map(|k| k.to_string())
            .collect();
        let top = |k: &str| k.split('.').next().unwrap_or("").to_string();
        let built: BTreeSet<String> = wanted.keys().map(|k| top(k)).collect();
        let (unexpected, skipped): (Vec<String>, Vec<String>) = present
            .iter()
            .filter(|k| !wanted.contains_key(*k) && !k.ends_with(IGNORED_SUFFIX))
            .map(|k| k.to_string())
            .partition(|k| built.contains(&top(k)));
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(RuntimeError::KeyMismatch {
                source_name,
                missing,
                unexpected,
            });
        }

        let mut tensors = BTreeMap::new();
        for (name, ty) in wanted {
            let view = st.tensor(name).map_err(|e| file_err(format!("tensor `{name}`: {e}")))?;
            check_shape(name, ty, view.shape())?;
            let stored = st_to_ir(view.dtype());
            let dtype_err = || RuntimeError::ParameterDtype {
                name: name.to_string(),
                expected: ty.dtype.to_string(),
                found: stored
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| format!("{:?}", view.dtype())),
            };
            let stored = stored.ok_or_else(dtype_err)?;
            if stored != ty.dtype && !(stored.is_float() && ty.dtype.is_float()) {
                return Err(dtype_err());
            }
            let t = Tensor::from_raw_buffer(view.data(), to_candle(stored), view.shape(), device)
                .map_err(|e| file_err(format!("tensor `{name}`: {e}")))?;
            tensors.insert(name.to_string(), t.to_dtype(to_candle(ty.dtype))?);
        }
        Ok(ParamStore { tensors, skipped })
    }

    /// Initializes every parameter of `graph` on `device` following its `Init`, deterministically
    /// from `seed` and the parameter's name. Random values are drawn in f64 and rounded to the
    /// parameter's dtype. `TruncNormal { std }` draws `std * z` with `z` standard normal
    /// rejected outside `[-2, 2]` (the IR's definition: truncation at 2 std).
    pub fn init_random(graph: &Graph, seed: u64, device: &Device) -> Result<Self, RuntimeError> {
        let mut tensors = BTreeMap::new();
        for (_, p) in graph.parameters() {
            let dtype = to_candle(p.ty.dtype);
            let shape = p.ty.shape.as_slice();
            let random = |f: &mut dyn FnMut(&mut Rng) -> f64| -> Result<Tensor, RuntimeError> {
                if !p.ty.dtype.is_float() {
                    return Err(RuntimeError::ParameterInit {
                        name: p.name.clone(),
                        message: format!("random init of a {} tensor", p.ty.dtype),
                    });
                }
                let mut rng = Rng::for_name(seed, &p.name);
                let n = p.ty.numel();
                let t = if p.ty.dtype == DType::F64 {
                    Tensor::from_vec((0..n).map(|_| f(&mut rng)).collect::<Vec<f64>>(), shape, device)?
                } else {
                    Tensor::from_vec((0..n).map(|_| f(&mut rng) as f32).collect::<Vec<f32>>(), shape, device)?
                        .to_dtype(dtype)?
                };
                Ok(t)
            };
            let t = match p.init {
                Init::Zeros => Tensor::zeros(shape, dtype, device)?,
                Init::Ones => Tensor::ones(shape, dtype, device)?,
                Init::Normal { std } => random(&mut |r| std * r.normal())?,
                Init::TruncNormal { std } => random(&mut |r| loop {
                    let z = r.normal();
                    if z.abs() <= 2.0 {
                        break std * z;
                    }
                })?,
                Init::Uniform { bound } => random(&mut |r| bound * (2.0 * r.uniform() - 1.0))?,
            };
            tensors.insert(p.name.clone(), t);
        }
        Ok(ParamStore::from_tensors(tensors))
    }

    /// Writes every tensor to a safetensors file, atomically ([`crate::write_atomic`]: a
    /// temporary file in the same directory, synced, then renamed over `path`).
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<(), RuntimeError> {
        let path = path.as_ref();
        let write_err = |message: String| RuntimeError::WeightsWrite {
            path: path.to_path_buf(),
            message,
        };
        let mut views = Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            views.push((
                name.clone(),
                RawView::from_tensor(t).map_err(|e| write_err(format!("tensor `{name}`: {e}")))?,
            ));
        }
        let bytes = safetensors::tensor::serialize(views, &None).map_err(|e| write_err(e.to_string()))?;
        crate::fsio::write_atomic(path, &bytes).map_err(|e| write_err(e.to_string()))
    }
}

fn check_shape(name: &str, ty: &TensorType, found: &[usize]) -> Result<(), RuntimeError> {
    if ty.shape != found {
        return Err(RuntimeError::ParameterShape {
            name: name.to_string(),
            expected: ty.shape.clone(),
            found: found.to_vec(),
        });
    }
    Ok(())
}

pub(crate) fn st_to_ir(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::I64 => DType::I64,
        StDtype::U32 => DType::U32,
        StDtype::U8 => DType::U8,
        _ => return None,
    })
}

fn ir_to_st(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F64 => StDtype::F64,
        DType::I64 => StDtype::I64,
        DType::U32 => StDtype::U32,
        DType::U8 => StDtype::U8,
    }
}

/// A tensor's bytes (little endian) for serialization.
pub(crate) struct RawView {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl RawView {
    pub(crate) fn from_tensor(t: &Tensor) -> Result<Self, String> {
        let dtype = from_candle(t.dtype()).ok_or_else(|| format!("unsupported dtype {:?}", t.dtype()))?;
        let flat = t
            .flatten_all()
            .and_then(|f| f.to_device(&Device::Cpu))
            .map_err(|e| e.to_string())?;
        fn bytes<T: candle_core::WithDType, const N: usize>(
            t: &Tensor,
            f: impl Fn(T) -> [u8; N],
        ) -> Result<Vec<u8>, String> {
            Ok(t.to_vec1::<T>()
                .map_err(|e| e.to_string())?
                .into_iter()
                .flat_map(f)
                .collect())
        }
        let data = match t.dtype() {
            CDType::F32 => bytes(&flat, f32::to_le_bytes)?,
            CDType::F64 => bytes(&flat, f64::to_le_bytes)?,
            CDType::F16 => bytes(&flat, half::f16::to_le_bytes)?,
            CDType::BF16 => bytes(&flat, half::bf16::to_le_bytes)?,
            CDType::I64 => bytes(&flat, i64::to_le_bytes)?,
            CDType::U32 => bytes(&flat, u32::to_le_bytes)?,
            CDType::U8 => bytes(&flat, u8::to_le_bytes)?,
            d => return Err(format!("unsupported dtype {d:?}")),
        };
        Ok(RawView {
            dtype: ir_to_st(dtype),
            shape: t.dims().to_vec(),
            data,
        })
    }
}

impl View for RawView {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A small deterministic generator (xoshiro256**, seeded through SplitMix64 from the run seed
/// and an FNV-1a hash of the parameter name). Its output never changes between releases, so
/// seeded initializations are reproducible.
pub(crate) struct Rng {
    s: [u64; 4],
    spare: Option<f64>,
}

impl Rng {
    pub(crate) fn for_name(seed: u64, name: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self::new(seed ^ h.rotate_left(17))
    }

    pub(crate) fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box-Muller, both values of each pair used).
    pub(crate) fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}
