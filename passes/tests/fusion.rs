//! The windowed-attention fusion pass, the fused op's kernels and its VJP.
//!
//! * Small hand-built attention graphs (the exact node pattern of `models/src/attention.rs`)
//!   in float64, with padding (5x7 tokens, 3x3 windows), for no rel term, the decomposed term
//!   and the BEiT bias, and the global (one-window, non-square) case: fused vs unfused outputs
//!   and parameter gradients, and the fused gradients against central finite differences.
//! * The kernels with tiny chunks (every chunking path) against the default chunking.
//! * The tiny backbones of both families and a detector inference graph, fused vs unfused in
//!   float32, outputs and (backbones) parameter gradients; the training graph fuses every block.
//! * Attention the pass does not recognize is left alone and reported.

use candle_core::{DType as CDType, Device, Tensor};
use vitdet_ir::ops::*;
use vitdet_ir::{DType, Graph, TensorType, Value};
use vitdet_models::{build_backbone, build_detector, build_detector_training, ModelConfig};
use vitdet_passes::{differentiate, fuse_attention};
use vitdet_runtime::{run, ParamStore};

mod common;
use common::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Rel {
    None,
    Decomposed,
    Bias,
}

#[derive(Clone, Copy, Debug)]
struct Spec {
    batch: usize,
    hw: [usize; 2],
    channels: usize,
    heads: usize,
    /// `None`: global attention over the whole grid.
    window: Option<usize>,
    rel: Rel,
    qkv_bias: bool,
}

/// A graph under construction with float64 trainable parameters.
struct Builder {
    g: Graph,
    dtype: DType,
    params: Vec<(String, Vec<usize>)>,
}

impl Builder {
    fn param(&mut self, name: &str, shape: &[usize]) -> Value {
        let p = Parameter {
            name: name.to_string(),
            ty: TensorType::new(self.dtype, shape.to_vec()),
            init: Init::Zeros,
            trainable: true,
        };
        self.params.push((name.to_string(), shape.to_vec()));
        self.g.add(p, "blk", &[]).unwrap()
    }
    fn op(&mut self, scope: &str, op: impl Into<Op>, ins: &[Value]) -> Value {
        self.g.add(op, scope, ins).unwrap()
    }
    fn reshape(&mut self, scope: &str, x: Value, shape: &[usize]) -> Value {
        self.op(scope, Reshape { shape: shape.to_vec() }, &[x])
    }
    fn permute(&mut self, scope: &str, x: Value, perm: &[usize]) -> Value {
        self.op(scope, Permute { perm: perm.to_vec() }, &[x])
    }
    fn matmul(&mut self, scope: &str, a: Value, b: Value, transpose_rhs: bool) -> Value {
        self.op(scope, MatMul::new(transpose_rhs), &[a, b])
    }
    fn add(&mut self, scope: &str, a: Value, b: Value) -> Value {
        self.op(scope, Binary { kind: BinaryKind::Add }, &[a, b])
    }
}

const ATTN: &str = "blk.attn";

/// The attention block exactly as `models/src/attention.rs` and `vit.rs` emit it, on a token
/// parameter `x [B, H, W, C]`; output `y`, and the output's use by a loss `sum(y * r)`.
/// `extra_probs_output` also exposes the probabilities (a pattern the pass must not fuse).
fn attention_graph(s: Spec, extra_probs_output: bool) -> (Graph, Vec<(String, Vec<usize>)>) {
    attention_graph_typed(s, extra_probs_output, DType::F64)
}

fn attention_graph_typed(s: Spec, extra_probs_output: bool, dtype: DType) -> (Graph, Vec<(String, Vec<usize>)>) {
    let mut b = Builder {
        g: Graph::new(),
        dtype,
        params: Vec::new(),
    };
    let [hh, ww] = s.hw;
    let c = s.channels;
    let x0 = b.param("x", &[s.batch, hh, ww, c]);
    let (xw, [h, w], bw, win) = match s.window {
        Some(ws) => {
            let (ph, pw) = ((ws - hh % ws) % ws, (ws - ww % ws) % ws);
            let (hp, wp) = (hh + ph, ww + pw);
            let x = b.op(
                "blk",
                Pad {
                    pads: vec![[0, 0], [0, ph], [0, pw], [0, 0]],
                },
                &[x0],
            );
            let x = b.reshape("blk", x, &[s.batch, hp / ws, ws, wp / ws, ws, c]);
            let x = b.permute("blk", x, &[0, 1, 3, 2, 4, 5]);
            let bw = s.batch * (hp / ws) * (wp / ws);
            let x = b.reshape("blk", x, &[bw, ws, ws, c]);
            (x, [ws, ws], bw, Some((ws, hp, wp)))
        }
        None => (x0, [hh, ww], s.batch, None),
    };
    let heads = s.heads;
    let (n, hd, bh) = (h * w, c / heads, bw * heads);
    let wq = b.param("qkv.weight", &[3 * c, c]);
    let mut ins = vec![xw, wq];
    if s.qkv_bias {
        ins.push(b.param("qkv.bias", &[3 * c]));
    }
    let qkv = b.op("blk.attn.qkv", Linear {}, &ins);
    let qkv = b.reshape(ATTN, qkv, &[bw, n, 3, heads, hd]);
    let qkv = b.permute(ATTN, qkv, &[2, 0, 3, 1, 4]);
    let qkv = b.reshape(ATTN, qkv, &[3, bh, n, hd]);
    let mut parts = Vec::new();
    for i in 0..3 {
        let t = b.op(
            ATTN,
            Slice {
                axis: 0,
                start: i,
                end: i + 1,
            },
            &[qkv],
        );
        parts.push(b.reshape(ATTN, t, &[bh, n, hd]));
    }
    let (q, k, v) = (parts[0], parts[1], parts[2]);
    let qs = b.op(
        ATTN,
        Affine {
            mul: (hd as f64).powf(-0.5),
            add: 0.0,
        },
        &[q],
    );
    let mut attn = b.matmul(ATTN, qs, k, true);
    match s.rel {
        Rel::None => {}
        Rel::Bias => {
            let table = b.param("rel_table", &[(2 * h - 1) * (2 * w - 1), heads]);
            let bias = b.op("blk.bias", RelPosBias { window: [h, w] }, &[table]);
            let a = b.reshape(ATTN, attn, &[bw, heads, n, n]);
            let a = b.add(ATTN, a, bias);
            attn = b.reshape(ATTN, a, &[bh, n, n]);
        }
        Rel::Decomposed => {
            let th = b.param("rel_pos_h", &[2 * h - 1, hd]);
            let tw = b.param("rel_pos_w", &[2 * w - 1, hd]);
            let rh = b.op(ATTN, RelPosGather { q_size: h, k_size: h }, &[th]);
            let rw = b.op(ATTN, RelPosGather { q_size: w, k_size: w }, &[tw]);
            let rq = b.reshape(ATTN, q, &[bh, h, w, hd]);
            let qh = b.permute(ATTN, rq, &[1, 0, 2, 3]);
            let qh = b.reshape(ATTN, qh, &[h, bh * w, hd]);
            let relh = b.matmul(ATTN, qh, rh, true);
            let relh = b.reshape(ATTN, relh, &[h, bh, w, h]);
            let relh = b.permute(ATTN, relh, &[1, 0, 2, 3]);
            let relh = b.reshape(ATTN, relh, &[bh, h, w, h, 1]);
            let qw = b.permute(ATTN, rq, &[2, 0, 1, 3]);
            let qw = b.reshape(ATTN, qw, &[w, bh * h, hd]);
            let relw = b.matmul(ATTN, qw, rw, true);
            let relw = b.reshape(ATTN, relw, &[w, bh, h, w]);
            let relw = b.permute(ATTN, relw, &[1, 2, 0, 3]);
            let relw = b.reshape(ATTN, relw, &[bh, h, w, 1, w]);
            let a = b.reshape(ATTN, attn, &[bh, h, w, h, w]);
            let a = b.add(ATTN, a, relh);
            let a = b.add(ATTN, a, relw);
            attn = b.reshape(ATTN, a, &[bh, n, n]);
        }
    }
    let probs = b.op(ATTN, Softmax { axis: 2 }, &[attn]);
    let out = b.matmul(ATTN, probs, v, false);
    let out = b.reshape(ATTN, out, &[bw, heads, h, w, hd]);
    let out = b.permute(ATTN, out, &[0, 2, 3, 1, 4]);
    let out = b.reshape(ATTN, out, &[bw, h, w, c]);
    let wp_ = b.param("proj.weight", &[c, c]);
    let bp = b.param("proj.bias", &[c]);
    let mut y = b.op("blk.attn.proj", Linear {}, &[out, wp_, bp]);
    if let Some((ws, hp, wp)) = win {
        let t = b.reshape("blk", y, &[s.batch, hp / ws, wp / ws, ws, ws, c]);
        let t = b.permute("blk", t, &[0, 1, 3, 2, 4, 5]);
        y = b.reshape("blk", t, &[s.batch, hp, wp, c]);
        if hp != hh {
            y = b.op(
                "blk",
                Slice {
                    axis: 1,
                    start: 0,
                    end: hh,
                },
                &[y],
            );
        }
        if wp != ww {
            y = b.op(
                "blk",
                Slice {
                    axis: 2,
                    start: 0,
                    end: ww,
                },
                &[y],
            );
        }
    }
    let r = b.g.add(
        Input {
            name: "probe".into(),
            ty: TensorType::new(dtype, vec![s.batch, hh, ww, c]),
        },
        "loss",
        &[],
    );
    let r = r.unwrap();
    let prod = b.op("loss", Binary { kind: BinaryKind::Mul }, &[y, r]);
    let loss = b.op(
        "loss",
        ReduceSum {
            axes: vec![0, 1, 2, 3],
            keepdim: false,
        },
        &[prod],
    );
    b.g.set_output("y", y);
    b.g.set_output("loss", loss);
    if extra_probs_output {
        b.g.set_output("probs", probs);
    }
    (b.g, b.params)
}

fn tensor(data: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(CDType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `|a - b|_2 / |b|_2`.
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (values(a), values(b));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

fn random_store(params: &[(String, Vec<usize>)], rng: &mut Rng) -> Vec<(String, Vec<usize>, Vec<f64>)> {
    params
        .iter()
        .map(|(n, s)| {
            let vals = rng.normal(s.iter().product()).into_iter().map(|v| 0.5 * v).collect();
            (n.clone(), s.clone(), vals)
        })
        .collect()
}

fn store(p: &[(String, Vec<usize>, Vec<f64>)]) -> ParamStore {
    ParamStore::from_tensors(p.iter().map(|(n, s, v)| (n.clone(), tensor(v.clone(), s))))
}

fn check_small(spec: Spec, seed: u64) {
    let (unfused, params) = attention_graph(spec, false);
    let fused = fuse_attention(&unfused).unwrap();
    assert_eq!(fused.report.fused, 1, "{spec:?}: {:?}", fused.report);
    assert!(fused.report.unmatched.is_empty());
    let block = &fused.report.blocks[0];
    assert_eq!(block.scope, ATTN);
    assert_eq!(block.window, spec.window.unwrap_or(spec.hw[0]));
    let ops: Vec<&str> = fused
        .graph
        .graph
        .node_indices()
        .map(|i| fused.graph.node(i).op.name())
        .collect();
    assert!(ops.contains(&"window_attention"));
    for gone in ["softmax", "matmul", "pad", "permute"] {
        assert!(!ops.contains(&gone), "{spec:?}: {gone} left in the fused graph");
    }

    let mut rng = Rng(seed);
    let p = random_store(&params, &mut rng);
    let [h, w] = spec.hw;
    let probe = tensor(
        rng.normal(spec.batch * h * w * spec.channels),
        &[spec.batch, h, w, spec.channels],
    );
    let inputs = [("probe", probe)];
    let dev = Device::Cpu;

    // Forward: float64, so the two differ only by reassociation (~1e-15 relative).
    let yu = run(&unfused, &store(&p), &inputs, &dev).unwrap();
    let yf = run(&fused.graph, &store(&p), &inputs, &dev).unwrap();
    let err = rel_l2(yf.get("y").unwrap(), yu.get("y").unwrap());
    assert!(err < 1e-12, "{spec:?}: forward relative error {err:.2e}");

    // Gradients of every parameter (tokens, qkv, proj, rel tables) vs the unfused autodiff.
    let du = differentiate(&unfused, "loss").unwrap();
    let df = differentiate(&fused.graph, "loss").unwrap();
    assert!(df.unreached.is_empty(), "{:?}", df.unreached);
    let gu = run(&du.graph, &store(&p), &inputs, &dev).unwrap();
    let gf = run(&df.graph, &store(&p), &inputs, &dev).unwrap();
    for (name, _) in &params {
        let k = format!("grad/{name}");
        let err = rel_l2(gf.get(&k).unwrap(), gu.get(&k).unwrap());
        assert!(err < 1e-11, "{spec:?}: gradient of {name}: relative error {err:.2e}");
    }

    // And against central finite differences of the fused forward (h = 1e-5 in float64:
    // truncation ~1e-10, rounding ~1e-11 relative; a wrong rule is off by O(1)).
    let loss_at = |p: &[(String, Vec<usize>, Vec<f64>)]| {
        values(
            run(&fused.graph, &store(p), &inputs, &dev)
                .unwrap()
                .get("loss")
                .unwrap(),
        )[0]
    };
    for (i, (name, _)) in params.iter().enumerate() {
        let g = values(gf.get(&format!("grad/{name}")).unwrap());
        let dir = rng.normal(g.len());
        let analytic: f64 = g.iter().zip(&dir).map(|(a, b)| a * b).sum();
        let shifted = |hs: f64| {
            let mut q = p.clone();
            for (x, d) in q[i].2.iter_mut().zip(&dir) {
                *x += hs * d;
            }
            loss_at(&q)
        };
        let numeric = (shifted(1e-5) - shifted(-1e-5)) / 2e-5;
        let err = (analytic - numeric).abs() / (analytic.abs() + numeric.abs() + 1e-8);
        assert!(
            err < 1e-6,
            "{spec:?}: {name}: analytic {analytic} vs numeric {numeric} ({err:.2e})"
        );
    }
}

const PADDED: Spec = Spec {
    batch: 1,
    hw: [5, 7],
    channels: 8,
    heads: 2,
    window: Some(3),
    rel: Rel::None,
    qkv_bias: true,
};

#[test]
fn padded_windows_without_rel_term() {
    check_small(PADDED, 1);
    check_small(
        Spec {
            qkv_bias: false,
            batch: 2,
            ..PADDED
        },
        2,
    );
}

#[test]
fn padded_windows_with_decomposed_rel_pos() {
    check_small(
        Spec {
            rel: Rel::Decomposed,
            ..PADDED
        },
        3,
    );
}

#[test]
fn padded_windows_with_beit_bias() {
    check_small(
        Spec {
            rel: Rel::Bias,
            batch: 2,
            ..PADDED
        },
        4,
    );
}

#[test]
fn global_non_square_grid() {
    for (i, rel) in [Rel::None, Rel::Decomposed, Rel::Bias].into_iter().enumerate() {
        check_small(
            Spec {
                window: None,
                rel,
                ..PADDED
            },
            10 + i as u64,
        );
    }
}

/// Every chunking path (several windows per chunk, one window, a divisor of the heads) gives
/// the default's results: the chunks only regroup independent rows, so float64 agrees to
/// rounding.
#[test]
fn kernels_agree_across_chunk_sizes() {
    use vitdet_runtime::kernels::window_attention::{window_attention_grad_with, window_attention_with, KernelOptions};
    let mut rng = Rng(7);
    for rel in [WindowRelPos::None, WindowRelPos::Decomposed, WindowRelPos::Bias] {
        let (b, h, w, heads, hd, ws) = (2, 5, 7, 4, 3, 3);
        let c = heads * hd;
        let op = WindowAttention {
            heads,
            window: [ws, ws],
            scale: 0.6,
            rel_pos: rel,
            qkv_bias: true,
        };
        let n = ws * ws;
        let mut x = vec![
            tensor(rng.normal(b * h * w * 3 * c), &[b, h, w, 3 * c]),
            tensor(rng.normal(3 * c), &[3 * c]),
        ];
        match rel {
            WindowRelPos::None => {}
            WindowRelPos::Decomposed => {
                x.push(tensor(rng.normal(n * hd), &[ws, ws, hd]));
                x.push(tensor(rng.normal(n * hd), &[ws, ws, hd]));
            }
            WindowRelPos::Bias => x.push(tensor(rng.normal(heads * n * n), &[heads, n, n])),
        }
        let opts = |chunk_bytes, portable| KernelOptions { chunk_bytes, portable };
        let full = window_attention_with(&op, &x, opts(1 << 30, false)).unwrap();
        let mut gx = x.clone();
        gx.extend(full.iter().cloned());
        gx.push(tensor(rng.normal(b * h * w * c), &[b, h, w, c]));
        let gfull = window_attention_grad_with(&op.grad(), &gx, opts(1 << 30, false)).unwrap();
        // Logit bytes per window-head: 9 * 9 * 8 = 648; budgets of 2 windows, 1 head, 2 heads,
        // and the portable (candle-op) epilogue.
        for (bytes, portable) in [
            (2 * heads * 648, false),
            (648, false),
            (2 * 648, false),
            (1 << 30, true),
            (648, true),
        ] {
            let o = opts(bytes, portable);
            let part = window_attention_with(&op, &x, o).unwrap();
            for (a, e) in part.iter().zip(&full) {
                assert!(rel_l2(a, e) < 1e-14, "{rel:?} {bytes}: forward");
            }
            let gpart = window_attention_grad_with(&op.grad(), &gx, o).unwrap();
            for (a, e) in gpart.iter().zip(&gfull) {
                assert!(rel_l2(a, e) < 1e-13, "{rel:?} {bytes}: backward");
            }
        }
    }
}

#[test]
fn unrecognized_attention_is_left_alone_and_reported() {
    let (g, _) = attention_graph(PADDED, true);
    let fused = fuse_attention(&g).unwrap();
    assert_eq!(fused.report.fused, 0);
    assert_eq!(fused.report.unmatched.len(), 1);
    let u = &fused.report.unmatched[0];
    assert_eq!(u.scope, ATTN);
    assert!(
        u.reason.contains("graph output") || u.reason.contains("other uses"),
        "{}",
        u.reason
    );
    assert_eq!(fused.graph.graph.node_count(), g.graph.node_count());
    assert_eq!(fused.graph.dump().unwrap(), g.dump().unwrap());
}

/// A query scale with an offset is not detectron2's attention: not fused, and said why.
#[test]
fn attention_with_an_unexpected_op_is_reported() {
    let (mut g, _) = attention_graph(
        Spec {
            rel: Rel::Decomposed,
            ..PADDED
        },
        false,
    );
    let affine = g
        .graph
        .node_indices()
        .find(|&i| matches!(g.node(i).op, Op::Affine(_)))
        .unwrap();
    g.graph[affine].op = Op::Affine(Affine { mul: 0.5, add: 0.1 });
    g.verify().unwrap();
    let fused = fuse_attention(&g).unwrap();
    assert_eq!(fused.report.fused, 0);
    let u = &fused.report.unmatched;
    assert_eq!(u.len(), 1);
    assert!(u[0].reason.contains("query scale"), "{}", u[0].reason);
    assert_eq!(fused.graph.dump().unwrap(), g.dump().unwrap());
}

/// Random parameters for a preset graph, with the (zero-initialized) relative-position tables
/// made random too and the qkv weights enlarged (the default init's 0.02 std makes nearly
/// uniform attention), so that every term of the logits matters.
fn preset_params(graph: &Graph) -> ParamStore {
    let dev = Device::Cpu;
    let mut p = ParamStore::init_random(graph, 5, &dev).unwrap();
    let mut rng = Rng(99);
    for (_, decl) in graph.parameters() {
        let std = if decl.name.contains("rel_pos") || decl.name.contains("relative_position") {
            0.3
        } else if decl.name.ends_with("attn.qkv.weight") {
            0.2
        } else {
            continue;
        };
        {
            let vals: Vec<f32> = rng
                .normal(decl.ty.numel())
                .into_iter()
                .map(|v| (std * v) as f32)
                .collect();
            p.insert(
                decl.name.clone(),
                Tensor::from_vec(vals, decl.ty.shape.as_slice(), &dev).unwrap(),
            );
        }
    }
    p
}

fn image(cfg: &ModelConfig) -> Tensor {
    let s = cfg.image_size;
    let vals: Vec<f32> = Rng(3).normal(3 * s * s).into_iter().map(|v| v as f32).collect();
    Tensor::from_vec(vals, (1, 3, s, s), &Device::Cpu).unwrap()
}

/// Float32 tolerances: the fused op computes the same sums in another association (softmax
/// via the log-sum-exp, q/k/v for padded tokens from the bias): ~1e-7 per op, grown to ~1e-6
/// through the blocks and pyramid; 1e-5 leaves a margin while a wrong window, head or rel term
/// is off by O(1).
const F32_FORWARD: f64 = 1e-5;
/// Gradients sum over every position of the batch, and the backward doubles the depth.
const F32_GRADIENT: f64 = 1e-4;

fn check_backbone(preset: &str) {
    let cfg = ModelConfig::preset(preset).unwrap();
    let mut graph = build_backbone(&cfg).unwrap();
    let fused = fuse_attention(&graph).unwrap();
    assert_eq!(fused.report.fused, cfg.depth, "{preset}: {:?}", fused.report.unmatched);
    assert!(fused.report.unmatched.is_empty());
    for b in &fused.report.blocks {
        assert!(b.saved_activation_bytes > 0, "{preset}: {b:?}");
    }
    let params = preset_params(&graph);
    let img = image(&cfg);
    let dev = Device::Cpu;
    let yu = run(&graph, &params, &[("image", img.clone())], &dev).unwrap();
    let yf = run(&fused.graph, &params, &[("image", img.clone())], &dev).unwrap();
    for (name, t) in &yu.outputs {
        let err = rel_l2(yf.get(name).unwrap(), t);
        assert!(err < F32_FORWARD, "{preset} {name}: relative error {err:.2e}");
    }

    // loss = sum_k sum(p_k * r_k), then the parameter gradients of both graphs.
    let mut rng = Rng(11);
    let mut probes = Vec::new();
    let mut add_loss = |g: &mut Graph, probes: &mut Vec<(String, Tensor)>, fill: bool| {
        let outs: Vec<_> = g.outputs.iter().map(|o| (o.name.clone(), o.value)).collect();
        let mut loss: Option<Value> = None;
        for (i, (name, v)) in outs.into_iter().enumerate() {
            let shape = g.value_type(v).shape.clone();
            let pname = format!("probe.{name}");
            if fill {
                let vals: Vec<f32> = rng
                    .normal(shape.iter().product())
                    .into_iter()
                    .map(|x| x as f32)
                    .collect();
                probes.push((pname.clone(), Tensor::from_vec(vals, shape.as_slice(), &dev).unwrap()));
            }
            let r = g
                .add(
                    Input {
                        name: pname,
                        ty: TensorType::new(DType::F32, shape.clone()),
                    },
                    "loss",
                    &[],
                )
                .unwrap();
            let prod = g.add(Binary { kind: BinaryKind::Mul }, "loss", &[v, r]).unwrap();
            let s = g
                .add(
                    ReduceSum {
                        axes: (0..shape.len()).collect(),
                        keepdim: false,
                    },
                    "loss",
                    &[prod],
                )
                .unwrap();
            loss = Some(match (loss, i) {
                (Some(l), _) => g.add(Binary { kind: BinaryKind::Add }, "loss", &[l, s]).unwrap(),
                (None, _) => s,
            });
        }
        g.set_output("loss", loss.unwrap());
    };
    add_loss(&mut graph, &mut probes, true);
    let mut fgraph = fused.graph.clone();
    add_loss(&mut fgraph, &mut probes, false);
    let mut inputs: Vec<(&str, Tensor)> = vec![("image", img)];
    inputs.extend(probes.iter().map(|(n, t)| (n.as_str(), t.clone())));
    let du = differentiate(&graph, "loss").unwrap();
    let df = differentiate(&fgraph, "loss").unwrap();
    assert_eq!(du.gradients, df.gradients);
    let gu = run(&du.graph, &params, &inputs, &dev).unwrap();
    let gf = run(&df.graph, &params, &inputs, &dev).unwrap();
    let mut worst = (0.0, String::new());
    for (_, out) in &du.gradients {
        let err = rel_l2(gf.get(out).unwrap(), gu.get(out).unwrap());
        if err > worst.0 {
            worst = (err, out.clone());
        }
    }
    eprintln!("{preset}: worst gradient relative error {:.2e} ({})", worst.0, worst.1);
    assert!(
        worst.0 < F32_GRADIENT,
        "{preset}: {} relative error {:.2e}",
        worst.1,
        worst.0
    );
}

#[test]
fn vitdet_tiny_backbone_fused_matches_unfused() {
    check_backbone("vitdet-tiny");
}

#[test]
fn vit_tiny_backbone_fused_matches_unfused() {
    check_backbone("vit-tiny");
}

#[test]
fn detector_inference_graphs_fused_match_unfused() {
    for preset in ["vit-tiny", "vitdet-tiny"] {
        check_detector(preset);
    }
}

fn check_detector(preset: &str) {
    let cfg = ModelConfig::preset(preset).unwrap();
    let graph = build_detector(&cfg).unwrap();
    let fused = fuse_attention(&graph).unwrap();
    assert_eq!(fused.report.fused, cfg.depth);
    let params = preset_params(&graph);
    let img = image(&cfg);
    let dev = Device::Cpu;
    let yu = run(&graph, &params, &[("image", img.clone())], &dev).unwrap();
    let yf = run(&fused.graph, &params, &[("image", img)], &dev).unwrap();
    for (name, t) in &yu.outputs {
        let f = yf.get(name).unwrap();
        assert_eq!(f.dims(), t.dims(), "{name}");
        if t.dtype().is_float() && t.elem_count() > 0 {
            let err = rel_l2(f, t);
            assert!(err < F32_FORWARD, "{preset} {name}: relative error {err:.2e}");
        } else {
            assert_eq!(values(f), values(t), "{preset} {name}");
        }
    }
}

#[test]
fn training_graph_fuses_every_block() {
    for preset in ["vitdet-tiny", "vit-tiny"] {
        let cfg = ModelConfig::preset(preset).unwrap();
        let graph = build_detector_training(&cfg, [cfg.image_size, cfg.image_size], 4).unwrap();
        let fused = fuse_attention(&graph).unwrap();
        assert_eq!(fused.report.fused, cfg.depth, "{preset}: {:?}", fused.report.unmatched);
        let saved: u64 = fused.report.blocks.iter().map(|b| b.saved_activation_bytes).sum();
        assert!(saved > 0);
        let loss = vitdet_models::LOSS_NAMES.last().unwrap();
        let diff = differentiate(&fused.graph, loss).unwrap();
        diff.graph.verify().unwrap();
        assert!(diff.unreached.is_empty() || !diff.unreached.iter().any(|p| p.contains("attn")));
    }
}

/// Timing of one ViT-B-size attention block (64x64 tokens, 768 channels, 12 heads, 14x14
/// windows with padding, decomposed rel pos; and the global case), unfused vs fused, forward
/// and forward + backward, in float32. Not a test: run with
/// `cargo test -p vitdet-passes --test fusion -- --ignored --nocapture vit_b_block_timing`.
#[test]
#[ignore]
fn vit_b_block_timing() {
    let dev = Device::Cpu;
    for window in [Some(14), None] {
        let spec = Spec {
            batch: 1,
            hw: [64, 64],
            channels: 768,
            heads: 12,
            window,
            rel: Rel::Decomposed,
            qkv_bias: true,
        };
        let (unfused, params) = attention_graph_typed(spec, false, DType::F32);
        let fused = fuse_attention(&unfused).unwrap();
        assert_eq!(fused.report.fused, 1);
        let mut rng = Rng(1);
        let store = ParamStore::from_tensors(params.iter().map(|(n, s)| {
            let vals: Vec<f32> = rng
                .normal(s.iter().product())
                .into_iter()
                .map(|v| (0.05 * v) as f32)
                .collect();
            (n.clone(), Tensor::from_vec(vals, s.as_slice(), &dev).unwrap())
        }));
        let probe: Vec<f32> = rng.normal(64 * 64 * 768).into_iter().map(|v| v as f32).collect();
        let inputs = [("probe", Tensor::from_vec(probe, (1, 64, 64, 768), &dev).unwrap())];
        let time = |g: &Graph| {
            run(g, &store, &inputs, &dev).unwrap(); // warm-up
            let t = std::time::Instant::now();
            let out = run(g, &store, &inputs, &dev).unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let mut ops: Vec<_> = out.op_seconds.iter().filter(|(_, &s)| s > 0.05).collect();
            ops.sort_by(|a, b| b.1.total_cmp(a.1));
            eprintln!("  {ms:.0} ms: {ops:.2?}");
            (ms, out.peak_live_bytes as f64 / (1 << 20) as f64)
        };
        let du = differentiate(&unfused, "loss").unwrap().graph;
        let df = differentiate(&fused.graph, "loss").unwrap().graph;
        let (fu, ff, bu, bf) = (time(&unfused), time(&fused.graph), time(&du), time(&df));
        eprintln!(
            "{}: forward unfused {:.0} ms ({:.0} MiB peak) fused {:.0} ms ({:.0} MiB); fwd+bwd unfused {:.0} ms ({:.0} MiB) fused {:.0} ms ({:.0} MiB); saved {:.1} MiB",
            if window.is_some() { "window 14" } else { "global" },
            fu.0, fu.1, ff.0, ff.1, bu.0, bu.1, bf.0, bf.1,
            fused.report.blocks[0].saved_activation_bytes as f64 / (1 << 20) as f64
        );
    }
}

/// The activation bytes the fusion saves in the ViT-B training graphs at 1024x1024 (not a
/// test: `cargo test -p vitdet-passes --test fusion -- --ignored --nocapture saved_bytes`).
#[test]
#[ignore]
fn saved_bytes_of_base_training_graphs() {
    for preset in ["vitdet-b", "vit-b"] {
        let cfg = ModelConfig::preset(preset).unwrap();
        let graph = build_detector_training(&cfg, [cfg.image_size, cfg.image_size], 8).unwrap();
        let t = std::time::Instant::now();
        let fused = fuse_attention(&graph).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let saved: u64 = fused.report.blocks.iter().map(|b| b.saved_activation_bytes).sum();
        eprintln!(
            "{preset}: fused {} blocks in {ms:.0} ms, saved {:.1} MiB ({:?})",
            fused.report.fused,
            saved as f64 / (1 << 20) as f64,
            fused
                .report
                .blocks
                .iter()
                .map(|b| (b.window, b.windows, b.saved_activation_bytes >> 20))
                .collect::<Vec<_>>()
        );
    }
}

/// Forward and training-step timing of the tiny backbones, unfused vs fused (not a test:
/// `cargo test -p vitdet-passes --test fusion -- --ignored --nocapture tiny_backbone_timing`).
#[test]
#[ignore]
fn tiny_backbone_timing() {
    let dev = Device::Cpu;
    for preset in ["vitdet-tiny", "vit-tiny"] {
        let cfg = ModelConfig::preset(preset).unwrap();
        let mut graph = build_backbone(&cfg).unwrap();
        let outs: Vec<Value> = graph.outputs.iter().map(|o| o.value).collect();
        let mut total: Option<Value> = None;
        for v in outs {
            let axes = (0..graph.value_type(v).rank()).collect();
            let s = graph.add(ReduceSum { axes, keepdim: false }, "loss", &[v]).unwrap();
            total = Some(match total {
                Some(t) => graph.add(Binary { kind: BinaryKind::Add }, "loss", &[t, s]).unwrap(),
                None => s,
            });
        }
        graph.set_output("loss", total.unwrap());
        let fused = fuse_attention(&graph).unwrap().graph;
        let params = preset_params(&graph);
        let inputs = [("image", image(&cfg))];
        let time = |g: &Graph| {
            run(g, &params, &inputs, &dev).unwrap();
            let t = std::time::Instant::now();
            for _ in 0..5 {
                run(g, &params, &inputs, &dev).unwrap();
            }
            t.elapsed().as_secs_f64() * 1e3 / 5.0
        };
        let (du, df) = (
            differentiate(&graph, "loss").unwrap().graph,
            differentiate(&fused, "loss").unwrap().graph,
        );
        eprintln!(
            "{preset}: forward unfused {:.1} ms fused {:.1} ms; fwd+bwd unfused {:.1} ms fused {:.1} ms",
            time(&graph),
            time(&fused),
            time(&du),
            time(&df)
        );
    }
}
