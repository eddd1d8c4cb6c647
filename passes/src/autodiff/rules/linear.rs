//! Contractions: linear layers, matrix products and convolutions.

use vitdet_ir::ops::{Conv2d, Conv2dGradWeight, ConvTranspose2d, MatMul, ReduceSum};
use vitdet_ir::Value;

use super::{Ctx, Grads};

/// `[dx, dw]` plus, when the op has a bias (third input), its gradient: `dy` summed over
/// `axes` (every axis but the channel one).
fn with_bias_grad(ctx: &mut Ctx, mut grads: Vec<Option<Value>>, dy: Value, axes: Vec<usize>) -> Grads {
    if ctx.num_inputs() == 3 {
        grads.push(if ctx.needs(2) {
            Some(ctx.emit(ReduceSum { axes, keepdim: false }, &[dy])?)
        } else {
            None
        });
    }
    Ok(grads)
}

/// `y = x @ w^T + b`: `dx = dy @ w`, `dw = dy^T @ x` over all leading axes, `db = sum dy`.
pub(super) fn linear(ctx: &mut Ctx, dy: Value) -> Grads {
    let (x, w) = (ctx.input(0), ctx.input(1));
    let xs = ctx.shape(x);
    let (out, inp) = (ctx.shape(w)[0], ctx.shape(w)[1]);
    let rows = xs.iter().product::<usize>() / inp;
    let dx = if ctx.needs(0) {
        let dy2 = ctx.reshape(dy, vec![rows, out])?;
        let dx = ctx.emit(MatMul::new(false), &[dy2, w])?;
        Some(ctx.reshape(dx, xs.clone())?)
    } else {
        None
    };
    let dw = if ctx.needs(1) {
        let dy2 = ctx.reshape(dy, vec![rows, out])?;
        let x2 = ctx.reshape(x, vec![rows, inp])?;
        let dy_t_x = MatMul {
            transpose_lhs: true,
            transpose_rhs: false,
        };
        Some(ctx.emit(dy_t_x, &[dy2, x2])?)
    } else {
        None
    };
    let rank = ctx.shape(dy).len();
    with_bias_grad(ctx, vec![dx, dw], dy, (0..rank - 1).collect())
}

/// `y = A @ B` with `A = a` or `a^T` (`transpose_lhs`) and `B = b` or `b^T` (`transpose_rhs`),
/// batch axes broadcast: `dA = dy @ B^T` and `dB = A^T @ dy`, each a matmul whose transpose
/// flags read the operands as stored (no transposed copies), summed over broadcast axes.
pub(super) fn matmul(ctx: &mut Ctx, o: &MatMul, dy: Value) -> Grads {
    let (a, b) = (ctx.input(0), ctx.input(1));
    let (sa, sb) = (ctx.shape(a), ctx.shape(b));
    let da = if ctx.needs(0) {
        let g = if o.transpose_lhs {
            // a = A^T: da = B @ dy^T.
            let op = MatMul {
                transpose_lhs: o.transpose_rhs,
                transpose_rhs: true,
            };
            ctx.emit(op, &[b, dy])?
        } else {
            // da = dy @ B^T.
            ctx.emit(MatMul::new(!o.transpose_rhs), &[dy, b])?
        };
        Some(ctx.sum_to(g, &sa)?)
    } else {
        None
    };
    let db = if ctx.needs(1) {
        let op = if o.transpose_rhs {
            // b = B^T: db = dy^T @ A.
            MatMul {
                transpose_lhs: true,
                transpose_rhs: o.transpose_lhs,
            }
        } else {
            // db = A^T @ dy.
            MatMul {
                transpose_lhs: !o.transpose_lhs,
                transpose_rhs: false,
            }
        };
        let args = if o.transpose_rhs { [dy, a] } else { [a, dy] };
        let g = ctx.emit(op, &args)?;
        Some(ctx.sum_to(g, &sb)?)
    } else {
        None
    };
    Ok(vec![da, db])
}

/// Convolution: the input gradient is the transposed convolution of `dy` with the same weight
/// (its output padding restores the input size), the weight gradient a correlation of `x` with
/// `dy`.
pub(super) fn conv2d(ctx: &mut Ctx, o: &Conv2d, dy: Value) -> Grads {
    let (x, w) = (ctx.input(0), ctx.input(1));
    let (xs, ws, ys) = (ctx.shape(x), ctx.shape(w), ctx.shape(dy));
    let kernel = [ws[2], ws[3]];
    let dx = if ctx.needs(0) {
        if o.groups != 1 {
            return Err(format!(
                "input gradient of a grouped convolution (groups {}) is not implemented",
                o.groups
            ));
        }
        let mut output_padding = [0; 2];
        for d in 0..2 {
            let covered = (ys[2 + d] - 1) * o.stride[d] + o.dilation[d] * (kernel[d] - 1) + 1;
            output_padding[d] = xs[2 + d] + 2 * o.padding[d] - covered;
        }
        let op = ConvTranspose2d {
            stride: o.stride,
            padding: o.padding,
            output_padding,
            dilation: o.dilation,
        };
        Some(ctx.emit(op, &[dy, w])?)
    } else {
        None
    };
    let dw = if ctx.needs(1) {
        let op = Conv2dGradWeight {
            stride: o.stride,
            padding: o.padding,
            dilation: o.dilation,
            groups: o.groups,
            kernel,
        };
        Some(ctx.emit(op, &[x, dy])?)
    } else {
        None
    };
    with_bias_grad(ctx, vec![dx, dw], dy, vec![0, 2, 3])
}

/// Transposed convolution `x [N, Cin, H, W]`, `w [Cin, Cout, kh, kw]`: it is the adjoint of the
/// convolution of its output with `w`, so `dx = conv2d(dy, w)` and the weight gradient is that
/// convolution's, with the roles of input and output swapped.
pub(super) fn conv_transpose2d(ctx: &mut Ctx, o: &ConvTranspose2d, dy: Value) -> Grads {
    let (x, w) = (ctx.input(0), ctx.input(1));
    let ws = ctx.shape(w);
    let dx = if ctx.needs(0) {
        let op = Conv2d {
            stride: o.stride,
            padding: o.padding,
            dilation: o.dilation,
            groups: 1,
        };
        Some(ctx.emit(op, &[dy, w])?)
    } else {
        None
    };
    let dw = if ctx.needs(1) {
        let op = Conv2dGradWeight {
            stride: o.stride,
            padding: o.padding,
            dilation: o.dilation,
            groups: 1,
            kernel: [ws[2], ws[3]],
        };
        Some(ctx.emit(op, &[dy, x])?)
    } else {
        None
    };
    with_bias_grad(ctx, vec![dx, dw], dy, vec![0, 2, 3])
}
