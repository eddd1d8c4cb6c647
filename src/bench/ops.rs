//! `vitdet bench --ops`: the hot ops of ViTDet-B at 1024x1024, each run alone through the
//! runtime's kernels (`kernels::execute`, so a CUDA tensor takes the CUDA kernels the runtime
//! dispatches to) on random inputs, timed with synchronization.
//!
//! The shapes are those of one 1024x1024 image: 64x64 = 4096 tokens of 768 channels, 12 heads of
//! 64, 14x14 windows (the grid padded to 70x70: 25 windows) with detectron2's decomposed
//! relative positions, the global blocks as one 64x64 window (fused, and the eager form's window
//! partition copy, relative-position adds and global q @ k^T), the simple feature pyramid's
//! convolutions at 256x256 (P2) and its 2x2 deconvolution at 64x64, and the RPN's top-2000 of the
//! 196,608 P2 anchor scores. `scale` divides every size (the head count stays 12) so the table
//! also runs on a CPU in seconds.
//!
//! [`cases`] is the single source of the op list: `--list` prints it as JSON, and
//! `scripts/gpu/torch_ops.py` reads that to time the same shapes in PyTorch.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vitdet_ir::ops::{
    Binary, BinaryKind, Conv2d, Conv2dGradWeight, ConvTranspose2d, LayerNorm, Linear, MatMul, Permute, Softmax, TopK,
    WindowAttention, WindowRelPos,
};
use vitdet_ir::{DType, Op, TensorType};
use vitdet_runtime::{kernels, Device, Tensor};

use super::timer::{time_calls, Timing};

/// One input of a case: its type and the standard deviation of its random values.
#[derive(Clone, Debug, Serialize)]
pub struct InputSpec {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub std: f32,
}

/// One row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct OpCase {
    /// Row name, e.g. `linear_qkv`.
    pub name: &'static str,
    /// The shapes in words, e.g. `[4096,768] x [768,2304] + bias`.
    pub shape: String,
    pub dtype: DType,
    /// The IR op with its attributes (serialized with its `op` tag).
    pub op: Op,
    /// The op's inputs in order. For `window_attention_grad` the forward's outputs `out` and
    /// `lse` are computed by running the forward once, not drawn at random (`std` 0).
    pub inputs: Vec<InputSpec>,
    /// The op's floating-point operations (the IR's cost rules).
    pub flops: u64,
    /// Bytes of the op's inputs and outputs: what a memory-bound kernel must move at least.
    pub bytes: u64,
}

/// The sizes of the table at one scale.
struct Dims {
    /// Token grid side (64 at 1024 px, patch 16).
    side: usize,
    heads: usize,
    head_dim: usize,
    window: usize,
    /// Pyramid channels and P2's side.
    fpn: usize,
    p2: usize,
    anchors: usize,
    top_k: usize,
}

impl Dims {
    fn new(scale: usize) -> Dims {
        let div = |x: usize| (x / scale).max(1);
        Dims {
            side: div(64),
            heads: 12,
            head_dim: div(64),
            window: 14usize.div_ceil(scale),
            fpn: div(256),
            p2: div(256),
            anchors: div(196_608),
            top_k: div(2000),
        }
    }

    fn channels(&self) -> usize {
        self.heads * self.head_dim
    }

    fn tokens(&self) -> usize {
        self.side * self.side
    }
}

fn dims_text(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(","))
}

/// The table's rows at `scale` (1: ViTDet-B at 1024x1024) in `dtype`.
pub fn cases(scale: usize, dtype: DType) -> Result<Vec<OpCase>> {
    if scale == 0 {
        bail!("--scale must be at least 1");
    }
    let d = Dims::new(scale);
    let (t, c, hd) = (d.tokens(), d.channels(), d.head_dim);
    let ty = |shape: &[usize]| TensorType::new(dtype, shape.to_vec());
    let mut out = Vec::new();
    let mut push = |name: &'static str, shape: String, op: Op, inputs: Vec<(TensorType, f32)>| -> Result<()> {
        out.push(case(name, shape, op, inputs).with_context(|| format!("op table row `{name}`"))?);
        Ok(())
    };

    for (name, width) in [("linear_qkv", 3 * c), ("linear_fc1", 4 * c)] {
        push(
            name,
            format!("[{t},{c}] x [{c},{width}] + bias"),
            Linear {}.into(),
            vec![(ty(&[t, c]), 1.0), (ty(&[width, c]), 0.03), (ty(&[width]), 0.02)],
        )?;
    }

    let attention = |window: usize| WindowAttention {
        heads: d.heads,
        window: [window, window],
        scale: (hd as f64).powf(-0.5),
        rel_pos: WindowRelPos::Decomposed,
        qkv_bias: true,
    };
    for (name, grad_name, window) in [
        ("attention_window", "attention_window_grad", d.window),
        ("attention_global", "attention_global_grad", d.side),
    ] {
        let op = attention(window);
        let padded = d.side.div_ceil(window) * window;
        let n_windows = (padded / window).pow(2);
        let windows = if n_windows == 1 {
            format!("one {padded}x{padded} window")
        } else {
            format!("window {window}: {n_windows} windows on {padded}x{padded}")
        };
        let what = format!(
            "qkv [1,{s},{s},{q}], {h} heads x {hd}, {windows}, decomposed rel-pos",
            s = d.side,
            q = 3 * c,
            h = d.heads,
        );
        let forward = vec![
            (ty(&[1, d.side, d.side, 3 * c]), 1.0),
            (ty(&[3 * c]), 0.02),
            (ty(&[window, window, hd]), 0.1),
            (ty(&[window, window, hd]), 0.1),
        ];
        let lse = TensorType::new(vitdet_ir::ops::lse_dtype(dtype), [n_windows, d.heads, window * window]);
        let out_ty = ty(&[1, d.side, d.side, c]);
        let mut backward = forward.clone();
        backward.extend([(out_ty.clone(), 0.0), (lse, 0.0), (out_ty, 1.0)]);
        push(name, what.clone(), op.clone().into(), forward)?;
        push(grad_name, what, op.grad().into(), backward)?;
    }

    // Attention as eager code runs it (the unfused graph, detectron2's module): the windows cut
    // out of the padded grid by a copy, the decomposed term's broadcast adds over the windows'
    // [heads, q, q, k, k] logits, and the global block's q @ k^T.
    let (window, side) = (d.window, d.side);
    let per_side = side.div_ceil(window);
    push(
        "window_partition",
        format!("[1,{per_side},{window},{per_side},{window},{c}] -> windows-first copy"),
        Permute {
            perm: vec![0, 1, 3, 2, 4, 5],
        }
        .into(),
        vec![(ty(&[1, per_side, window, per_side, window, c]), 1.0)],
    )?;
    for (name, w, batch) in [
        ("rel_pos_add_window", window, per_side * per_side * d.heads),
        ("rel_pos_add_global", side, d.heads),
    ] {
        push(
            name,
            format!("[{batch},{w},{w},{w},{w}] + [{batch},{w},{w},{w},1]"),
            Binary { kind: BinaryKind::Add }.into(),
            vec![(ty(&[batch, w, w, w, w]), 1.0), (ty(&[batch, w, w, w, 1]), 1.0)],
        )?;
    }
    push(
        "matmul_scores_global",
        format!("[{h},{t},{hd}] x [{h},{t},{hd}]^T", h = d.heads),
        MatMul::new(true).into(),
        vec![(ty(&[d.heads, t, hd]), 1.0), (ty(&[d.heads, t, hd]), 1.0)],
    )?;

    let n = t;
    push(
        "softmax",
        format!("[{h},{n},{n}] last axis", h = d.heads),
        Softmax { axis: 2 }.into(),
        vec![(ty(&[d.heads, n, n]), 1.0)],
    )?;
    push(
        "layer_norm",
        format!("[{t},{c}]"),
        LayerNorm { axis: 1, eps: 1e-6 }.into(),
        vec![(ty(&[t, c]), 1.0), (ty(&[c]), 1.0), (ty(&[c]), 0.1)],
    )?;
    let (f, p2) = (d.fpn, d.p2);
    push(
        "conv3x3",
        format!("{f}->{f} at {p2}x{p2}, pad 1"),
        Conv2d::same(1).into(),
        vec![(ty(&[1, f, p2, p2]), 1.0), (ty(&[f, f, 3, 3]), 0.02)],
    )?;
    // Its backward: the input gradient (a stride-1 transposed convolution of dy) and the weight
    // gradient.
    push(
        "conv3x3_grad_input",
        format!("{f}->{f} at {p2}x{p2}, pad 1: dy conv_transpose w"),
        ConvTranspose2d {
            stride: [1, 1],
            padding: [1, 1],
            output_padding: [0, 0],
            dilation: [1, 1],
        }
        .into(),
        vec![(ty(&[1, f, p2, p2]), 1.0), (ty(&[f, f, 3, 3]), 0.02)],
    )?;
    push(
        "conv3x3_grad_weight",
        format!("{f}->{f} at {p2}x{p2}, pad 1: x, dy -> dw"),
        Conv2dGradWeight {
            stride: [1, 1],
            padding: [1, 1],
            dilation: [1, 1],
            groups: 1,
            kernel: [3, 3],
        }
        .into(),
        vec![(ty(&[1, f, p2, p2]), 1.0), (ty(&[1, f, p2, p2]), 1.0)],
    )?;
    push(
        "conv1x1",
        format!("{c}->{f} at {p2}x{p2}"),
        Conv2d::same(0).into(),
        vec![(ty(&[1, c, p2, p2]), 1.0), (ty(&[f, c, 1, 1]), 0.03)],
    )?;
    let half = (c / 2).max(1);
    push(
        "conv_transpose2x2",
        format!("{c}->{half} at {s}x{s}, stride 2", s = d.side),
        ConvTranspose2d::upsample(2).into(),
        vec![
            (ty(&[1, c, d.side, d.side]), 1.0),
            (ty(&[c, half, 2, 2]), 0.03),
            (ty(&[half]), 0.02),
        ],
    )?;
    push(
        "top_k",
        format!("{} scores, k {}", d.anchors, d.top_k),
        TopK { k: d.top_k }.into(),
        vec![(ty(&[1, d.anchors]), 1.0)],
    )?;
    Ok(out)
}

fn case(name: &'static str, shape: String, op: Op, inputs: Vec<(TensorType, f32)>) -> Result<OpCase> {
    let types: Vec<&TensorType> = inputs.iter().map(|(t, _)| t).collect();
    let outputs = op.rule().infer(&types).map_err(anyhow::Error::msg)?;
    let cost = op.rule().cost(&types, &outputs);
    let bytes = types
        .iter()
        .copied()
        .chain(&outputs)
        .map(|t| t.size_in_bytes() as u64)
        .sum();
    Ok(OpCase {
        name,
        shape,
        dtype: inputs[0].0.dtype,
        op,
        inputs: inputs
            .into_iter()
            .map(|(t, std)| InputSpec {
                dtype: t.dtype,
                shape: t.shape,
                std,
            })
            .collect(),
        flops: cost.flops,
        bytes,
    })
}

/// A timed row.
#[derive(Clone, Debug, Serialize)]
pub struct OpResult {
    #[serde(flatten)]
    pub case: OpCase,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub timing: Option<Timing>,
    /// Achieved rate, `flops / median` (rows with a FLOP count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tflops: Option<f64>,
    /// Achieved bandwidth, `bytes / median`, GB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbps: Option<f64>,
    /// Why the row could not run (the other rows still do).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Random inputs of `case` on `device` (for a backward, `out` and `lse` from its forward).
fn make_inputs(case: &OpCase, device: &Device) -> Result<Vec<Tensor>> {
    let random = |spec: &InputSpec| -> Result<Tensor> {
        let dtype = vitdet_runtime::dtype::to_candle(spec.dtype);
        Ok(Tensor::randn(0f32, spec.std, spec.shape.as_slice(), device)?.to_dtype(dtype)?)
    };
    match &case.op {
        Op::WindowAttentionGrad(grad) => {
            let forward = grad.forward();
            let n = forward.num_inputs();
            let mut inputs = case.inputs[..n].iter().map(random).collect::<Result<Vec<_>>>()?;
            let outputs = kernels::execute(&forward.into(), &inputs).context("the backward row's forward")?;
            inputs.extend(outputs);
            inputs.push(random(&case.inputs[n + 2])?);
            Ok(inputs)
        }
        _ => case.inputs.iter().map(random).collect(),
    }
}

/// Times every case; a case that fails records its error and the table goes on.
pub fn run(cases: Vec<OpCase>, device: &Device, warmup: usize, iters: usize, progress: &dyn Fn(&str)) -> Vec<OpResult> {
    cases
        .into_iter()
        .map(|case| {
            progress(case.name);
            let timed = make_inputs(&case, device)
                .and_then(|inputs| time_calls(device, warmup, iters, || Ok(kernels::execute(&case.op, &inputs)?)));
            match timed {
                Ok(timing) => {
                    let seconds = timing.median_ms / 1e3;
                    let rate = |x: u64| (x > 0 && seconds > 0.0).then(|| x as f64 / seconds);
                    OpResult {
                        tflops: rate(case.flops).map(|r| r / 1e12),
                        gbps: rate(case.bytes).map(|r| r / 1e9),
                        case,
                        timing: Some(timing),
                        error: None,
                    }
                }
                Err(e) => OpResult {
                    case,
                    timing: None,
                    tflops: None,
                    gbps: None,
                    error: Some(format!("{e:#}")),
                },
            }
        })
        .collect()
}

/// The op list as a text table (`--list`).
pub fn list_text(cases: &[OpCase]) -> String {
    let mut s = format!("{:<24} {:<6} shape\n", "op", "dtype");
    for c in cases {
        s += &format!("{:<24} {:<6} {}\n", c.name, c.dtype.as_str(), c.shape);
        let inputs: Vec<String> = c.inputs.iter().map(|i| dims_text(&i.shape)).collect();
        s += &format!("{:<31} inputs {}\n", "", inputs.join(" "));
    }
    s
}

/// `v` with three significant digits (at least the units).
fn three_digits(v: f64) -> String {
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else if v >= 1.0 {
        2
    } else {
        3
    };
    format!("{v:.decimals$}")
}

/// The timed table as text.
pub fn results_text(results: &[OpResult]) -> String {
    let mut s = format!(
        "{:<24} {:<6} {:>10} {:>10} {:>8} {:>9} {:>10}  shape\n",
        "op", "dtype", "median ms", "min ms", "TFLOP/s", "GB/s", "peak"
    );
    for r in results {
        let c = &r.case;
        match (&r.timing, &r.error) {
            (Some(t), _) => {
                let opt = |v: Option<f64>| v.map_or("-".to_string(), three_digits);
                s += &format!(
                    "{:<24} {:<6} {:>10.3} {:>10.3} {:>8} {:>9} {:>10}  {}\n",
                    c.name,
                    c.dtype.as_str(),
                    t.median_ms,
                    t.min_ms,
                    opt(r.tflops),
                    opt(r.gbps),
                    t.peak_bytes
                        .map_or("-".to_string(), |b| crate::report::bytes(b as usize)),
                    c.shape
                );
            }
            (None, e) => {
                s += &format!(
                    "{:<24} {:<6} failed: {}\n",
                    c.name,
                    c.dtype.as_str(),
                    e.as_deref().unwrap_or("no timing")
                );
            }
        }
    }
    s
}
