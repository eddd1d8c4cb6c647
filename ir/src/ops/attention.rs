//! Attention building blocks: softmax and the two relative-position families.

use serde::{Deserialize, Serialize};

use super::{expect_float, expect_rank, numel, Cost, OpRule};
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
