//! Static memory planning: one arena for every activation of a scheduled graph, laid out the
//! way the runtime really holds memory.
//!
//! # What gets a buffer
//!
//! * Every value the runtime stores in memory of its own (a *root*): graph inputs and the
//!   results of ops that write a new buffer. Values the runtime executes as views (reshape of
//!   contiguous data, slice, expand, no-op pads/casts/concats, see `storage` for the rules)
//!   get no buffer: they live in their root's, and extend its lifetime. Views of parameters are
//!   resident with the parameters and never planned.
//! * Every node whose kernel allocates scratch memory beyond its outputs gets a *workspace*
//!   buffer live at its own step only (`workspace` has the per-op rules).
//!
//! No op writes in place in the runtime (candle always allocates a result), so an elementwise
//! output never reuses its dying input's buffer: planning that reuse would make the plan
//! smaller than what the runtime measures.
//!
//! # Lifetimes
//!
//! A value is live from the step its producer runs (a graph input from its `input` node's
//! step) to the step of its last scheduled consumer (`vitdet_ir::Liveness`'s walk); graph
//! outputs live to the end; values nobody reads die at their own step. A root's buffer lives
//! from its producer's step to the last step any value stored in it (itself or a view) is live.
//! Lifetimes are closed step intervals: a node's inputs, outputs and workspace are live together
//! at its step, so an output never shares memory with an input of the same node.
//!
//! # Placement
//!
//! Offsets come from several greedy heuristics, keeping the smallest arena, as XLA's heap
//! simulator does (`placement` has them and why one is not enough): the skyline (lowest
//! offset first, long-lived buffers settling at the bottom), greedy-by-size best fit (TFLite's
//! arena planner and XLA's default: each buffer in the smallest gap left between placed buffers
//! whose lifetimes overlap its own) and first fit by size class. Best fit alone is within 1% of
//! the bound on inference and plain training graphs, but up to 40% above it on checkpointed
//! ones; the portfolio is within 3% on every preset's training graph.
//!
//! [`MemoryPlan::breakdown`] splits the arena at its peak step into saved activations,
//! transient activations, workspace and fragmentation, beside parameters, gradients and
//! optimizer state (`breakdown`).

mod breakdown;
mod placement;
mod storage;
mod workspace;

pub use breakdown::MemoryBreakdown;
pub use placement::Placement;

use std::collections::{HashMap, HashSet};

use vitdet_ir::ops::Op;
use vitdet_ir::{Graph, NodeIndex, Value};

/// Every buffer's offset and size is a multiple of this (a cache line; what SIMD kernels and
/// most allocators assume).
pub const ALIGNMENT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("execution order names node %{0}, which is not in the graph")]
    MissingNode(usize),
    #[error("execution order runs node %{0} twice")]
    Repeated(usize),
    #[error("node %{consumer} reads %{producer}:{output} before it is computed (order not topological or incomplete)")]
    NotTopological {
        consumer: usize,
        producer: usize,
        output: usize,
    },
    #[error("graph output `{0}` is never computed by the execution order")]
    OutputNotComputed(String),
    #[error("memory plan is invalid: {0}")]
    Invalid(String),
    #[error("no placement strategy given")]
    NoPlacement,
}

/// What a buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BufferKind {
    /// The storage of a root value (and of every view of it).
    Value,
    /// The scratch memory of the node that produced `Buffer::value` (its output 0), during that
    /// node's step only.
    Workspace,
}

/// One buffer: its lifetime in steps of the order (inclusive) and its place in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// The root value stored here; for a workspace, output 0 of the node it serves.
    pub value: Value,
    pub kind: BufferKind,
    /// Step of the producer.
    pub first: usize,
    /// Last step at which the value or a view of it is live (the last step for graph outputs).
    pub last: usize,
    pub offset: usize,
    /// Aligned size in bytes.
    pub size: usize,
    /// Size in bytes before alignment (what the runtime allocates).
    pub bytes: usize,
}

impl Buffer {
    fn lives_with(&self, other: &Buffer) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    fn shares_bytes_with(&self, other: &Buffer) -> bool {
        self.size > 0
            && other.size > 0
            && self.offset < other.offset + other.size
            && other.offset < self.offset + self.size
    }

    fn describe(&self) -> String {
        let what = match self.kind {
            BufferKind::Value => "",
            BufferKind::Workspace => " (workspace)",
        };
        format!(
            "%{}:{}{what} (steps {}..={}, bytes {}..{})",
            self.value.node.index(),
            self.value.output,
            self.first,
            self.last,
            self.offset,
            self.offset + self.size
        )
    }
}

/// Where every activation lives in one arena.
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    /// `(offset, aligned size)` of the buffer holding each planned value: its own for a root,
    /// its root's for a view. Values stored with the parameters are absent.
    pub offsets: HashMap<Value, (usize, usize)>,
    /// The root whose buffer holds each planned value that is a view (see `storage`).
    pub aliases: HashMap<Value, Value>,
    /// Every buffer with its lifetime: value buffers in definition order, then workspaces.
    pub buffers: Vec<Buffer>,
    /// Bytes the arena needs: the highest end of any buffer.
    pub arena_bytes: usize,
    /// Peak over the steps of the live (unaligned) buffer bytes, workspace included: what the
    /// runtime holds at its fullest, and a bound no arena can beat.
    pub lower_bound_bytes: usize,
    /// The same peak over aligned sizes: the bound this planner's arena is really held to
    /// (for tiny tensors the 64-byte rounding alone can exceed `lower_bound_bytes` many times).
    pub aligned_lower_bound_bytes: usize,
    /// Live (unaligned) buffer bytes at each step, workspace included: the figure the
    /// runtime's per-step measurement compares with.
    pub step_live_bytes: Vec<usize>,
    /// Number of steps of the order that was planned.
    pub steps: usize,
    /// The heuristic whose arena was kept.
    pub placement: Placement,
}

fn align(bytes: usize) -> usize {
    bytes.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn is_param(graph: &Graph, v: Value) -> bool {
    matches!(graph.node(v.node).op, Op::Parameter(_))
}

/// Checks that `order` runs every node at most once, only nodes of `graph`, producers before
/// consumers, and computes every graph output.
fn validate_order(graph: &Graph, order: &[NodeIndex]) -> Result<(), PlanError> {
    let mut ran = HashSet::with_capacity(order.len());
    for &n in order {
        if graph.graph.node_weight(n).is_none() {
            return Err(PlanError::MissingNode(n.index()));
        }
        for v in graph.inputs_of(n) {
            if !ran.contains(&v.node) {
                return Err(PlanError::NotTopological {
                    consumer: n.index(),
                    producer: v.node.index(),
                    output: v.output,
                });
            }
        }
        if !ran.insert(n) {
            return Err(PlanError::Repeated(n.index()));
        }
    }
    for o in &graph.outputs {
        if !ran.contains(&o.value.node) {
            return Err(PlanError::OutputNotComputed(o.name.clone()));
        }
    }
    Ok(())
}

/// Liveness span `(value, first step, last step)` of every non-parameter value computed by
/// `order`, in definition order, from `vitdet_ir::Liveness`'s walk.
fn value_spans(graph: &Graph, order: &[NodeIndex]) -> Vec<(Value, usize, usize)> {
    let mut walk = vitdet_ir::Liveness::new(graph, order);
    let mut first: Vec<(Value, usize)> = Vec::new();
    let mut last: HashMap<Value, usize> = HashMap::new();
    for (step, &n) in order.iter().enumerate() {
        for output in 0..graph.node(n).outputs.len() {
            let v = Value { node: n, output };
            if !is_param(graph, v) {
                first.push((v, step));
            }
        }
        for v in walk.step(n) {
            last.insert(v, step);
        }
    }
    let end = order.len().saturating_sub(1);
    first
        .into_iter()
        .map(|(v, f)| (v, f, last.get(&v).copied().unwrap_or(end)))
        .collect()
}

/// The nodes of `order` the runtime runs without a kernel: their output is a view of, or is,
/// another value's buffer (see `storage`).
pub(crate) fn view_nodes(graph: &Graph, order: &[NodeIndex]) -> std::collections::HashSet<NodeIndex> {
    let layouts = storage::layouts(graph, order);
    order
        .iter()
        .copied()
        .filter(|&n| {
            let v = Value::from(n);
            layouts.get(&v).is_some_and(|l| l.root != v)
        })
        .collect()
}

/// The buffers the runtime allocates over `order` (unplaced: offset 0) and the root of every
/// value that is a view.
fn runtime_buffers(graph: &Graph, order: &[NodeIndex]) -> (Vec<Buffer>, HashMap<Value, Value>) {
    let layouts = storage::layouts(graph, order);
    let mut buffers: Vec<Buffer> = Vec::new();
    let mut buffer_of: HashMap<Value, usize> = HashMap::new();
    let mut aliases = HashMap::new();
    for (v, first, last) in value_spans(graph, order) {
        let root = layouts[&v].root;
        if root != v {
            aliases.insert(v, root);
        }
        if is_param(graph, root) {
            continue;
        }
        match buffer_of.get(&root) {
            // Roots come before their views in definition order.
            Some(&i) => buffers[i].last = buffers[i].last.max(last),
            None => {
                let bytes = graph.value_type(v).size_in_bytes();
                buffer_of.insert(v, buffers.len());
                buffers.push(Buffer {
                    value: v,
                    kind: BufferKind::Value,
                    first,
                    last,
                    offset: 0,
                    size: align(bytes),
                    bytes,
                });
            }
        }
    }
    for (step, &n) in order.iter().enumerate() {
        let bytes = workspace::workspace_bytes(graph, n, &layouts);
        if bytes > 0 {
            buffers.push(Buffer {
                value: Value { node: n, output: 0 },
                kind: BufferKind::Workspace,
                first: step,
                last: step,
                offset: 0,
                size: align(bytes),
                bytes,
            });
        }
    }
    (buffers, aliases)
}

/// Live bytes per step over `steps` steps, from a difference array over the lifetimes.
fn live_per_step(buffers: &[Buffer], steps: usize, size: impl Fn(&Buffer) -> usize) -> Vec<usize> {
    let mut delta = vec![0isize; steps + 1];
    for b in buffers {
        delta[b.first] += size(b) as isize;
        delta[b.last + 1] -= size(b) as isize;
    }
    let mut live = 0isize;
    delta[..steps]
        .iter()
        .map(|d| {
            live += d;
            live as usize
        })
        .collect()
}

/// Plans one arena for the activations of `graph` run in `order` (normally
/// [`crate::schedule()`]'s), with every [`Placement`] heuristic. Errors name the offending node
/// when `order` is not a valid execution order of `graph`.
pub fn plan_memory(graph: &Graph, order: &[NodeIndex]) -> Result<MemoryPlan, PlanError> {
    plan_memory_with(graph, order, &Placement::ALL)
}

/// [`plan_memory`] with only the given placement heuristics (the smallest arena wins, the
/// earlier heuristic on a tie).
pub fn plan_memory_with(graph: &Graph, order: &[NodeIndex], strategies: &[Placement]) -> Result<MemoryPlan, PlanError> {
    validate_order(graph, order)?;
    if strategies.is_empty() {
        return Err(PlanError::NoPlacement);
    }
    let (mut buffers, aliases) = runtime_buffers(graph, order);
    let step_live_bytes = live_per_step(&buffers, order.len(), |b| b.bytes);
    let aligned = live_per_step(&buffers, order.len(), |b| b.size);
    let aligned_lower_bound_bytes = aligned.iter().copied().max().unwrap_or(0);
    let (arena_bytes, placement) = placement::place(&mut buffers, strategies, aligned_lower_bound_bytes);

    let mut offsets: HashMap<Value, (usize, usize)> = buffers
        .iter()
        .filter(|b| b.kind == BufferKind::Value)
        .map(|b| (b.value, (b.offset, b.size)))
        .collect();
    for (v, root) in &aliases {
        if let Some(&place) = offsets.get(root) {
            offsets.insert(*v, place);
        }
    }
    Ok(MemoryPlan {
        offsets,
        aliases,
        buffers,
        arena_bytes,
        lower_bound_bytes: step_live_bytes.iter().copied().max().unwrap_or(0),
        aligned_lower_bound_bytes,
        step_live_bytes,
        steps: order.len(),
        placement,
    })
}

impl MemoryPlan {
    /// Planned arena over the lower bound (1.0 is optimal); 1.0 for a graph with no activations.
    pub fn ratio(&self) -> f64 {
        if self.lower_bound_bytes == 0 {
            1.0
        } else {
            self.arena_bytes as f64 / self.lower_bound_bytes as f64
        }
    }

    /// The step at which the most (aligned) buffer bytes are live: where the arena's high-water
    /// mark is reached when the placement has no fragmentation (the first such step).
    pub fn peak_step(&self) -> usize {
        let aligned = live_per_step(&self.buffers, self.steps, |b| b.size);
        let max = aligned.iter().copied().max().unwrap_or(0);
        aligned.iter().position(|&b| b == max).unwrap_or(0)
    }

    /// Verifies the plan against `graph` run in `order`, recomputing lifetimes directly from
    /// the order (not through the liveness walk the planner used):
    /// * every computed non-parameter value is held by a buffer: its own, or its root's when
    ///   [`MemoryPlan::aliases`] names one (a root that is a parameter holds it outside the
    ///   arena); that buffer is live from the root's producer's step through the value's last
    ///   use (graph outputs to the end), so a view keeps its root alive;
    /// * value buffers are at least their value's size, aligned and inside the arena; workspace
    ///   buffers live at their node's step only;
    /// * no two buffers that are live at a common step share a byte.
    pub fn check(&self, graph: &Graph, order: &[NodeIndex]) -> Result<(), PlanError> {
        validate_order(graph, order)?;
        let bad = |msg: String| Err(PlanError::Invalid(msg));
        if order.len() != self.steps {
            return bad(format!("planned for {} steps, order has {}", self.steps, order.len()));
        }
        let name = |v: Value| format!("%{}:{}", v.node.index(), v.output);
        let step_of: HashMap<NodeIndex, usize> = order.iter().enumerate().map(|(s, &n)| (n, s)).collect();
        let mut needed: HashMap<Value, (usize, usize)> = HashMap::new();
        for (s, &n) in order.iter().enumerate() {
            for output in 0..graph.node(n).outputs.len() {
                let v = Value { node: n, output };
                if !is_param(graph, v) {
                    needed.insert(v, (s, s));
                }
            }
        }
        for (s, &n) in order.iter().enumerate() {
            for v in graph.inputs_of(n) {
                if let Some(span) = needed.get_mut(&v) {
                    span.1 = span.1.max(s);
                }
            }
        }
        for o in &graph.outputs {
            if let Some(span) = needed.get_mut(&o.value) {
                span.1 = order.len() - 1;
            }
        }
        let mut value_buffer: HashMap<Value, &Buffer> = HashMap::new();
        for b in &self.buffers {
            let v = b.value;
            if !step_of.contains_key(&v.node) || v.output >= graph.node(v.node).outputs.len() {
                return bad(format!("buffer for {}, which the order does not compute", name(v)));
            }
            match b.kind {
                BufferKind::Value => {
                    if !needed.contains_key(&v) || self.aliases.contains_key(&v) {
                        return bad(format!("buffer for {}, which is not a root activation", name(v)));
                    }
                    if value_buffer.insert(v, b).is_some() {
                        return bad(format!("{} has two buffers", name(v)));
                    }
                    let bytes = graph.value_type(v).size_in_bytes();
                    if b.size < bytes || b.bytes != bytes {
                        return bad(format!("{} needs {bytes} bytes, its buffer has {}", name(v), b.size));
                    }
                }
                BufferKind::Workspace => {
                    if b.first != step_of[&v.node] || b.last != b.first {
                        return bad(format!("{} does not live at its node's step only", b.describe()));
                    }
                }
            }
            if b.size % ALIGNMENT != 0 || b.offset % ALIGNMENT != 0 || b.size < b.bytes {
                return bad(format!("{} is not aligned to {ALIGNMENT}", b.describe()));
            }
            if b.offset + b.size > self.arena_bytes {
                return bad(format!(
                    "{} ends past the {}-byte arena",
                    b.describe(),
                    self.arena_bytes
                ));
            }
        }
        for (&v, &(first, last)) in &needed {
            let root = self.aliases.get(&v).copied().unwrap_or(v);
            if self.aliases.contains_key(&root) {
                return bad(format!("{} is a view of {}, itself a view", name(v), name(root)));
            }
            if root != v && is_param(graph, root) {
                if self.offsets.contains_key(&v) {
                    return bad(format!("{} lives with the parameters but has an offset", name(v)));
                }
                continue;
            }
            let Some(b) = value_buffer.get(&root) else {
                return bad(format!("{} has no buffer (its root {})", name(v), name(root)));
            };
            if b.first != step_of[&root.node] || b.first > first || b.last < last {
                return bad(format!(
                    "{} is live over steps {first}..={last} but its buffer {} is not",
                    name(v),
                    b.describe()
                ));
            }
            if self.offsets.get(&v) != Some(&(b.offset, b.size)) {
                return bad(format!("offsets and buffers disagree on {}", name(v)));
            }
        }
        if self.offsets.len() > needed.len() {
            return bad(format!(
                "{} offsets for {} computed values",
                self.offsets.len(),
                needed.len()
            ));
        }
        // Sweep over steps: each buffer is compared with those still live when it starts,
        // which covers every pair whose lifetimes meet.
        let mut by_first: Vec<&Buffer> = self.buffers.iter().collect();
        by_first.sort_by_key(|b| b.first);
        let mut active: Vec<&Buffer> = Vec::new();
        for b in by_first {
            active.retain(|a| a.last >= b.first);
            if let Some(a) = active.iter().find(|a| a.shares_bytes_with(b)) {
                return bad(format!("{} and {} overlap", a.describe(), b.describe()));
            }
            active.push(b);
        }
        Ok(())
    }
}
