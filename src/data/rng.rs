//! Counter-based random streams: every random decision of the data pipeline comes from a
//! ChaCha8 generator whose 256-bit key is `(seed, domain, a, b)`, so the draws for any
//! (iteration, sample) can be reproduced alone, without replaying the ones before it (what an
//! exact resume needs). ChaCha is a pseudo-random function of its key, so distinct keys give
//! independent streams.
//!
//! Only the raw 64-bit outputs of ChaCha8 are used; the conversions to floats and ranges below
//! are written out here so the streams do not change with the `rand` crate's sampling code.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a stream is for; part of the key so different uses never share draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Domain {
    /// Synthetic dataset: `a` = split, `b` = image index.
    Synthetic = 1,
    /// Training sampler: `a` = epoch.
    Sampler = 2,
    /// Large-scale jitter: `a` = iteration, `b` = sample index within the batch.
    Lsj = 3,
    /// The training graph's `seed` input (drop path, anchor and RoI sampling): `a` = iteration,
    /// `b` = sample index within the batch.
    Model = 4,
}

/// A deterministic random stream keyed by `(seed, domain, a, b)`.
pub struct Stream(ChaCha8Rng);

impl Stream {
    pub fn new(seed: u64, domain: Domain, a: u64, b: u64) -> Self {
        let mut key = [0u8; 32];
        for (i, v) in [seed, domain as u64, a, b].into_iter().enumerate() {
            key[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        Stream(ChaCha8Rng::from_seed(key))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`, computed as numpy's `uniform` does: `lo + (hi - lo) * u`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in `0..n` (unbiased: rejection of the incomplete top block). `n > 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let zone = u64::MAX - (u64::MAX - n + 1) % n;
        loop {
            let x = self.next_u64();
            if x <= zone {
                return x % n;
            }
        }
    }

    /// Uniform integer in `lo..=hi`.
    pub fn range_inclusive(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below((hi - lo + 1) as u64) as usize
    }

    /// A uniformly random point of the unit disc (rejection sampling: only `+ * <`, so the
    /// result is the same on every platform, unlike `sin`/`cos`).
    pub fn in_unit_disc(&mut self) -> (f64, f64) {
        loop {
            let (x, y) = (self.uniform(-1.0, 1.0), self.uniform(-1.0, 1.0));
            if x * x + y * y < 1.0 {
                return (x, y);
            }
        }
    }

    /// A uniformly random unit vector (a direction), via [`Stream::in_unit_disc`].
    pub fn direction(&mut self) -> (f64, f64) {
        loop {
            let (x, y) = self.in_unit_disc();
            let n = (x * x + y * y).sqrt();
            if n > 1e-3 {
                return (x / n, y / n);
            }
        }
    }
}
