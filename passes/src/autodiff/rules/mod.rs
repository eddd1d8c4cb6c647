//! Vector-Jacobian product rules, one module per op family (mirroring `vitdet_ir::ops`),
//! found from the op by [`vjp`]. A rule receives the gradients of the node's outputs (`None`
//! for outputs nothing downstream differentiates) and returns one entry per input: the
//! gradient of that input, or `None` where it has none or the input does not need one
//! ([`Ctx::needs`]).

mod attention;
mod detection;
mod elementwise;
mod linear;
mod loss;
mod norm;
mod shape;
mod window_attention;

use vitdet_ir::{Op, Value};

use super::Ctx;

pub(crate) type Grads = Result<Vec<Option<Value>>, String>;

/// Whether gradients flow through `op` at all. Index, selection and target-assignment ops do
/// not (their outputs are integers, masks, or values detectron2 detaches).
pub(crate) fn differentiable(op: &Op) -> bool {
    !matches!(
        op,
        Op::Input(_)
            | Op::Anchors(_)
            | Op::BoxDecode(_)
            | Op::ClipBoxes(_)
            | Op::TopK(_)
            | Op::Nms(_)
            | Op::PasteMasks(_)
            | Op::IotaLike(_)
            | Op::CompareScalar(_)
            | Op::DropPathMask(_)
            | Op::AnchorTargets(_)
            | Op::ProposalTargets(_)
            | Op::MaskTargets(_)
    )
}

/// Applies the VJP rule of the context's op.
pub(crate) fn vjp(ctx: &mut Ctx, dys: &[Option<Value>]) -> Grads {
    let op = ctx.op().clone();
    let dy = || dys[0].ok_or_else(|| "output 0 has no gradient".to_string());
    match &op {
        Op::Unary(o) => elementwise::unary(ctx, o, dy()?),
        Op::Binary(o) => elementwise::binary(ctx, o, dy()?),
        Op::Affine(o) => elementwise::affine(ctx, o, dy()?),
        Op::Cast(_) => elementwise::cast(ctx, dy()?),
        // The drop-path op is the identity (training graphs express dropping as a product with
        // a `drop_path_mask`), so its gradient passes through.
        Op::DropPath(_) => Ok(vec![Some(dy()?)]),
        Op::Linear(_) => linear::linear(ctx, dy()?),
        Op::MatMul(o) => linear::matmul(ctx, o, dy()?),
        Op::Conv2d(o) => linear::conv2d(ctx, o, dy()?),
        Op::ConvTranspose2d(o) => linear::conv_transpose2d(ctx, o, dy()?),
        Op::LayerNorm(o) => norm::layer_norm(ctx, o, dy()?),
        Op::GroupNorm(o) => norm::group_norm(ctx, o, dy()?),
        Op::BatchNorm(o) => norm::batch_norm(ctx, o, dy()?),
        Op::BatchNormTrain(o) => norm::batch_norm_train(ctx, o, dy()?),
        Op::Softmax(o) => attention::softmax(ctx, o, dy()?),
        Op::RelPosGather(o) => attention::rel_pos_gather(ctx, o, dy()?),
        Op::RelPosBias(o) => attention::rel_pos_bias(ctx, o, dy()?),
        Op::Reshape(_) | Op::Permute(_) | Op::Pad(_) | Op::Slice(_) | Op::Concat(_) | Op::Expand(_) => {
            shape::shape_op(ctx, &op, dy()?)
        }
        Op::DynamicPrefix(_) => shape::dynamic_prefix(ctx, dy()?),
        Op::PadRows(_) => shape::pad_rows(ctx, dy()?),
        Op::ReduceSum(o) => shape::reduce_sum(ctx, o, dy()?),
        Op::MaxPool2d(o) => shape::max_pool2d(ctx, o, dy()?),
        Op::Resize(o) => shape::resize(ctx, o, dy()?),
        Op::IndexSelect(o) => detection::index_select(ctx, o, dy()?),
        Op::GatherRows(o) => detection::gather_rows(ctx, o, dy()?),
        Op::RoiAlign(o) => detection::roi_align(ctx, o, dy()?),
        Op::WindowAttention(o) => window_attention::window_attention(ctx, o, dys),
        Op::SigmoidBceLoss(_) | Op::SmoothL1Loss(_) | Op::SoftmaxCrossEntropyLoss(_) => loss::loss(ctx, &op, dy()?),
        op => Err(format!("no VJP rule for `{}`", op.name())),
    }
}
