//! Live bytes over an execution order: the one definition shared by the planner (passes) and
//! the runtime's measurement, so planned and measured peaks agree exactly.
//!
//! A value is live from the step that produces it (a graph input from its `input` node's
//! step) until the step of its last consumer; graph outputs stay live to the end; parameters
//! are never counted. The peak is sampled after each step's outputs exist and before its
//! dead inputs are released; outputs nobody reads are released right after the sample.

use std::collections::{HashMap, HashSet};

use crate::graph::{Graph, Value};
use crate::ops::Op;
use crate::NodeIndex;

/// The live-bytes accounting of one walk over an execution order .
#[derive(Clone, Debug)]
pub struct Liveness<'g> {
    graph: &'g Graph,
    remaining: HashMap<Value, usize>,
    live: usize,
    peak: usize,
}

impl<'g> Liveness<'g> {
    /// Starts a walk over `order`, whose scheduled nodes determine the uses that count.
    pub fn new(graph: &'g Graph, order: &[NodeIndex]) -> Self {
        let mut remaining = graph.use_counts();
        let scheduled: HashSet<NodeIndex> = order.iter().copied().collect();
        if scheduled.len() != graph.graph.node_count() {
            for n in graph.graph.node_indices().filter(|n| !scheduled.contains(n)) {
                for v in graph.inputs_of(n) {
                    if let Some(c) = remaining.get_mut(&v) {
                        *c -= 1;
                    }
                }
            }
        }
        Liveness {
            graph,
            remaining,
            live: 0,
            peak: 0,
        }
    }

    fn counted(&self, v: Value) -> bool {
        !matches!(self.graph.node(v.node).op, Op::Parameter(_))
    }

    fn bytes(&self, v: Value) -> usize {
        self.graph.value_type(v).size_in_bytes()
    }

    /// Accounts for node `n` having just produced its outputs: adds them to the live bytes,
    /// samples the peak, then releases the inputs `n` used for the last time and the outputs of
    /// `n` nobody uses. Returns the released values (parameters are never live, never released).
    pub fn step(&mut self, n: NodeIndex) -> Vec<Value> {
        let outputs: Vec<Value> = (0..self.graph.node(n).outputs.len())
            .map(|output| Value { node: n, output })
            .collect();
        for &v in &outputs {
            if self.counted(v) {
                self.live += self.bytes(v);
            }
        }
        self.peak = self.peak.max(self.live);
        let mut dead = Vec::new();
        for v in self.graph.inputs_of(n) {
            if !self.counted(v) {
                continue;
            }
            let c = self.remaining.get_mut(&v).expect("every edge is a counted use");
            *c -= 1;
            if *c == 0 {
                dead.push(v);
            }
        }
        for v in outputs {
            if self.counted(v) && self.remaining.get(&v).copied().unwrap_or(0) == 0 {
                dead.push(v);
            }
        }
        for &v in &dead {
            self.live -= self.bytes(v);
        }
        dead
    }

    /// Live bytes now.
    pub fn live_bytes(&self) -> usize {
        self.live
    }

    /// Peak live bytes so far.
    pub fn peak_bytes(&self) -> usize {
        self.peak
    }
}
