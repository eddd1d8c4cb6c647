//! Mapping a training graph onto the chain: the transformer blocks, what each block's
//! backward reads, and the ways of keeping less of it.
//!
//! A **block** is the set of forward nodes whose scope lies under `<prefix>blocks.<i>` (the
//! first `blocks.<integer>` segment pair of the scope); blocks form the chain in the order
//! their first node runs. Nothing else about the model is assumed: ops are classified by cost
//! only, so fused or unknown ops are handled like any other.
//!
//! Per block:
//! * **saved** values: outputs of its nodes with a consumer in the backward
//!   ([`crate::autodiff::BACKWARD_SCOPE`]);
//! * **boundary** values: outputs read by forward nodes outside the block or by graph outputs
//!   (the block output, pyramid taps). They are always kept: they are the chain's
//!   checkpoints, and the next block's recomputation starts from them;
//! * **candidates**: nodes whose flops per output element exceed
//!   [`CHEAP_FLOPS_PER_ELEMENT`] (linear, matmul, conv, fused attention); everything else
//!   (norms, activations, softmax, element-wise, shape ops) is cheap to recompute.
//!
//! An option of the block keeps the outputs of a subset `K` of the candidates (plus the
//! boundary values and the block's external inputs) and recomputes every other saved value from
//! them right before the block's backward. `K` = all candidates is *selective* recomputation
//! (almost free: only cheap ops rerun); `K` = nothing recomputes the whole block from its
//! input. The subsets of at most [`MAX_EXACT_CANDIDATES`] candidates are all tried; above
//! that, a nested sequence drops one candidate at a time, the one freeing the most bytes per
//! recomputed flop. Options dominated in (stored, transient, flops) are discarded; option 0
//! keeps every saved value.
//!
//! Memory is counted in the memory plan's buffers: a view (reshape, slice, ...) costs nothing
//! but holds its root's buffer. Stored bytes of an option: the buffers of the boundary values,
//! of the saved values it keeps and of the block values its recomputation reads. Transient: the
//! buffers of the saved values it rematerializes plus the largest intermediate of the
//! recomputation (they are not all live at once, since the schedule recomputes each value when
//! the backward first asks for it, so this leans high). Values produced outside the block from
//! parameters alone by cheap ops (a shared relative-position bias) are recomputed too rather
//! than held until the backward, unless the backward reads them anyway.
//!
//! Blocks with the same structure (same ops, costs, shapes, wiring, views and saved values,
//! which repeated transformer blocks have) share one enumeration of options.

use std::collections::{BTreeSet, HashMap, HashSet};

use vitdet_ir::{Graph, NodeIndex, Op, Value};

use super::chain::StageOption;
use crate::autodiff::BACKWARD_SCOPE;
use crate::memory::MemoryPlan;
use crate::schedule::RECOMPUTE_SCOPE;

/// An op whose flops per output element are at most this is cheap to recompute. Norms,
/// activations, softmax and element-wise ops cost under 10; the cheapest contraction in a ViT
/// (`q @ k^T`, 2 flops per head-dim element) costs 128 at head dim 64.
pub const CHEAP_FLOPS_PER_ELEMENT: u64 = 32;

/// Blocks with at most this many candidates get every subset tried as an option.
pub const MAX_EXACT_CANDIDATES: usize = 10;

/// Consumers of every value, and the graph outputs.
pub(crate) struct Uses {
    pub consumers: HashMap<Value, Vec<NodeIndex>>,
    pub outputs: HashSet<Value>,
}

impl Uses {
    pub fn new(g: &Graph) -> Uses {
        let mut consumers: HashMap<Value, Vec<NodeIndex>> = HashMap::new();
        for n in g.graph.node_indices() {
            for v in g.inputs_of(n) {
                consumers.entry(v).or_default().push(n);
            }
        }
        Uses {
            consumers,
            outputs: g.outputs.iter().map(|o| o.value).collect(),
        }
    }

    fn of(&self, v: Value) -> &[NodeIndex] {
        self.consumers.get(&v).map_or(&[], Vec::as_slice)
    }
}

pub(crate) fn is_backward(g: &Graph, n: NodeIndex) -> bool {
    g.node(n).scope.starts_with(BACKWARD_SCOPE)
}

pub(crate) fn is_forward(g: &Graph, n: NodeIndex) -> bool {
    let s = &g.node(n).scope;
    !s.starts_with(BACKWARD_SCOPE) && !s.starts_with(RECOMPUTE_SCOPE)
}

/// `a.b.blocks.3` for a scope `a.b.blocks.3.attn.qkv`, if it has a `blocks.<integer>` pair.
pub fn block_scope(scope: &str) -> Option<String> {
    let parts: Vec<&str> = scope.split('.').collect();
    let i = parts
        .windows(2)
        .position(|w| w[0] == "blocks" && !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit()))?;
    Some(parts[..i + 2].join("."))
}

/// Flops of a node and whether it is cheap to recompute.
fn node_flops(g: &Graph, n: NodeIndex) -> (u64, bool) {
    let flops = g.node_cost(n).flops;
    let elements: u64 = g.node(n).outputs.iter().map(|t| t.numel() as u64).sum();
    (flops, flops <= CHEAP_FLOPS_PER_ELEMENT * elements.max(1))
}

fn bytes(g: &Graph, v: Value) -> u64 {
    g.value_type(v).size_in_bytes() as u64
}

fn outputs_of(g: &Graph, n: NodeIndex) -> impl Iterator<Item = Value> {
    (0..g.node(n).outputs.len()).map(move |output| Value { node: n, output })
}

/// One option of a block: which candidates it keeps, and its numbers for the chain.
#[derive(Clone, Debug)]
pub struct BlockOption {
    /// `None` keeps every saved value (option 0); otherwise the kept candidates.
    pub kept: Option<BTreeSet<NodeIndex>>,
    pub numbers: StageOption,
    /// `selective`, `full`, or `selective + <dropped candidates' sub-scopes>`.
    pub label: String,
}

/// What one option recomputes.
pub(crate) struct Recompute {
    /// Saved values rematerialized for the backward.
    pub targets: Vec<Value>,
    /// Nodes to clone, in execution (topological) order.
    pub nodes: Vec<NodeIndex>,
}

/// A transformer block of the training graph.
#[derive(Clone, Debug)]
pub struct Block {
    /// `backbone.net.blocks.3`.
    pub scope: String,
    /// Its forward computation nodes (no parameters), in execution order.
    pub nodes: Vec<NodeIndex>,
    members: HashSet<NodeIndex>,
    saved: BTreeSet<Value>,
    boundary: BTreeSet<Value>,
    candidates: Vec<NodeIndex>,
    /// Options, option 0 first.
    pub options: Vec<BlockOption>,
    /// Index of the option that keeps only the block's input (every candidate dropped).
    pub full: usize,
}

/// The chain of a training graph: its blocks, and what recomputation may rely on.
#[derive(Clone, Debug)]
pub struct ChainMap {
    pub blocks: Vec<Block>,
    param_derived: HashSet<NodeIndex>,
    /// Step of every node in the order the map was built from.
    position: HashMap<NodeIndex, usize>,
    /// The value whose buffer holds each view (the memory plan's aliases).
    aliases: HashMap<Value, Value>,
    /// Inputs and flops of the nodes recomputation may clone (looked up many times while the
    /// options are enumerated).
    inputs: HashMap<NodeIndex, Vec<Value>>,
    flops: HashMap<NodeIndex, u64>,
}

impl ChainMap {
    fn inputs_of<'a>(&'a self, g: &Graph, n: NodeIndex) -> std::borrow::Cow<'a, [Value]> {
        match self.inputs.get(&n) {
            Some(v) => std::borrow::Cow::Borrowed(v),
            None => std::borrow::Cow::Owned(g.inputs_of(n)),
        }
    }

    /// What option `choice` of block `b` recomputes.
    pub(crate) fn recompute(&self, g: &Graph, b: usize, choice: usize) -> Recompute {
        let block = &self.blocks[b];
        block.recompute(g, block.options[choice].kept.as_ref(), self)
    }
}

/// The blocks of `g` (run in `order`, planned as `plan`) in chain order, each with its options.
/// Memory is counted in the plan's buffers: a view costs nothing but holds its root's buffer.
pub fn find_blocks(g: &Graph, order: &[NodeIndex], plan: &MemoryPlan) -> ChainMap {
    let uses = Uses::new(g);
    let mut by_scope: HashMap<String, usize> = HashMap::new();
    let mut blocks: Vec<Block> = Vec::new();
    for &n in order {
        let node = g.node(n);
        if !is_forward(g, n) || node.op.is_source() {
            continue;
        }
        let Some(scope) = block_scope(&node.scope) else {
            continue;
        };
        let i = *by_scope.entry(scope.clone()).or_insert_with(|| {
            blocks.push(Block {
                scope,
                nodes: Vec::new(),
                members: HashSet::new(),
                saved: BTreeSet::new(),
                boundary: BTreeSet::new(),
                candidates: Vec::new(),
                options: Vec::new(),
                full: 0,
            });
            blocks.len() - 1
        });
        blocks[i].nodes.push(n);
    }
    let mut map = ChainMap {
        blocks: Vec::new(),
        param_derived: parameter_derived(g, order, &uses),
        position: order.iter().enumerate().map(|(i, &n)| (n, i)).collect(),
        aliases: plan.aliases.clone(),
        inputs: HashMap::new(),
        flops: HashMap::new(),
    };
    let cloneable = blocks
        .iter()
        .flat_map(|b| b.nodes.iter().copied())
        .chain(map.param_derived.iter().copied());
    for n in cloneable {
        map.inputs.insert(n, g.inputs_of(n));
        map.flops.insert(n, node_flops(g, n).0);
    }
    let mut known: Vec<(String, usize)> = Vec::new();
    let mut blocks_done: Vec<Block> = Vec::with_capacity(blocks.len());
    for mut b in blocks {
        let b = &mut b;
        b.members = b.nodes.iter().copied().collect();
        let members = &b.members;
        for &n in &b.nodes {
            for v in outputs_of(g, n) {
                let readers = uses.of(v);
                if readers.iter().any(|&c| is_backward(g, c)) {
                    b.saved.insert(v);
                }
                if uses.outputs.contains(&v) || readers.iter().any(|&c| is_forward(g, c) && !members.contains(&c)) {
                    b.boundary.insert(v);
                }
            }
            if !node_flops(g, n).1 {
                b.candidates.push(n);
            }
        }
        let signature = signature(g, b, &map);
        b.options = match known.iter().find(|(s, _)| *s == signature) {
            // Same structure as an earlier block: same numbers, kept sets moved by position.
            Some((_, earlier)) => {
                let earlier: &Block = &blocks_done[*earlier];
                let moved: HashMap<NodeIndex, NodeIndex> =
                    earlier.nodes.iter().copied().zip(b.nodes.iter().copied()).collect();
                earlier
                    .options
                    .iter()
                    .map(|o| BlockOption {
                        kept: o.kept.as_ref().map(|k| k.iter().map(|n| moved[n]).collect()),
                        numbers: o.numbers,
                        label: o.label.clone(),
                    })
                    .collect()
            }
            None => {
                known.push((signature, blocks_done.len()));
                options(g, b, &map)
            }
        };
        b.full = b
            .options
            .iter()
            .position(|o| o.kept.as_ref().is_some_and(BTreeSet::is_empty))
            .expect("the keep-nothing option is never discarded");
        blocks_done.push(b.clone());
    }
    map.blocks = blocks_done;
    map
}

/// Everything the options of a block depend on, with nodes named by their position in the
/// block: two blocks with equal signatures have the same options.
fn signature(g: &Graph, b: &Block, map: &ChainMap) -> String {
    use std::fmt::Write;
    let local: HashMap<NodeIndex, usize> = b.nodes.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let name = |v: Value| match local.get(&v.node) {
        Some(i) => format!("{i}:{}", v.output),
        // Outside the block: only whether it is recomputable, at what cost, and its size matter.
        None if map.param_derived.contains(&v.node) => format!(
            "ext({},{},{})",
            g.node(v.node).op.name(),
            map.flops.get(&v.node).copied().unwrap_or(0),
            g.value_type(v).size_in_bytes()
        ),
        None => format!("ext({})", g.value_type(v).size_in_bytes()),
    };
    let mut s = String::new();
    for &n in &b.nodes {
        let node = g.node(n);
        let sub = node.scope.strip_prefix(&b.scope).unwrap_or(&node.scope);
        // Op name and cost rather than attributes, which differ between otherwise equal blocks
        // (drop-path rates and random streams).
        let flops = map.flops.get(&n).copied().unwrap_or(0);
        let _ = write!(s, "{sub}|{}|{flops}|{:?}|", node.op.name(), node.outputs);
        for &v in map.inputs_of(g, n).iter() {
            let _ = write!(s, "{},", name(v));
        }
        for v in outputs_of(g, n) {
            let root = map.aliases.get(&v).copied().unwrap_or(v);
            let _ = write!(
                s,
                "[{} {} {}]",
                name(root),
                b.saved.contains(&v),
                b.boundary.contains(&v)
            );
        }
        s.push('\n');
    }
    s
}

/// Nodes computed by cheap ops from parameters alone (recursively), so recomputing them needs
/// no activation, and whose outputs no backward node reads (those stay live through the
/// backward anyway: a copy would only add memory).
fn parameter_derived(g: &Graph, order: &[NodeIndex], uses: &Uses) -> HashSet<NodeIndex> {
    let mut set = HashSet::new();
    for &n in order {
        let node = g.node(n);
        let read_by_backward = || outputs_of(g, n).any(|v| uses.of(v).iter().any(|&c| is_backward(g, c)));
        let derived = match node.op {
            Op::Parameter(_) => true,
            Op::Input(_) => false,
            _ => {
                is_forward(g, n)
                    && node_flops(g, n).1
                    && g.inputs_of(n).iter().all(|v| set.contains(&v.node))
                    && !read_by_backward()
            }
        };
        if derived {
            set.insert(n);
        }
    }
    set
}

impl Block {
    /// What keeping `kept` (`None`: every saved value) recomputes.
    pub(crate) fn recompute(&self, g: &Graph, kept: Option<&BTreeSet<NodeIndex>>, map: &ChainMap) -> Recompute {
        let Some(kept) = kept else {
            return Recompute {
                targets: Vec::new(),
                nodes: Vec::new(),
            };
        };
        let available = |v: &Value| kept.contains(&v.node) || self.boundary.contains(v);
        let targets: Vec<Value> = self.saved.iter().copied().filter(|v| !available(v)).collect();
        let members = &self.members;
        // Everything the targets need, stopping at kept values, boundary values and external
        // activations; parameters are always there.
        let mut need: HashSet<NodeIndex> = HashSet::new();
        let mut stack: Vec<NodeIndex> = targets.iter().map(|v| v.node).collect();
        while let Some(n) = stack.pop() {
            if !need.insert(n) {
                continue;
            }
            for &v in map.inputs_of(g, n).iter() {
                let m = v.node;
                let inside = members.contains(&m) && !available(&v);
                let outside_derived =
                    !members.contains(&m) && map.param_derived.contains(&m) && !g.node(m).op.is_source();
                if inside || outside_derived {
                    stack.push(m);
                }
            }
        }
        let mut nodes: Vec<NodeIndex> = need.into_iter().collect();
        // Execution order, so every clone's inputs are cloned before it.
        nodes.sort_by_key(|n| map.position.get(n).copied().unwrap_or(usize::MAX));
        Recompute { targets, nodes }
    }

    /// The chain numbers of keeping `kept`, in buffers (roots of views).
    fn numbers(&self, g: &Graph, kept: Option<&BTreeSet<NodeIndex>>, map: &ChainMap) -> StageOption {
        let r = self.recompute(g, kept, map);
        let root = |v: Value| map.aliases.get(&v).copied().unwrap_or(v);
        let cloned: HashSet<NodeIndex> = r.nodes.iter().copied().collect();
        let members = &self.members;
        let targets: HashSet<Value> = r.targets.iter().copied().collect();
        // Buffers of the block held from the end of the forward to its backward.
        let mut stored: BTreeSet<Value> = self.boundary.iter().map(|&v| root(v)).collect();
        stored.extend(self.saved.iter().filter(|v| !targets.contains(v)).map(|&v| root(v)));
        let mut flops = 0;
        for &n in &r.nodes {
            flops += map.flops.get(&n).copied().unwrap_or_else(|| node_flops(g, n).0);
            for &v in map.inputs_of(g, n).iter() {
                if !cloned.contains(&v.node) {
                    stored.insert(root(v));
                }
            }
        }
        stored.retain(|v| members.contains(&v.node));
        // Buffers the recomputation writes: those of the targets stay until the backward has
        // read them, the others only while the recomputation runs.
        let target_roots: BTreeSet<Value> = targets
            .iter()
            .map(|&v| root(v))
            .filter(|v| cloned.contains(&v.node))
            .collect();
        let largest_intermediate = r
            .nodes
            .iter()
            .flat_map(|&n| outputs_of(g, n))
            .filter(|v| root(*v) == *v && !target_roots.contains(v))
            .map(|v| bytes(g, v))
            .max()
            .unwrap_or(0);
        StageOption {
            stored_bytes: stored.iter().map(|&v| bytes(g, v)).sum(),
            transient_bytes: target_roots.iter().map(|&v| bytes(g, v)).sum::<u64>() + largest_intermediate,
            recompute_flops: flops,
        }
    }

    /// `selective`, `full`, or `selective + attn.qkv, mlp.fc1` (sub-scopes of rerun candidates).
    fn label(&self, g: &Graph, kept: Option<&BTreeSet<NodeIndex>>, map: &ChainMap) -> String {
        let Some(kept) = kept else {
            return "none".into();
        };
        if kept.is_empty() {
            return "full".into();
        }
        // Only the candidates the option really reruns, by sub-scope (`attn` x2 for two
        // contractions in the same module).
        let rerun: HashSet<NodeIndex> = self.recompute(g, Some(kept), map).nodes.into_iter().collect();
        let mut dropped: Vec<(String, usize)> = Vec::new();
        for &n in self
            .candidates
            .iter()
            .filter(|n| !kept.contains(n) && rerun.contains(n))
        {
            let scope = &g.node(n).scope;
            let sub = scope
                .strip_prefix(&self.scope)
                .map(|s| s.trim_start_matches('.'))
                .filter(|s| !s.is_empty())
                .unwrap_or(g.node(n).op.name());
            match dropped.iter_mut().find(|(d, _)| d == sub) {
                Some((_, count)) => *count += 1,
                None => dropped.push((sub.to_string(), 1)),
            }
        }
        if dropped.is_empty() {
            return "selective".into();
        }
        let names: Vec<String> = dropped
            .into_iter()
            .map(|(d, c)| if c == 1 { d } else { format!("{d} x{c}") })
            .collect();
        format!("selective + {}", names.join(", "))
    }
}

/// The block's options: keep-all first, then the undominated candidate subsets by flops.
fn options(g: &Graph, b: &Block, map: &ChainMap) -> Vec<BlockOption> {
    let option = |kept: Option<BTreeSet<NodeIndex>>| BlockOption {
        numbers: b.numbers(g, kept.as_ref(), map),
        label: b.label(g, kept.as_ref(), map),
        kept,
    };
    let keep_all = option(None);
    let subsets: Vec<BTreeSet<NodeIndex>> = if b.candidates.len() <= MAX_EXACT_CANDIDATES {
        (0u32..1 << b.candidates.len())
            .map(|mask| {
                (0..b.candidates.len())
                    .filter(|i| mask >> i & 1 == 1)
                    .map(|i| b.candidates[i])
                    .collect()
            })
            .collect()
    } else {
        nested_subsets(g, b, map)
    };
    let mut rest: Vec<BlockOption> = subsets.into_iter().map(|k| option(Some(k))).collect();
    // Undominated in (stored, transient, flops); the keep-nothing option always stays (it is
    // what the `blocks` and `scopes` policies pick). Of options with equal numbers the first in
    // this order survives, so the result is deterministic.
    rest.sort_by_key(|o| {
        let n = o.numbers;
        (n.recompute_flops, n.stored_bytes, n.transient_bytes)
    });
    let dominated = |o: &BlockOption, by: &StageOption| {
        let n = o.numbers;
        by.stored_bytes <= n.stored_bytes
            && by.transient_bytes <= n.transient_bytes
            && by.recompute_flops <= n.recompute_flops
    };
    let mut kept: Vec<BlockOption> = vec![keep_all];
    for o in rest {
        let is_full = o.kept.as_ref().is_some_and(BTreeSet::is_empty);
        if is_full || !kept.iter().any(|k| dominated(&o, &k.numbers)) {
            kept.push(o);
        }
    }
    kept
}

/// Above [`MAX_EXACT_CANDIDATES`]: all candidates kept, then repeatedly drop the one whose
/// removal frees the most stored bytes per added flop, down to none.
fn nested_subsets(g: &Graph, b: &Block, map: &ChainMap) -> Vec<BTreeSet<NodeIndex>> {
    let mut current: BTreeSet<NodeIndex> = b.candidates.iter().copied().collect();
    let mut out = vec![current.clone()];
    while !current.is_empty() {
        let here = b.numbers(g, Some(&current), map);
        let mut best: Option<(f64, NodeIndex)> = None;
        for &c in &current {
            let mut next = current.clone();
            next.remove(&c);
            let there = b.numbers(g, Some(&next), map);
            let freed = here.stored_bytes as f64 - there.stored_bytes as f64;
            let cost = (there.recompute_flops.saturating_sub(here.recompute_flops)) as f64 + 1.0;
            let score = freed / cost;
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, c));
            }
        }
        let (_, c) = best.expect("current is not empty");
        current.remove(&c);
        out.push(current.clone());
    }
    out
}
