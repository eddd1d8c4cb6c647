//! [`Builder`]: a [`Graph`] plus a module-scope stack, with one helper per PyTorch module the
//! backbones use. Node scopes are the dotted module path (`backbone.net.blocks.3.attn`) and
//! parameter names are `scope.leaf`, i.e. detectron2's state-dict keys.

use vitdet_ir::ops::{
    Affine, BatchNorm, BatchNormTrain, Binary, BinaryKind, Cast, Concat, Conv2d, ConvTranspose2d, DynamicPrefix,
    GroupNorm, Init, Input, LayerNorm, MatMul, MaxPool2d, Pad, Parameter, Permute, ReduceSum, Reshape, Resize,
    ResizeMode, Slice, Softmax, Unary, UnaryKind,
};
use vitdet_ir::{DType, Graph, NodeIndex, Op, TensorType, Value};

use crate::error::ModelError;

pub(crate) type Result<T> = std::result::Result<T, ModelError>;

/// Std of the truncated normal used for linear weights and embeddings (timm / detectron2).
pub const TRUNC_NORMAL_STD: f64 = 0.02;

pub(crate) struct Builder {
    pub graph: Graph,
    scope: Vec<String>,
    /// `Some` while building a training graph (see [`Training`]); `None` for inference.
    pub training: Option<Training>,
}

/// `nn.BatchNorm2d`'s default momentum of the running statistics (detectron2 keeps it).
pub const BN_MOMENTUM: f64 = 0.1;

/// Training mode of a [`Builder`]: modules emit their training form. Drop path multiplies
/// branches by a `DropPathMask` drawn from `seed`; BatchNorm normalizes with batch statistics
/// (`BatchNormTrain`) and records its updated running statistics in `buffer_updates`.
pub(crate) struct Training {
    /// The graph's i64 seed input.
    pub seed: Value,
    /// Every BatchNorm running statistic, in the order the modules were built.
    pub buffer_updates: Vec<BufferUpdate>,
}

/// A buffer's value before the step (the parameter) and the value the step writes back.
pub(crate) struct BufferUpdate {
    pub name: String,
    pub current: Value,
    pub updated: Value,
}

impl Builder {
    pub fn new() -> Self {
        Builder {
            graph: Graph::new(),
            scope: Vec::new(),
            training: None,
        }
    }

    /// The current module path.
    pub fn scope(&self) -> String {
        self.scope.join(".")
    }

    /// `scope.leaf` (or `leaf` at the root).
    fn path(&self, leaf: &str) -> String {
        if self.scope.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.scope())
        }
    }

    /// Runs `f` inside child module `name` (which may itself be dotted, e.g. `blocks.3`).
    pub fn scoped<T>(&mut self, name: impl std::fmt::Display, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.scope.push(name.to_string());
        let r = f(self);
        self.scope.pop();
        r
    }

    /// Adds `op` in the current scope.
    pub fn op(&mut self, op: impl Into<Op>, inputs: &[Value]) -> Result<Value> {
        let scope = self.scope();
        Ok(self.graph.add(op, &scope, inputs)?)
    }

    /// Adds a node with several outputs in the current scope; its outputs are
    /// `Value { node, output: i }`.
    pub fn op_multi(&mut self, op: impl Into<Op>, inputs: &[Value]) -> Result<NodeIndex> {
        let scope = self.scope();
        Ok(self.graph.add_node(op, &scope, inputs)?)
    }

    pub fn shape(&self, v: Value) -> Vec<usize> {
        self.graph.value_type(v).shape.clone()
    }

    /// The sum of the vector `v` (`[N]`, any numeric dtype) as an f32 scalar `[]`; for a 0/1
    /// vector, its number of ones (exact up to 2^24).
    pub fn sum_rows(&mut self, v: Value) -> Result<Value> {
        let v = match self.graph.value_type(v).dtype {
            DType::F32 => v,
            _ => self.op(Cast { dtype: DType::F32 }, &[v])?,
        };
        self.op(
            ReduceSum {
                axes: vec![0],
                keepdim: false,
            },
            &[v],
        )
    }

    /// A whole number held in an f32 scalar (a [`Builder::sum_rows`] of ones) as the i64 count
    /// [`Builder::first_rows`] takes.
    pub fn row_count(&mut self, ones: Value) -> Result<Value> {
        self.op(Cast { dtype: DType::I64 }, &[ones])
    }

    /// The first `count` rows of `x`, at least one and at most `bound`, as a value with dynamic
    /// rows (kernels are not defined on empty tensors; a graph computes its count once).
    pub fn first_rows(&mut self, x: Value, count: Value, bound: usize) -> Result<Value> {
        self.op(DynamicPrefix { min_rows: 1, bound }, &[x, count])
    }

    pub fn input(&mut self, name: &str, shape: Vec<usize>) -> Result<Value> {
        self.typed_input(name, DType::F32, shape)
    }

    pub fn typed_input(&mut self, name: &str, dtype: DType, shape: Vec<usize>) -> Result<Value> {
        self.op(
            Input {
                name: name.to_string(),
                ty: TensorType::new(dtype, shape),
            },
            &[],
        )
    }

    /// Trainable parameter `scope.leaf`.
    pub fn param(&mut self, leaf: &str, shape: Vec<usize>, init: Init) -> Result<Value> {
        self.source(leaf, shape, init, true)
    }

    /// Non-trainable buffer `scope.leaf` (BatchNorm running statistics).
    pub fn buffer(&mut self, leaf: &str, shape: Vec<usize>, init: Init) -> Result<Value> {
        self.source(leaf, shape, init, false)
    }

    fn source(&mut self, leaf: &str, shape: Vec<usize>, init: Init, trainable: bool) -> Result<Value> {
        let name = self.path(leaf);
        self.op(
            Parameter {
                name,
                ty: TensorType::f32(shape),
                init,
                trainable,
            },
            &[],
        )
    }

    // ----- modules (each opens its own child scope `name`) -----

    /// `nn.Linear(in, out, bias)` on the last axis; weight trunc-normal(0.02), bias zeros.
    pub fn linear(&mut self, name: &str, x: Value, out: usize, bias: bool) -> Result<Value> {
        self.linear_init(name, x, out, bias, Init::TruncNormal { std: TRUNC_NORMAL_STD })
    }

    /// [`Builder::linear`] with the weight initialized by `init` (bias zeros).
    pub fn linear_init(&mut self, name: &str, x: Value, out: usize, bias: bool, init: Init) -> Result<Value> {
        let inp = *self.shape(x).last().expect("linear input has rank >= 1");
        self.scoped(name, |b| {
            let w = b.param("weight", vec![out, inp], init)?;
            let mut ins = vec![x, w];
            if bias {
                ins.push(b.param("bias", vec![out], Init::Zeros)?);
            }
            b.op(vitdet_ir::ops::Linear {}, &ins)
        })
    }

    /// LayerNorm over `axis` (last axis: `nn.LayerNorm`; 1 on NCHW: detectron2's channel
    /// `LayerNorm`) with `weight` ones and `bias` zeros.
    pub fn layer_norm(&mut self, name: &str, x: Value, axis: usize, eps: f64) -> Result<Value> {
        let c = self.shape(x)[axis];
        self.scoped(name, |b| {
            let (w, bias) = b.affine_params(c)?;
            b.op(LayerNorm { axis, eps }, &[x, w, bias])
        })
    }

    /// `nn.GroupNorm(groups, C, eps)`.
    pub fn group_norm(&mut self, name: &str, x: Value, groups: usize, eps: f64) -> Result<Value> {
        let c = self.shape(x)[1];
        self.scoped(name, |b| {
            let (w, bias) = b.affine_params(c)?;
            b.op(GroupNorm { groups, eps }, &[x, w, bias])
        })
    }

    /// `nn.BatchNorm2d`: trainable `weight`, `bias`; buffers `running_mean` (zeros) and
    /// `running_var` (ones). Inference form normalizes with the running statistics; in
    /// training mode with the batch's (`BatchNormTrain`, momentum [`BN_MOMENTUM`]), recording
    /// the updated statistics.
    pub fn batch_norm(&mut self, name: &str, x: Value, eps: f64) -> Result<Value> {
        let c = self.shape(x)[1];
        self.scoped(name, |b| {
            let (w, bias) = b.affine_params(c)?;
            let mean = b.buffer("running_mean", vec![c], Init::Zeros)?;
            let var = b.buffer("running_var", vec![c], Init::Ones)?;
            if b.training.is_none() {
                return b.op(BatchNorm { eps }, &[x, w, bias, mean, var]);
            }
            let op = BatchNormTrain {
                eps,
                momentum: BN_MOMENTUM,
            };
            let node = b.op_multi(op, &[x, w, bias, mean, var])?;
            let out = |output| Value { node, output };
            let updates =
                [("running_mean", mean, out(1)), ("running_var", var, out(2))].map(|(leaf, current, updated)| {
                    BufferUpdate {
                        name: b.path(leaf),
                        current,
                        updated,
                    }
                });
            b.training
                .as_mut()
                .expect("training mode")
                .buffer_updates
                .extend(updates);
            Ok(out(0))
        })
    }

    fn affine_params(&mut self, c: usize) -> Result<(Value, Value)> {
        let w = self.param("weight", vec![c], Init::Ones)?;
        let b = self.param("bias", vec![c], Init::Zeros)?;
        Ok((w, b))
    }

    /// `nn.Conv2d(in, out, k, stride, padding, bias)`; weight Normal(sqrt(2 / fan_out)) with
    /// `fan_out = out * k * k` (detectron2's `c2_msra_fill`), bias zeros.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d(
        &mut self,
        name: &str,
        x: Value,
        out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Value> {
        let inp = self.shape(x)[1];
        self.scoped(name, |b| b.conv2d_here(x, inp, out, k, stride, padding, bias))
    }

    /// [`Builder::conv2d`] whose parameters live in the current scope (for detectron2's
    /// `Conv2d` with a `norm` child, see [`Builder::conv_norm`]).
    #[allow(clippy::too_many_arguments)]
    fn conv2d_here(
        &mut self,
        x: Value,
        inp: usize,
        out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Value> {
        let std = (2.0 / (out * k * k) as f64).sqrt();
        let w = self.param("weight", vec![out, inp, k, k], Init::Normal { std })?;
        let mut ins = vec![x, w];
        if bias {
            ins.push(self.param("bias", vec![out], Init::Zeros)?);
        }
        let conv = Conv2d {
            stride: [stride, stride],
            padding: [padding, padding],
            dilation: [1, 1],
            groups: 1,
        };
        self.op(conv, &ins)
    }

    /// Parameters of `nn.Conv2d(in, out, k)` with bias as children of module `name`: weight
    /// Normal(`std`), bias zeros. Apply them (possibly several times: a head shared over
    /// pyramid levels) with [`Builder::conv2d_apply`].
    pub fn conv2d_params(&mut self, name: &str, inp: usize, out: usize, k: usize, std: f64) -> Result<(Value, Value)> {
        self.scoped(name, |b| {
            let w = b.param("weight", vec![out, inp, k, k], Init::Normal { std })?;
            let bias = b.param("bias", vec![out], Init::Zeros)?;
            Ok((w, bias))
        })
    }

    /// A stride-1 conv with `padding` on `x` with given weight and bias, in the current scope.
    pub fn conv2d_apply(&mut self, x: Value, w: Value, bias: Value, padding: usize) -> Result<Value> {
        let conv = Conv2d {
            stride: [1, 1],
            padding: [padding, padding],
            dilation: [1, 1],
            groups: 1,
        };
        self.op(conv, &[x, w, bias])
    }

    /// detectron2's `Conv2d(in, out, k, padding=k/2, bias=False, norm=...)`: a bias-free conv
    /// with its norm as child module `norm` (`name.weight`, `name.norm.*`).
    pub fn conv_norm(&mut self, name: &str, x: Value, out: usize, k: usize, norm: Norm) -> Result<Value> {
        let inp = self.shape(x)[1];
        self.scoped(name, |b| {
            let y = b.conv2d_here(x, inp, out, k, 1, k / 2, false)?;
            match norm {
                Norm::ChannelLayerNorm { eps } => b.layer_norm("norm", y, 1, eps),
                Norm::BatchNorm { eps } => b.batch_norm("norm", y, eps),
            }
        })
    }

    /// `nn.ConvTranspose2d(in, out, k, stride=k)` with bias; weight `[in, out, k, k]`
    /// Normal(sqrt(2 / fan_out)), bias zeros.
    pub fn conv_transpose(&mut self, name: &str, x: Value, out: usize, k: usize) -> Result<Value> {
        let inp = self.shape(x)[1];
        self.scoped(name, |b| {
            let std = (2.0 / (out * k * k) as f64).sqrt();
            let w = b.param("weight", vec![inp, out, k, k], Init::Normal { std })?;
            let bias = b.param("bias", vec![out], Init::Zeros)?;
            b.op(ConvTranspose2d::upsample(k), &[x, w, bias])
        })
    }

    // ----- plain ops in the current scope -----

    /// Boxes `[..., 4]` clamped to an `image_hw` image.
    pub fn clip_boxes(&mut self, boxes: Value, image_hw: [usize; 2]) -> Result<Value> {
        self.op(
            vitdet_ir::ops::ClipBoxes {
                height: image_hw[0] as f64,
                width: image_hw[1] as f64,
            },
            &[boxes],
        )
    }

    pub fn reshape(&mut self, x: Value, shape: Vec<usize>) -> Result<Value> {
        self.op(Reshape { shape }, &[x])
    }

    pub fn permute(&mut self, x: Value, perm: Vec<usize>) -> Result<Value> {
        self.op(Permute { perm }, &[x])
    }

    pub fn slice(&mut self, x: Value, axis: usize, start: usize, end: usize) -> Result<Value> {
        self.op(Slice { axis, start, end }, &[x])
    }

    pub fn pad(&mut self, x: Value, pads: Vec<[usize; 2]>) -> Result<Value> {
        self.op(Pad { pads }, &[x])
    }

    pub fn binary(&mut self, kind: BinaryKind, a: Value, b: Value) -> Result<Value> {
        self.op(Binary { kind }, &[a, b])
    }

    pub fn add(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(BinaryKind::Add, a, b)
    }

    /// The number of buffer updates recorded so far (0 outside training), to pass to
    /// [`Builder::keep_updates_if`] for the modules built after it.
    pub fn updates_recorded(&self) -> usize {
        self.training.as_ref().map_or(0, |t| t.buffer_updates.len())
    }

    /// Makes the buffer updates recorded from index `first` on take effect only when `keep` (an
    /// f32 scalar, 0 or 1) is 1: `updated * keep + current * (1 - keep)`, which is exactly
    /// `updated` or `current` for finite values.
    pub fn keep_updates_if(&mut self, first: usize, keep: Value) -> Result<()> {
        let Some(t) = self.training.as_mut() else {
            return Ok(());
        };
        let mut updates = std::mem::take(&mut t.buffer_updates);
        if first < updates.len() {
            let drop = self.op(Affine { mul: -1.0, add: 1.0 }, &[keep])?;
            for u in &mut updates[first..] {
                let new = self.binary(BinaryKind::Mul, u.updated, keep)?;
                let old = self.binary(BinaryKind::Mul, u.current, drop)?;
                u.updated = self.add(new, old)?;
            }
        }
        self.training.as_mut().expect("training mode").buffer_updates = updates;
        Ok(())
    }

    pub fn scale(&mut self, x: Value, mul: f64) -> Result<Value> {
        self.op(Affine { mul, add: 0.0 }, &[x])
    }

    pub fn gelu(&mut self, x: Value) -> Result<Value> {
        self.op(Unary { kind: UnaryKind::Gelu }, &[x])
    }

    pub fn relu(&mut self, x: Value) -> Result<Value> {
        self.op(Unary { kind: UnaryKind::Relu }, &[x])
    }

    pub fn sigmoid(&mut self, x: Value) -> Result<Value> {
        self.op(
            Unary {
                kind: UnaryKind::Sigmoid,
            },
            &[x],
        )
    }

    pub fn concat(&mut self, xs: &[Value], axis: usize) -> Result<Value> {
        self.op(Concat { axis }, xs)
    }

    pub fn softmax(&mut self, x: Value, axis: usize) -> Result<Value> {
        self.op(Softmax { axis }, &[x])
    }

    pub fn matmul(&mut self, a: Value, b: Value, transpose_rhs: bool) -> Result<Value> {
        self.op(MatMul::new(transpose_rhs), &[a, b])
    }

    pub fn max_pool(&mut self, x: Value, kernel: usize, stride: usize) -> Result<Value> {
        self.op(MaxPool2d::new(kernel, stride), &[x])
    }

    pub fn resize(&mut self, x: Value, size: [usize; 2], mode: ResizeMode) -> Result<Value> {
        self.op(
            Resize {
                size,
                mode,
                align_corners: false,
            },
            &[x],
        )
    }

    /// `[B, H, W, C] -> [B, C, H, W]`.
    pub fn nhwc_to_nchw(&mut self, x: Value) -> Result<Value> {
        self.permute(x, vec![0, 3, 1, 2])
    }

    /// `[B, C, H, W] -> [B, H, W, C]`.
    pub fn nchw_to_nhwc(&mut self, x: Value) -> Result<Value> {
        self.permute(x, vec![0, 2, 3, 1])
    }

    pub fn finish(self) -> Graph {
        self.graph
    }
}

/// The norm child of a detectron2 `Conv2d`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Norm {
    ChannelLayerNorm { eps: f64 },
    BatchNorm { eps: f64 },
}
