//! Execution order.
//!
//! The base order is a topological order that follows construction order where dependencies
//! allow (Kahn's algorithm taking the lowest ready node index first, as
//! [`Graph::topo_order`]): builders and autodiff add nodes in program order, so the forward
//! runs first and the backward in reverse block order.
//!
//! One exception: a gradient accumulation (a backward `add` of two backward values) runs as
//! soon as both operands exist. Autodiff emits the sum of a value's gradient contributions when
//! it reaches the value's producer, which for a value shared by many blocks (a relative
//! position bias table) is long after the first contributions arrived; in index order they would
//! all stay live until then, while summing early frees one operand's worth each time.
//!
//! Recomputation nodes (scope [`RECOMPUTE_SCOPE`], added by activation checkpointing) must
//! not run as soon as their inputs exist, which would be during the forward and would save
//! nothing: they run on demand. The other nodes are ordered as above, with a recomputation
//! node counting as a dependency on whatever its own non-recomputation inputs are; right before
//! a node runs, its recomputation ancestors that have not run yet are run (inputs first). So a
//! block's recomputation happens right before the backward of that block first reads it, and
//! values it reads stay live exactly until then. Without recomputation nodes the order is
//! the base order.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

use vitdet_ir::ops::BinaryKind;
use vitdet_ir::{Graph, IrError, NodeIndex, Op};

use crate::autodiff::BACKWARD_SCOPE;

/// Scope prefix of nodes that rematerialize forward values for the backward:
/// `recompute/<forward scope>`.
pub const RECOMPUTE_SCOPE: &str = "recompute/";

fn is_recompute(g: &Graph, n: NodeIndex) -> bool {
    g.node(n).scope.starts_with(RECOMPUTE_SCOPE)
}

/// A backward `add` of two backward values: a sum of gradient contributions.
fn is_accumulation(g: &Graph, n: NodeIndex) -> bool {
    let backward = |m: NodeIndex| g.node(m).scope.starts_with(BACKWARD_SCOPE);
    matches!(&g.node(n).op, Op::Binary(b) if b.kind == BinaryKind::Add)
        && backward(n)
        && g.inputs_of(n).iter().all(|v| backward(v.node))
}

/// The order in which the runtime executes `graph` and in which liveness is computed
/// (deterministic for a given graph; see the module docs).
pub fn schedule(graph: &Graph) -> Result<Vec<NodeIndex>, IrError> {
    let topo = graph.topo_order()?;
    // The non-recomputation nodes each recomputation node depends on, through recomputation
    // nodes only (in topological order, so inputs are resolved first).
    let mut sources: HashMap<NodeIndex, BTreeSet<NodeIndex>> = HashMap::new();
    for &n in &topo {
        if !is_recompute(graph, n) {
            continue;
        }
        let mut set = BTreeSet::new();
        for v in graph.inputs_of(n) {
            match sources.get(&v.node) {
                Some(s) => set.extend(s.iter().copied()),
                None => {
                    set.insert(v.node);
                }
            }
        }
        sources.insert(n, set);
    }
    // Kahn's algorithm, lowest index first, over the other nodes with those dependencies.
    let mut deps: HashMap<NodeIndex, BTreeSet<NodeIndex>> = HashMap::new();
    let mut users: HashMap<NodeIndex, Vec<NodeIndex>> = HashMap::new();
    for &n in topo.iter().filter(|&&n| !is_recompute(graph, n)) {
        let mut d = BTreeSet::new();
        for v in graph.inputs_of(n) {
            match sources.get(&v.node) {
                Some(s) => d.extend(s.iter().copied()),
                None => {
                    d.insert(v.node);
                }
            }
        }
        for &p in &d {
            users.entry(p).or_default().push(n);
        }
        deps.insert(n, d);
    }
    let mut waiting: HashMap<NodeIndex, usize> = deps.iter().map(|(&n, d)| (n, d.len())).collect();
    // Ready nodes: (not an accumulation, index), so accumulations come first.
    let mut ready: BinaryHeap<Reverse<(bool, NodeIndex)>> = waiting
        .iter()
        .filter(|(_, &c)| c == 0)
        .map(|(&n, _)| Reverse((!is_accumulation(graph, n), n)))
        .collect();
    let mut order = Vec::with_capacity(topo.len());
    let mut done: HashSet<NodeIndex> = HashSet::with_capacity(topo.len());
    while let Some(Reverse((_, n))) = ready.pop() {
        emit_recompute_ancestors(graph, n, &mut done, &mut order);
        order.push(n);
        done.insert(n);
        for &u in users.get(&n).map_or(&[][..], Vec::as_slice) {
            let c = waiting.get_mut(&u).expect("every user is waited on");
            *c -= 1;
            if *c == 0 {
                ready.push(Reverse((!is_accumulation(graph, u), u)));
            }
        }
    }
    // Recomputation nodes nobody reads still run (last), so every node is scheduled.
    for &n in &topo {
        if !done.contains(&n) {
            emit_recompute_ancestors(graph, n, &mut done, &mut order);
            order.push(n);
            done.insert(n);
        }
    }
    Ok(order)
}

/// Appends the recomputation nodes `n` needs that have not run, inputs before users.
fn emit_recompute_ancestors(graph: &Graph, n: NodeIndex, done: &mut HashSet<NodeIndex>, order: &mut Vec<NodeIndex>) {
    // Iterative post-order: (node, whether its inputs were pushed).
    let mut stack: Vec<(NodeIndex, bool)> = graph.inputs_of(n).into_iter().rev().map(|v| (v.node, false)).collect();
    while let Some((m, expanded)) = stack.pop() {
        if done.contains(&m) || !is_recompute(graph, m) {
            continue;
        }
        if expanded {
            order.push(m);
            done.insert(m);
        } else {
            stack.push((m, true));
            stack.extend(graph.inputs_of(m).into_iter().rev().map(|v| (v.node, false)));
        }
    }
}
