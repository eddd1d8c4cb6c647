//! The public entry points: a [`CheckpointPolicy`] applied to a training graph, and the
//! memory/recompute trade-off curve.
//!
//! The chain model ([`super::chain`]) only estimates memory; the truth is the memory planner
//! on the rewritten, scheduled graph. [`CheckpointPolicy::Auto`] therefore solves on the
//! model, rewrites, plans, and when the planned step (`base_bytes` + arena) exceeds the
//! budget, tightens the model's budget by the excess and solves again; when it fits with room
//! to spare (the model leans high), it loosens the model's budget by the slack, bisecting once
//! both a fitting and a failing model budget are known. After [`MAX_ROUNDS`] plans the
//! cheapest fitting one wins; if none fit, the lowest-memory policy is tried, and only if that
//! does not fit either is the budget reported as infeasible. The model is calibrated on the graph: its
//! base is the planned no-recompute arena minus what the blocks keep, so with nothing
//! recomputed model and plan agree exactly.

use std::collections::{HashMap, HashSet};

use vitdet_ir::{Graph, IrError, NodeIndex, Value};

use super::chain::{self, BudgetError, Chain, Stage};
use super::graph::{find_blocks, is_backward, is_forward, ChainMap};
use super::rewrite::rewrite;
use crate::memory::{plan_memory, MemoryPlan, PlanError};
use crate::schedule::schedule;

/// Plans tried per budget before falling back to the lowest-memory policy.
pub const MAX_ROUNDS: usize = 8;

const GIB: f64 = (1u64 << 30) as f64;

/// What to recompute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointPolicy {
    /// Keep every activation.
    None,
    /// Every block recomputed from its input.
    Blocks,
    /// The blocks with these scopes (e.g. `backbone.net.blocks.2`) recomputed from their input.
    Scopes(Vec<String>),
    /// The least recompute whose planned step (`base_bytes` + activation arena) fits.
    Auto { budget_bytes: u64 },
}

/// A checkpointed training graph, scheduled and planned.
#[derive(Clone, Debug)]
pub struct Checkpointed {
    pub graph: Graph,
    /// [`schedule`] of `graph`: recomputation runs right before the backward needs it.
    pub order: Vec<NodeIndex>,
    /// Block scopes with anything recomputed, with their level, e.g.
    /// `backbone.net.blocks.3 (selective + mlp.fc1)`.
    pub checkpointed: Vec<String>,
    /// Flops of the recomputation nodes.
    pub recompute_flops: u64,
    /// Forward values still live when the backward starts (what the forward keeps).
    pub saved_activation_bytes: u64,
    pub plan: MemoryPlan,
    /// The option chosen for every block, in chain order (empty for [`CheckpointPolicy::None`]).
    pub choices: Vec<usize>,
    /// The blocks' activation memory in the chain model: what they keep plus the largest
    /// rematerialization ([`super::chain`]); 0 for [`CheckpointPolicy::None`], which does not
    /// look for blocks.
    pub block_activation_bytes: u64,
}

/// One point of [`frontier`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontierPoint {
    /// The budget asked for.
    pub budget_bytes: u64,
    /// `base_bytes` + the planned arena.
    pub peak_bytes: u64,
    pub arena_bytes: u64,
    pub recompute_flops: u64,
    pub saved_activation_bytes: u64,
    /// [`Checkpointed::block_activation_bytes`].
    pub block_activation_bytes: u64,
    pub checkpointed: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "budget {:.2} GiB is below the minimum reachable {:.2} GiB ({policy})",
        *budget_bytes as f64 / GIB,
        *min_reachable_bytes as f64 / GIB
    )]
    Infeasible {
        budget_bytes: u64,
        min_reachable_bytes: u64,
        /// The policy reaching the minimum, in words.
        policy: String,
    },
    #[error("the graph has no transformer blocks (no forward node scoped `...blocks.<i>...`) to checkpoint")]
    NoBlocks,
    #[error("no transformer block has scope `{scope}` (the blocks are {known})")]
    UnknownScope { scope: String, known: String },
    #[error(transparent)]
    Chain(#[from] BudgetError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Ir(#[from] IrError),
}

/// Applies `policy` to the training graph `graph` (forward + backward, as
/// [`crate::differentiate`] returns it); `base_bytes` is the memory outside the activation
/// arena (parameters, gradients, optimizer state) that [`CheckpointPolicy::Auto`]'s budget
/// includes.
pub fn apply_checkpointing(
    graph: &Graph,
    policy: &CheckpointPolicy,
    base_bytes: u64,
) -> Result<Checkpointed, CheckpointError> {
    if *policy == CheckpointPolicy::None {
        return realize_plain(graph);
    }
    let p = Planner::new(graph, base_bytes)?;
    match policy {
        CheckpointPolicy::None => unreachable!("handled above"),
        CheckpointPolicy::Blocks => p.realize(&p.all_full()),
        CheckpointPolicy::Scopes(scopes) => {
            let mut choices = vec![0; p.map.blocks.len()];
            for s in scopes {
                let i = p.map.blocks.iter().position(|b| &b.scope == s).ok_or_else(|| {
                    let known: Vec<&str> = p.map.blocks.iter().map(|b| b.scope.as_str()).collect();
                    CheckpointError::UnknownScope {
                        scope: s.clone(),
                        known: known.join(", "),
                    }
                })?;
                choices[i] = p.map.blocks[i].full;
            }
            p.realize(&choices)
        }
        CheckpointPolicy::Auto { budget_bytes } => p.auto(*budget_bytes),
    }
}

/// The planned peak against recompute flops at `points` budgets evenly spaced from the
/// no-recompute peak down to the minimum reachable one (consecutive budgets that give the same
/// policy are reported once).
pub fn frontier(graph: &Graph, base_bytes: u64, points: usize) -> Result<Vec<FrontierPoint>, CheckpointError> {
    let p = Planner::new(graph, base_bytes)?;
    let top = base_bytes + p.none.plan.arena_bytes as u64;
    let (bottom_run, _) = p.minimum()?;
    let bottom = base_bytes + bottom_run.plan.arena_bytes as u64;
    let points = points.max(2);
    let mut out: Vec<FrontierPoint> = Vec::new();
    let mut last: Option<Vec<usize>> = None;
    for k in 0..points {
        let budget = top - (top.saturating_sub(bottom)) * k as u64 / (points - 1) as u64;
        let r = p.auto(budget)?;
        if last.as_ref() == Some(&r.choices) {
            continue;
        }
        last = Some(r.choices.clone());
        out.push(FrontierPoint {
            budget_bytes: budget,
            peak_bytes: base_bytes + r.plan.arena_bytes as u64,
            arena_bytes: r.plan.arena_bytes as u64,
            recompute_flops: r.recompute_flops,
            saved_activation_bytes: r.saved_activation_bytes,
            block_activation_bytes: r.block_activation_bytes,
            checkpointed: r.checkpointed,
        });
    }
    Ok(out)
}

/// The graph scheduled and planned as it is.
fn realize_plain(graph: &Graph) -> Result<Checkpointed, CheckpointError> {
    let order = schedule(graph)?;
    let plan = plan_memory(graph, &order)?;
    Ok(Checkpointed {
        saved_activation_bytes: saved_at_backward_start(graph, &order),
        graph: graph.clone(),
        order,
        checkpointed: Vec::new(),
        recompute_flops: 0,
        plan,
        choices: Vec::new(),
        block_activation_bytes: 0,
    })
}

/// Bytes of forward values live when the first backward node runs.
fn saved_at_backward_start(g: &Graph, order: &[NodeIndex]) -> u64 {
    let Some(start) = order.iter().position(|&n| is_backward(g, n)) else {
        return 0;
    };
    let mut last_use: std::collections::HashMap<Value, usize> = std::collections::HashMap::new();
    for (step, &n) in order.iter().enumerate() {
        for v in g.inputs_of(n) {
            last_use.insert(v, step);
        }
    }
    let outputs: HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
    order[..start]
        .iter()
        .filter(|&&n| is_forward(g, n) && !g.node(n).op.is_source())
        .flat_map(|&n| (0..g.node(n).outputs.len()).map(move |output| Value { node: n, output }))
        .filter(|v| outputs.contains(v) || last_use.get(v).is_some_and(|&s| s >= start))
        .map(|v| g.value_type(v).size_in_bytes() as u64)
        .sum()
}

/// The graph, its chain and the no-recompute plan the model is calibrated on.
struct Planner<'g> {
    graph: &'g Graph,
    map: ChainMap,
    chain: Chain,
    base_bytes: u64,
    none: Checkpointed,
}

impl<'g> Planner<'g> {
    fn new(graph: &'g Graph, base_bytes: u64) -> Result<Self, CheckpointError> {
        let none = realize_plain(graph)?;
        let map = find_blocks(graph, &none.order, &none.plan);
        if map.blocks.is_empty() {
            return Err(CheckpointError::NoBlocks);
        }
        let stages: Vec<Stage> = map
            .blocks
            .iter()
            .map(|b| Stage {
                options: b.options.iter().map(|o| o.numbers).collect(),
            })
            .collect();
        let kept: u64 = stages.iter().map(|s| s.options[0].stored_bytes).sum();
        let chain = Chain {
            stages,
            base_bytes: base_bytes + (none.plan.arena_bytes as u64).saturating_sub(kept),
        };
        let mut none = none;
        none.choices = vec![0; map.blocks.len()];
        none.block_activation_bytes = kept;
        Ok(Planner {
            graph,
            map,
            chain,
            base_bytes,
            none,
        })
    }

    fn all_full(&self) -> Vec<usize> {
        self.map.blocks.iter().map(|b| b.full).collect()
    }

    /// The graph rewritten for `choices`, scheduled and planned.
    fn realize(&self, choices: &[usize]) -> Result<Checkpointed, CheckpointError> {
        if choices.iter().all(|&c| c == 0) {
            return Ok(self.none.clone());
        }
        let (graph, recompute_flops) = rewrite(self.graph, &self.map, choices)?;
        graph.verify()?;
        let order = schedule(&graph)?;
        let plan = plan_memory(&graph, &order)?;
        let checkpointed = self
            .map
            .blocks
            .iter()
            .zip(choices)
            .filter(|(_, &c)| c != 0)
            .map(|(b, &c)| format!("{} ({})", b.scope, b.options[c].label))
            .collect();
        let modeled = chain::evaluate(
            &self.chain,
            &chain::Policy {
                choices: choices.to_vec(),
            },
        )?
        .0;
        Ok(Checkpointed {
            saved_activation_bytes: saved_at_backward_start(&graph, &order),
            graph,
            order,
            checkpointed,
            recompute_flops,
            plan,
            choices: choices.to_vec(),
            block_activation_bytes: modeled - self.chain.base_bytes,
        })
    }

    fn total(&self, r: &Checkpointed) -> u64 {
        self.base_bytes + r.plan.arena_bytes as u64
    }

    /// The lowest planned peak of two candidates: every block recomputed from its input, and
    /// the model's lowest-memory policy; with its description.
    fn minimum(&self) -> Result<(Checkpointed, String), CheckpointError> {
        let full = self.realize(&self.all_full())?;
        let floor = chain::solve(&self.chain, chain::min_peak(&self.chain)?)?;
        if floor.policy.choices != full.choices {
            let lowest = self.realize(&floor.policy.choices)?;
            if self.total(&lowest) < self.total(&full) {
                return Ok((lowest, "the model's lowest-memory policy".into()));
            }
        }
        Ok((full, "every block recomputed from its input".into()))
    }

    /// The least-recompute policy whose planned step fits `budget`: the model's budget is
    /// tightened by the planned excess while the plan does not fit and loosened by the slack
    /// once it does (bisecting between the two once both are known), for [`MAX_ROUNDS`]
    /// plans; the cheapest fitting plan wins.
    fn auto(&self, budget: u64) -> Result<Checkpointed, CheckpointError> {
        if self.total(&self.none) <= budget {
            return Ok(self.none.clone());
        }
        let mut best: Option<Checkpointed> = None;
        let mut planned: HashMap<Vec<usize>, u64> = HashMap::new();
        let (mut fits, mut fails): (Option<u64>, Option<u64>) = (None, None);
        let mut model_budget = budget;
        for _ in 0..MAX_ROUNDS {
            let sol = match chain::solve(&self.chain, model_budget) {
                Ok(sol) => sol,
                Err(BudgetError::Infeasible { .. }) => break,
                Err(e) => return Err(e.into()),
            };
            let total = match planned.get(&sol.policy.choices) {
                Some(&t) => t,
                None => {
                    let r = self.realize(&sol.policy.choices)?;
                    let t = self.total(&r);
                    planned.insert(sol.policy.choices.clone(), t);
                    if t <= budget && best.as_ref().is_none_or(|b| r.recompute_flops < b.recompute_flops) {
                        best = Some(r);
                    }
                    t
                }
            };
            let next = if total <= budget {
                fits = Some(model_budget);
                match fails {
                    Some(f) => model_budget + (f - model_budget) / 2,
                    None => model_budget + (budget - total),
                }
            } else {
                fails = Some(model_budget);
                match fits {
                    Some(f) => f + (model_budget - f) / 2,
                    None => model_budget.saturating_sub(total - budget),
                }
            };
            if next == model_budget || fits.zip(fails).is_some_and(|(a, b)| b - a <= budget / 1000) {
                break;
            }
            model_budget = next;
        }
        if let Some(b) = best {
            return Ok(b);
        }
        let (lowest, policy) = self.minimum()?;
        if self.total(&lowest) <= budget {
            return Ok(lowest);
        }
        Err(CheckpointError::Infeasible {
            budget_bytes: budget,
            min_reachable_bytes: self.total(&lowest),
            policy,
        })
    }
}
