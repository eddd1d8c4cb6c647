//! Activation checkpointing over a chain of stages (the transformer blocks of the backbone):
//! which stages keep their activations for the backward pass and which keep only their input
//! and recompute their forward just before their backward.
//!
//! This module is the abstract chain solver; mapping a training graph onto a [`Chain`] and
//! rewriting the graph with the chosen policy is done elsewhere.
//!
//! # Memory model (two-level: store everything or checkpoint the input)
//!
//! Stage `i` has `input_bytes` (its input `x_i`, `[B, H, W, C]`), `saved_bytes` (everything its
//! backward reads when nothing is recomputed) and `forward_flops` (the price of running its
//! forward again). A stage is either [`StagePolicy::Keep`] (stores `saved_bytes` during the
//! forward) or [`StagePolicy::Recompute`] (stores only `input_bytes`; during the backward its
//! forward is rerun from that input right before its own backward, rematerializing
//! `saved_bytes - input_bytes` more, freed once its backward is done). With `R` the recomputed
//! stages, the planned peak is
//!
//! ```text
//! peak = base_bytes + sum_i stored_i + max_{i in R} transient_i      (the max is 0 when R is empty)
//! stored_i    = saved_bytes_i if Keep, input_bytes_i if Recompute
//! transient_i = saved_bytes_i - input_bytes_i (0 when negative)
//! ```
//!
//! It charges everything stored at the end of the forward plus the worst rematerialization on
//! top, which over-estimates the true peak a little (stages later in the chain have already
//! released their storage when an earlier stage is rematerialized) but is the bound used by
//! Chen et al. 2016 ("Training deep nets with sublinear memory cost") and by PyTorch's
//! `checkpoint_sequential`. The cost of a policy is the sum of `forward_flops` over `R`.
//! [`evaluate`] is the single definition of both numbers; the solver reports through it.
//!
//! Not modeled: rotor's (Beaumont et al. 2019) richer multi-level schedules, where a
//! recomputed segment may itself keep some intermediate checkpoints, a stage's forward may be
//! rerun more than once, and the peak is simulated step by step. Only the two levels above exist.
//!
//! # Solver and why it is exact
//!
//! Fix the stage `t` whose transient defines the max term. Then every other recomputed stage
//! must have `transient_j <= transient_t`, the max term is exactly `transient_t`, and what is
//! left is a 0/1 knapsack: minimize the recompute cost subject to
//! `sum stored <= budget - base_bytes - transient_t`. [`solve`] enumerates `t` (plus the
//! all-Keep policy, which has no max term) and solves each knapsack exactly by a dynamic
//! program over the stages whose state set is the Pareto frontier of partial policies on
//! (stored bytes, key), where key is the tie-break order below. Dropping a partial policy that
//! another one beats on both is safe because both stored bytes and the key behave additively
//! under appending the same suffix: the dominating prefix followed by any suffix stays within the
//! budget whenever the dominated one does, and stays at least as good on the key (cost and
//! count add; the prefix bits are the leading bits of the policy). Every policy is therefore
//! either reached or dominated by a reached one, so the minimum over all `t` is the optimum.
//!
//! Ties are broken deterministically by the key (recompute cost, number of recomputed stages,
//! then the policy vector in lexicographic order with Keep before Recompute, i.e. earlier stages
//! kept), so the answer is unique. The knapsack is NP-hard in general, so the frontier can grow
//! exponentially on adversarial chains; real backbones repeat a few stage shapes and keep it
//! small. Past [`MAX_FRONTIER`] states the solver stops with [`BudgetError::SearchLimit`]
//! rather than run away.

use std::cmp::Ordering;

/// Largest Pareto frontier the solver keeps for one stage before giving up.
pub const MAX_FRONTIER: usize = 1 << 20;

const GIB: f64 = (1u64 << 30) as f64;

/// One stage of the chain (one transformer block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage {
    /// The stage input, stored when the stage is recomputed.
    pub input_bytes: u64,
    /// Everything the stage's backward needs when it is not recomputed.
    pub saved_bytes: u64,
    /// Cost of running the stage's forward once more.
    pub forward_flops: u64,
}

impl Stage {
    fn stored(&self, p: StagePolicy) -> u64 {
        match p {
            StagePolicy::Keep => self.saved_bytes,
            StagePolicy::Recompute => self.input_bytes,
        }
    }

    fn transient(&self) -> u64 {
        self.saved_bytes.saturating_sub(self.input_bytes)
    }
}

/// The chain and the memory that is resident regardless of the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub stages: Vec<Stage>,
    /// Parameters, gradients, optimizer state and every activation outside the chain.
    pub base_bytes: u64,
}

/// What one stage does with its activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StagePolicy {
    Keep,
    Recompute,
}

/// A policy for every stage of a chain, in chain order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Policy {
    pub stages: Vec<StagePolicy>,
}

impl Policy {
    /// Recompute nothing (the `none` policy).
    pub fn none(n: usize) -> Policy {
        Policy {
            stages: vec![StagePolicy::Keep; n],
        }
    }

    /// Recompute every stage (the `blocks` policy).
    pub fn blocks(n: usize) -> Policy {
        Policy {
            stages: vec![StagePolicy::Recompute; n],
        }
    }

    /// Recompute exactly the listed stages of an `n`-stage chain (e.g. the global-attention
    /// blocks for the `global` policy). Duplicates are allowed; an index `>= n` is an error.
    pub fn subset(n: usize, indices: &[usize]) -> Result<Policy, BudgetError> {
        let mut p = Policy::none(n);
        for &i in indices {
            if i >= n {
                return Err(BudgetError::StageOutOfRange { index: i, stages: n });
            }
            p.stages[i] = StagePolicy::Recompute;
        }
        Ok(p)
    }

    /// Number of recomputed stages.
    pub fn recomputed(&self) -> usize {
        self.stages.iter().filter(|&&p| p == StagePolicy::Recompute).count()
    }
}

/// The solver's answer: the policy and its numbers from [`evaluate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Solution {
    pub policy: Policy,
    pub peak_bytes: u64,
    pub recompute_flops: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "activation checkpointing cannot fit a budget of {budget} bytes ({:.3} GiB): the minimum reachable peak is \
         {min_reachable} bytes ({:.3} GiB)",
        *budget as f64 / GIB,
        *min_reachable as f64 / GIB
    )]
    Infeasible { budget: u64, min_reachable: u64 },
    #[error("policy has {policy} stages but the chain has {chain}")]
    PolicyLength { policy: usize, chain: usize },
    #[error("stage index {index} is out of range for a chain of {stages} stages")]
    StageOutOfRange { index: usize, stages: usize },
    #[error("chain totals overflow 64 bits (bytes or flops too large to add up)")]
    Overflow,
    #[error(
        "checkpointing search gave up after {states} candidate partial policies (limit {MAX_FRONTIER}); the chain has \
         too many distinct stage shapes for an exact answer"
    )]
    SearchLimit { states: usize },
}

/// Peak bytes and recompute flops of `policy` on `chain` under the model in the module docs.
pub fn evaluate(chain: &Chain, policy: &Policy) -> Result<(u64, u64), BudgetError> {
    if policy.stages.len() != chain.stages.len() {
        return Err(BudgetError::PolicyLength {
            policy: policy.stages.len(),
            chain: chain.stages.len(),
        });
    }
    let mut stored = chain.base_bytes;
    let mut transient = 0u64;
    let mut flops = 0u64;
    for (s, &p) in chain.stages.iter().zip(&policy.stages) {
        stored = stored.checked_add(s.stored(p)).ok_or(BudgetError::Overflow)?;
        if p == StagePolicy::Recompute {
            transient = transient.max(s.transient());
            flops = flops.checked_add(s.forward_flops).ok_or(BudgetError::Overflow)?;
        }
    }
    let peak = stored.checked_add(transient).ok_or(BudgetError::Overflow)?;
    Ok((peak, flops))
}

/// Rejects chains whose worst-case totals do not fit in `u64`, so the solver's sums cannot
/// overflow afterwards.
fn check_totals(chain: &Chain) -> Result<(), BudgetError> {
    let mut bytes = chain.base_bytes;
    let mut flops = 0u64;
    let mut transient = 0u64;
    for s in &chain.stages {
        bytes = bytes
            .checked_add(s.saved_bytes.max(s.input_bytes))
            .ok_or(BudgetError::Overflow)?;
        flops = flops.checked_add(s.forward_flops).ok_or(BudgetError::Overflow)?;
        transient = transient.max(s.transient());
    }
    bytes.checked_add(transient).ok_or(BudgetError::Overflow)?;
    Ok(())
}

/// Smallest peak any policy reaches on `chain`.
pub fn min_peak(chain: &Chain) -> Result<u64, BudgetError> {
    check_totals(chain)?;
    let keep_all: u64 = chain.base_bytes + chain.stages.iter().map(|s| s.saved_bytes).sum::<u64>();
    let mut best = keep_all;
    for (t, st) in chain.stages.iter().enumerate() {
        // With `t` defining the max term, recompute every allowed stage that stores less that way.
        let level = st.transient();
        let mut peak = chain.base_bytes + level;
        for (j, s) in chain.stages.iter().enumerate() {
            let recompute = j == t || (s.transient() <= level && s.input_bytes < s.saved_bytes);
            peak += if recompute { s.input_bytes } else { s.saved_bytes };
        }
        best = best.min(peak);
    }
    Ok(best)
}

/// A partial policy over a prefix of the chain.
#[derive(Clone, Debug)]
struct Partial {
    stored: u64,
    flops: u64,
    count: usize,
    bits: Vec<StagePolicy>,
}

impl Partial {
    /// The tie-break order: cost, then number recomputed, then earlier stages kept.
    fn key_cmp(&self, other: &Partial) -> Ordering {
        (self.flops, self.count, &self.bits).cmp(&(other.flops, other.count, &other.bits))
    }
}

/// Best policy with `forced` recomputed and every other recomputed stage's transient at most
/// `level`, storing at most `cap` bytes of chain activations; `None` if there is none.
fn knapsack(chain: &Chain, forced: usize, level: u64, cap: u64) -> Result<Option<Partial>, BudgetError> {
    let mut states = vec![Partial {
        stored: 0,
        flops: 0,
        count: 0,
        bits: Vec::with_capacity(chain.stages.len()),
    }];
    for (j, s) in chain.stages.iter().enumerate() {
        let options: &[StagePolicy] = if j == forced {
            &[StagePolicy::Recompute]
        } else if s.transient() > level {
            &[StagePolicy::Keep]
        } else {
            &[StagePolicy::Keep, StagePolicy::Recompute]
        };
        let mut next = Vec::with_capacity(states.len() * options.len());
        for st in &states {
            for &p in options {
                // Stored bytes only grow along the chain, so an over-budget prefix is dead.
                let stored = st.stored + s.stored(p);
                if stored > cap {
                    continue;
                }
                let mut bits = st.bits.clone();
                bits.push(p);
                let recompute = p == StagePolicy::Recompute;
                next.push(Partial {
                    stored,
                    flops: st.flops + if recompute { s.forward_flops } else { 0 },
                    count: st.count + recompute as usize,
                    bits,
                });
            }
        }
        // Pareto filter: keep a state only if no state storing at most as much has a key at
        // least as good.
        next.sort_by(|a, b| a.stored.cmp(&b.stored).then_with(|| a.key_cmp(b)));
        let mut kept: Vec<Partial> = Vec::with_capacity(next.len());
        for st in next {
            if kept.last().is_none_or(|best| st.key_cmp(best) == Ordering::Less) {
                kept.push(st);
            }
        }
        if kept.len() > MAX_FRONTIER {
            return Err(BudgetError::SearchLimit { states: kept.len() });
        }
        if kept.is_empty() {
            return Ok(None);
        }
        states = kept;
    }
    // The last kept state has the best key of all (keys strictly improve along `kept`).
    Ok(states.pop())
}

/// Minimal-recompute policy whose peak fits `budget` (see the module docs for the model, the
/// proof of optimality and the tie-break order).
pub fn solve(chain: &Chain, budget: u64) -> Result<Solution, BudgetError> {
    check_totals(chain)?;
    let n = chain.stages.len();
    let keep_all = Policy::none(n);
    let (keep_peak, _) = evaluate(chain, &keep_all)?;
    // All-Keep has the smallest possible key, so it wins whenever it fits.
    if keep_peak <= budget {
        return Ok(Solution {
            policy: keep_all,
            peak_bytes: keep_peak,
            recompute_flops: 0,
        });
    }
    let mut best: Option<Partial> = None;
    for (t, st) in chain.stages.iter().enumerate() {
        let level = st.transient();
        let Some(cap) = budget.checked_sub(chain.base_bytes).and_then(|b| b.checked_sub(level)) else {
            continue;
        };
        if let Some(cand) = knapsack(chain, t, level, cap)? {
            if best.as_ref().is_none_or(|b| cand.key_cmp(b) == Ordering::Less) {
                best = Some(cand);
            }
        }
    }
    match best {
        Some(b) => {
            let policy = Policy { stages: b.bits };
            let (peak_bytes, recompute_flops) = evaluate(chain, &policy)?;
            Ok(Solution {
                policy,
                peak_bytes,
                recompute_flops,
            })
        }
        None => Err(BudgetError::Infeasible {
            budget,
            min_reachable: min_peak(chain)?,
        }),
    }
}

/// The peak/cost trade-off curve: for every recompute cost that is optimal for some budget,
/// the solver's policy at the smallest budget with that cost. Sorted by decreasing peak and
/// strictly increasing cost; starts at all-Keep and ends at the minimum reachable peak.
pub fn frontier(chain: &Chain) -> Result<Vec<Solution>, BudgetError> {
    let mut points: Vec<Solution> = Vec::new();
    let mut budget = evaluate(chain, &Policy::none(chain.stages.len()))?.0;
    let floor = min_peak(chain)?;
    loop {
        let sol = solve(chain, budget)?;
        let peak = sol.peak_bytes;
        match points.last_mut() {
            // Same cost at a lower peak: the earlier point was not the smallest budget for it.
            Some(last) if last.recompute_flops == sol.recompute_flops => *last = sol,
            _ => points.push(sol),
        }
        if peak <= floor {
            return Ok(points);
        }
        budget = peak - 1;
    }
}
