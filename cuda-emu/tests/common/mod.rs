//! What the emulator tests share: a seeded generator and the relative L2 error.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};

/// A 64-bit linear congruential generator (Knuth's MMIX constants): reproducible inputs.
pub struct Rng(pub u64);

impl Rng {
    /// The next state.
    pub fn next_state(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }

    /// `n` values uniform in `[offset - scale, offset + scale)`.
    pub fn values(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next_state() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale + offset)
            .collect()
    }

    /// An f32 CPU tensor of values uniform in `[-scale, scale)`.
    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        self.tensor_around(shape, scale, 0.0)
    }

    /// An f32 CPU tensor of values uniform in `[offset - scale, offset + scale)`.
    pub fn tensor_around(&mut self, shape: &[usize], scale: f32, offset: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(self.values(n, scale, offset), shape, &Device::Cpu).unwrap()
    }
}

/// A tensor's elements as f64, in row-major order (any float dtype).
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// `|got - want| / |want|` over all elements, computed in f64 (any float dtypes).
pub fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    let (g, w) = (values(got), values(want));
    let d: f64 = g.iter().zip(&w).map(|(a, b)| (a - b) * (a - b)).sum();
    let n: f64 = w.iter().map(|b| b * b).sum();
    (d / n.max(1e-300)).sqrt()
}
