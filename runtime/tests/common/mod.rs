//! Test helpers: a tiny f64 n-d array for plain-loop reference implementations, a seeded
//! generator, and closeness checks.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};

/// Deterministic test generator (SplitMix64).
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// A row-major f64 array.
#[derive(Clone, Debug)]
pub struct Nd {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Nd {
    pub fn new(shape: &[usize], data: Vec<f64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        Nd {
            shape: shape.to_vec(),
            data,
        }
    }
    pub fn zeros(shape: &[usize]) -> Self {
        Nd::new(shape, vec![0.0; shape.iter().product()])
    }
    /// Standard normal values times `scale` plus `offset`, rounded to f32 (so f32 kernels see
    /// exactly the reference's inputs).
    pub fn randn(shape: &[usize], rng: &mut TestRng, scale: f64, offset: f64) -> Self {
        let n = shape.iter().product();
        Nd::new(
            shape,
            (0..n)
                .map(|_| ((rng.normal() * scale + offset) as f32) as f64)
                .collect(),
        )
    }
    pub fn strides(&self) -> Vec<usize> {
        let mut s = vec![1; self.shape.len()];
        for i in (0..self.shape.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * self.shape[i + 1];
        }
        s
    }
    pub fn offset(&self, idx: &[usize]) -> usize {
        assert_eq!(idx.len(), self.shape.len());
        idx.iter().zip(self.strides()).map(|(i, s)| i * s).sum()
    }
    pub fn at(&self, idx: &[usize]) -> f64 {
        for (i, d) in idx.iter().zip(&self.shape) {
            assert!(i < d, "index {idx:?} out of {:?}", self.shape);
        }
        self.data[self.offset(idx)]
    }
    pub fn set(&mut self, idx: &[usize], v: f64) {
        let o = self.offset(idx);
        self.data[o] = v;
    }
    pub fn tensor(&self) -> Tensor {
        self.tensor_as(DType::F32)
    }
    pub fn tensor_as(&self, dtype: DType) -> Tensor {
        Tensor::from_vec(self.data.clone(), self.shape.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }
    pub fn from_tensor(t: &Tensor) -> Nd {
        let data = t
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        Nd::new(t.dims(), data)
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Calls `f` with every index of `shape` in row-major order.
pub fn for_each_index(shape: &[usize], mut f: impl FnMut(&[usize])) {
    if shape.contains(&0) {
        return;
    }
    let mut idx = vec![0usize; shape.len()];
    loop {
        f(&idx);
        let mut d = shape.len();
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Asserts equal shapes and `|got - want| <= atol + rtol * |want|` everywhere.
pub fn assert_close(got: &Nd, want: &Nd, atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let mut worst = (0.0f64, 0usize);
    for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
        if g.is_nan() || w.is_nan() {
            assert!(
                g.is_nan() && w.is_nan(),
                "{what}: NaN mismatch at {i}: got {g}, want {w}"
            );
            continue;
        }
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    if worst.0 > 0.0 {
        let i = worst.1;
        panic!(
            "{what}: element {i} got {} want {} (|diff| {:.3e} > atol {atol:e} + rtol {rtol:e} * |want|)",
            got.data[i],
            want.data[i],
            (got.data[i] - want.data[i]).abs()
        );
    }
}

/// Max |got - want| (for reporting).
pub fn max_abs_diff(got: &Nd, want: &Nd) -> f64 {
    got.data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

pub fn fixtures_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The first CUDA device, or `None` after printing why the calling test is skipped (a build
/// without the `cuda` feature, or a machine without a GPU and its driver).
pub fn cuda_device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Relative L2 error of `got` against `want` (any devices and float dtypes), in f64.
pub fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    let (g, w) = (Nd::from_tensor(got), Nd::from_tensor(want));
    let diff: f64 = g.data.iter().zip(&w.data).map(|(a, b)| (a - b) * (a - b)).sum();
    let norm: f64 = w.data.iter().map(|b| b * b).sum();
    (diff / norm.max(1e-300)).sqrt()
}
