//! Kernels: one module per op family, mirroring `vitdet_ir::ops`. [`execute`] finds an op's
//! kernel by matching on [`Op`].
//!
//! Every kernel is written with candle tensor ops, so it runs on any candle device, except for a
//! few CPU-only fast paths (custom ops in `cpu`: fused softmax, fused normalizations) that are
//! chosen only when the input lives on the CPU; other devices take the candle-op path. The
//! detection kernels (`detection`: anchors, box coding, top-k, NMS, RoIAlign, mask paste) are
//! host loops: inputs on another device are copied to the CPU and the results copied back.
//!
//! Conventions shared by the kernels:
//! * Half-precision (f16/bf16) inputs of reductions (norms, softmax) and of resizes are computed
//!   in f32 and rounded back, as PyTorch's CPU kernels do.
//! * candle's CPU matmul (the `gemm` crate) has no bf16 kernel, so on the CPU bf16 contractions
//!   (linear, matmul, conv, transposed conv) are computed in f32 and rounded back to bf16.
//! * Kernels avoid copies: `slice` returns a view, and only ops that need contiguous data
//!   (`permute`, the CPU custom ops, matmul operands with unusable strides) make it contiguous.

pub mod attention;
pub mod conv;
pub(crate) mod cpu;
pub(crate) mod cpu_attention_grad;
pub(crate) mod cpu_gemm;
pub(crate) mod cpu_grad;
pub mod detection;
pub mod elementwise;
pub mod index;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod pool;
pub mod random;
pub mod reduce;
pub mod resize;
pub mod shape;
pub mod targets;
pub mod window_attention;

use candle_core::{DType, Tensor};
use vitdet_ir::Op;

/// Why a kernel did not produce a value.
#[derive(Debug)]
pub enum KernelError {
    /// A candle operation failed.
    Candle(candle_core::Error),
    /// The runtime has no kernel for this op, these attributes or these dtypes.
    Unsupported(String),
}

impl From<candle_core::Error> for KernelError {
    fn from(e: candle_core::Error) -> Self {
        KernelError::Candle(e)
    }
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelError::Candle(e) => write!(f, "{e}"),
            KernelError::Unsupported(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for KernelError {}

pub type KernelResult<T> = Result<T, KernelError>;

/// A tensor's values as f64, flattened (the kernels' unit tests compare paths with it).
#[cfg(test)]
pub(crate) fn f64_values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("a float tensor")
}

/// Whether the kernel of `op` reads input `slot` on the host (a host loop): on a GPU it would
/// copy the value back and wait for the device, so the executor hands it the host copy of a
/// value made on the host (a graph input, the anchors, a host loop's result) where it kept one.
/// The host loops that matter on a GPU: drop-path masks and anchor and RoI targets (every
/// input, seeds and ground truth among them), the RoIs' matches and validity of the mask
/// targets (which pool the masks on the device), and a dynamic prefix's row count.
pub fn reads_on_host(op: &Op, slot: usize) -> bool {
    match op {
        Op::DropPathMask(_) | Op::AnchorTargets(_) | Op::ProposalTargets(_) => true,
        Op::MaskTargets(_) => slot >= 2,
        Op::DynamicPrefix(_) => slot == 1,
        _ => false,
    }
}

/// Whether `op`'s outputs depend on its attributes only (the anchors): a program placing them
/// on a GPU keeps the placed copies for its later runs (`executor::Program`).
pub fn is_constant(op: &Op) -> bool {
    matches!(op, Op::Anchors(_))
}

/// Whether `op` only moves data (concatenates, reshapes, slices, permutes, broadcasts, takes a
/// dynamic prefix): where a host loop reads its result, the executor also runs it on its
/// inputs' host copies, so the host loop reads e.g. the concatenated anchors or the sampled
/// foreground RoIs without copying them back from a GPU.
pub fn moves_data_only(op: &Op) -> bool {
    matches!(
        op,
        Op::Concat(_) | Op::Reshape(_) | Op::Slice(_) | Op::Permute(_) | Op::Expand(_) | Op::DynamicPrefix(_)
    )
}

/// Runs one op on its input tensors (in the op's input order) and returns its outputs.
///
/// Sources (`input`, `parameter`) are not computations: the executor supplies their values, and
/// asking for them here is an `Unsupported` error.
pub fn execute(op: &Op, inputs: &[Tensor]) -> KernelResult<Vec<Tensor>> {
    let (lo, hi) = op.rule().arity();
    if inputs.len() < lo || inputs.len() > hi {
        return Err(KernelError::Unsupported(format!(
            "{} takes {lo}..={hi} inputs, given {}",
            op.name(),
            inputs.len()
        )));
    }
    let one = |t: Tensor| Ok(vec![t]);
    let x = &inputs[0..];
    match op {
        Op::Input(_) | Op::Parameter(_) => Err(KernelError::Unsupported(
            "sources are supplied by the executor, not computed".into(),
        )),
        Op::Unary(o) => one(elementwise::unary(o, &x[0])?),
        Op::UnaryGrad(o) => one(elementwise::unary_grad(o, &x[0], &x[1])?),
        Op::ReduceSum(o) => one(reduce::reduce_sum(o, &x[0])?),
        Op::Binary(o) => one(elementwise::binary(o, &x[0], &x[1])?),
        Op::Affine(o) => one(elementwise::affine(o, &x[0])?),
        Op::Cast(o) => one(elementwise::cast(o, &x[0])?),
        Op::DropPath(o) => one(elementwise::drop_path(o, &x[0])?),
        Op::DropPathMask(o) => one(random::drop_path_mask(o, &x[0])?),
        Op::Linear(_) => one(linear::linear(&x[0], &x[1], x.get(2))?),
        Op::MatMul(o) => one(linear::matmul(o, &x[0], &x[1])?),
        Op::Conv2d(o) => one(conv::conv2d(o, &x[0], &x[1], x.get(2))?),
        Op::Conv2dGradWeight(o) => one(conv::conv2d_grad_weight(o, &x[0], &x[1])?),
        Op::ConvTranspose2d(o) => one(conv::conv_transpose2d(o, &x[0], &x[1], x.get(2))?),
        Op::LayerNorm(o) => one(norm::layer_norm(o, &x[0], &x[1], &x[2])?),
        Op::LayerNormGrad(o) => norm::layer_norm_grad(o, &x[0], &x[1], &x[2]),
        Op::GroupNorm(o) => one(norm::group_norm(o, &x[0], &x[1], &x[2])?),
        Op::GroupNormGrad(o) => norm::group_norm_grad(o, &x[0], &x[1], &x[2]),
        Op::BatchNorm(o) => one(norm::batch_norm(o, &x[0], &x[1], &x[2], &x[3], &x[4])?),
        Op::BatchNormTrain(o) => norm::batch_norm_train(o, &x[0], &x[1], &x[2], &x[3], &x[4]),
        Op::BatchNormTrainGrad(o) => norm::batch_norm_train_grad(o, &x[0], &x[1], &x[2]),
        Op::Softmax(o) => one(attention::softmax(o, &x[0])?),
        Op::SoftmaxGrad(o) => one(attention::softmax_grad(o, &x[0], &x[1])?),
        Op::RelPosGather(o) => one(attention::rel_pos_gather(o, &x[0])?),
        Op::RelPosBias(o) => one(attention::rel_pos_bias(o, &x[0])?),
        Op::RelPosGatherGrad(o) => one(attention::rel_pos_gather_grad(o, &x[0])?),
        Op::RelPosBiasGrad(o) => one(attention::rel_pos_bias_grad(o, &x[0])?),
        Op::Reshape(o) => one(shape::reshape(o, &x[0])?),
        Op::Permute(o) => one(shape::permute(o, &x[0])?),
        Op::Pad(o) => one(shape::pad(o, &x[0])?),
        Op::Slice(o) => one(shape::slice(o, &x[0])?),
        Op::DynamicPrefix(o) => one(shape::dynamic_prefix(o, &x[0], &x[1])?),
        Op::PadRows(o) => one(shape::pad_rows(o, &x[0])?),
        Op::Concat(o) => one(shape::concat(o, x)?),
        Op::Expand(o) => one(shape::expand(o, &x[0])?),
        Op::MaxPool2d(o) => one(pool::max_pool2d(o, &x[0])?),
        Op::MaxPool2dGrad(o) => one(pool::max_pool2d_grad(o, &x[0], &x[1])?),
        Op::Resize(o) => one(resize::resize(o, &x[0])?),
        Op::ResizeGrad(o) => one(resize::resize_grad(o, &x[0])?),
        Op::IotaLike(o) => one(index::iota_like(o, &x[0])?),
        Op::CompareScalar(o) => one(index::compare_scalar(o, &x[0])?),
        Op::Anchors(o) => one(detection::anchors(o)?),
        Op::BoxDecode(o) => one(detection::box_decode(o, &x[0], &x[1])?),
        Op::ClipBoxes(o) => one(detection::clip_boxes(o, &x[0])?),
        Op::TopK(o) => detection::top_k(o, &x[0]),
        Op::IndexSelect(o) => one(detection::index_select(o, &x[0], &x[1])?),
        Op::IndexSelectGrad(o) => one(detection::index_select_grad(o, &x[0], &x[1])?),
        Op::GatherRows(o) => one(detection::gather_rows(o, &x[0], &x[1])?),
        Op::GatherRowsGrad(o) => one(detection::gather_rows_grad(o, &x[0], &x[1])?),
        Op::Nms(o) => detection::nms(o, &x[0], &x[1], x.get(2), x.get(3)),
        Op::RoiAlign(o) => one(detection::roi_align(o, x)?),
        Op::RoiAlignGrad(o) => detection::roi_align_grad(o, &x[0], &x[1]),
        Op::PasteMasks(o) => one(detection::paste_masks(o, &x[0], &x[1])?),
        Op::AnchorTargets(o) => targets::anchor_targets(o, &x[0], &x[1], &x[2], &x[3]),
        Op::ProposalTargets(o) => targets::proposal_targets(o, x),
        Op::MaskTargets(o) => one(targets::mask_targets(o, &x[0], &x[1], &x[2], x.get(3))?),
        Op::SigmoidBceLoss(o) => one(loss::sigmoid_bce_loss(o, x)?),
        Op::SigmoidBceLossGrad(o) => one(loss::sigmoid_bce_loss_grad(o, x)?),
        Op::SmoothL1Loss(o) => one(loss::smooth_l1_loss(o, x)?),
        Op::SmoothL1LossGrad(o) => one(loss::smooth_l1_loss_grad(o, x)?),
        Op::SoftmaxCrossEntropyLoss(o) => one(loss::softmax_cross_entropy_loss(o, x)?),
        Op::SoftmaxCrossEntropyLossGrad(o) => one(loss::softmax_cross_entropy_loss_grad(o, x)?),
        Op::WindowAttention(o) => window_attention::window_attention(o, x),
        Op::WindowAttentionGrad(o) => window_attention::window_attention_grad(o, x),
    }
}

/// The dtype reductions are computed in: f32 for half types, the dtype itself otherwise.
pub(crate) fn accum_dtype(d: DType) -> DType {
    match d {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Requires a floating-point input.
pub(crate) fn expect_float(what: &str, t: &Tensor) -> KernelResult<()> {
    if !t.dtype().is_float() {
        return Err(KernelError::Unsupported(format!(
            "{what} must be floating point, found {}",
            crate::dtype::describe(t)
        )));
    }
    Ok(())
}

/// Whether a contraction in `dtype` on `t`'s device must be computed in f32 (bf16 on the CPU,
/// which candle's gemm does not support).
pub(crate) fn contraction_needs_f32(t: &Tensor) -> bool {
    t.dtype() == DType::BF16 && t.device().is_cpu()
}

/// `t` with shape `[1, c, 1, ...]` (rank `rank`) for broadcasting a per-channel vector over
/// axis `axis`.
pub(crate) fn channel_view(v: &Tensor, axis: usize, rank: usize) -> candle_core::Result<Tensor> {
    let mut shape = vec![1usize; rank];
    shape[axis] = v.elem_count();
    v.reshape(shape)
}
