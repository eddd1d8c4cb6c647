//! Which values the runtime stores in their own memory, and which are views of another value's.
//!
//! The CPU runtime (candle) executes some data-movement ops without new storage: the result is
//! a strided view sharing its input's buffer, and that buffer then lives as long as any view of
//! it. This module replays the layouts (dims and strides over a root buffer) the runtime's
//! kernels produce, in the order the executor runs them, so the planner gives one buffer per
//! root and extends its lifetime through every view. The rules, kernel by kernel
//! (`vitdet-runtime`'s `kernels/shape.rs`, `elementwise.rs`, `conv.rs`):
//!
//! * `reshape` of a row-major contiguous input is a view; of a strided one, a copy.
//! * `permute` is a view when the permuted layout is still contiguous (only size-1 axes move),
//!   otherwise a contiguous copy.
//! * `slice` is always a view (candle's `narrow`), `expand` always a view (stride 0 on the
//!   broadcast axes); both may leave a strided layout for the next op.
//! * `concat` of one input, `pad` by nothing, `affine` by (1, 0), inference `drop_path` and a
//!   `cast` to the value's own dtype return the input itself.
//! * `conv2d` with kernel == stride and no bias (the patchify fast path) returns an NCHW view
//!   of its NHWC result: new storage, but strided.
//! * Everything else writes a new row-major buffer. In particular no op writes in place: candle
//!   never overwrites an input, so an elementwise op whose input dies at that node still needs a
//!   buffer of its own, and the plan gives it one (planning the reuse would describe memory the
//!   runtime does not have).
//!
//! Candle's contiguity test ignores axes of size 1 (`Shape::is_contiguous`); so does this one.

use std::collections::HashMap;

use vitdet_ir::ops::Op;
use vitdet_ir::{Graph, NodeIndex, Value};

/// A value's layout: which value's buffer holds its elements, and its dims and element strides
/// in that buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub root: Value,
    pub dims: Vec<usize>,
    pub strides: Vec<usize>,
}

fn row_major(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; dims.len()];
    let mut acc = 1;
    for i in (0..dims.len()).rev() {
        strides[i] = acc;
        acc *= dims[i];
    }
    strides
}

impl Layout {
    fn new_buffer(root: Value, dims: &[usize]) -> Layout {
        Layout {
            root,
            dims: dims.to_vec(),
            strides: row_major(dims),
        }
    }

    /// candle's `is_contiguous`: row-major strides on every axis longer than 1.
    pub fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for (&s, &d) in self.strides.iter().zip(&self.dims).rev() {
            if d > 1 && s != acc {
                return false;
            }
            acc *= d;
        }
        true
    }

    fn view(&self, dims: Vec<usize>, strides: Vec<usize>) -> Layout {
        Layout {
            root: self.root,
            dims,
            strides,
        }
    }
}

/// candle's `broadcast_as` strides: new leading axes and expanded size-1 axes get stride 0.
fn broadcast(src: &Layout, dims: &[usize]) -> Layout {
    let lead = dims.len() - src.dims.len();
    let strides = (0..dims.len())
        .map(|i| {
            let broadcast_axis = i < lead || (src.dims[i - lead] == 1 && dims[i] != 1);
            if broadcast_axis {
                0
            } else {
                src.strides[i - lead]
            }
        })
        .collect();
    src.view(dims.to_vec(), strides)
}

/// The layout of every output of every node of `order` (parameters are their own roots).
pub(crate) fn layouts(graph: &Graph, order: &[NodeIndex]) -> HashMap<Value, Layout> {
    let mut out: HashMap<Value, Layout> = HashMap::new();
    for &n in order {
        let node = graph.node(n);
        let inputs = graph.inputs_of(n);
        for (output, ty) in node.outputs.iter().enumerate() {
            let v = Value { node: n, output };
            let first = inputs.first().and_then(|x| out.get(x));
            let layout = match (output, first) {
                (0, Some(x)) => match result_of(graph, &node.op, x, &inputs, &ty.shape) {
                    Produced::View(l) => l,
                    Produced::Strided(strides) => Layout {
                        root: v,
                        dims: ty.shape.clone(),
                        strides,
                    },
                    Produced::Fresh => Layout::new_buffer(v, &ty.shape),
                },
                _ => Layout::new_buffer(v, &ty.shape),
            };
            out.insert(v, layout);
        }
    }
    out
}

/// What a kernel returns, as far as memory goes.
enum Produced {
    /// A view of its first input's buffer.
    View(Layout),
    /// A buffer of its own with these (non-row-major) strides.
    Strided(Vec<usize>),
    /// A buffer of its own, row-major.
    Fresh,
}

/// How the runtime produces the (first) output of `op` from its first input `x`.
fn result_of(graph: &Graph, op: &Op, x: &Layout, inputs: &[Value], dims: &[usize]) -> Produced {
    let same = || Produced::View(x.clone());
    match op {
        Op::Reshape(_) if x.is_contiguous() => Produced::View(x.view(dims.to_vec(), row_major(dims))),
        Op::Permute(p) => {
            let permuted = x.view(
                p.perm.iter().map(|&a| x.dims[a]).collect(),
                p.perm.iter().map(|&a| x.strides[a]).collect(),
            );
            if permuted.is_contiguous() {
                Produced::View(permuted)
            } else {
                Produced::Fresh
            }
        }
        Op::Slice(s) => {
            let mut d = x.dims.clone();
            d[s.axis] = s.end - s.start;
            Produced::View(x.view(d, x.strides.clone()))
        }
        Op::Expand(_) => Produced::View(broadcast(x, dims)),
        Op::Concat(_) if inputs.len() == 1 => same(),
        Op::Pad(p) if p.pads.iter().all(|&[a, b]| a == 0 && b == 0) => same(),
        Op::Affine(a) if a.mul == 1.0 && a.add == 0.0 => same(),
        Op::DropPath(_) => same(),
        Op::Cast(c) if graph.value_type(inputs[0]).dtype == c.dtype => same(),
        Op::Conv2d(c) if inputs.len() == 2 && is_patchify(graph, c, inputs[1]) => {
            // The gemm's [n, ho, wo, o] result seen as NCHW.
            let (o, h, w) = (dims[1], dims[2], dims[3]);
            Produced::Strided(vec![h * w * o, 1, w * o, o])
        }
        _ => Produced::Fresh,
    }
}

/// The runtime's patchify fast path: kernel == stride, no padding, no dilation, one group.
pub(crate) fn is_patchify(graph: &Graph, c: &vitdet_ir::ops::Conv2d, weight: Value) -> bool {
    let w = &graph.value_type(weight).shape;
    w.len() == 4 && [w[2], w[3]] == c.stride && c.padding == [0, 0] && c.dilation == [1, 1] && c.groups == 1
}
