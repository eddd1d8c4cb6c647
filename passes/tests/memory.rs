//! The static memory planner: invariants on random graphs and random execution orders
//! (property-based, with views that share their input's buffer), on the real models, and the
//! planned arena against the max-live lower bound.

use std::collections::HashMap;
use std::time::Instant;

use proptest::prelude::*;
use vitdet_ir::ops::{Binary, BinaryKind, Expand, Init, Input, Parameter, Permute, Reshape, Slice, Unary, UnaryKind};
use vitdet_ir::{Graph, NodeIndex, TensorType, Value};
use vitdet_models::{build_backbone, build_detector, build_detector_training, AttentionStrategy, ModelConfig};
use vitdet_passes::checkpoint::{apply_checkpointing, CheckpointPolicy, Checkpointed};
use vitdet_passes::memory::{plan_memory_with, BufferKind, Placement, ALIGNMENT};
use vitdet_passes::{autocast, differentiate, fuse_attention, plan_memory, schedule, MemoryPlan, PlanError, Precision};

/// SplitMix64: a tiny seeded generator, so every random case is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A random DAG of inputs, parameters, unary, binary (same-shape), reshape, slice, permute and
/// expand nodes over random shapes (the last four are views in the runtime, some strided, so a
/// later reshape copies); a few random values become graph outputs, and some values go unused.
fn random_graph(rng: &mut Rng, nodes: usize) -> Graph {
    let mut g = Graph::new();
    let mut values: Vec<Value> = Vec::new();
    let random_shape = |rng: &mut Rng| -> Vec<usize> { (0..1 + rng.below(3)).map(|_| 1 + rng.below(9)).collect() };
    for i in 0..1 + rng.below(3) {
        let ty = TensorType::f32(random_shape(rng));
        values.push(
            g.add(
                Input {
                    name: format!("x{i}"),
                    ty,
                },
                "",
                &[],
            )
            .unwrap(),
        );
    }
    let unary = [UnaryKind::Gelu, UnaryKind::Relu, UnaryKind::Exp, UnaryKind::Neg];
    let binary = [BinaryKind::Add, BinaryKind::Mul, BinaryKind::Sub];
    for i in 0..nodes {
        let a = values[rng.below(values.len())];
        let shape = g.value_type(a).shape.clone();
        let v = match rng.below(8) {
            5 => {
                let axis = rng.below(shape.len());
                let start = rng.below(shape[axis]);
                let end = start + 1 + rng.below(shape[axis] - start);
                g.add(Slice { axis, start, end }, "s", &[a]).unwrap()
            }
            6 => {
                let mut perm: Vec<usize> = (0..shape.len()).collect();
                for i in (1..perm.len()).rev() {
                    perm.swap(i, rng.below(i + 1));
                }
                g.add(Permute { perm }, "t", &[a]).unwrap()
            }
            7 => {
                // A new leading axis, and size-1 axes broadcast.
                let mut to = vec![1 + rng.below(3)];
                to.extend(shape.iter().map(|&d| if d == 1 { 1 + rng.below(3) } else { d }));
                g.add(Expand { shape: to }, "e", &[a]).unwrap()
            }
            0 => g
                .add(
                    Unary {
                        kind: unary[rng.below(unary.len())],
                    },
                    "u",
                    &[a],
                )
                .unwrap(),
            1 => {
                let numel: usize = shape.iter().product();
                let divisors: Vec<usize> = (1..=numel).filter(|&d| numel.is_multiple_of(d)).collect();
                let k = divisors[rng.below(divisors.len())];
                g.add(
                    Reshape {
                        shape: vec![numel / k, k],
                    },
                    "r",
                    &[a],
                )
                .unwrap()
            }
            2 => {
                // A parameter operand: read by the graph but never planned.
                let p = g
                    .add(
                        Parameter {
                            name: format!("p{i}"),
                            ty: TensorType::f32(shape),
                            init: Init::Zeros,
                            trainable: true,
                        },
                        "p",
                        &[],
                    )
                    .unwrap();
                g.add(Binary { kind: BinaryKind::Mul }, "b", &[a, p]).unwrap()
            }
            _ => {
                let same: Vec<Value> = values
                    .iter()
                    .copied()
                    .filter(|&v| g.value_type(v).shape == shape)
                    .collect();
                let b = same[rng.below(same.len())];
                g.add(
                    Binary {
                        kind: binary[rng.below(binary.len())],
                    },
                    "b",
                    &[a, b],
                )
                .unwrap()
            }
        };
        values.push(v);
    }
    for k in 0..1 + rng.below(3) {
        let v = values[rng.below(values.len())];
        g.set_output(&format!("y{k}"), v);
    }
    g
}

/// A random topological order (Kahn's algorithm choosing a random ready node), to test the
/// planner on orders other than the default schedule.
fn random_order(rng: &mut Rng, g: &Graph) -> Vec<NodeIndex> {
    // One entry per edge, so a node reading a value twice waits for two decrements.
    let mut pending: HashMap<NodeIndex, usize> = HashMap::new();
    let mut consumers: HashMap<NodeIndex, Vec<NodeIndex>> = HashMap::new();
    for n in g.graph.node_indices() {
        let ins = g.inputs_of(n);
        pending.insert(n, ins.len());
        for v in ins {
            consumers.entry(v.node).or_default().push(n);
        }
    }
    let mut ready: Vec<NodeIndex> = pending.iter().filter(|(_, &c)| c == 0).map(|(&n, _)| n).collect();
    ready.sort();
    let mut order = Vec::new();
    while !ready.is_empty() {
        let n = ready.swap_remove(rng.below(ready.len()));
        order.push(n);
        for &m in consumers.get(&n).map(Vec::as_slice).unwrap_or(&[]) {
            let c = pending.get_mut(&m).unwrap();
            *c -= 1;
            if *c == 0 {
                ready.push(m);
            }
        }
    }
    assert_eq!(order.len(), g.graph.node_count());
    order
}

/// Plans with each placement heuristic and with all of them, checks the invariants with the
/// plan's own checker and with [`independent_check`], and checks the bounds.
fn plan_and_check(g: &Graph, order: &[NodeIndex]) -> MemoryPlan {
    // Every heuristic on its own, then the portfolio, which is no worse than any of them.
    let mut smallest = usize::MAX;
    for p in Placement::ALL {
        let alone = plan_memory_with(g, order, &[p]).unwrap();
        alone.check(g, order).unwrap();
        independent_check(g, order, &alone);
        smallest = smallest.min(alone.arena_bytes);
    }
    let plan = plan_memory(g, order).unwrap();
    plan.check(g, order).unwrap();
    independent_check(g, order, &plan);
    assert_eq!(plan.arena_bytes, smallest);
    assert!(plan.arena_bytes >= plan.aligned_lower_bound_bytes);
    assert!(plan.aligned_lower_bound_bytes >= plan.lower_bound_bytes);
    assert_eq!(
        plan.lower_bound_bytes,
        plan.step_live_bytes.iter().copied().max().unwrap_or(0)
    );
    plan
}

/// The invariants, step by step from the order alone: every computed activation's buffer (its
/// own, or its root's for a view) is live from its definition to its last use (graph outputs to
/// the end), and at every step the live buffers are pairwise disjoint and inside the arena.
fn independent_check(g: &Graph, order: &[NodeIndex], plan: &MemoryPlan) {
    let step_of: HashMap<NodeIndex, usize> = order.iter().enumerate().map(|(s, &n)| (n, s)).collect();
    let is_param = |v: Value| matches!(g.node(v.node).op, vitdet_ir::Op::Parameter(_));
    let mut last_use: HashMap<Value, usize> = HashMap::new();
    for (s, &n) in order.iter().enumerate() {
        for v in g.inputs_of(n) {
            last_use.insert(v, s);
        }
    }
    for o in &g.outputs {
        last_use.insert(o.value, order.len() - 1);
    }
    let buffer_of: HashMap<Value, &vitdet_passes::memory::Buffer> = plan
        .buffers
        .iter()
        .filter(|b| b.kind == BufferKind::Value)
        .map(|b| (b.value, b))
        .collect();
    for (s, &n) in order.iter().enumerate() {
        for output in 0..g.node(n).outputs.len() {
            let v = Value { node: n, output };
            if is_param(v) {
                continue;
            }
            let root = plan.aliases.get(&v).copied().unwrap_or(v);
            if is_param(root) {
                continue; // a view of a parameter: stored with the parameters
            }
            let b = buffer_of[&root];
            let last = last_use.get(&v).copied().unwrap_or(s);
            assert!(
                b.first <= s && b.last >= last && b.first == step_of[&root.node],
                "value {v:?} live {s}..={last}, buffer {b:?}"
            );
            assert!(b.size >= g.value_type(root).size_in_bytes());
        }
    }
    for s in 0..order.len() {
        let mut live: Vec<(usize, usize)> = plan
            .buffers
            .iter()
            .filter(|b| b.first <= s && s <= b.last && b.size > 0)
            .map(|b| (b.offset, b.offset + b.size))
            .collect();
        live.sort();
        for w in live.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "buffers {:?} and {:?} overlap at step {s}",
                w[0],
                w[1]
            );
        }
        assert!(live.last().is_none_or(|&(_, end)| end <= plan.arena_bytes));
    }
}

#[test]
fn chain_needs_two_buffers() {
    // x -> a -> b -> c, 16 f32 each (64 bytes, one aligned block): at every step exactly the
    // input and output of the running node are live, so two blocks suffice and are needed.
    let mut g = Graph::new();
    let x = g
        .add(
            Input {
                name: "x".into(),
                ty: TensorType::f32([16]),
            },
            "",
            &[],
        )
        .unwrap();
    let a = g.add(Unary { kind: UnaryKind::Relu }, "a", &[x]).unwrap();
    let b = g.add(Unary { kind: UnaryKind::Relu }, "b", &[a]).unwrap();
    let c = g.add(Unary { kind: UnaryKind::Relu }, "c", &[b]).unwrap();
    g.set_output("c", c);
    let order = schedule(&g).unwrap();
    let plan = plan_and_check(&g, &order);
    assert_eq!(plan.lower_bound_bytes, 128);
    assert_eq!(plan.arena_bytes, 128);
    // Alternating blocks: x and b share, a and c share.
    assert_eq!(plan.offsets[&x].0, plan.offsets[&b].0);
    assert_eq!(plan.offsets[&a].0, plan.offsets[&c].0);
    assert_ne!(plan.offsets[&x].0, plan.offsets[&a].0);
}

#[test]
fn sizes_are_aligned_and_the_arena_meets_the_aligned_bound() {
    // x [100 f32] = 400 bytes -> 448 aligned. s = x * 2 elementwise keeps x alive for the
    // final add, and a small value defined while only x is live must not reuse x's bytes.
    let mut g = Graph::new();
    let x = g
        .add(
            Input {
                name: "x".into(),
                ty: TensorType::f32([100]),
            },
            "",
            &[],
        )
        .unwrap();
    let small = g.add(Reshape { shape: vec![10, 10] }, "r", &[x]).unwrap();
    let e = g.add(Unary { kind: UnaryKind::Exp }, "e", &[small]).unwrap();
    let back = g.add(Reshape { shape: vec![100] }, "r2", &[e]).unwrap();
    let y = g.add(Binary { kind: BinaryKind::Add }, "y", &[x, back]).unwrap();
    g.set_output("y", y);
    let order = schedule(&g).unwrap();
    let plan = plan_and_check(&g, &order);
    for &(off, size) in plan.offsets.values() {
        assert_eq!(off % ALIGNMENT, 0);
        assert_eq!(size, 448);
    }
    // Live sets: {x,small}, {x,small,e}, {x,e,back}, {x,back,y}: three at most.
    assert_eq!(plan.lower_bound_bytes, 3 * 400);
    assert_eq!(plan.arena_bytes, 3 * 448);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random graphs (from a seed, so a failing case shrinks to a small seed and size) in their
    /// default schedule and in random topological orders.
    #[test]
    fn plans_of_random_graphs_in_random_orders_hold_the_invariants(seed in any::<u64>(), nodes in 1usize..60) {
        let mut rng = Rng(seed);
        let g = random_graph(&mut rng, nodes);
        plan_and_check(&g, &schedule(&g).unwrap());
        for _ in 0..3 {
            plan_and_check(&g, &random_order(&mut rng, &g));
        }
    }
}

#[test]
fn views_share_their_root_buffer_and_keep_it_alive() {
    // x -> slice (view) ... -> relu(slice) at the end: x's buffer must live until the relu,
    // though x itself is last read by the slice; a reshape of the (strided) slice copies.
    let mut g = Graph::new();
    let x = g
        .add(
            Input {
                name: "x".into(),
                ty: TensorType::f32([4, 16]),
            },
            "",
            &[],
        )
        .unwrap();
    let s = g
        .add(
            Slice {
                axis: 1,
                start: 0,
                end: 8,
            },
            "s",
            &[x],
        )
        .unwrap();
    let copied = g.add(Reshape { shape: vec![32] }, "r", &[s]).unwrap();
    let e = g.add(Unary { kind: UnaryKind::Exp }, "e", &[copied]).unwrap();
    let y = g.add(Unary { kind: UnaryKind::Relu }, "y", &[s]).unwrap();
    g.set_output("e", e);
    g.set_output("y", y);
    let order = vec![x.node, s.node, copied.node, e.node, y.node];
    let plan = plan_and_check(&g, &order);
    assert_eq!(plan.aliases.get(&s), Some(&x));
    assert_eq!(plan.aliases.get(&copied), None, "a strided view is copied by reshape");
    assert_eq!(plan.offsets[&s], plan.offsets[&x]);
    let xb = plan.buffers.iter().find(|b| b.value == x).unwrap();
    assert_eq!((xb.first, xb.last), (0, 4));
    // Step 3 holds x (256 B), the copy and e (128 B each); step 4 x, e and y.
    assert_eq!(plan.lower_bound_bytes, 512);
}

#[test]
fn random_graphs_satisfy_the_invariants() {
    // Greedy best fit is a heuristic: on random graphs the arena may exceed the lower bound,
    // so only the invariants are asserted here; the worst ratio against the aligned bound (tiny
    // tensors round up to 64 bytes, which dwarfs the unaligned bound) is printed for information.
    let mut worst = 1.0f64;
    let aligned_ratio = |p: MemoryPlan| p.arena_bytes as f64 / p.aligned_lower_bound_bytes.max(1) as f64;
    for seed in 0..200 {
        let mut rng = Rng(seed);
        let nodes = 1 + rng.below(60);
        let g = random_graph(&mut rng, nodes);
        let order = schedule(&g).unwrap();
        worst = worst.max(aligned_ratio(plan_and_check(&g, &order)));
        for _ in 0..3 {
            let order = random_order(&mut rng, &g);
            worst = worst.max(aligned_ratio(plan_and_check(&g, &order)));
        }
    }
    println!("random graphs: worst arena / aligned lower bound {worst:.4}");
}

#[test]
fn check_rejects_a_corrupted_plan() {
    // The checker must be able to fail: move one buffer onto another that lives alongside it,
    // shorten a lifetime, and shrink the arena, each in turn.
    let mut rng = Rng(7);
    let g = random_graph(&mut rng, 40);
    let order = schedule(&g).unwrap();
    let plan = plan_and_check(&g, &order);
    let pair = (0..plan.buffers.len())
        .flat_map(|i| (0..plan.buffers.len()).map(move |j| (i, j)))
        .find(|&(i, j)| {
            let (a, b) = (&plan.buffers[i], &plan.buffers[j]);
            i != j && a.first <= b.last && b.first <= a.last && a.size > 0 && b.size > 0
        })
        .expect("some two values live together");
    let mut overlapped = plan.clone();
    let (i, j) = pair;
    overlapped.buffers[j].offset = overlapped.buffers[i].offset;
    let b = overlapped.buffers[j];
    // The moved buffer holds its root value and every view of it.
    let held: Vec<Value> = overlapped
        .offsets
        .keys()
        .copied()
        .filter(|v| *v == b.value || overlapped.aliases.get(v) == Some(&b.value))
        .collect();
    for v in held {
        overlapped.offsets.insert(v, (b.offset, b.size));
    }
    let err = overlapped.check(&g, &order).unwrap_err().to_string();
    assert!(err.contains("overlap"), "{err}");

    let mut short = plan.clone();
    let k = short
        .buffers
        .iter()
        .position(|b| b.last > b.first)
        .expect("some value outlives its step");
    short.buffers[k].last = short.buffers[k].first;
    let err = short.check(&g, &order).unwrap_err().to_string();
    assert!(err.contains("is live over steps"), "{err}");

    let mut small = plan.clone();
    small.arena_bytes -= ALIGNMENT;
    let err = small.check(&g, &order).unwrap_err().to_string();
    assert!(err.contains("past the"), "{err}");
}

#[test]
fn bad_orders_are_errors() {
    let mut rng = Rng(3);
    let g = random_graph(&mut rng, 20);
    let mut order = schedule(&g).unwrap();
    let last = order.len() - 1;
    order.swap(0, last);
    assert!(matches!(plan_memory(&g, &order), Err(PlanError::NotTopological { .. })));
    let mut order = schedule(&g).unwrap();
    order.push(order[0]);
    assert!(matches!(plan_memory(&g, &order), Err(PlanError::Repeated(_))));
    let mut order = schedule(&g).unwrap();
    order.push(NodeIndex::new(100_000));
    assert!(matches!(plan_memory(&g, &order), Err(PlanError::MissingNode(100_000))));
    // An order that stops before a graph output is computed names that output.
    let mut g = Graph::new();
    let x = g
        .add(
            Input {
                name: "x".into(),
                ty: TensorType::f32([4]),
            },
            "",
            &[],
        )
        .unwrap();
    let y = g.add(Unary { kind: UnaryKind::Relu }, "y", &[x]).unwrap();
    g.set_output("y", y);
    let err = plan_memory(&g, &[x.node]).unwrap_err().to_string();
    assert!(err.contains("`y`"), "{err}");
}

/// Plans the graph's default schedule, checks it and prints the ratio; returns the ratio.
fn plan_model(label: &str, g: &Graph) -> f64 {
    let order = schedule(g).unwrap();
    let start = Instant::now();
    let plan = plan_memory(g, &order).unwrap();
    let planning = start.elapsed();
    plan.check(g, &order).unwrap();
    println!(
        "{label}: {} buffers, arena {} B, lower bound {} B, ratio {:.4}, planned in {:.0} ms",
        plan.buffers.len(),
        plan.arena_bytes,
        plan.lower_bound_bytes,
        plan.ratio(),
        planning.as_secs_f64() * 1e3
    );
    plan.ratio()
}

/// The issue's acceptance bound: the planned arena within 5% of the max-live lower bound.
const RATIO_BOUND: f64 = 1.05;

#[test]
fn real_models_in_infer_mode_plan_within_bound() {
    for name in vitdet_models::presets::NAMES {
        let cfg = ModelConfig::preset(name).unwrap();
        let backbone = build_backbone(&cfg).unwrap();
        let r = plan_model(&format!("{name} backbone (infer)"), &backbone);
        assert!(r <= RATIO_BOUND, "{name} backbone: ratio {r:.4}");
        let detector = build_detector(&cfg).unwrap();
        let r = plan_model(&format!("{name} detector (infer)"), &detector);
        assert!(r <= RATIO_BOUND, "{name} detector: ratio {r:.4}");
    }
}

#[test]
fn every_preset_in_train_mode_plans_within_bound() {
    for name in vitdet_models::presets::NAMES {
        let cfg = ModelConfig::preset(name).unwrap();
        let s = cfg.image_size;
        let forward = build_detector_training(&cfg, [s, s], 16).unwrap();
        let diff = differentiate(&forward, "loss").unwrap();
        let r = plan_model(&format!("{name} detector (train)"), &diff.graph);
        assert!(r <= RATIO_BOUND, "{name} train: ratio {r:.4}");
    }
}

/// A graph whose buffers have the given `(first time, last time, elements)`: each buffer is
/// `exp` of a broadcast of a one-element input, read at its last time by a sum (whose scalar
/// result dies at once). Returns the graph and an order in which, at each time, the producers
/// run before the consumers, so two buffers share a step exactly when their time intervals meet.
fn graph_of_lifetimes(lifetimes: &[(usize, usize, usize)]) -> (Graph, Vec<NodeIndex>) {
    let mut g = Graph::new();
    let x = g
        .add(
            Input {
                name: "x".into(),
                ty: TensorType::f32([1]),
            },
            "",
            &[],
        )
        .unwrap();
    let mut order = vec![x.node];
    let end = lifetimes.iter().map(|l| l.1).max().unwrap_or(0);
    let mut buffers: Vec<Option<Value>> = vec![None; lifetimes.len()];
    let mut last = x;
    for t in 0..=end {
        for (i, &(first, _, elements)) in lifetimes.iter().enumerate() {
            if first == t {
                let e = g.add(Expand { shape: vec![elements] }, "e", &[x]).unwrap();
                let b = g.add(Unary { kind: UnaryKind::Exp }, "b", &[e]).unwrap();
                order.extend([e.node, b.node]);
                buffers[i] = Some(b);
            }
        }
        for (i, &(_, l, _)) in lifetimes.iter().enumerate() {
            if l == t {
                let b = buffers[i].expect("a lifetime ends after it starts");
                last = g
                    .add(
                        vitdet_ir::ops::ReduceSum {
                            axes: vec![0],
                            keepdim: false,
                        },
                        "r",
                        &[b],
                    )
                    .unwrap();
                order.push(last.node);
            }
        }
    }
    g.set_output("y", last);
    (g, order)
}

/// One training graph: the detector's training forward at `size` px (attention fused or not,
/// autocast to `precision`), differentiated.
fn training_graph(cfg: &ModelConfig, size: usize, fuse: bool, precision: Precision) -> Graph {
    let mut forward = build_detector_training(cfg, [size, size], 16).unwrap();
    if fuse {
        forward = fuse_attention(&forward).unwrap().graph;
    }
    let forward = autocast(&forward, precision).unwrap();
    differentiate(&forward, "loss").unwrap().graph
}

/// The checkpoint policies of the acceptance bound: none, every block, the global blocks (when
/// the model has any) and auto at a budget halfway between none's and every block's arena.
fn checkpointed_plans(cfg: &ModelConfig, graph: &Graph) -> Vec<(&'static str, Checkpointed)> {
    let base = 4 * graph.param_bytes() as u64; // parameters, gradients, two AdamW moments
    let none = apply_checkpointing(graph, &CheckpointPolicy::None, base).unwrap();
    let blocks = apply_checkpointing(graph, &CheckpointPolicy::Blocks, base).unwrap();
    let mid = base + (none.plan.arena_bytes + blocks.plan.arena_bytes) as u64 / 2;
    let auto = apply_checkpointing(graph, &CheckpointPolicy::Auto { budget_bytes: mid }, base).unwrap();
    let mut out = vec![("none", none), ("blocks", blocks), ("auto", auto)];
    let global: Vec<String> = cfg
        .global_block_indices()
        .into_iter()
        .map(|i| format!("backbone.net.blocks.{i}"))
        .collect();
    if !global.is_empty() {
        out.push((
            "global",
            apply_checkpointing(graph, &CheckpointPolicy::Scopes(global), base).unwrap(),
        ));
    }
    out
}

/// Plans every checkpoint policy of `preset` at `size` px in f32/f16, fused/unfused; prints
/// the arena over the bound with greedy-by-size best fit alone and with every heuristic, and
/// returns the worst of the latter.
fn checkpointed_ratios(preset: &str, attention: Option<AttentionStrategy>, size: usize) -> f64 {
    let mut cfg = ModelConfig::preset(preset).unwrap();
    cfg.image_size = size;
    if let Some(a) = attention {
        cfg.attention = a;
    }
    let mut worst = 1.0f64;
    for precision in [Precision::F32, Precision::F16] {
        for fuse in [true, false] {
            let graph = training_graph(&cfg, size, fuse, precision);
            for (policy, ck) in checkpointed_plans(&cfg, &graph) {
                let start = Instant::now();
                let plan = plan_memory(&ck.graph, &ck.order).unwrap();
                let planning = start.elapsed();
                plan.check(&ck.graph, &ck.order).unwrap();
                let by_size = plan_memory_with(&ck.graph, &ck.order, &[Placement::BestFitBySize]).unwrap();
                println!(
                    "{preset} {:?} {size}px {precision:?} fused={fuse} {policy}: bound {:.3} GiB, \
                     best-fit-by-size {:.4}, all heuristics {:.4} ({}, {:.0} ms)",
                    cfg.attention,
                    plan.lower_bound_bytes as f64 / (1u64 << 30) as f64,
                    by_size.ratio(),
                    plan.ratio(),
                    plan.placement.name(),
                    planning.as_secs_f64() * 1e3
                );
                worst = worst.max(plan.ratio());
            }
        }
    }
    worst
}

#[test]
fn checkpointed_training_graphs_plan_within_bound() {
    // vit-b at 1024 px with unfused attention, every block (or the global ones) recomputed: the
    // saved block inputs and the gradients live across the recomputed 768 MiB attention
    // logits, and greedy-by-size best fit left them above the logits (23-38% over the bound).
    let cfg = ModelConfig::preset("vit-b").unwrap();
    let graph = training_graph(&cfg, cfg.image_size, false, Precision::F32);
    for (policy, ck) in checkpointed_plans(&cfg, &graph) {
        let plan = plan_memory(&ck.graph, &ck.order).unwrap();
        plan.check(&ck.graph, &ck.order).unwrap();
        let by_size = plan_memory_with(&ck.graph, &ck.order, &[Placement::BestFitBySize]).unwrap();
        println!(
            "{policy}: best fit by size {:.4}, all heuristics {:.4} ({})",
            by_size.ratio(),
            plan.ratio(),
            plan.placement.name()
        );
        assert!(plan.ratio() <= RATIO_BOUND, "{policy}: ratio {:.4}", plan.ratio());
        assert!(plan.arena_bytes <= by_size.arena_bytes);
        if policy == "blocks" || policy == "global" {
            assert!(by_size.ratio() > 1.2, "the case this test guards has changed");
        }
    }
}

/// The full table at the presets' own image size and attention (asserted) and with global
/// attention (printed); minutes in a debug build:
/// `cargo test -p vitdet-passes --test memory -- --ignored --nocapture`.
#[test]
#[ignore]
fn checkpointed_training_graphs_of_every_preset_plan_within_bound() {
    let mut failures = Vec::new();
    for preset in vitdet_models::presets::NAMES {
        let size = ModelConfig::preset(preset).unwrap().image_size;
        let worst = checkpointed_ratios(preset, None, size);
        if worst > RATIO_BOUND {
            failures.push(format!("{preset}: {worst:.4}"));
        }
        // Global attention in every block, for information: the fused f16 graphs plan up to
        // 8% above the bound (the shared f16 bias and the kernel's per-step f32 copies of qkv
        // and of that bias leave holes none of the heuristics fills).
        checkpointed_ratios(preset, Some(AttentionStrategy::Global), size);
    }
    assert!(failures.is_empty(), "above {RATIO_BOUND}: {failures:?}");
}

#[test]
fn long_lived_buffers_between_short_spikes_pack_to_the_bound() {
    // Two long-lived buffers (steps 2..6 and 2..8) interleaved with three short, larger ones.
    // Greedy by size puts the spikes at the bottom, each at its own time, and the long-lived
    // buffers must then clear every spike they overlap: 21 units where 14 are ever live at
    // once. The skyline settles the long-lived ones first and reaches the bound.
    const UNIT: usize = 1024; // f32 elements: 4 KiB, so the 64-byte scalars are noise
    let spans = [(0, 1, 8), (1, 3, 6), (2, 6, 3), (2, 8, 4), (5, 6, 7)];
    let lifetimes: Vec<(usize, usize, usize)> = spans.iter().map(|&(f, l, u)| (f, l, u * UNIT)).collect();
    let (g, order) = graph_of_lifetimes(&lifetimes);
    let unit_bytes = 4 * UNIT;
    let by_size = plan_memory_with(&g, &order, &[Placement::BestFitBySize]).unwrap();
    by_size.check(&g, &order).unwrap();
    let plan = plan_and_check(&g, &order);
    println!(
        "best fit by size {} B, {} {} B, aligned bound {} B",
        by_size.arena_bytes,
        plan.placement.name(),
        plan.arena_bytes,
        plan.aligned_lower_bound_bytes
    );
    // The scalars and the input add at most a few 64-byte blocks to either figure.
    let slack = 4 * ALIGNMENT;
    assert!(by_size.arena_bytes >= 21 * unit_bytes, "{}", by_size.arena_bytes);
    assert!(plan.aligned_lower_bound_bytes <= 14 * unit_bytes + slack);
    assert_eq!(plan.arena_bytes, plan.aligned_lower_bound_bytes);
    assert_eq!(plan.placement, Placement::Skyline);
}

#[test]
fn plan_memory_with_no_strategy_is_an_error() {
    let (g, order) = graph_of_lifetimes(&[(0, 1, 16)]);
    assert!(matches!(plan_memory_with(&g, &order, &[]), Err(PlanError::NoPlacement)));
    // Each heuristic alone gives a valid plan.
    for p in Placement::ALL {
        let plan = plan_memory_with(&g, &order, &[p]).unwrap();
        plan.check(&g, &order).unwrap();
        assert_eq!(plan.placement, p);
    }
}
