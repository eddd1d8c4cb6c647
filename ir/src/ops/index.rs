//! Index constants and comparison masks for static-shape post-processing (Mask R-CNN's level
//! ids, class ids and "non-empty box" masks), the graph form of `torch.full`, `torch.arange`
//! and `x > c`.
//!
//! [`IotaLike`] takes its shape (and, at run time, its device) from an input whose values it
//! ignores, so every op keeps at least one input and no kernel needs to be told a device.

use serde::{Deserialize, Serialize};

use super::{numel, Cost, IntRange, OpRule};
use crate::types::{DType, TensorType};

/// `out[i] = start + step * i[axis]`, shaped like the input (whose values are not read), in
/// `dtype`: `step = 0` fills with `start` (`torch.full_like`), `step = 1` counts along `axis`
/// (`torch.arange` broadcast over the other axes). For integer dtypes `start` and `step` must
/// be integers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IotaLike {
    pub axis: usize,
    pub start: f64,
    pub step: f64,
    pub dtype: DType,
}

impl OpRule for IotaLike {
    /// `start + step * i` for `i` in `0..len` (integer dtypes).
    fn value_ranges(&self, _: &[Option<IntRange>], t: &[&TensorType]) -> Vec<Option<IntRange>> {
        let len = t[0].shape.get(self.axis).copied().unwrap_or(0);
        if self.dtype.is_float() || len == 0 {
            return vec![None];
        }
        let last = self.start + self.step * (len - 1) as f64;
        let fits = |v: f64| v.abs() < 2f64.powi(53);
        vec![(fits(self.start) && fits(last)).then(|| IntRange::new(self.start as i64, last as i64))]
    }
    fn name(&self) -> &'static str {
        "iota_like"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        if self.axis >= x.rank() {
            return Err(format!("axis {} out of range for {x}", self.axis));
        }
        if !self.start.is_finite() || !self.step.is_finite() {
            return Err(format!("start {} and step {} must be finite", self.start, self.step));
        }
        if !self.dtype.is_float() && (self.start.fract() != 0.0 || self.step.fract() != 0.0) {
            return Err(format!(
                "start {} and step {} must be integers for {}",
                self.start, self.step, self.dtype
            ));
        }
        Ok(vec![TensorType::new(self.dtype, x.shape.clone())])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareKind {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

/// `out = (x (kind) value)` elementwise as `u8` (1 = true): a validity mask. Comparisons with
/// NaN are false (`ne`: true), as in IEEE arithmetic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompareScalar {
    pub kind: CompareKind,
    pub value: f64,
}

impl OpRule for CompareScalar {
    fn name(&self) -> &'static str {
        "compare_scalar"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        if self.value.is_nan() {
            return Err("cannot compare with NaN".into());
        }
        Ok(vec![TensorType::new(DType::U8, i[0].shape.clone())])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: numel(&i[0].shape),
            ..Cost::default()
        }
    }
}
