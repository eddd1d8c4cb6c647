//! Data-movement ops: they change the layout of values, never their contents.

use serde::{Deserialize, Serialize};

use super::{union_all, IntRange, OpRule, RowRule};
use crate::types::{DType, TensorType};

/// Same elements in row-major order under a new shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reshape {
    pub shape: Vec<usize>,
}

impl OpRule for Reshape {
    /// The values are the input's.
    fn value_ranges(&self, i: &[Option<IntRange>], _: &[&TensorType]) -> Vec<Option<IntRange>> {
        vec![i[0]]
    }
    fn name(&self) -> &'static str {
        "reshape"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let n: usize = self.shape.iter().product();
        if n != i[0].numel() {
            return Err(format!(
                "cannot reshape {} ({} elements) to {:?}",
                i[0],
                i[0].numel(),
                self.shape
            ));
        }
        Ok(vec![i[0].with_shape(self.shape.clone())])
    }
}

/// Axis permutation: output axis `k` is input axis `perm[k]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Permute {
    pub perm: Vec<usize>,
}

impl OpRule for Permute {
    /// The values are the input's.
    fn value_ranges(&self, i: &[Option<IntRange>], _: &[&TensorType]) -> Vec<Option<IntRange>> {
        vec![i[0]]
    }
    fn name(&self) -> &'static str {
        "permute"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        let mut seen = vec![false; x.rank()];
        if self.perm.len() != x.rank()
            || !self
                .perm
                .iter()
                .all(|&p| p < x.rank() && !std::mem::replace(&mut seen[p], true))
        {
            return Err(format!("{:?} is not a permutation of the axes of {x}", self.perm));
        }
        Ok(vec![
            x.with_shape(self.perm.iter().map(|&p| x.shape[p]).collect::<Vec<_>>())
        ])
    }
}

/// Zero padding: `pads[d] = [before, after]` for every axis `d`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pad {
    pub pads: Vec<[usize; 2]>,
}

impl OpRule for Pad {
    /// The input's values and the zeros added.
    fn value_ranges(&self, i: &[Option<IntRange>], _: &[&TensorType]) -> Vec<Option<IntRange>> {
        vec![i[0].map(|r| r.union(IntRange::new(0, 0)))]
    }
    fn name(&self) -> &'static str {
        "pad"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        if self.pads.len() != x.rank() {
            return Err(format!("{} pad pairs for {x}", self.pads.len()));
        }
        Ok(vec![x.with_shape(
            x.shape
                .iter()
                .zip(&self.pads)
                .map(|(d, p)| d + p[0] + p[1])
                .collect::<Vec<_>>(),
        )])
    }
}

/// Elements `start..end` along `axis`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slice {
    pub axis: usize,
    pub start: usize,
    pub end: usize,
}

impl OpRule for Slice {
    /// The values are the input's.
    fn value_ranges(&self, i: &[Option<IntRange>], _: &[&TensorType]) -> Vec<Option<IntRange>> {
        vec![i[0]]
    }
    fn name(&self) -> &'static str {
        "slice"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        let dim = *x
            .shape
            .get(self.axis)
            .ok_or_else(|| format!("axis {} out of range for {x}", self.axis))?;
        if self.start >= self.end || self.end > dim {
            return Err(format!(
                "slice {}..{} out of range for axis {} of {x}",
                self.start, self.end, self.axis
            ));
        }
        let mut shape = x.shape.clone();
        shape[self.axis] = self.end - self.start;
        Ok(vec![x.with_shape(shape)])
    }
}

/// Concatenation of all inputs along `axis`; other dims and dtypes must agree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Concat {
    pub axis: usize,
}

impl OpRule for Concat {
    /// Every input's values.
    fn value_ranges(&self, i: &[Option<IntRange>], _: &[&TensorType]) -> Vec<Option<IntRange>> {
        vec![union_all(i)]
    }
    fn name(&self) -> &'static str {
        "concat"
    }
    fn arity(&self) -> (usize, usize) {
        (1, usize::MAX)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let first = i[0];
        if self.axis >= first.rank() {
            return Err(format!("axis {} out of range for {first}", self.axis));
        }
        let mut shape = first.shape.clone();
        shape[self.axis] = 0;
        for t in i {
            let same_elsewhere =
                t.rank() == first.rank() && (0..t.rank()).all(|d| d == self.axis || t.shape[d] == first.shape[d]);
            if !same_elsewhere || t.dtype != first.dtype {
                return Err(format!("cannot concatenate {t} with {first} along axis {}", self.axis));
            }
            shape[self.axis] += t.shape[self.axis];
        }
        Ok(vec![first.with_shape(shape)])
    }
}

/// NumPy-style broadcast of the input to `shape` (the adjoint of a sum over broadcast axes):
/// the input's axes align with the trailing axes of `shape`, each of size 1 or equal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Expand {
    pub shape: Vec<usize>,
}

impl OpRule for Expand {
    /// The values are the input's.
    fn value_ranges(&self, i: &[Option<IntRange>], _: &[&TensorType]) -> Vec<Option<IntRange>> {
        vec![i[0]]
    }
    fn name(&self) -> &'static str {
        "expand"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        match super::broadcast_shapes(&x.shape, &self.shape) {
            Ok(s) if s == self.shape => Ok(vec![x.with_shape(self.shape.clone())]),
            _ => Err(format!("cannot expand {x} to {:?}", self.shape)),
        }
    }
}

/// The first `clamp(count, min_rows, bound)` rows of `x` (inputs: `x [B, ...]` and `count`, an
/// i64 scalar `[]`), as a value whose row count is dynamic, bounded by `bound`. Ops downstream
/// that take dynamic rows ([`OpRule::rows`]) compute on the actual rows only: Mask R-CNN's mask
/// head runs on the sampled foreground RoIs, not on every slot that could hold one. A negative
/// count is an error at run time. `min_rows >= 1`: kernels are not defined on empty tensors.
/// [`PadRows`] turns such a value back into a static one.
/// All of a graph's dynamic values share one count ([`crate::Graph::verify`] checks it), so
/// dynamic values of equal bound always hold the same number of rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DynamicPrefix {
    pub min_rows: usize,
    pub bound: usize,
}

impl OpRule for DynamicPrefix {
    /// The values are the input's.
    fn value_ranges(&self, i: &[Option<IntRange>], _: &[&TensorType]) -> Vec<Option<IntRange>> {
        vec![i[0]]
    }
    fn name(&self) -> &'static str {
        "dynamic_prefix"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (x, count) = (i[0], i[1]);
        let rows = *x.shape.first().ok_or_else(|| format!("input {x} has no rows"))?;
        if self.min_rows == 0 || self.min_rows > self.bound || self.bound > rows {
            return Err(format!(
                "need 1 <= min_rows ({}) <= bound ({}) <= the input's {rows} rows",
                self.min_rows, self.bound
            ));
        }
        if count.dtype != DType::I64 || count.rank() != 0 {
            return Err(format!("count must be an i64 scalar [], found {count}"));
        }
        let mut shape = x.shape.clone();
        shape[0] = self.bound;
        Ok(vec![x.with_shape(shape).with_dynamic_rows()])
    }
}

/// A value with dynamic rows padded with zero rows to `rows`, at least its bound:
/// `x [<=B, ...]` -> `[rows, ...]`, static. The way back from [`DynamicPrefix`] (graph outputs
/// are static).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PadRows {
    pub rows: usize,
}

impl OpRule for PadRows {
    /// The input's values and the zeros added.
    fn value_ranges(&self, i: &[Option<IntRange>], _: &[&TensorType]) -> Vec<Option<IntRange>> {
        vec![i[0].map(|r| r.union(IntRange::new(0, 0)))]
    }
    fn name(&self) -> &'static str {
        "pad_rows"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        if !x.dynamic_rows || x.shape[0] > self.rows {
            return Err(format!(
                "input must have dynamic rows bounded by at most {}, found {x}",
                self.rows
            ));
        }
        let mut shape = x.shape.clone();
        shape[0] = self.rows;
        Ok(vec![x.with_shape(shape)])
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0], &[])
    }
}
