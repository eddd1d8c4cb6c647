//! The checkpointing chain solver against brute force, plus its contract at the budget extremes.

use vitdet_passes::checkpoint::{evaluate, frontier, min_peak, solve, BudgetError, Chain, Policy, Stage, StagePolicy};

/// xorshift64*: deterministic across platforms and needs no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Small values from narrow ranges so that equal costs, sizes and transients (the tie cases)
/// come up often; sometimes `input > saved` so recomputing would cost memory.
fn random_chain(rng: &mut Rng) -> Chain {
    let n = rng.below(11) as usize;
    let stages = (0..n)
        .map(|_| Stage {
            input_bytes: 1 + rng.below(8),
            saved_bytes: rng.below(40),
            forward_flops: rng.below(6),
        })
        .collect();
    Chain {
        stages,
        base_bytes: rng.below(20),
    }
}

/// The reference: every policy, best by (cost, number recomputed, earlier stages kept).
fn brute_force(chain: &Chain, budget: u64) -> Option<(Policy, u64, u64)> {
    let n = chain.stages.len();
    let mut best: Option<((u64, usize, Policy), u64)> = None;
    for mask in 0u32..(1 << n) {
        let policy = Policy {
            stages: (0..n)
                .map(|i| {
                    if mask >> i & 1 == 1 {
                        StagePolicy::Recompute
                    } else {
                        StagePolicy::Keep
                    }
                })
                .collect(),
        };
        let (peak, cost) = evaluate(chain, &policy).unwrap();
        if peak > budget {
            continue;
        }
        let key = (cost, policy.recomputed(), policy);
        if best.as_ref().is_none_or(|(k, _)| key < *k) {
            best = Some((key, peak));
        }
    }
    best.map(|((cost, _, policy), peak)| (policy, peak, cost))
}

fn brute_min_peak(chain: &Chain) -> u64 {
    let n = chain.stages.len();
    (0u32..(1 << n))
        .map(|mask| {
            let policy = Policy {
                stages: (0..n)
                    .map(|i| {
                        if mask >> i & 1 == 1 {
                            StagePolicy::Recompute
                        } else {
                            StagePolicy::Keep
                        }
                    })
                    .collect(),
            };
            evaluate(chain, &policy).unwrap().0
        })
        .min()
        .unwrap()
}

#[test]
fn solver_matches_brute_force_on_random_chains() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut feasible = 0;
    let mut recomputing = 0;
    for _ in 0..400 {
        let chain = random_chain(&mut rng);
        let floor = brute_min_peak(&chain);
        assert_eq!(min_peak(&chain).unwrap(), floor, "{chain:?}");
        let keep_peak = evaluate(&chain, &Policy::none(chain.stages.len())).unwrap().0;
        for _ in 0..8 {
            // Budgets from a little below the floor to a little above all-Keep.
            let lo = floor.saturating_sub(5);
            let budget = lo + rng.below(keep_peak + 6 - lo);
            match (solve(&chain, budget), brute_force(&chain, budget)) {
                (Ok(sol), Some((policy, peak, cost))) => {
                    assert_eq!(sol.policy, policy, "{chain:?} budget {budget}");
                    assert_eq!((sol.peak_bytes, sol.recompute_flops), (peak, cost));
                    assert!(sol.peak_bytes <= budget);
                    feasible += 1;
                    recomputing += (sol.policy.recomputed() > 0) as usize;
                }
                (
                    Err(BudgetError::Infeasible {
                        budget: b,
                        min_reachable,
                    }),
                    None,
                ) => {
                    assert_eq!((b, min_reachable), (budget, floor));
                }
                (got, want) => panic!("{chain:?} budget {budget}: solver {got:?}, brute force {want:?}"),
            }
        }
    }
    // The comparison must have exercised both outcomes and non-trivial policies.
    assert!(
        feasible > 1000 && recomputing > 500,
        "feasible {feasible}, recomputing {recomputing}"
    );
}

#[test]
fn larger_budget_never_costs_more() {
    let mut rng = Rng(42);
    for _ in 0..200 {
        let chain = random_chain(&mut rng);
        let floor = min_peak(&chain).unwrap();
        let keep_peak = evaluate(&chain, &Policy::none(chain.stages.len())).unwrap().0;
        let mut last = u64::MAX;
        for budget in floor..=keep_peak + 1 {
            let cost = solve(&chain, budget).unwrap().recompute_flops;
            assert!(cost <= last, "{chain:?}: budget {budget} costs {cost} > {last}");
            last = cost;
        }
        assert_eq!(last, 0, "all-Keep budget must recompute nothing");
    }
}

fn vit_b_like() -> Chain {
    // ViT-B at 1024x1024, batch 1, fp32: 64x64 tokens of width 768. Block input 4096*768*4 bytes.
    // Saved activations ~17 token-width tensors per block plus attention probabilities: 25
    // windows of 14x14 (padded 70x70) for windowed blocks, one 4096x4096 map per head for the
    // four global blocks (2, 5, 8, 11). Flops: 24*N*C^2 for the linears plus 4*N^2*C-type
    // attention terms.
    let tokens = 64 * 64u64;
    let c = 768u64;
    let input = tokens * c * 4;
    let dense = 17 * input;
    let window_attn = 2 * 25 * 12 * 196 * 196 * 4;
    let global_attn = 2 * 12 * tokens * tokens * 4;
    let linear_flops = 24 * tokens * c * c;
    let stages = (0..12)
        .map(|i| {
            let global = i % 3 == 2;
            Stage {
                input_bytes: input,
                saved_bytes: dense + if global { global_attn } else { window_attn },
                forward_flops: linear_flops
                    + if global {
                        4 * tokens * tokens * c
                    } else {
                        4 * 25 * 196 * 196 * c
                    },
            }
        })
        .collect();
    Chain {
        stages,
        base_bytes: 2 << 30,
    }
}

#[test]
fn big_budget_recomputes_nothing_and_infeasible_budget_names_the_minimum() {
    let chain = vit_b_like();
    let keep_peak = evaluate(&chain, &Policy::none(12)).unwrap().0;
    for budget in [keep_peak, keep_peak + 1, u64::MAX] {
        let sol = solve(&chain, budget).unwrap();
        assert_eq!(sol.policy, Policy::none(12));
        assert_eq!((sol.peak_bytes, sol.recompute_flops), (keep_peak, 0));
    }
    let floor = min_peak(&chain).unwrap();
    assert!(floor < keep_peak);
    let ok = solve(&chain, floor).unwrap();
    assert_eq!(ok.peak_bytes, floor);
    let err = solve(&chain, floor - 1).unwrap_err();
    assert_eq!(
        err,
        BudgetError::Infeasible {
            budget: floor - 1,
            min_reachable: floor
        }
    );
    let msg = err.to_string();
    assert!(msg.contains(&floor.to_string()) && msg.contains("GiB"), "{msg}");
    // Below the resident base nothing helps either, including on an empty chain.
    let empty = Chain {
        stages: vec![],
        base_bytes: 10,
    };
    assert_eq!(
        solve(&empty, 9).unwrap_err(),
        BudgetError::Infeasible {
            budget: 9,
            min_reachable: 10
        }
    );
    assert_eq!(solve(&empty, 10).unwrap().peak_bytes, 10);
}

#[test]
fn named_policies_and_bad_input() {
    let chain = vit_b_like();
    let global = Policy::subset(12, &[2, 5, 8, 11]).unwrap();
    assert_eq!(global.recomputed(), 4);
    assert_eq!(Policy::blocks(12).recomputed(), 12);
    let (none_peak, none_cost) = evaluate(&chain, &Policy::none(12)).unwrap();
    let (global_peak, global_cost) = evaluate(&chain, &global).unwrap();
    let (blocks_peak, blocks_cost) = evaluate(&chain, &Policy::blocks(12)).unwrap();
    assert_eq!(none_cost, 0);
    assert!(blocks_peak < global_peak && global_peak < none_peak);
    assert!(global_cost < blocks_cost);
    // The solver at a named policy's peak is never worse than that policy.
    for (peak, cost) in [(global_peak, global_cost), (blocks_peak, blocks_cost)] {
        assert!(solve(&chain, peak).unwrap().recompute_flops <= cost);
    }

    assert_eq!(
        Policy::subset(3, &[3]).unwrap_err(),
        BudgetError::StageOutOfRange { index: 3, stages: 3 }
    );
    assert_eq!(
        evaluate(&chain, &Policy::none(11)).unwrap_err(),
        BudgetError::PolicyLength { policy: 11, chain: 12 }
    );
    let huge = Chain {
        stages: vec![
            Stage {
                input_bytes: 1,
                saved_bytes: u64::MAX,
                forward_flops: 1,
            };
            2
        ],
        base_bytes: 0,
    };
    assert_eq!(solve(&huge, 100).unwrap_err(), BudgetError::Overflow);
    assert_eq!(evaluate(&huge, &Policy::none(2)).unwrap_err(), BudgetError::Overflow);
}

#[test]
fn vit_b_frontier() {
    let chain = vit_b_like();
    let points = frontier(&chain).unwrap();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("peak GiB  recompute GFLOP  recomputed blocks");
    for p in &points {
        let which: Vec<usize> = (0..12)
            .filter(|&i| p.policy.stages[i] == StagePolicy::Recompute)
            .collect();
        println!(
            "{:8.3}  {:14.1}  {which:?}",
            gib(p.peak_bytes),
            p.recompute_flops as f64 / 1e9
        );
    }
    // Strictly decreasing peak, strictly increasing cost, from all-Keep to the floor, and
    // every point is the solver's own answer at its peak.
    assert_eq!(points[0].recompute_flops, 0);
    assert_eq!(points.last().unwrap().peak_bytes, min_peak(&chain).unwrap());
    for w in points.windows(2) {
        assert!(w[1].peak_bytes < w[0].peak_bytes && w[1].recompute_flops > w[0].recompute_flops);
    }
    for p in &points {
        assert_eq!(solve(&chain, p.peak_bytes).unwrap().recompute_flops, p.recompute_flops);
    }
    // Recomputing a single stage saves nothing in this model (its rematerialization comes back
    // as the transient), so every step off all-Keep recomputes at least two stages.
    assert!(points[1..].iter().all(|p| p.policy.recomputed() >= 2));
    // The global blocks dominate memory, so on this chain the named `global` policy is the
    // solver's own choice at its peak; at the floor every block is recomputed.
    let global = Policy::subset(12, &[2, 5, 8, 11]).unwrap();
    assert!(points.iter().any(|p| p.policy == global));
    assert_eq!(points.last().unwrap().policy, Policy::blocks(12));
}

#[test]
fn vit_h_depth_frontier_is_consistent() {
    // ViT-H depth: 32 blocks of width 1280, global blocks 7, 15, 23, 31. Too deep for brute
    // force; checks that the solver stays fast and self-consistent on a real-sized chain.
    let tokens = 64 * 64u64;
    let input = tokens * 1280 * 4;
    let stages = (0..32)
        .map(|i| {
            let global = i % 8 == 7;
            Stage {
                input_bytes: input,
                saved_bytes: 17 * input
                    + if global {
                        2 * 16 * tokens * tokens * 4
                    } else {
                        2 * 25 * 16 * 196 * 196 * 4
                    },
                forward_flops: 24 * tokens * 1280 * 1280 + if global { 4 * tokens * tokens * 1280 } else { 0 },
            }
        })
        .collect();
    let chain = Chain {
        stages,
        base_bytes: 8 << 30,
    };
    let start = std::time::Instant::now();
    let points = frontier(&chain).unwrap();
    println!("{} frontier points in {:?}", points.len(), start.elapsed());
    for w in points.windows(2) {
        assert!(w[1].peak_bytes < w[0].peak_bytes && w[1].recompute_flops > w[0].recompute_flops);
    }
    let global = Policy::subset(32, &[7, 15, 23, 31]).unwrap();
    let (peak, cost) = evaluate(&chain, &global).unwrap();
    assert!(solve(&chain, peak).unwrap().recompute_flops <= cost);
    assert_eq!(points.last().unwrap().peak_bytes, min_peak(&chain).unwrap());
}
