//! Scratch memory the runtime's CPU kernels allocate beyond their outputs.
//!
//! A node's workspace is the most memory its kernel holds at once during the call, beyond its
//! inputs and outputs: im2col columns, contiguous copies of strided operands, intermediate
//! results of composite kernels. The planner gives it a buffer live at the node's step only.
//!
//! Each rule mirrors the kernel it names in `vitdet-runtime`'s `kernels/` and is written as the
//! phases of the kernel: the bytes held together at each phase (output included once it
//! exists); the workspace is the largest phase minus the outputs. The rules were checked against
//! the runtime's measured heap node by node (tests/measured_memory.rs).
//!
//! The fused window attention's rules, phase by phase, are in [`window_attention`].
//!
//! Not modelled (these nodes get no workspace, so the plan is below the measurement there):
//! * the `gemm` crate's packing buffers: allocated per matrix product, sized by the machine's
//!   cache sizes, tens of KiB;
//! * the host loops of the detection kernels (`kernels/detection.rs`, `targets.rs`): f64 copies
//!   of their inputs plus data-dependent tables (RoIAlign's adaptive sampling grids, NMS and
//!   matching lists). Measured on vitdet-tiny training at 256 px: `roi_align_grad` up to 7.4 MB
//!   over the plan, `mask_targets` 1.0 MB, `anchor_targets` and `nms` 0.7 MB, `roi_align`
//!   0.5 MB, the rest under 0.3 MB; none of them runs at the peak step of these models;

use std::collections::HashMap;

use vitdet_ir::ops::{Conv2d, Conv2dGradWeight, ConvTranspose2d, Op, ResizeMode, UnaryKind};
use vitdet_ir::{Graph, NodeIndex, TensorType, Value};

use super::storage::{is_patchify, Layout};

mod window_attention;

/// Bytes of the column buffer the CPU im2col kernels build at a time (`IM2COL_TILE_BYTES` in
/// the runtime's `kernels/conv.rs`).
const IM2COL_TILE_BYTES: usize = 32 << 20;

/// What the rules need to know about the node.
struct Node<'a> {
    graph: &'a Graph,
    inputs: Vec<Value>,
    layouts: &'a HashMap<Value, Layout>,
    out_bytes: usize,
}

impl Node<'_> {
    fn bytes(&self, i: usize) -> usize {
        self.graph.value_type(self.inputs[i]).size_in_bytes()
    }

    fn input_types(&self) -> Vec<&TensorType> {
        self.inputs.iter().map(|&v| self.graph.value_type(v)).collect()
    }

    fn dims(&self, i: usize) -> &[usize] {
        &self.graph.value_type(self.inputs[i]).shape
    }

    fn elem(&self, i: usize) -> usize {
        self.graph.value_type(self.inputs[i]).dtype.size_in_bytes()
    }

    fn count(&self, i: usize) -> usize {
        self.dims(i).iter().product()
    }

    /// Whether input `i` is stored row-major (a strided view costs a copy where a kernel needs
    /// contiguous data).
    fn contiguous(&self, i: usize) -> bool {
        self.layouts.get(&self.inputs[i]).is_none_or(Layout::is_contiguous)
    }

    /// Bytes of the contiguous copy `Tensor::contiguous` makes of input `i` (0 if none).
    fn copy_if_strided(&self, i: usize) -> usize {
        if self.contiguous(i) {
            0
        } else {
            self.bytes(i)
        }
    }

    /// The workspace from the kernel's phases (see the module doc).
    fn peak_of_phases(&self, phases: &[usize]) -> usize {
        phases.iter().copied().max().unwrap_or(0).saturating_sub(self.out_bytes)
    }
}

/// Workspace bytes of node `n` given the layouts of the values it reads.
pub(crate) fn workspace_bytes(graph: &Graph, n: NodeIndex, layouts: &HashMap<Value, Layout>) -> usize {
    let node = graph.node(n);
    let cx = Node {
        graph,
        inputs: graph.inputs_of(n),
        layouts,
        out_bytes: node.outputs.iter().map(|t| t.size_in_bytes()).sum(),
    };
    let out = cx.out_bytes;
    match &node.op {
        Op::Conv2d(c) => conv2d(&cx, c),
        Op::ConvTranspose2d(c) => conv_transpose2d(&cx, c),
        Op::Conv2dGradWeight(c) => conv2d_grad_weight(&cx, c),
        // `y = x @ w^T` (x copied first when strided), then the bias add writes the output.
        Op::Linear(_) => {
            let y = if cx.inputs.len() == 3 { out } else { 0 };
            cx.copy_if_strided(0) + y
        }
        // Operands are reshaped to rank 2 or 3 first, which copies strided ones, and a transposed
        // lhs whose batch is folded into rows (an rhs without batch) is copied too.
        Op::MatMul(m) => {
            let batch = |i: usize| cx.dims(i)[..cx.dims(i).len() - 2].iter().product::<usize>();
            let folded_transposed = m.transpose_lhs && batch(0) > 1 && batch(1) == 1;
            let lhs = if folded_transposed {
                cx.bytes(0)
            } else {
                cx.copy_if_strided(0)
            };
            lhs + cx.copy_if_strided(1)
        }
        // The CPU custom ops (fused norms, softmax, GELU) read contiguous input.
        Op::LayerNorm(_) | Op::GroupNorm(_) => cx.copy_if_strided(0),
        Op::Softmax(o) if o.axis + 1 == cx.dims(0).len() => cx.copy_if_strided(0),
        Op::LayerNormGrad(_) | Op::GroupNormGrad(_) => cx.copy_if_strided(0) + cx.copy_if_strided(2),
        // The batch kind computes dx per channel into one vector, scattered into dx afterwards.
        Op::BatchNormTrainGrad(_) => cx.copy_if_strided(0) + cx.copy_if_strided(2) + cx.bytes(0),
        // `x * alpha` before `+ beta` writes the output.
        Op::BatchNorm(_) => out,
        // In f64 on the CPU: x, x - mean, (x - mean) * scale and + bias alive together.
        Op::BatchNormTrain(_) => {
            let widened = if cx.elem(0) == 8 { 0 } else { 8 * cx.count(0) };
            widened + 24 * cx.count(0)
        }
        // The u32 row indices; the bias table's gather is permuted into the output.
        Op::RelPosGather(o) => 4 * o.q_size * o.k_size,
        Op::RelPosBias(o) => 4 * (o.window[0] * o.window[1]).pow(2) + out,
        Op::Unary(u) => unary(&cx, u.kind),
        Op::UnaryGrad(u) => unary_grad(&cx, u.kind),
        Op::Pad(p) => pad(&cx, &p.pads),
        Op::Resize(r) => resize(&cx, r.mode, r.size),
        // dy in f64, dx accumulated in f64, then rounded into the output.
        Op::ResizeGrad(_) => 8 * cx.count(0) + 8 * out / cx.elem(0),
        // x and dy copied to f64, dx accumulated in f64, then rounded into the output.
        Op::MaxPool2dGrad(_) => 8 * (cx.count(0) + cx.count(1)) + 8 * out / cx.elem(0),
        // A zero tensor the rows are index-added into; index_add writes a new tensor.
        Op::GatherRowsGrad(_) => out + cx.copy_if_strided(1),
        Op::SigmoidBceLoss(_) | Op::SmoothL1Loss(_) => loss(&cx, false),
        Op::SigmoidBceLossGrad(_) | Op::SmoothL1LossGrad(_) => loss(&cx, true),
        Op::WindowAttention(a) => window_attention::forward(a, &cx.input_types(), out),
        Op::WindowAttentionGrad(a) => window_attention::backward(&a.forward(), &cx.input_types(), out),
        // Every other kernel is one candle op (or a view) writing its output directly, or a
        // detection host loop (see the module doc).
        _ => 0,
    }
}

/// `kernels::elementwise::unary`: GELU's custom op reads contiguous input; sigmoid is
/// `recip(exp(neg(x)) + 1)` with two temporaries alive together; the rest are one candle op.
fn unary(cx: &Node, kind: UnaryKind) -> usize {
    let n = cx.bytes(0);
    match kind {
        UnaryKind::Gelu => cx.copy_if_strided(0),
        UnaryKind::Sigmoid => 2 * n,
        _ => 0,
    }
}

/// `kernels::elementwise::unary_grad`: the temporaries of each derivative's candle expression
/// alive at its fullest (counted statement by statement: a borrowed temporary lives to the end
/// of its statement, one moved into an operator dies inside it).
fn unary_grad(cx: &Node, kind: UnaryKind) -> usize {
    let n = cx.bytes(0);
    match kind {
        // The one-pass kernels (GELU in f32, ReLU in f32 / f64) read contiguous x and dy and
        // write the output; f16 / bf16 go through them with x, dy and dx in f32 alive while dx
        // is rounded.
        UnaryKind::Gelu | UnaryKind::Relu if cx.elem(0) == 2 => 6 * n,
        UnaryKind::Relu => cx.copy_if_strided(0) + cx.copy_if_strided(1),
        UnaryKind::Gelu if cx.elem(0) == 4 => cx.copy_if_strided(0) + cx.copy_if_strided(1),
        // f64, candle ops: cdf, pdf, x * pdf and cdf + x * pdf, before the output.
        UnaryKind::Gelu => cx.peak_of_phases(&[4 * n]),
        // s, 1 - s and s (1 - s) beside the output.
        UnaryKind::Sigmoid => 3 * n,
        UnaryKind::Tanh => 3 * n,
        UnaryKind::Sqrt => 2 * n,
        UnaryKind::Exp | UnaryKind::Abs => n,
        UnaryKind::Log | UnaryKind::Neg => 0,
    }
}

/// `kernels::shape::pad`: one `pad_with_zeros` per padded axis, each concatenating two zero
/// blocks around the previous result.
fn pad(cx: &Node, pads: &[[usize; 2]]) -> usize {
    let size = cx.elem(0);
    let mut dims = cx.dims(0).to_vec();
    let mut previous = 0; // the intermediate result of the previous axis, if any
    let mut phases = Vec::new();
    for (axis, &[before, after]) in pads.iter().enumerate() {
        if before == 0 && after == 0 {
            continue;
        }
        let rest: usize = dims
            .iter()
            .enumerate()
            .filter(|&(d, _)| d != axis)
            .map(|(_, &v)| v)
            .product();
        dims[axis] += before + after;
        let next = dims.iter().product::<usize>() * size;
        phases.push(previous + (before + after) * rest * size + next);
        previous = next;
    }
    cx.peak_of_phases(&phases)
}

/// `kernels::resize::resize`: bilinear / bicubic on the CPU in f64 (an f64 copy of the input and
/// an f64 result, rounded into the output); nearest as one `index_select` per axis.
fn resize(cx: &Node, mode: ResizeMode, size: [usize; 2]) -> usize {
    let d = cx.dims(0);
    match mode {
        ResizeMode::Nearest => d[0] * d[1] * size[0] * d[3] * cx.elem(0),
        _ => {
            let out_count = cx.out_bytes / cx.elem(0);
            let input = if cx.elem(0) == 8 {
                cx.copy_if_strided(0)
            } else {
                8 * cx.count(0)
            };
            cx.peak_of_phases(&[input + 8 * out_count, 8 * out_count + cx.out_bytes])
        }
    }
}

/// `kernels::loss`: inputs and targets are read into f64 host vectors (each through an f64
/// tensor that lives until its vector is filled), beside the f64 per-element weights; a
/// gradient is an f64 vector rounded into the output.
fn loss(cx: &Node, grad: bool) -> usize {
    let n = cx.count(0);
    let weights = 8 * cx.count(2);
    let reads = weights + 24 * n;
    if grad {
        cx.peak_of_phases(&[reads, weights + 8 * n + cx.out_bytes])
    } else {
        reads
    }
}

/// Tiles of the CPU im2col kernels: `(images, rows)` of the first (largest) tile and whether
/// there is more than one, for `n` images of `ho` output rows and `row_bytes` column bytes per
/// output row of one image.
fn im2col_tile(n: usize, ho: usize, row_bytes: usize, batch_tiles: bool) -> (usize, usize, bool) {
    let image_bytes = row_bytes * ho;
    if batch_tiles && image_bytes <= IM2COL_TILE_BYTES {
        let per_tile = (IM2COL_TILE_BYTES / image_bytes.max(1)).clamp(1, n.max(1));
        (per_tile.min(n), ho, n > per_tile)
    } else {
        let rows = (IM2COL_TILE_BYTES / row_bytes.max(1)).clamp(1, ho.max(1));
        (1, rows.min(ho), n > 1 || ho > rows)
    }
}

/// `im2col_conv_host`: `[N, C, H, W]` input `x` (index `xi`) padded on the fly, kernel
/// `[O, C, kh, kw]`, output `[N, O, Ho, Wo]`. Returns the phases (result included).
fn im2col_conv_phases(cx: &Node, xi: usize, o: usize, k: [usize; 2], out_hw: [usize; 2]) -> Vec<usize> {
    let (n, c) = (cx.dims(xi)[0], cx.dims(xi)[1]);
    let size = cx.elem(xi);
    let [ho, wo] = out_hw;
    let kk = c * k[0] * k[1];
    let xc = cx.copy_if_strided(xi);
    let out = n * o * ho * wo * size;
    let (nb, r, several) = im2col_tile(n, ho, kk * wo * size, n > 1);
    let cols = kk * nb * r * wo * size;
    let product = o * nb * r * wo * size;
    if several || n > 1 {
        // The output vector, plus one tile's columns and product.
        vec![xc + out + cols + product]
    } else {
        // The product is the result.
        vec![xc + cols + product]
    }
}

/// The bias add that follows a bias-free convolution result `y`: `y` and the output together.
fn with_bias(mut phases: Vec<usize>, y: usize, out: usize, bias: bool) -> Vec<usize> {
    if bias {
        phases.push(y + out);
    }
    phases
}

/// `kernels::conv::conv2d`.
fn conv2d(cx: &Node, c: &Conv2d) -> usize {
    let bias = cx.inputs.len() == 3;
    let (x, w) = (cx.dims(0), cx.dims(1));
    let size = cx.elem(0);
    let (n, ch, h, wd) = (x[0], x[1], x[2], x[3]);
    let (o, kh, kw) = (w[0], w[2], w[3]);
    let out = cx.out_bytes;
    if is_patchify(cx.graph, c, cx.inputs[1]) {
        let (ho, wo) = (h / kh, wd / kw);
        let cropped = ho * kh != h || wo * kw != wd;
        // Reshaping a cropped or strided input copies it, then the patch permutation copies.
        let reshaped = if cropped || !cx.contiguous(0) {
            n * ch * ho * kh * wo * kw * size
        } else {
            0
        };
        let patches = n * ch * ho * kh * wo * kw * size;
        let y = n * ho * wo * o * size;
        return cx.peak_of_phases(&with_bias(vec![reshaped + patches, patches + y], y, out, bias));
    }
    if c.stride == [1, 1] && c.groups == 1 && [kh, kw] != [1, 1] {
        let ho = h + 2 * c.padding[0] - c.dilation[0] * (kh - 1);
        let wo = wd + 2 * c.padding[1] - c.dilation[1] * (kw - 1);
        let y = n * o * ho * wo * size;
        let phases = im2col_conv_phases(cx, 0, o, [kh, kw], [ho, wo]);
        return cx.peak_of_phases(&with_bias(phases, y, out, bias));
    }
    0
}

/// `kernels::conv::conv_transpose2d`.
fn conv_transpose2d(cx: &Node, c: &ConvTranspose2d) -> usize {
    let bias = cx.inputs.len() == 3;
    let (x, w) = (cx.dims(0), cx.dims(1));
    let size = cx.elem(0);
    let (n, ci, h, wd) = (x[0], x[1], x[2], x[3]);
    let (co, kh, kw) = (w[1], w[2], w[3]);
    let out = cx.out_bytes;
    if [kh, kw] == c.stride && c.padding == [0, 0] && c.output_padding == [0, 0] && c.dilation == [1, 1] {
        // `w^T @ x` ([N, O*kh*kw, H*W], the output's size), then one pass interleaving it
        // into the output.
        let y = n * co * kh * kw * h * wd * size;
        let xc = cx.copy_if_strided(0);
        if kh * kw == 1 && !bias {
            // Interleaving one kernel offset moves nothing: the product is the output.
            return xc;
        }
        return cx.peak_of_phases(&[xc + y, y + out]);
    }
    let ho = (h - 1) * c.stride[0] + c.dilation[0] * (kh - 1) + c.output_padding[0] + 1 - 2 * c.padding[0];
    let wo = (wd - 1) * c.stride[1] + c.dilation[1] * (kw - 1) + c.output_padding[1] + 1 - 2 * c.padding[1];
    let reach = [c.dilation[0] * (kh - 1), c.dilation[1] * (kw - 1)];
    let y = n * co * ho * wo * size;
    let phases = if c.stride == [1, 1]
        && [kh, kw] != [1, 1]
        && c.output_padding == [0, 0]
        && reach[0] >= c.padding[0]
        && reach[1] >= c.padding[1]
    {
        // The flipped kernel (a small copy), then the im2col convolution.
        let wf = ci * co * kh * kw * size;
        im2col_conv_phases(cx, 0, co, [kh, kw], [ho, wo])
            .into_iter()
            .map(|p| p + wf)
            .collect()
    } else {
        // gemm + col2im per tile of input rows: the input tile (a copy) and its columns.
        let m = co * kh * kw;
        let (nb, r, _) = im2col_tile(n, h, m * wd * size, true);
        let xt = ci * nb * r * wd * size;
        let cols = m * nb * r * wd * size;
        vec![cx.copy_if_strided(0) + y + xt + cols]
    };
    cx.peak_of_phases(&with_bias(phases, y, out, bias))
}

/// `kernels::conv::conv2d_grad_weight` (CPU, f32 / f64): per tile, the columns of `x` and a
/// contiguous `[O, images * rows * Wo]` copy of the gradient's tile beside the per-group
/// products; then the products become the output (a transposed copy when the gemm wrote
/// `dw^T`, a concatenation for several groups).
fn conv2d_grad_weight(cx: &Node, c: &Conv2dGradWeight) -> usize {
    let (x, dy) = (cx.dims(0), cx.dims(1));
    let size = cx.elem(0);
    let (n, cin) = (x[0], x[1]);
    let (o, ho, wo) = (dy[1], dy[2], dy[3]);
    let g = c.groups.max(1);
    let k = cin * c.kernel[0] * c.kernel[1];
    let (nb, r, _) = im2col_tile(n, ho, k * wo * size, true);
    let cols = k * nb * r * wo * size;
    // One image's full rows of a contiguous gradient are a view; anything else a copy.
    let dyt = if nb == 1 && r == ho && cx.contiguous(1) {
        0
    } else {
        o * nb * r * wo * size
    };
    let parts = k / g * o * size; // all groups' products: the output's size
    let cols_first = k / g >= o / g;
    let mut phases = vec![cx.copy_if_strided(0) + cols + dyt + parts];
    if cols_first || g > 1 {
        phases.push(parts + cx.out_bytes);
    }
    cx.peak_of_phases(&phases)
}
