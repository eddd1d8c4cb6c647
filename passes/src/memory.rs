//! Static memory planning: one arena for every activation of a scheduled graph.
//!
//! Lifetimes follow `vitdet_ir::Liveness` exactly (the accounting the runtime measures with):
//! a value is live from the step its producer runs (a graph input from its `input` node's
//! step) to the step of its last scheduled consumer; graph outputs live to the end; values
//! nobody reads die at their own step; parameters are resident elsewhere and get no buffer.
//! Lifetimes are closed step intervals: a node's inputs and outputs are live together at its
//! step, so an output never shares memory with an input of the same node.
//!
//! Offsets come from greedy-by-size best fit, the strategy of TFLite's arena planner and
//! XLA's heap simulator: buffers in decreasing size order, each put in the smallest gap left
//! between already placed buffers whose lifetimes overlap its own, or above all of them when
//! no gap fits.
//!
//! Not done yet: in-place reuse (an elementwise output taking over its dying input's buffer)
//! is not attempted; every value gets its own buffer.

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
}

/// One value's buffer: its lifetime in steps of the order (inclusive) and its place in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub value: Value,
    /// Step of the producer.
    pub first: usize,
    /// Step of the last consumer (the last step for graph outputs).
    pub last: usize,
    pub offset: usize,
    /// Aligned size in bytes.
    pub size: usize,
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
}

/// Where every activation lives in one arena.
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    /// `(offset, aligned size)` of every planned value.
    pub offsets: HashMap<Value, (usize, usize)>,
    /// Every buffer with its lifetime, in definition order.
    pub buffers: Vec<Buffer>,
    /// Bytes the arena needs: the highest end of any buffer.
    pub arena_bytes: usize,
    /// Peak of the sum of live (unaligned) sizes over the steps, the same figure as
    /// `vitdet_ir::Liveness`'s peak: no arena can be smaller.
    pub lower_bound_bytes: usize,
    /// The same peak over aligned sizes: the bound this planner's arena is really held to
    /// (for tiny tensors the 64-byte rounding alone can exceed `lower_bound_bytes` many times).
    pub aligned_lower_bound_bytes: usize,
    /// Number of steps of the order that was planned.
    pub steps: usize,
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

/// Lifetimes of every non-parameter value computed by `order`, from `vitdet_ir::Liveness`'s
/// walk, and its peak.
fn lifetimes(graph: &Graph, order: &[NodeIndex]) -> (Vec<(Value, usize, usize)>, usize) {
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
    let spans = first
        .into_iter()
        .map(|(v, f)| (v, f, last.get(&v).copied().unwrap_or(end)))
        .collect();
    (spans, walk.peak_bytes())
}

/// Plans one arena for the activations of `graph` run in `order` (normally
/// [`crate::schedule`]'s). Errors name the offending node when `order` is not a valid
/// execution order of `graph`.
pub fn plan_memory(graph: &Graph, order: &[NodeIndex]) -> Result<MemoryPlan, PlanError> {
    validate_order(graph, order)?;
    let (spans, lower_bound_bytes) = lifetimes(graph, order);
    let mut buffers: Vec<Buffer> = spans
        .into_iter()
        .map(|(value, first, last)| Buffer {
            value,
            first,
            last,
            offset: 0,
            size: align(graph.value_type(value).size_in_bytes()),
        })
        .collect();

    // Placement order: largest first; ties by definition order so the plan is deterministic.
    let mut by_size: Vec<usize> = (0..buffers.len()).collect();
    by_size.sort_by(|&a, &b| buffers[b].size.cmp(&buffers[a].size).then(a.cmp(&b)));

    // Placed buffers kept sorted by offset, so the gaps between the ones that live alongside a
    // new buffer come out of one ascending scan.
    let mut placed: Vec<usize> = Vec::with_capacity(buffers.len());
    let mut arena_bytes = 0;
    for i in by_size {
        let b = buffers[i];
        let mut best: Option<(usize, usize)> = None; // (gap size, offset)
        let mut cursor = 0; // end of the highest overlapping buffer below the scan position
        if b.size > 0 {
            for &j in &placed {
                let p = &buffers[j];
                if p.size == 0 || !p.lives_with(&b) {
                    continue;
                }
                if p.offset > cursor {
                    let gap = p.offset - cursor;
                    if gap >= b.size && best.is_none_or(|(g, _)| gap < g) {
                        best = Some((gap, cursor));
                    }
                }
                cursor = cursor.max(p.offset + p.size);
            }
        }
        let offset = best.map_or(cursor, |(_, o)| o);
        buffers[i].offset = offset;
        arena_bytes = arena_bytes.max(offset + b.size);
        let at = placed.partition_point(|&j| buffers[j].offset <= offset);
        placed.insert(at, i);
    }

    // Aligned live bytes per step from a difference array over the lifetimes.
    let mut delta = vec![0isize; order.len() + 1];
    for b in &buffers {
        delta[b.first] += b.size as isize;
        delta[b.last + 1] -= b.size as isize;
    }
    let (mut live, mut aligned_lower_bound_bytes) = (0isize, 0usize);
    for d in &delta[..order.len()] {
        live += d;
        aligned_lower_bound_bytes = aligned_lower_bound_bytes.max(live as usize);
    }

    let offsets = buffers.iter().map(|b| (b.value, (b.offset, b.size))).collect();
    Ok(MemoryPlan {
        offsets,
        buffers,
        arena_bytes,
        lower_bound_bytes,
        aligned_lower_bound_bytes,
        steps: order.len(),
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

    /// Verifies the plan against `graph` run in `order`, recomputing lifetimes directly from
    /// the order (not through the liveness walk the planner used): every computed
    /// non-parameter value has an aligned buffer at least its size, live from its producer's
    /// step to its last consumer's (graph outputs to the end), inside the arena; no two
    /// buffers that are live at a common step share a byte.
    pub fn check(&self, graph: &Graph, order: &[NodeIndex]) -> Result<(), PlanError> {
        validate_order(graph, order)?;
        let bad = |msg: String| Err(PlanError::Invalid(msg));
        if order.len() != self.steps {
            return bad(format!("planned for {} steps, order has {}", self.steps, order.len()));
        }
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
        if self.buffers.len() != needed.len() || self.offsets.len() != needed.len() {
            return bad(format!(
                "{} buffers and {} offsets for {} computed values",
                self.buffers.len(),
                self.offsets.len(),
                needed.len()
            ));
        }
        for b in &self.buffers {
            let v = b.value;
            let name = format!("%{}:{}", v.node.index(), v.output);
            let Some(&(first, last)) = needed.get(&v) else {
                return bad(format!("buffer for {name}, which is not a computed activation"));
            };
            if b.first > first || b.last < last || step_of[&v.node] != b.first {
                return bad(format!(
                    "{name} is live over steps {first}..={last} but its buffer over {}..={}",
                    b.first, b.last
                ));
            }
            let bytes = graph.value_type(v).size_in_bytes();
            if b.size < bytes || b.size % ALIGNMENT != 0 || b.offset % ALIGNMENT != 0 {
                return bad(format!(
                    "{name} needs {bytes} bytes, has {} at offset {} (alignment {ALIGNMENT})",
                    b.size, b.offset
                ));
            }
            if b.offset + b.size > self.arena_bytes {
                return bad(format!(
                    "{name} ends at byte {}, past the {}-byte arena",
                    b.offset + b.size,
                    self.arena_bytes
                ));
            }
            if self.offsets.get(&v) != Some(&(b.offset, b.size)) {
                return bad(format!("offsets and buffers disagree on {name}"));
            }
        }
        // Sweep over steps: each buffer is compared with those still live when it starts,
        // which covers every pair whose lifetimes meet.
        let mut by_first: Vec<&Buffer> = self.buffers.iter().collect();
        by_first.sort_by_key(|b| b.first);
        let mut active: Vec<&Buffer> = Vec::new();
        for b in by_first {
            active.retain(|a| a.last >= b.first);
            if let Some(a) = active.iter().find(|a| a.shares_bytes_with(b)) {
                return bad(format!(
                    "%{}:{} (steps {}..={}, bytes {}..{}) and %{}:{} (steps {}..={}, bytes {}..{}) overlap",
                    a.value.node.index(),
                    a.value.output,
                    a.first,
                    a.last,
                    a.offset,
                    a.offset + a.size,
                    b.value.node.index(),
                    b.value.output,
                    b.first,
                    b.last,
                    b.offset,
                    b.offset + b.size
                ));
            }
            active.push(b);
        }
        Ok(())
    }
}
