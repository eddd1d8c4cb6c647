//! Random ops. Randomness is a pure function of a seed value in the graph, so a training step
//! is reproducible from its seed alone and needs no generator state in the runtime.

use serde::{Deserialize, Serialize};

use super::{Cost, OpRule};
use crate::types::{DType, TensorType};

/// Per-sample keep mask for stochastic depth ([`DropPath`](super::DropPath) in training):
/// input `seed`, an i64 scalar (`[]` or `[1]`), whose bits are read as a `u64`; output
/// `[batch]` f32 with entries `0` (dropped) or `1 / (1 - rate)` (kept).
///
/// Sample `b` is kept when `u(seed, stream, b) >= rate`, so with probability `1 - rate`, where
/// `u` is the counter-based uniform [`DropPathMask::uniform`]: no state is carried between
/// calls, any iteration's mask follows from its seed, and different `stream`s (one per drop-path
/// site) draw independent masks from one seed. `rate = 0` keeps every sample (all ones).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DropPathMask {
    pub rate: f64,
    pub stream: u64,
    pub batch: usize,
}

/// SplitMix64's output function applied to `z + golden gamma` (Steele, Lea and Flood, 2014): a
/// bijection of `u64` with good avalanche, used here as a stateless hash.
pub fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl DropPathMask {
    /// The uniform draw in `[0, 1)` for sample `b`:
    /// `h = splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ b)`, then the top 53 bits of `h`
    /// times `2^-53`. Chaining the hash keeps `(seed, stream, b)` triples that differ in any
    /// field from sharing a draw in practice.
    pub fn uniform(seed: u64, stream: u64, b: u64) -> f64 {
        let h = splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ b);
        (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// The mask value for sample `b` under `seed`: `0` or `1 / (1 - rate)`.
    pub fn value(&self, seed: u64, b: u64) -> f64 {
        if Self::uniform(seed, self.stream, b) >= self.rate {
            1.0 / (1.0 - self.rate)
        } else {
            0.0
        }
    }
}

impl OpRule for DropPathMask {
    fn name(&self) -> &'static str {
        "drop_path_mask"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        if !(0.0..1.0).contains(&self.rate) {
            return Err(format!("drop rate must be in [0, 1), found {}", self.rate));
        }
        if self.batch == 0 {
            return Err("batch must be positive".into());
        }
        let seed = i[0];
        if seed.dtype != DType::I64 || seed.numel() != 1 || seed.rank() > 1 {
            return Err(format!("seed must be an i64 scalar ([] or [1]), found {seed}"));
        }
        Ok(vec![TensorType::f32([self.batch])])
    }
    /// A handful of integer operations per sample; counted as one flop each.
    fn cost(&self, _: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: self.batch as u64,
            ..Cost::default()
        }
    }
}
