//! Elementwise ops: unary functions, broadcasting binary ops, affine, cast, drop path.

use candle_core::{DType, Tensor};
use vitdet_ir::ops::{Affine, Binary, BinaryKind, Cast, DropPath, Unary, UnaryGrad, UnaryKind};

use super::{accum_dtype, expect_float, KernelError, KernelResult};
use crate::dtype::to_candle;

/// `f(x)` elementwise. GELU is the exact erf form (PyTorch's default): on the CPU, f32 (and f16 /
/// bf16 through f32) runs the vectorized `cpu::gelu_f32`; on CUDA, f32/f16/bf16 run the
/// runtime's kernel (`crate::cuda::activation`); anything else uses candle's `gelu_erf`. Sigmoid is
/// `1 / (1 + exp(-x))`, which saturates to exactly 0 and 1.
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

fn gelu(x: &Tensor) -> KernelResult<Tensor> {
    match x.dtype() {
        DType::F32 | DType::F16 | DType::BF16 if x.device().is_cpu() => {
            let y = super::cpu::gelu(&x.to_dtype(DType::F32)?)?;
            Ok(y.to_dtype(x.dtype())?)
        }
        #[cfg(feature = "cuda")]
        _ if x.device().is_cuda() && crate::cuda::activation::run::supports(x) => crate::cuda::activation::run::gelu(x),
        _ => Ok(x.gelu_erf()?),
    }
}

/// `dx = dy * f'(x)` (see [`UnaryGrad`] for each derivative), from candle ops in f32 for half
/// types (f64 for f64) and rounded back. One-pass kernels run instead where they exist: on the
/// CPU `cpu::UnaryGradCpu` (GELU with the forward's f32 arithmetic, ReLU), on CUDA the
/// runtime's GELU and ReLU gradient kernels (`crate::cuda::activation`).
pub fn unary_grad(op: &UnaryGrad, x: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    if x.dims() != dy.dims() || x.dtype() != dy.dtype() {
        return Err(KernelError::Unsupported(format!(
            "unary_grad: gradient {:?} {:?} must match input {:?} {:?}",
            dy.dtype(),
            dy.dims(),
            x.dtype(),
            x.dims()
        )));
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::cuda::activation::run::supports(x) {
        match op.kind {
            UnaryKind::Gelu => return crate::cuda::activation::run::gelu_grad(x, dy),
            UnaryKind::Relu => return crate::cuda::activation::run::relu_grad(x, dy),
            _ => {}
        }
    }
    let (dtype, acc) = (x.dtype(), accum_dtype(x.dtype()));
    let (x, dy) = (x.to_dtype(acc)?, dy.to_dtype(acc)?);
    if x.device().is_cpu() && super::cpu::UnaryGradCpu::takes(op.kind, acc) {
        return Ok(super::cpu::unary_grad(op.kind, &x, &dy)?.to_dtype(dtype)?);
    }
    let dx = match op.kind {
        UnaryKind::Gelu => {
            // Phi(x) + x phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2, phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
            let cdf = ((x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
            let pdf = (x.sqr()? * -0.5)?
                .exp()?
                .affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
            dy.mul(&(cdf + x.mul(&pdf)?)?)?
        }
        UnaryKind::Relu => {
            // threshold_backward: 0 where x <= 0 (so NaN inputs pass dy through).
            x.le(0.0)?.where_cond(&dy.zeros_like()?, &dy)?
        }
        UnaryKind::Sigmoid => {
            let s = (x.neg()?.exp()? + 1.0)?.recip()?;
            dy.mul(&s.mul(&s.affine(-1.0, 1.0)?)?)?
        }
        UnaryKind::Exp => dy.mul(&x.exp()?)?,
        UnaryKind::Log => dy.div(&x)?,
        UnaryKind::Neg => dy.neg()?,
        UnaryKind::Sqrt => (dy.div(&x.sqrt()?)? * 0.5)?,
        UnaryKind::Tanh => dy.mul(&x.tanh()?.sqr()?.affine(-1.0, 1.0)?)?,
        UnaryKind::Abs => dy.mul(&x.sign()?)?,
    };
    Ok(dx.to_dtype(dtype)?)
}

/// `a (op) b` with NumPy broadcasting (candle's `broadcast_*`, which use the plain kernels when
/// the shapes already agree).
pub fn binary(op: &Binary, a: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::cuda::binary::run::binary(op.kind, a, b)? {
        return Ok(y);
    }
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
