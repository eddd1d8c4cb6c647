//! Convolutions on NCHW feature maps.

use serde::{Deserialize, Serialize};

use super::{expect_float, expect_rank, expect_same_dtype, numel, Cost, OpRule, RowRule};
use crate::types::TensorType;

/// 2-d convolution (PyTorch's `conv2d`): `x [N, C, H, W]`, `w [O, C/groups, kh, kw]`, optional
/// `b [O]` -> `[N, O, Ho, Wo]` with `Ho = (H + 2p - d(kh-1) - 1) / s + 1`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conv2d {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl Conv2d {
    /// Stride-1, dilation-1, ungrouped convolution with the given padding.
    pub fn same(padding: usize) -> Self {
        Conv2d {
            stride: [1, 1],
            padding: [padding, padding],
            dilation: [1, 1],
            groups: 1,
        }
    }

    /// Output height and width on an `input` map (`[H, W]`) with a `kernel` (`[kh, kw]`), or
    /// `None` when a stride is 0 or the dilated kernel is larger than the padded input.
    pub fn output_size(&self, input: [usize; 2], kernel: [usize; 2]) -> Option<[usize; 2]> {
        let axis = |d: usize| {
            let span = self.dilation[d] * kernel[d].checked_sub(1)? + 1;
            let padded = input[d] + 2 * self.padding[d];
            (self.stride[d] > 0 && padded >= span).then(|| (padded - span) / self.stride[d] + 1)
        };
        Some([axis(0)?, axis(1)?])
    }
}

impl OpRule for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 3)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (x, w) = (i[0], i[1]);
        expect_rank("input", x, 4)?;
        expect_rank("weight", w, 4)?;
        expect_float("input", x)?;
        expect_same_dtype(x, w, "weight")?;
        if self.groups == 0 || x.shape[1] % self.groups != 0 || w.shape[0] % self.groups != 0 {
            return Err(format!("groups={} does not divide channels of {x} / {w}", self.groups));
        }
        if w.shape[1] * self.groups != x.shape[1] {
            return Err(format!(
                "weight {w} expects {} input channels, input is {x}",
                w.shape[1] * self.groups
            ));
        }
        if let Some(b) = i.get(2) {
            super::expect_vector("bias", b, w.shape[0], x)?;
        }
        let Some([ho, wo]) = self.output_size([x.shape[2], x.shape[3]], [w.shape[2], w.shape[3]]) else {
            return Err(format!(
                "kernel {w} does not fit input {x} with padding {:?}",
                self.padding
            ));
        };
        Ok(vec![x.with_shape([x.shape[0], w.shape[0], ho, wo])])
    }
    fn cost(&self, i: &[&TensorType], o: &[TensorType]) -> Cost {
        // fvcore: batch * prod(w.shape) * prod(out spatial)
        let w = &i[1].shape;
        let o_ = &o[0].shape;
        let macs = o_[0] as u64 * numel(w) * (o_[2] * o_[3]) as u64;
        let out = numel(o_);
        Cost {
            macs,
            flops: 2 * macs + if i.len() == 3 { out } else { 0 },
            activations: out,
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0], &[0])
    }
}

/// Weight gradient of [`Conv2d`] with these attributes: inputs `(x [N, Cin, H, W],
/// dy [N, O, Ho, Wo])` -> `dw [O, Cin/groups, kh, kw]` with
/// `dw[o, c, i, j] = sum_{n, p, q} dy[n, o, p, q] * x[n, g*Cin/groups + c, p*s - pad + i*d,
/// q*s - pad + j*d]` (`g` the group of `o`, out-of-range `x` reads 0). `dy` must have the
/// forward output size. The input gradient of `Conv2d` is a [`ConvTranspose2d`] of `dy` with the
/// same weight, stride, padding and dilation and the `output_padding` that restores `H, W`; the
/// weight gradient of `ConvTranspose2d` is this op with the roles swapped (input `dy`, gradient
/// the transposed conv's input).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conv2dGradWeight {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
    pub kernel: [usize; 2],
}

impl Conv2dGradWeight {
    /// The convolution whose weight gradient this is.
    pub fn conv(&self) -> Conv2d {
        Conv2d {
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
        }
    }
}

impl OpRule for Conv2dGradWeight {
    fn name(&self) -> &'static str {
        "conv2d_grad_weight"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (x, dy) = (i[0], i[1]);
        expect_rank("input", x, 4)?;
        expect_rank("gradient", dy, 4)?;
        expect_float("input", x)?;
        expect_same_dtype(x, dy, "gradient")?;
        let (cin, o) = (x.shape[1], dy.shape[1]);
        if self.groups == 0 || cin % self.groups != 0 || o % self.groups != 0 {
            return Err(format!("groups={} does not divide channels of {x} / {dy}", self.groups));
        }
        if dy.shape[0] != x.shape[0] {
            return Err(format!("gradient {dy} and input {x} differ in batch"));
        }
        if self.kernel.contains(&0) || self.dilation.contains(&0) || self.stride.contains(&0) {
            return Err(format!(
                "kernel {:?}, stride {:?} and dilation {:?} must be positive",
                self.kernel, self.stride, self.dilation
            ));
        }
        let Some(out) = self.conv().output_size([x.shape[2], x.shape[3]], self.kernel) else {
            return Err(format!(
                "kernel {:?} does not fit input {x} with padding {:?}",
                self.kernel, self.padding
            ));
        };
        for (d, &expected) in out.iter().enumerate() {
            if dy.shape[2 + d] != expected {
                return Err(format!(
                    "gradient {dy} must have the conv output size {expected} on axis {}",
                    2 + d
                ));
            }
        }
        Ok(vec![x.with_shape([
            o,
            cin / self.groups,
            self.kernel[0],
            self.kernel[1],
        ])])
    }
    fn cost(&self, i: &[&TensorType], o: &[TensorType]) -> Cost {
        // The forward's contraction: batch * prod(w.shape) * prod(out spatial).
        let dy = &i[1].shape;
        let macs = dy[0] as u64 * numel(&o[0].shape) * (dy[2] * dy[3]) as u64;
        Cost {
            macs,
            flops: 2 * macs,
            activations: 0,
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0, 1], &[])
    }
}

/// 2-d transposed convolution (PyTorch's `conv_transpose2d`, groups 1): `x [N, C, H, W]`,
/// `w [C, O, kh, kw]`, optional `b [O]` -> `[N, O, Ho, Wo]` with
/// `Ho = (H - 1) s - 2p + d(kh - 1) + output_padding + 1`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvTranspose2d {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub output_padding: [usize; 2],
    pub dilation: [usize; 2],
}

impl ConvTranspose2d {
    /// The `k x k`, stride-`k` upsampling deconvolution the pyramids use.
    pub fn upsample(k: usize) -> Self {
        ConvTranspose2d {
            stride: [k, k],
            padding: [0, 0],
            output_padding: [0, 0],
            dilation: [1, 1],
        }
    }
}

impl OpRule for ConvTranspose2d {
    fn name(&self) -> &'static str {
        "conv_transpose2d"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 3)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (x, w) = (i[0], i[1]);
        expect_rank("input", x, 4)?;
        expect_rank("weight", w, 4)?;
        expect_float("input", x)?;
        expect_same_dtype(x, w, "weight")?;
        if w.shape[0] != x.shape[1] {
            return Err(format!(
                "weight {w} expects {} input channels, input is {x}",
                w.shape[0]
            ));
        }
        if let Some(b) = i.get(2) {
            super::expect_vector("bias", b, w.shape[1], x)?;
        }
        let mut out = vec![x.shape[0], w.shape[1]];
        for d in 0..2 {
            let full = (x.shape[2 + d] - 1) * self.stride[d]
                + self.dilation[d] * (w.shape[2 + d] - 1)
                + self.output_padding[d]
                + 1;
            if full <= 2 * self.padding[d] {
                return Err(format!("padding {:?} leaves no output for {x}", self.padding));
            }
            out.push(full - 2 * self.padding[d]);
        }
        Ok(vec![x.with_shape(out)])
    }
    fn cost(&self, i: &[&TensorType], o: &[TensorType]) -> Cost {
        // fvcore (transposed): batch * prod(w.shape) * prod(input spatial)
        let (x, w) = (&i[0].shape, &i[1].shape);
        let macs = x[0] as u64 * numel(w) * (x[2] * x[3]) as u64;
        let out = numel(&o[0].shape);
        Cost {
            macs,
            flops: 2 * macs + if i.len() == 3 { out } else { 0 },
            activations: out,
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0], &[0])
    }
}
