//! The abstract chain solver: a chain of stages (the transformer blocks), each with a list of
//! ways to treat its activations, and the cheapest choice per stage whose modeled peak fits a
//! budget.
//!
//! # Memory model (multiple choice per stage)
//!
//! Stage `i` offers options `o = 0, 1, ...`, each a [`StageOption`]: `stored_bytes` (what the
//! stage keeps from the end of its forward until its backward), `transient_bytes` (what it
//! rematerializes on top of that right before its backward, freed once its backward is done)
//! and `recompute_flops` (the price of that rematerialization). Option 0 keeps everything the
//! backward reads (no transient, no recompute); the others keep less and recompute the rest
//! (how they are derived from a graph is [`super::graph`]'s job). With `o_i` the option chosen
//! for stage `i`, the modeled peak is
//!
//! ```text
//! peak = base_bytes + sum_i stored(o_i) + max_i transient(o_i)
//! ```
//!
//! It charges everything stored at the end of the forward plus the worst rematerialization on
//! top, which over-estimates the true peak a little (stages later in the chain have already
//! released their storage when an earlier stage is rematerialized) but is the bound used by
//! Chen et al. 2016 ("Training deep nets with sublinear memory cost") and by PyTorch's
//! `checkpoint_sequential`. The cost of a policy is the sum of the chosen `recompute_flops`.
//! [`evaluate`] is the single definition of both numbers; the solver reports through it.
//!
//! # Solver and why it is exact
//!
//! Fix a level `L` for the max term. Every policy whose options all have `transient <= L`
//! and whose stored sum is at most `budget - base_bytes - L` fits the budget (its real max
//! term is at most `L`), and the optimal policy is among those for `L` = its own max transient.
//! So the optimum is the best over the distinct transient values `L` of a multiple-choice
//! knapsack: minimize the recompute cost subject to `sum stored <= budget - base_bytes - L`,
//! using only options with `transient <= L`. [`solve`] solves each knapsack exactly by a
//! dynamic program over the stages whose state set is the Pareto frontier of partial policies
//! on (stored bytes, key), where key is the tie-break order below. Dropping a partial policy
//! that another one beats on both is safe because both stored bytes and the key behave
//! additively under appending the same suffix: the dominating prefix followed by any suffix
//! stays within the budget whenever the dominated one does, and stays at least as good on the
//! key (cost and count add; the prefix choices are the leading entries of the policy). Every
//! policy is therefore either reached or dominated by a reached one.
//!
//! Ties are broken deterministically by the key (recompute cost, number of stages not on
//! option 0, then the choice vector in lexicographic order, i.e. earlier stages on lower
//! options), so the answer is unique. The knapsack is NP-hard in general, so the frontier can
//! grow exponentially on adversarial chains; real backbones repeat a few stage shapes and keep
//! it small. Past [`MAX_FRONTIER`] states the solver stops with [`BudgetError::SearchLimit`]
//! rather than run away.
//!
//! Not modeled: rotor's (Beaumont et al. 2019) schedules where a stage's forward is rerun
//! more than once or the peak is simulated step by step; the graph-level pass checks the real
//! peak with the memory planner instead.

use std::cmp::Ordering;

/// Largest Pareto frontier the solver keeps for one stage before giving up.
pub const MAX_FRONTIER: usize = 1 << 20;

const GIB: f64 = (1u64 << 30) as f64;

/// One way a stage treats its activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StageOption {
    /// Bytes kept from the end of the forward until the stage's backward.
    pub stored_bytes: u64,
    /// Bytes rematerialized right before the stage's backward (on top of the stored ones).
    pub transient_bytes: u64,
    /// Cost of the rematerialization.
    pub recompute_flops: u64,
}

/// One stage of the chain (one transformer block): its options, option 0 keeping everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub options: Vec<StageOption>,
}

impl Stage {
    /// The classic two-level stage: keep `saved_bytes`, or keep only `input_bytes` and rerun
    /// the forward (`forward_flops`), rematerializing `saved_bytes - input_bytes`.
    pub fn two_level(input_bytes: u64, saved_bytes: u64, forward_flops: u64) -> Stage {
        Stage {
            options: vec![
                StageOption {
                    stored_bytes: saved_bytes,
                    ..StageOption::default()
                },
                StageOption {
                    stored_bytes: input_bytes,
                    transient_bytes: saved_bytes.saturating_sub(input_bytes),
                    recompute_flops: forward_flops,
                },
            ],
        }
    }
}

/// The chain and the memory that is resident regardless of the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub stages: Vec<Stage>,
    /// Parameters, gradients, optimizer state and every activation outside the chain.
    pub base_bytes: u64,
}

/// The option chosen for every stage of a chain, in chain order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Policy {
    pub choices: Vec<usize>,
}

impl Policy {
    /// Option 0 everywhere: recompute nothing.
    pub fn none(n: usize) -> Policy {
        Policy { choices: vec![0; n] }
    }

    /// Number of stages not on option 0.
    pub fn recomputed(&self) -> usize {
        self.choices.iter().filter(|&&c| c != 0).count()
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
    #[error("policy picks option {option} for stage {stage}, which has {options} options")]
    OptionOutOfRange {
        stage: usize,
        option: usize,
        options: usize,
    },
    #[error("stage {stage} has no options (option 0, keeping everything, is required)")]
    NoOptions { stage: usize },
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
    if policy.choices.len() != chain.stages.len() {
        return Err(BudgetError::PolicyLength {
            policy: policy.choices.len(),
            chain: chain.stages.len(),
        });
    }
    let mut stored = chain.base_bytes;
    let mut transient = 0u64;
    let mut flops = 0u64;
    for (stage, (s, &c)) in chain.stages.iter().zip(&policy.choices).enumerate() {
        let o = s.options.get(c).ok_or(BudgetError::OptionOutOfRange {
            stage,
            option: c,
            options: s.options.len(),
        })?;
        stored = stored.checked_add(o.stored_bytes).ok_or(BudgetError::Overflow)?;
        transient = transient.max(o.transient_bytes);
        flops = flops.checked_add(o.recompute_flops).ok_or(BudgetError::Overflow)?;
    }
    let peak = stored.checked_add(transient).ok_or(BudgetError::Overflow)?;
    Ok((peak, flops))
}

/// Rejects chains with an option-less stage or whose worst-case totals do not fit in `u64`,
/// so the solver's sums cannot overflow afterwards.
fn check_totals(chain: &Chain) -> Result<(), BudgetError> {
    let mut bytes = chain.base_bytes;
    let mut flops = 0u64;
    let mut transient = 0u64;
    for (stage, s) in chain.stages.iter().enumerate() {
        if s.options.is_empty() {
            return Err(BudgetError::NoOptions { stage });
        }
        let max = |f: fn(&StageOption) -> u64| s.options.iter().map(f).max().unwrap_or(0);
        bytes = bytes
            .checked_add(max(|o| o.stored_bytes))
            .ok_or(BudgetError::Overflow)?;
        flops = flops
            .checked_add(max(|o| o.recompute_flops))
            .ok_or(BudgetError::Overflow)?;
        transient = transient.max(max(|o| o.transient_bytes));
    }
    bytes.checked_add(transient).ok_or(BudgetError::Overflow)?;
    Ok(())
}

/// The candidate max-term levels: every distinct transient, ascending.
fn levels(chain: &Chain) -> Vec<u64> {
    let mut l: Vec<u64> = chain
        .stages
        .iter()
        .flat_map(|s| s.options.iter().map(|o| o.transient_bytes))
        .collect();
    l.sort_unstable();
    l.dedup();
    l
}

/// Smallest peak any policy reaches on `chain`.
pub fn min_peak(chain: &Chain) -> Result<u64, BudgetError> {
    check_totals(chain)?;
    let mut best = u64::MAX;
    for level in levels(chain) {
        // With every transient at most `level`, each stage independently stores the least it can.
        let mut peak = chain.base_bytes + level;
        let mut possible = true;
        for s in &chain.stages {
            match s
                .options
                .iter()
                .filter(|o| o.transient_bytes <= level)
                .map(|o| o.stored_bytes)
                .min()
            {
                Some(b) => peak += b,
                None => possible = false,
            }
        }
        if possible {
            best = best.min(peak);
        }
    }
    // An empty chain has no levels: only the base remains.
    Ok(if best == u64::MAX { chain.base_bytes } else { best })
}

/// A partial policy over a prefix of the chain.
#[derive(Clone, Debug)]
struct Partial {
    stored: u64,
    flops: u64,
    count: usize,
    choices: Vec<usize>,
}

impl Partial {
    /// The tie-break order: cost, then number of stages off option 0, then earlier stages on
    /// lower options.
    fn key_cmp(&self, other: &Partial) -> Ordering {
        (self.flops, self.count, &self.choices).cmp(&(other.flops, other.count, &other.choices))
    }
}

/// A partial policy's extension by one stage, before its choice vector is built.
struct Candidate {
    stored: u64,
    flops: u64,
    count: usize,
    /// Lexicographic rank of the parent prefix among the previous stage's states.
    parent_rank: usize,
    parent: usize,
    choice: usize,
}

impl Candidate {
    /// [`Partial::key_cmp`] without the choice vectors: prefixes of equal length compare as
    /// their ranks, then the appended choice decides.
    fn key(&self) -> (u64, usize, usize, usize) {
        (self.flops, self.count, self.parent_rank, self.choice)
    }
}

/// The Pareto frontier over (stored bytes, key) of complete policies that use only options with
/// `transient <= level` and store at most `cap` bytes of chain activations, sorted by
/// increasing stored bytes (and so strictly decreasing key); empty if there is none.
///
/// With `bound` (the cost and count of a policy already found), partial policies that cost
/// strictly more are dropped: cost and count only grow, so they cannot beat it. Partial
/// policies that cannot fit `cap` even with the smallest options for the remaining stages are
/// dropped too. Both prunings keep the best policy exact (not the rest of the frontier).
fn knapsack(chain: &Chain, level: u64, cap: u64, bound: Option<(u64, usize)>) -> Result<Vec<Partial>, BudgetError> {
    // Smallest stored bytes of every suffix of the chain at this level.
    let mut suffix = vec![0u64; chain.stages.len() + 1];
    for (i, s) in chain.stages.iter().enumerate().rev() {
        let least = s
            .options
            .iter()
            .filter(|o| o.transient_bytes <= level)
            .map(|o| o.stored_bytes)
            .min();
        suffix[i] = match least {
            Some(b) => suffix[i + 1].saturating_add(b),
            None => return Ok(Vec::new()),
        };
    }
    let mut states = vec![Partial {
        stored: 0,
        flops: 0,
        count: 0,
        choices: Vec::with_capacity(chain.stages.len()),
    }];
    for (i, s) in chain.stages.iter().enumerate() {
        // Lexicographic ranks of the prefixes, so candidates compare without their vectors.
        let mut by_choices: Vec<usize> = (0..states.len()).collect();
        by_choices.sort_by(|&a, &b| states[a].choices.cmp(&states[b].choices));
        let mut rank = vec![0; states.len()];
        for (r, &i) in by_choices.iter().enumerate() {
            rank[i] = r;
        }
        let mut next: Vec<Candidate> = Vec::with_capacity(states.len() * s.options.len());
        for (parent, st) in states.iter().enumerate() {
            for (choice, o) in s.options.iter().enumerate() {
                // Stored bytes only grow along the chain, so an over-budget prefix is dead.
                let stored = st.stored + o.stored_bytes;
                if o.transient_bytes > level || stored.saturating_add(suffix[i + 1]) > cap {
                    continue;
                }
                let flops = st.flops + o.recompute_flops;
                let count = st.count + (choice != 0) as usize;
                if bound.is_some_and(|b| (flops, count) > b) {
                    continue;
                }
                next.push(Candidate {
                    stored,
                    flops,
                    count,
                    parent_rank: rank[parent],
                    parent,
                    choice,
                });
            }
        }
        // Pareto filter: keep a state only if no state storing at most as much has a key at
        // least as good.
        next.sort_unstable_by(|a, b| a.stored.cmp(&b.stored).then_with(|| a.key().cmp(&b.key())));
        let mut kept: Vec<Partial> = Vec::new();
        let mut best: Option<(u64, usize, usize, usize)> = None;
        for c in next {
            if best.is_none_or(|b| c.key() < b) {
                best = Some(c.key());
                let mut choices = Vec::with_capacity(chain.stages.len());
                choices.extend_from_slice(&states[c.parent].choices);
                choices.push(c.choice);
                kept.push(Partial {
                    stored: c.stored,
                    flops: c.flops,
                    count: c.count,
                    choices,
                });
            }
        }
        if kept.len() > MAX_FRONTIER {
            return Err(BudgetError::SearchLimit { states: kept.len() });
        }
        if kept.is_empty() {
            return Ok(kept);
        }
        states = kept;
    }
    Ok(states)
}

fn solution(chain: &Chain, choices: Vec<usize>) -> Result<Solution, BudgetError> {
    let policy = Policy { choices };
    let (peak_bytes, recompute_flops) = evaluate(chain, &policy)?;
    Ok(Solution {
        policy,
        peak_bytes,
        recompute_flops,
    })
}

/// Minimal-recompute policy whose peak fits `budget` (see the module docs for the model, the
/// proof of optimality and the tie-break order).
pub fn solve(chain: &Chain, budget: u64) -> Result<Solution, BudgetError> {
    check_totals(chain)?;
    let n = chain.stages.len();
    let keep_all = Policy::none(n);
    let (keep_peak, keep_flops) = evaluate(chain, &keep_all)?;
    // All option 0 has the smallest possible key when it is free, so it wins whenever it fits.
    if keep_peak <= budget && keep_flops == 0 {
        return solution(chain, keep_all.choices);
    }
    let mut best: Option<Partial> = None;
    // Highest level first: it allows the most options, so its answer is a good bound early.
    for level in levels(chain).into_iter().rev() {
        let Some(cap) = budget.checked_sub(chain.base_bytes).and_then(|b| b.checked_sub(level)) else {
            continue;
        };
        let bound = best.as_ref().map(|b| (b.flops, b.count));
        // The last frontier state has the best key of all (keys strictly improve along it).
        if let Some(cand) = knapsack(chain, level, cap, bound)?.pop() {
            if best.as_ref().is_none_or(|b| cand.key_cmp(b) == Ordering::Less) {
                best = Some(cand);
            }
        }
    }
    if n == 0 && chain.base_bytes <= budget {
        return solution(chain, Vec::new());
    }
    match best {
        Some(b) => solution(chain, b.choices),
        None => Err(BudgetError::Infeasible {
            budget,
            min_reachable: min_peak(chain)?,
        }),
    }
}

/// The peak/cost trade-off curve: for every recompute cost that is optimal for some budget,
/// the solver's policy at the smallest budget with that cost. Sorted by decreasing peak and
/// strictly increasing cost; starts at all option 0 and ends at the minimum reachable peak.
///
/// Built from one uncapped knapsack per level: every optimal policy is on the frontier of its
/// own level, so the union of the levels' frontiers, Pareto-filtered on (peak, key), holds
/// them all.
pub fn frontier(chain: &Chain) -> Result<Vec<Solution>, BudgetError> {
    check_totals(chain)?;
    let mut all: Vec<(u64, Partial)> = Vec::new();
    for level in levels(chain) {
        for p in knapsack(chain, level, u64::MAX, None)? {
            all.push((chain.base_bytes + p.stored + level, p));
        }
    }
    if chain.stages.is_empty() {
        return Ok(vec![solution(chain, Vec::new())?]);
    }
    // By increasing modeled peak, then key: a point is on the curve when its key beats every
    // point at a lower or equal peak.
    all.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.key_cmp(&b.1)));
    let mut curve: Vec<Partial> = Vec::new();
    for (_, p) in all {
        if curve.last().is_none_or(|best| p.key_cmp(best) == Ordering::Less) {
            curve.push(p);
        }
    }
    // Solutions report the peak from `evaluate` (a policy found at a level above its own max
    // transient is cheaper there), and equal costs keep the lowest peak.
    let mut points: Vec<Solution> = Vec::new();
    for p in curve.into_iter().rev() {
        let sol = solution(chain, p.choices)?;
        match points.last_mut() {
            Some(last) if last.recompute_flops == sol.recompute_flops => *last = sol,
            _ => points.push(sol),
        }
    }
    Ok(points)
}
