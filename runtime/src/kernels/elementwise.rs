//! Elementwise ops: unary functions, broadcasting binary ops, affine, cast, drop path.

use candle_core::{DType, Tensor};
use vitdet_ir::ops::{Affine, Binary, BinaryKind, Cast, DropPath, Unary, UnaryKind};

use super::{expect_float, KernelResult};
use crate::dtype::to_candle;

/// `f(x)` elementwise. GELU is the exact erf form (PyTorch's default): on the CPU, f32 (and f16 /
/// bf16 through f32) runs the vectorized `cpu::gelu_f32`; f64 and other devices use
/// candle's `gelu_erf`. Sigmoid is `1 / (1 + exp(-x))`, which saturates to exactly 0 and 1.
pub fn unary(op: &Unary, x: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    Ok(match op.kind {
        UnaryKind::Gelu => gelu(x)?,
        UnaryKind::Relu => x.relu()?,
        UnaryKind::Sigmoid => (x.neg()?.exp()? + 1.0)?.recip()?,
        UnaryKind::Exp => x.exp()?,
        UnaryKind::Log => x.log()?,
        UnaryKind::Neg => x.neg()?,
        UnaryKind::Sqrt => x.sqrt()?,
        UnaryKind::Tanh => x.tanh()?,
        UnaryKind::Abs => x.abs()?,
    })
}

fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F32 | DType::F16 | DType::BF16 if x.device().is_cpu() => {
            let y = super::cpu::gelu(&x.to_dtype(DType::F32)?)?;
            y.to_dtype(x.dtype())
        }
        _ => x.gelu_erf(),
    }
}

/// `a (op) b` with NumPy broadcasting (candle's `broadcast_*`, which use the plain kernels when
/// the shapes already agree).
pub fn binary(op: &Binary, a: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
    Ok(match op.kind {
        BinaryKind::Add => a.broadcast_add(b)?,
        BinaryKind::Sub => a.broadcast_sub(b)?,
        BinaryKind::Mul => a.broadcast_mul(b)?,
        BinaryKind::Div => a.broadcast_div(b)?,
        BinaryKind::Maximum => a.broadcast_maximum(b)?,
        BinaryKind::Minimum => a.broadcast_minimum(b)?,
    })
}

/// `x * mul + add` (candle's fused `affine`; the constants are rounded to the input's dtype).
pub fn affine(op: &Affine, x: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    if op.mul == 1.0 && op.add == 0.0 {
        return Ok(x.clone());
    }
    Ok(x.affine(op.mul, op.add)?)
}

/// Conversion to another dtype (a no-op when it already has it).
pub fn cast(op: &Cast, x: &Tensor) -> KernelResult<Tensor> {
    Ok(x.to_dtype(to_candle(op.dtype))?)
}

/// Drop path at inference: the identity (the runtime executes inference graphs; stochastic
/// depth only exists in training).
pub fn drop_path(_op: &DropPath, x: &Tensor) -> KernelResult<Tensor> {
    Ok(x.clone())
}
