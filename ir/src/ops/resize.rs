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
