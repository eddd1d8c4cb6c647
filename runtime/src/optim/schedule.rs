//! The learning-rate schedule: linear warmup, then half-period cosine to 0.
//!
//! This is detectron2's
//! `LRMultiplier(opt, WarmupParamScheduler(CosineParamScheduler(1, 0), warmup_factor,
//! warmup_iters / max_iter), max_iter)`, evaluated the way fvcore does, in the same f64
//! operations:
//!
//! * `where = i / max_iter` at iteration `i` (0-based; the multiplier of the update made by the
//!   `i`-th step), `w = warmup_iters / max_iter`;
//! * `cosine(x) = 0 + 0.5 * (1 - 0) * (1 + cos(pi * x))`;
//! * if `where + 1e-6 > w` (fvcore's `CompositeParamScheduler` with its `WHERE_EPSILON`), the
//!   value is `cosine(where)` (the cosine keeps its own clock: "fixed" interval scaling);
//! * otherwise the linear warmup from `warmup_factor * cosine(0)` to `cosine(w)` at `x = where / w`:
//!   `cosine(w) * x + warmup_factor * (1 - x)`.
//!
//! The paper warms up for 0.25 epoch; here the length is given in iterations.

use serde::{Deserialize, Serialize};

use super::OptimError;

/// fvcore's `ParamScheduler.WHERE_EPSILON`.
const WHERE_EPSILON: f64 = 1e-6;

/// Linear warmup + half-period cosine learning-rate multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WarmupCosine {
    /// Iterations of the whole run (the cosine reaches 0 at `max_iter`).
    pub max_iter: u64,
    /// Iterations of linear warmup (0 for none).
    pub warmup_iters: u64,
    /// Multiplier at iteration 0, relative to the cosine's start (detectron2: 0.001).
    pub warmup_factor: f64,
}

impl WarmupCosine {
    /// detectron2's warmup factor.
    pub const DEFAULT_WARMUP_FACTOR: f64 = 0.001;

    /// A schedule over `max_iter` iterations with `warmup_iters` of warmup from factor 0.001.
    pub fn new(max_iter: u64, warmup_iters: u64) -> Result<Self, OptimError> {
        Self::with_warmup_factor(max_iter, warmup_iters, Self::DEFAULT_WARMUP_FACTOR)
    }

    pub fn with_warmup_factor(max_iter: u64, warmup_iters: u64, warmup_factor: f64) -> Result<Self, OptimError> {
        if max_iter == 0 {
            return Err(OptimError::Config("schedule: max_iter must be at least 1".into()));
        }
        if warmup_iters > max_iter {
            return Err(OptimError::Config(format!(
                "schedule: {warmup_iters} warmup iterations exceed max_iter {max_iter}"
            )));
        }
        if !(warmup_factor.is_finite() && warmup_factor >= 0.0) {
            return Err(OptimError::Config(format!(
                "schedule: warmup factor must be finite and >= 0, found {warmup_factor}"
            )));
        }
        Ok(WarmupCosine {
            max_iter,
            warmup_iters,
            warmup_factor,
        })
    }

    /// The multiplier of the base learning rates at `iteration` (in `[0, max_iter]`).
    pub fn multiplier(&self, iteration: u64) -> Result<f64, OptimError> {
        if iteration > self.max_iter {
            return Err(OptimError::IterationOutOfRange {
                iteration,
                max_iter: self.max_iter,
            });
        }
        let max_iter = self.max_iter as f64;
        let at = iteration as f64 / max_iter;
        let warmup_length = self.warmup_iters as f64 / max_iter;
        if at + WHERE_EPSILON > warmup_length {
            return Ok(cosine(at));
        }
        let start = self.warmup_factor * cosine(0.0);
        let end = cosine(warmup_length);
        // The warmup scheduler starts at 0 and is rescaled to its own length.
        let x = (at - 0.0) / warmup_length;
        Ok(end * x + start * (1.0 - x))
    }
}

/// fvcore's `CosineParamScheduler(start_value=1, end_value=0)`.
fn cosine(at: f64) -> f64 {
    let (start, end) = (1.0f64, 0.0f64);
    end + 0.5 * (start - end) * (1.0 + (std::f64::consts::PI * at).cos())
}
