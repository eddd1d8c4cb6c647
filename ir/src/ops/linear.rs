//! Contractions: linear layers and batched matrix products.

use serde::{Deserialize, Serialize};

use super::{broadcast_shapes, expect_float, expect_same_dtype, numel, Cost, OpRule};
use crate::types::TensorType;

/// `y = x @ w^T (+ b)`: `x [..., in]`, `w [out, in]`, optional `b [out]` -> `[..., out]`
/// (PyTorch's `nn.Linear`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Linear {}

impl OpRule for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 3)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (x, w) = (i[0], i[1]);
        expect_float("input", x)?;
        expect_same_dtype(x, w, "weight")?;
        if x.rank() < 1 || w.rank() != 2 {
            return Err(format!(
                "expects input [..., in] and weight [out, in], found {x} and {w}"
            ));
        }
        let inp = x.shape[x.rank() - 1];
        if w.shape[1] != inp {
            return Err(format!("weight {w} does not take {inp} input features (input {x})"));
        }
        if let Some(b) = i.get(2) {
            super::expect_vector("bias", b, w.shape[0], x)?;
        }
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = w.shape[0];
        Ok(vec![x.with_shape(shape)])
    }
    fn cost(&self, i: &[&TensorType], o: &[TensorType]) -> Cost {
        let macs = numel(&i[0].shape) * i[1].shape[0] as u64;
        let out = numel(&o[0].shape);
        Cost {
            macs,
            flops: 2 * macs + if i.len() == 3 { out } else { 0 },
            activations: out,
        }
    }
}

/// Batched matrix product `a [..., m, k] @ b [..., k, n] -> [..., m, n]`, batch dims broadcast.
/// With `transpose_lhs`, `a` is `[..., k, m]` and is used transposed (the weight gradient
/// `dy^T @ x` of a linear layer without a copy); with `transpose_rhs`, `b` is `[..., n, k]`
/// (`q @ k^T`). `transpose_lhs` is left out of the serialized form when false, so graphs written
/// before it existed read back unchanged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MatMul {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transpose_lhs: bool,
    pub transpose_rhs: bool,
}

impl MatMul {
    /// `a @ b`, or `a @ b^T` with `transpose_rhs`.
    pub fn new(transpose_rhs: bool) -> MatMul {
        MatMul {
            transpose_lhs: false,
            transpose_rhs,
        }
    }

    /// `(m, k)` of the lhs `a` as used (transposed with `transpose_lhs`).
    pub fn lhs_dims(&self, a: &[usize]) -> (usize, usize) {
        matrix_dims(a, self.transpose_lhs)
    }

    /// `(k, n)` of the rhs `b` as used (transposed with `transpose_rhs`).
    pub fn rhs_dims(&self, b: &[usize]) -> (usize, usize) {
        matrix_dims(b, self.transpose_rhs)
    }
}

/// `(rows, cols)` of the matrices of `[..., r, c]`, swapped when used transposed.
fn matrix_dims(dims: &[usize], transposed: bool) -> (usize, usize) {
    let (r, c) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if transposed {
        (c, r)
    } else {
        (r, c)
    }
}

impl OpRule for MatMul {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (a, b) = (i[0], i[1]);
        expect_float("lhs", a)?;
        expect_same_dtype(a, b, "rhs")?;
        if a.rank() < 2 || b.rank() < 2 {
            return Err(format!("operands must have rank >= 2, found {a} and {b}"));
        }
        let ((m, k), (bk, n)) = (self.lhs_dims(&a.shape), self.rhs_dims(&b.shape));
        if k != bk {
            let t = |yes: bool| if yes { "^T" } else { "" };
            return Err(format!(
                "inner dimensions differ: {a}{} @ {b}{} ({k} vs {bk})",
                t(self.transpose_lhs),
                t(self.transpose_rhs)
            ));
        }
        let mut shape = broadcast_shapes(&a.shape[..a.rank() - 2], &b.shape[..b.rank() - 2])?;
        shape.extend([m, n]);
        Ok(vec![a.with_shape(shape)])
    }
    fn cost(&self, i: &[&TensorType], o: &[TensorType]) -> Cost {
        let k = self.lhs_dims(&i[0].shape).1 as u64;
        let out = numel(&o[0].shape);
        Cost {
            macs: out * k,
            flops: 2 * out * k,
            activations: out,
        }
    }
}
