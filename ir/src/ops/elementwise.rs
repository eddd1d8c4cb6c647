//! Elementwise ops.

use serde::{Deserialize, Serialize};

use super::{broadcast_shapes, expect_float, expect_same_dtype, numel, Cost, IntRange, OpRule, RowRule};
use crate::types::{DType, TensorType};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnaryKind {
    /// Exact GELU, `x * 0.5 * (1 + erf(x / sqrt 2))` (PyTorch's default).
    Gelu,
    Relu,
    Sigmoid,
    Exp,
    Log,
    Neg,
    Sqrt,
    Tanh,
    Abs,
}

impl UnaryKind {
    /// Plain flops per element (an estimate for transcendental functions).
    fn flops_per_element(self) -> u64 {
        match self {
            UnaryKind::Gelu => 8,
            UnaryKind::Sigmoid | UnaryKind::Tanh => 4,
            UnaryKind::Exp | UnaryKind::Log | UnaryKind::Sqrt => 2,
            UnaryKind::Relu | UnaryKind::Neg | UnaryKind::Abs => 1,
        }
    }
}

/// `y = f(x)` elementwise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unary {
    pub kind: UnaryKind,
}

impl OpRule for Unary {
    fn name(&self) -> &'static str {
        "unary"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_float("input", i[0])?;
        Ok(vec![i[0].clone()])
    }
    fn cost(&self, _: &[&TensorType], o: &[TensorType]) -> Cost {
        Cost {
            flops: numel(&o[0].shape) * self.kind.flops_per_element(),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0], &[0])
    }
}

/// Backward of [`Unary`]: inputs `(x, dy)` of the same type, `dx = dy * f'(x)` elementwise:
/// * gelu: `Phi(x) + x * phi(x)` (exact, with the normal cdf `Phi` and pdf `phi`);
/// * relu: `0` where `x <= 0`, else `1` (PyTorch's `threshold_backward`: `f'(0) = 0`, and a NaN
///   input passes `dy` through);
/// * sigmoid: `s (1 - s)` with `s = sigmoid(x)`; exp: `exp(x)`; log: `1 / x`; neg: `-1`;
/// * sqrt: `0.5 / sqrt(x)`; tanh: `1 - t^2` with `t = tanh(x)`;
/// * abs: `sign(x)` with `sign(0) = 0` (and `0` for NaN, as PyTorch's CPU `sgn`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnaryGrad {
    pub kind: UnaryKind,
}

impl OpRule for UnaryGrad {
    fn name(&self) -> &'static str {
        "unary_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_float("input", i[0])?;
        if i[0] != i[1] {
            return Err(format!("gradient {} must have the input's type {}", i[1], i[0]));
        }
        Ok(vec![i[0].clone()])
    }
    fn cost(&self, _: &[&TensorType], o: &[TensorType]) -> Cost {
        // Re-evaluating f (or its derivative) plus the multiply by dy.
        Cost {
            flops: numel(&o[0].shape) * (self.kind.flops_per_element() + 1),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0, 1], &[0])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryKind {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
}

/// `y = a (op) b` with NumPy broadcasting; both operands have the same dtype.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Binary {
    pub kind: BinaryKind,
}

impl OpRule for Binary {
    /// Interval arithmetic on integer operands (`None` on overflow or division).
    fn value_ranges(&self, i: &[Option<IntRange>], t: &[&TensorType]) -> Vec<Option<IntRange>> {
        let (Some(a), Some(b)) = (i[0], i[1]) else {
            return vec![None];
        };
        if t[0].dtype.is_float() {
            return vec![None];
        }
        let corners = |f: fn(i64, i64) -> Option<i64>| -> Option<IntRange> {
            let v = [f(a.lo, b.lo)?, f(a.lo, b.hi)?, f(a.hi, b.lo)?, f(a.hi, b.hi)?];
            Some(IntRange::new(*v.iter().min()?, *v.iter().max()?))
        };
        vec![match self.kind {
            BinaryKind::Minimum => Some(IntRange::new(a.lo.min(b.lo), a.hi.min(b.hi))),
            BinaryKind::Maximum => Some(IntRange::new(a.lo.max(b.lo), a.hi.max(b.hi))),
            BinaryKind::Add => corners(i64::checked_add),
            BinaryKind::Sub => corners(i64::checked_sub),
            BinaryKind::Mul => corners(i64::checked_mul),
            BinaryKind::Div => None,
        }]
    }
    fn name(&self) -> &'static str {
        "binary"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_same_dtype(i[0], i[1], "operands")?;
        Ok(vec![i[0].with_shape(broadcast_shapes(&i[0].shape, &i[1].shape)?)])
    }
    fn cost(&self, _: &[&TensorType], o: &[TensorType]) -> Cost {
        Cost {
            flops: numel(&o[0].shape),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0, 1], &[0])
    }
}

/// `y = x * mul + add` with scalar constants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Affine {
    pub mul: f64,
    pub add: f64,
}

impl OpRule for Affine {
    fn name(&self) -> &'static str {
        "affine"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_float("input", i[0])?;
        Ok(vec![i[0].clone()])
    }
    fn cost(&self, _: &[&TensorType], o: &[TensorType]) -> Cost {
        Cost {
            flops: 2 * numel(&o[0].shape),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0], &[0])
    }
}

/// Converts to another dtype (used by mixed precision).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cast {
    pub dtype: DType,
}

impl OpRule for Cast {
    /// Integer to integer keeps the values when the target holds them all.
    fn value_ranges(&self, i: &[Option<IntRange>], t: &[&TensorType]) -> Vec<Option<IntRange>> {
        let holds = |r: IntRange| match self.dtype {
            DType::I64 => true,
            DType::U32 => r.lo >= 0 && r.hi <= u32::MAX as i64,
            DType::U8 => r.lo >= 0 && r.hi <= u8::MAX as i64,
            _ => false,
        };
        vec![i[0].filter(|&r| !t[0].dtype.is_float() && holds(r))]
    }
    fn name(&self) -> &'static str {
        "cast"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        Ok(vec![TensorType::new(self.dtype, i[0].shape.clone())])
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0], &[0])
    }
}

/// Stochastic depth on a residual branch `[B, ...]`: in training, each sample's branch is
/// zeroed with probability `rate` and the survivors scaled by `1 / (1 - rate)`; at inference it
/// is the identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DropPath {
    pub rate: f64,
}

impl OpRule for DropPath {
    fn name(&self) -> &'static str {
        "drop_path"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        if !(0.0..1.0).contains(&self.rate) {
            return Err(format!("drop rate must be in [0, 1), found {}", self.rate));
        }
        expect_float("input", i[0])?;
        Ok(vec![i[0].clone()])
    }
}
