//! Spatial resizing of NCHW tensors (PyTorch's `F.interpolate`).

use serde::{Deserialize, Serialize};

use super::{expect_float, expect_rank, numel, Cost, OpRule};
use crate::types::TensorType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// `src = floor(dst * in / out)` (PyTorch's legacy `nearest`).
    Nearest,
    Bilinear,
    /// Cubic convolution with `A = -0.75`, border indices clamped (PyTorch's `bicubic`).
    Bicubic,
}

/// Resizes the last two axes of `[N, C, H, W]` to `size`. For bilinear and bicubic,
/// `align_corners` follows PyTorch; source coordinates are `(dst + 0.5) * in / out - 0.5`
/// when it is false.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resize {
    pub size: [usize; 2],
    pub mode: ResizeMode,
    pub align_corners: bool,
}

impl OpRule for Resize {
    fn name(&self) -> &'static str {
        "resize"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        expect_rank("input", x, 4)?;
        expect_float("input", x)?;
        if self.size.contains(&0) {
            return Err(format!("empty target size {:?}", self.size));
        }
        Ok(vec![x.with_shape([x.shape[0], x.shape[1], self.size[0], self.size[1]])])
    }
    fn cost(&self, _: &[&TensorType], o: &[TensorType]) -> Cost {
        let n = numel(&o[0].shape);
        // fvcore counts nearest as 1 and bilinear as 4 per output element, bicubic not at all.
        let (macs, flops) = match self.mode {
            ResizeMode::Nearest => (n, 0),
            ResizeMode::Bilinear => (4 * n, 8 * n),
            ResizeMode::Bicubic => (0, 32 * n),
        };
        Cost {
            macs,
            flops,
            activations: 0,
        }
    }
}

/// Backward of [`Resize`] (the exact adjoint of the forward for every mode): input
/// `dy [N, C, h, w]` (the resized size) -> `dx [N, C, input_size]`, where `input_size` is the
/// forward's input size and `mode`, `align_corners` are the forward's. Each output pixel's
/// gradient is scattered back to the source pixels with the forward's interpolation weights
/// (nearest: its one source; bilinear: 2x2; bicubic: 4x4 with clamped border indices, so
/// clamped taps accumulate on the border pixel).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResizeGrad {
    pub input_size: [usize; 2],
    pub mode: ResizeMode,
    pub align_corners: bool,
}

impl OpRule for ResizeGrad {
    fn name(&self) -> &'static str {
        "resize_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let dy = i[0];
        expect_rank("gradient", dy, 4)?;
        expect_float("gradient", dy)?;
        if self.input_size.contains(&0) || dy.shape[2..].contains(&0) {
            return Err(format!("empty input size {:?} or gradient {dy}", self.input_size));
        }
        Ok(vec![dy.with_shape([
            dy.shape[0],
            dy.shape[1],
            self.input_size[0],
            self.input_size[1],
        ])])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        // Per resized element: one multiply-add per interpolation tap.
        let n = numel(&i[0].shape);
        let taps = match self.mode {
            ResizeMode::Nearest => 1,
            ResizeMode::Bilinear => 4,
            ResizeMode::Bicubic => 16,
        };
        Cost {
            flops: 2 * taps * n,
            ..Cost::default()
        }
    }
}
