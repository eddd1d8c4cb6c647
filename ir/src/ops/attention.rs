//! Attention building blocks: softmax and the two relative-position families.

use serde::{Deserialize, Serialize};

use super::{expect_float, expect_rank, expect_same_dtype, numel, Cost, OpRule};
use crate::types::TensorType;

/// Softmax along `axis` (computed stably: `exp(x - max) / sum`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Softmax {
    pub axis: usize,
}

impl OpRule for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_float("input", i[0])?;
        if self.axis >= i[0].rank() {
            return Err(format!("axis {} out of range for {}", self.axis, i[0]));
        }
        Ok(vec![i[0].clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: 5 * numel(&i[0].shape),
            ..Cost::default()
        }
    }
}

/// Backward of [`Softmax`] along `axis`: inputs `y` (the softmax output) and `dy` (its
/// gradient), same shape and dtype; output `dx = y * (dy - sum(dy * y, axis))`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SoftmaxGrad {
    pub axis: usize,
}

impl OpRule for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (y, dy) = (i[0], i[1]);
        expect_float("softmax output", y)?;
        expect_same_dtype(y, dy, "softmax output and gradient")?;
        if y.shape != dy.shape {
            return Err(format!("softmax output {y} and gradient {dy} must have one shape"));
        }
        if self.axis >= y.rank() {
            return Err(format!("axis {} out of range for {y}", self.axis));
        }
        Ok(vec![y.clone()])
    }
    /// Per element: one multiply and add for the dot product, a subtract and a multiply.
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: 4 * numel(&i[0].shape),
            ..Cost::default()
        }
    }
}

/// detectron2's `get_rel_pos`: from a decomposed relative-position table `[L, C]`, the
/// embeddings for every (query, key) coordinate pair along one axis, `[q_size, k_size, C]`.
/// When `L != 2 max(q, k) - 1` the table is first resized along `L` by linear interpolation
/// (`align_corners = False`); entry `(i, j)` reads row
/// `i * max(k/q, 1) - j * max(q/k, 1) + (k - 1) * max(q/k, 1)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelPosGather {
    pub q_size: usize,
    pub k_size: usize,
}

impl OpRule for RelPosGather {
    fn name(&self) -> &'static str {
        "rel_pos_gather"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let t = i[0];
        expect_rank("table", t, 2)?;
        expect_float("table", t)?;
        if self.q_size == 0 || self.k_size == 0 || t.shape[0] == 0 {
            return Err(format!("empty sizes q={} k={} for table {t}", self.q_size, self.k_size));
        }
        Ok(vec![t.with_shape([self.q_size, self.k_size, t.shape[1]])])
    }
}

/// Backward of [`RelPosGather`]: `dy [q_size, k_size, C] -> dtable [table_len, C]`, the exact
/// adjoint of the forward for a table of `table_len` rows. Each `dy[i, j]` is added to the
/// resized-table row the forward read for `(i, j)` (repeated rows accumulate); when
/// `table_len != 2 max(q, k) - 1` the forward resized the table by linear interpolation, so the
/// result is then mapped back through the transposed interpolation matrix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelPosGatherGrad {
    pub q_size: usize,
    pub k_size: usize,
    pub table_len: usize,
}

impl OpRule for RelPosGatherGrad {
    fn name(&self) -> &'static str {
        "rel_pos_gather_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let dy = i[0];
        expect_rank("gradient", dy, 3)?;
        expect_float("gradient", dy)?;
        if self.q_size == 0 || self.k_size == 0 || self.table_len == 0 {
            return Err(format!(
                "empty sizes q={} k={} table_len={}",
                self.q_size, self.k_size, self.table_len
            ));
        }
        if dy.shape[..2] != [self.q_size, self.k_size] {
            return Err(format!(
                "gradient must be [{}, {}, C], found {dy}",
                self.q_size, self.k_size
            ));
        }
        Ok(vec![dy.with_shape([self.table_len, dy.shape[2]])])
    }
    /// One add per gradient element, plus a `[table_len, 2 max(q, k) - 1] x [.., C]` product
    /// when the table was resized.
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        let c = i[0].shape.get(2).copied().unwrap_or(0) as u64;
        let target = 2 * self.q_size.max(self.k_size) as u64 - 1;
        let resize = if self.table_len as u64 != target {
            2 * self.table_len as u64 * target * c
        } else {
            0
        };
        Cost {
            flops: numel(&i[0].shape) + resize,
            ..Cost::default()
        }
    }
}

/// BEiT's relative position bias for a `window[0] x window[1]` token grid: from a table
/// `[(2h-1)(2w-1), heads]`, the bias `[heads, h*w, h*w]` whose entry `(n, i, j)` is
/// `table[(yi - yj + h - 1) * (2w - 1) + (xi - xj + w - 1), n]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelPosBias {
    pub window: [usize; 2],
}

impl RelPosBias {
    /// Rows a table for this window must have.
    pub fn table_len(&self) -> usize {
        (2 * self.window[0] - 1) * (2 * self.window[1] - 1)
    }
}

impl OpRule for RelPosBias {
    fn name(&self) -> &'static str {
        "rel_pos_bias"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let t = i[0];
        expect_rank("table", t, 2)?;
        expect_float("table", t)?;
        if self.window[0] == 0 || self.window[1] == 0 {
            return Err(format!("empty window {:?}", self.window));
        }
        if t.shape[0] != self.table_len() {
            return Err(format!(
                "table for a {}x{} window must have {} rows, found {t}",
                self.window[0],
                self.window[1],
                self.table_len()
            ));
        }
        let n = self.window[0] * self.window[1];
        Ok(vec![t.with_shape([t.shape[1], n, n])])
    }
}

/// Backward of [`RelPosBias`]: `dy [heads, h*w, h*w] -> dtable [(2h-1)(2w-1), heads]`, where
/// row `r` of head `n` sums `dy[n, i, j]` over every token pair `(i, j)` whose relative offset
/// indexes row `r` in the forward.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelPosBiasGrad {
    pub window: [usize; 2],
}

impl RelPosBiasGrad {
    /// Rows of the table gradient.
    pub fn table_len(&self) -> usize {
        RelPosBias { window: self.window }.table_len()
    }
}

impl OpRule for RelPosBiasGrad {
    fn name(&self) -> &'static str {
        "rel_pos_bias_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let dy = i[0];
        expect_rank("gradient", dy, 3)?;
        expect_float("gradient", dy)?;
        if self.window[0] == 0 || self.window[1] == 0 {
            return Err(format!("empty window {:?}", self.window));
        }
        let n = self.window[0] * self.window[1];
        if dy.shape[1..] != [n, n] {
            return Err(format!(
                "gradient for a {}x{} window must be [heads, {n}, {n}], found {dy}",
                self.window[0], self.window[1]
            ));
        }
        Ok(vec![dy.with_shape([self.table_len(), dy.shape[0]])])
    }
    /// One add per gradient element.
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: numel(&i[0].shape),
            ..Cost::default()
        }
    }
}
