//! The closed op set. One module per family; each op is a struct holding its attributes and
//! implementing [`OpRule`]: arity, type inference and cost live next to its documented
//! semantics. [`Op`] is the serializable sum of them all; `Op::name()` is the key runtimes and
//! passes use to find an op's kernel or VJP.
//!
//! Layout conventions: images and feature maps are NCHW; ViT tokens are NHWC (`[B, H, W, C]`)
//! as in detectron2; linear weights are `[out, in]` as in PyTorch.

mod attention;
mod conv;
mod detection;
mod elementwise;
mod index;
mod linear;
mod loss;
mod norm;
mod pool;
mod random;
mod reduce;
mod resize;
mod shape;
mod source;
mod targets;
mod window_attention;

pub use attention::{RelPosBias, RelPosBiasGrad, RelPosGather, RelPosGatherGrad, Softmax, SoftmaxGrad};
pub use conv::{Conv2d, Conv2dGradWeight, ConvTranspose2d};
pub use detection::{
    Anchors, BoxDecode, ClipBoxes, GatherRows, GatherRowsGrad, IndexSelect, IndexSelectGrad, Nms, PasteMasks, RoiAlign,
    RoiAlignGrad, TopK,
};
pub use elementwise::{Affine, Binary, BinaryKind, Cast, DropPath, Unary, UnaryGrad, UnaryKind};
pub use index::{CompareKind, CompareScalar, IotaLike};
pub use linear::{Linear, MatMul};
pub use loss::{
    LossNorm, SigmoidBceLoss, SigmoidBceLossGrad, SmoothL1Loss, SmoothL1LossGrad, SoftmaxCrossEntropyLoss,
    SoftmaxCrossEntropyLossGrad,
};
pub use norm::{BatchNorm, BatchNormTrain, BatchNormTrainGrad, GroupNorm, GroupNormGrad, LayerNorm, LayerNormGrad};
pub use pool::{MaxPool2d, MaxPool2dGrad};
pub use random::{splitmix64, DropPathMask};
pub use reduce::ReduceSum;
pub use resize::{Resize, ResizeGrad, ResizeMode};
pub use shape::{Concat, DynamicPrefix, Expand, Pad, PadRows, Permute, Reshape, Slice};
pub use source::{Init, Input, Parameter};
pub use targets::{max_positives, AnchorTargets, MaskTargets, ProposalTargets};
pub use window_attention::{lse_dtype, WindowAttention, WindowAttentionGrad, WindowGeometry, WindowRelPos};

use serde::{Deserialize, Serialize};

use crate::types::TensorType;

/// Compute cost of one node.
///
/// * `macs`: multiply-adds in fvcore's convention (what the paper's Table 5 calls FLOPs):
///   conv, transposed conv, linear and matmul count one per multiply-add; norms count as fvcore's
///   handles do (layer/group norm 5 per element, inference batch norm 2 per element); nearest
///   resize 1 per output element, bilinear 4; everything else (elementwise, softmax, bicubic,
///   shape ops) 0, as fvcore ignores them.
/// * `flops`: plain floating-point operations: 2 per multiply-add for contractions, plus a
///   per-element estimate for the rest (documented on each op).
/// * `activations`: fvcore's activation count: output elements of conv, transposed conv,
///   linear and matmul nodes; 0 for every other op.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    pub macs: u64,
    pub flops: u64,
    pub activations: u64,
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost {
            macs: self.macs + o.macs,
            flops: self.flops + o.flops,
            activations: self.activations + o.activations,
        }
    }
}

impl std::iter::Sum for Cost {
    fn sum<I: Iterator<Item = Cost>>(iter: I) -> Cost {
        iter.fold(Cost::default(), |a, b| a + b)
    }
}

/// Bounds every element of an integer value lies within: `lo..=hi`. Index-producing ops know
/// them by construction (top-k, NMS, iota), data movement keeps its input's; an index op whose
/// indices are proven within its axis skips its run-time range check (a copy to the host and a
/// wait on a GPU). See [`OpRule::value_ranges`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntRange {
    pub lo: i64,
    pub hi: i64,
}

impl IntRange {
    pub fn new(lo: i64, hi: i64) -> IntRange {
        IntRange {
            lo: lo.min(hi),
            hi: lo.max(hi),
        }
    }

    /// `0..n`, the indices of an axis of size `n` (`None` for an empty axis).
    pub fn indices(n: usize) -> Option<IntRange> {
        (n > 0).then(|| IntRange::new(0, i64::try_from(n - 1).unwrap_or(i64::MAX)))
    }

    /// The smallest range holding both.
    pub fn union(self, o: IntRange) -> IntRange {
        IntRange::new(self.lo.min(o.lo), self.hi.max(o.hi))
    }

    /// Whether every value is an index of an axis of size `n`.
    pub fn within(self, n: usize) -> bool {
        self.lo >= 0 && (self.hi as u64) < n as u64
    }
}

/// The union of all of `ranges`, if every one is known.
pub fn union_all(ranges: &[Option<IntRange>]) -> Option<IntRange> {
    let (first, rest) = ranges.split_first()?;
    rest.iter().try_fold((*first)?, |acc, r| Some(acc.union((*r)?)))
}

/// Which inputs and outputs of an op are indexed by rows that may be dynamic (see
/// [`TensorType::dynamic_rows`]): the op computes on each row of these inputs independently,
/// or reduces over them, so it runs unchanged on fewer rows than the bound.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowRule {
    /// Inputs whose leading dim is the row dim. If one of them is dynamic, all must be.
    pub inputs: Vec<usize>,
    /// Outputs whose leading dim is those inputs' rows: dynamic when they are. Every other
    /// output is static (a reduction over the actual rows, such as a weight gradient).
    pub outputs: Vec<usize>,
}

impl RowRule {
    /// Takes no dynamic input (the default).
    pub fn none() -> RowRule {
        RowRule::default()
    }

    pub fn new(inputs: &[usize], outputs: &[usize]) -> RowRule {
        RowRule {
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
        }
    }

    /// Output types with their dynamic flags set from the inputs' (left as the type rule made
    /// them when no input is dynamic: [`DynamicPrefix`] makes them). Errors when a dynamic input
    /// sits where the op cannot take one, or row inputs mix dynamic and static rows or bounds.
    pub(crate) fn apply(&self, op: &str, inputs: &[&TensorType], outputs: &mut [TensorType]) -> Result<(), String> {
        let dynamic: Vec<usize> = (0..inputs.len()).filter(|&i| inputs[i].dynamic_rows).collect();
        let Some(&first) = dynamic.first() else {
            return Ok(());
        };
        for t in outputs.iter_mut() {
            t.dynamic_rows = false;
        }
        if let Some(i) = dynamic.iter().find(|i| !self.inputs.contains(i)) {
            return Err(format!(
                "input {i} ({}) has a dynamic row count, which `{op}` does not take there",
                inputs[*i]
            ));
        }
        let bound = inputs[first].shape[0];
        for &i in self.inputs.iter().filter(|&&i| i < inputs.len()) {
            if !inputs[i].dynamic_rows || inputs[i].shape[0] != bound {
                return Err(format!(
                    "input {i} ({}) must have the dynamic rows of input {first} ({})",
                    inputs[i], inputs[first]
                ));
            }
        }
        for &o in &self.outputs {
            let t = &mut outputs[o];
            if t.shape.first() != Some(&bound) {
                return Err(format!("output {o} ({t}) does not keep the {bound} bounded rows"));
            }
            t.dynamic_rows = true;
        }
        Ok(())
    }
}

/// The rules every op provides.
pub trait OpRule {
    /// Lowercase name used in dumps and to find kernels and VJPs.
    fn name(&self) -> &'static str;
    /// Allowed number of inputs (inclusive range).
    fn arity(&self) -> (usize, usize);
    /// Output types from input types; the message names the mismatch.
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String>;
    /// Cost of one execution (see [`Cost`]).
    fn cost(&self, _inputs: &[&TensorType], _outputs: &[TensorType]) -> Cost {
        Cost::default()
    }
    /// Which inputs may have a dynamic row count, and which outputs then do (none by default).
    fn rows(&self) -> RowRule {
        RowRule::none()
    }
    /// Ranges of the integer outputs' values given the inputs' (`None` where unknown), one per
    /// output or fewer (the rest unknown). Nothing is known by default.
    fn value_ranges(&self, _inputs: &[Option<IntRange>], _types: &[&TensorType]) -> Vec<Option<IntRange>> {
        Vec::new()
    }
}

macro_rules! op_set {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        /// Every operation a graph can hold. Serialized with an `"op"` tag naming the variant.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "op", rename_all = "snake_case")]
        pub enum Op {
            $($variant($ty)),*
        }

        impl Op {
            /// The op's rules.
            pub fn rule(&self) -> &dyn OpRule {
                match self {
                    $(Op::$variant(o) => o),*
                }
            }
        }

        $(impl From<$ty> for Op {
            fn from(o: $ty) -> Op {
                Op::$variant(o)
            }
        })*
    };
}

op_set! {
    Input(Input),
    Parameter(Parameter),
    Unary(Unary),
    UnaryGrad(UnaryGrad),
    ReduceSum(ReduceSum),
    Binary(Binary),
    Affine(Affine),
    Cast(Cast),
    DropPath(DropPath),
    DropPathMask(DropPathMask),
    Linear(Linear),
    MatMul(MatMul),
    Conv2d(Conv2d),
    Conv2dGradWeight(Conv2dGradWeight),
    ConvTranspose2d(ConvTranspose2d),
    LayerNorm(LayerNorm),
    LayerNormGrad(LayerNormGrad),
    GroupNorm(GroupNorm),
    GroupNormGrad(GroupNormGrad),
    BatchNorm(BatchNorm),
    BatchNormTrain(BatchNormTrain),
    BatchNormTrainGrad(BatchNormTrainGrad),
    Softmax(Softmax),
    SoftmaxGrad(SoftmaxGrad),
    RelPosGather(RelPosGather),
    RelPosBias(RelPosBias),
    RelPosGatherGrad(RelPosGatherGrad),
    RelPosBiasGrad(RelPosBiasGrad),
    Reshape(Reshape),
    Permute(Permute),
    Pad(Pad),
    Slice(Slice),
    DynamicPrefix(DynamicPrefix),
    PadRows(PadRows),
    Concat(Concat),
    Expand(Expand),
    MaxPool2d(MaxPool2d),
    MaxPool2dGrad(MaxPool2dGrad),
    Resize(Resize),
    ResizeGrad(ResizeGrad),
    Anchors(Anchors),
    BoxDecode(BoxDecode),
    ClipBoxes(ClipBoxes),
    TopK(TopK),
    IndexSelect(IndexSelect),
    IndexSelectGrad(IndexSelectGrad),
    GatherRows(GatherRows),
    GatherRowsGrad(GatherRowsGrad),
    Nms(Nms),
    RoiAlign(RoiAlign),
    RoiAlignGrad(RoiAlignGrad),
    PasteMasks(PasteMasks),
    IotaLike(IotaLike),
    CompareScalar(CompareScalar),
    AnchorTargets(AnchorTargets),
    ProposalTargets(ProposalTargets),
    MaskTargets(MaskTargets),
    SigmoidBceLoss(SigmoidBceLoss),
    SigmoidBceLossGrad(SigmoidBceLossGrad),
    SmoothL1Loss(SmoothL1Loss),
    SmoothL1LossGrad(SmoothL1LossGrad),
    SoftmaxCrossEntropyLoss(SoftmaxCrossEntropyLoss),
    SoftmaxCrossEntropyLossGrad(SoftmaxCrossEntropyLossGrad),
    WindowAttention(WindowAttention),
    WindowAttentionGrad(WindowAttentionGrad),
}

impl Op {
    pub fn name(&self) -> &'static str {
        self.rule().name()
    }

    /// Attributes as compact `key=value` text, for dumps.
    pub fn attrs_text(&self) -> String {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        let Some(map) = value.as_object_mut() else {
            return String::new();
        };
        map.remove("op");
        map.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether this node is a source (graph input or parameter) rather than a computation.
    pub fn is_source(&self) -> bool {
        matches!(self, Op::Input(_) | Op::Parameter(_))
    }
}

// ----- helpers shared by the type rules -----

pub(crate) fn numel(shape: &[usize]) -> u64 {
    shape.iter().map(|&d| d as u64).product()
}

pub(crate) fn expect_rank(what: &str, t: &TensorType, rank: usize) -> Result<(), String> {
    if t.rank() != rank {
        return Err(format!("{what} must have rank {rank}, found {t}"));
    }
    Ok(())
}

pub(crate) fn expect_float(what: &str, t: &TensorType) -> Result<(), String> {
    if !t.dtype.is_float() {
        return Err(format!("{what} must be floating point, found {t}"));
    }
    Ok(())
}

pub(crate) fn expect_same_dtype(a: &TensorType, b: &TensorType, what: &str) -> Result<(), String> {
    if a.dtype != b.dtype {
        return Err(format!("{what}: dtype mismatch {a} vs {b}"));
    }
    Ok(())
}

/// A per-channel vector (norm weight, bias, running statistic) of length `c`.
pub(crate) fn expect_vector(what: &str, t: &TensorType, c: usize, x: &TensorType) -> Result<(), String> {
    if t.shape != [c] {
        return Err(format!("{what} must have shape [{c}], found {t}"));
    }
    expect_same_dtype(x, t, what)
}

/// NumPy-style broadcast of two shapes (the shape rule of [`Binary`] and of a matmul's batch
/// dims).
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        };
    }
    Ok(out)
}
