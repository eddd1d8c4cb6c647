//! Every VJP rule checked against central finite differences of the forward graph.
//!
//! Each case builds a tiny float64 graph whose differentiable inputs are trainable parameters,
//! reduces the op's output to a scalar `L = sum(y * r)` with a fixed random probe `r`, derives
//! the gradient graph, and compares the directional derivative `<grad, v>` for random
//! directions `v` with `(L(p + h v) - L(p - h v)) / 2h`.
//!
//! Tolerance: relative 1e-6. In float64 with h = 1e-5 the central difference's truncation error
//! is O(h^2) ~ 1e-10 relative for these smooth functions, and rounding O(eps / h) ~ 1e-11; a
//! wrong rule (a missing transpose, a dropped broadcast sum, a sign) is off by O(1). Piecewise
//! functions (relu, abs, max, max-pool, RoIAlign's bilinear weights) are probed away from their
//! kinks: inputs are random, so no sample sits on one.

use candle_core::{DType as CDType, Device, Tensor};
use vitdet_ir::ops::*;
use vitdet_ir::{DType, Graph, TensorType, Value};
use vitdet_passes::differentiate;
use vitdet_runtime::{run, ParamStore};

mod common;
use common::Rng;

const H: f64 = 1e-5;
const TOL: f64 = 1e-6;

fn tensor(data: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// A test case: parameters (name, shape, values), non-differentiable inputs, and the op under
/// test applied to them.
struct Case {
    graph: Graph,
    params: Vec<(String, Vec<usize>, Vec<f64>)>,
    inputs: Vec<(String, Tensor)>,
    rng: Rng,
}

impl Case {
    fn new(seed: u64) -> Self {
        Case {
            graph: Graph::new(),
            params: Vec::new(),
            inputs: Vec::new(),
            rng: Rng(seed),
        }
    }

    /// A trainable f64 parameter with standard normal values times `scale` plus `offset`.
    fn param(&mut self, shape: &[usize], scale: f64, offset: f64) -> Value {
        let n = shape.iter().product();
        let values = self.rng.normal(n).into_iter().map(|v| v * scale + offset).collect();
        self.param_values(shape, values)
    }

    fn param_values(&mut self, shape: &[usize], values: Vec<f64>) -> Value {
        let name = format!("p{}", self.params.len());
        let p = Parameter {
            name: name.clone(),
            ty: TensorType::new(DType::F64, shape.to_vec()),
            init: Init::Zeros,
            trainable: true,
        };
        let v = self.graph.add(p, "case", &[]).unwrap();
        self.params.push((name, shape.to_vec(), values));
        v
    }

    /// A graph input that gets no gradient.
    fn input(&mut self, t: Tensor, dtype: DType) -> Value {
        let name = format!("in{}", self.inputs.len());
        let ty = TensorType::new(dtype, t.dims().to_vec());
        let v = self.graph.add(Input { name: name.clone(), ty }, "case", &[]).unwrap();
        self.inputs.push((name, t));
        v
    }

    fn op(&mut self, op: impl Into<Op>, inputs: &[Value]) -> Value {
        self.graph.add(op, "case", inputs).unwrap()
    }

    /// Finishes the graph with `L = sum(y * r)` for every output `y` given, then checks.
    fn check(mut self, ys: &[Value]) {
        let mut total: Option<Value> = None;
        for &y in ys {
            let shape = self.graph.value_type(y).shape.clone();
            let n = shape.iter().product();
            let r = tensor(self.rng.normal(n), &shape);
            let r = self.input(r, DType::F64);
            let prod = self.op(Binary { kind: BinaryKind::Mul }, &[y, r]);
            let axes: Vec<usize> = (0..shape.len()).collect();
            let s = self.op(ReduceSum { axes, keepdim: false }, &[prod]);
            total = Some(match total {
                None => s,
                Some(t) => self.op(Binary { kind: BinaryKind::Add }, &[t, s]),
            });
        }
        self.graph.set_output("loss", total.unwrap());
        let diff = differentiate(&self.graph, "loss").unwrap();
        assert!(diff.unreached.is_empty(), "unreached: {:?}", diff.unreached);

        let store = |shift: Option<(usize, &[f64], f64)>| {
            ParamStore::from_tensors(self.params.iter().enumerate().map(|(i, (name, shape, vals))| {
                let vals = match shift {
                    Some((j, dir, h)) if j == i => vals.iter().zip(dir).map(|(a, d)| a + h * d).collect(),
                    _ => vals.clone(),
                };
                (name.clone(), tensor(vals, shape))
            }))
        };
        let inputs: Vec<(&str, Tensor)> = self.inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let out = run(&diff.graph, &store(None), &inputs, &Device::Cpu).unwrap();
        let loss_at = |s: &ParamStore| -> f64 {
            let o = run(&self.graph, s, &inputs, &Device::Cpu).unwrap();
            o.get("loss")
                .unwrap()
                .to_dtype(CDType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        };
        let mut rng = Rng(self.rng.0 ^ 0x5151);
        for (i, (name, shape, _)) in self.params.iter().enumerate() {
            let grad_name = format!("grad/{name}");
            let g = out
                .get(&grad_name)
                .unwrap_or_else(|| panic!("no gradient output for {name}"));
            assert_eq!(g.dims(), shape.as_slice(), "gradient shape of {name}");
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for _ in 0..2 {
                let dir = rng.normal(g.len());
                let analytic: f64 = g.iter().zip(&dir).map(|(a, b)| a * b).sum();
                let plus = loss_at(&store(Some((i, &dir, H))));
                let minus = loss_at(&store(Some((i, &dir, -H))));
                let numeric = (plus - minus) / (2.0 * H);
                let err = (analytic - numeric).abs() / (analytic.abs() + numeric.abs() + 1e-8);
                assert!(
                    err < TOL,
                    "{name}: analytic {analytic} vs finite difference {numeric} (relative error {err:.2e})"
                );
            }
        }
    }
}

fn unary_case(kind: UnaryKind, offset: f64, seed: u64) {
    let mut c = Case::new(seed);
    let x = c.param(&[3, 4], if offset > 0.0 { 0.3 } else { 1.0 }, offset);
    let y = c.op(Unary { kind }, &[x]);
    c.check(&[y]);
}

#[test]
fn unary_ops() {
    use UnaryKind::*;
    for (i, (kind, offset)) in [
        (Gelu, 0.0),
        (Relu, 0.0),
        (Sigmoid, 0.0),
        (Exp, 0.0),
        (Log, 2.0),
        (Neg, 0.0),
        (Sqrt, 2.0),
        (Tanh, 0.0),
        (Abs, 0.0),
    ]
    .into_iter()
    .enumerate()
    {
        unary_case(kind, offset, 10 + i as u64);
    }
}

#[test]
fn binary_ops_with_broadcasting() {
    use BinaryKind::*;
    for (i, kind) in [Add, Sub, Mul, Div, Maximum, Minimum].into_iter().enumerate() {
        for (sa, sb) in [
            (vec![2, 3, 4], vec![3, 1]),
            (vec![4], vec![2, 3, 4]),
            (vec![2, 3], vec![2, 3]),
        ] {
            let mut c = Case::new(100 + i as u64);
            let a = c.param(&sa, 1.0, 0.0);
            // Divisors kept away from zero.
            let b = if kind == Div {
                c.param(&sb, 0.3, 2.0)
            } else {
                c.param(&sb, 1.0, 0.0)
            };
            let y = c.op(Binary { kind }, &[a, b]);
            c.check(&[y]);
        }
    }
}

#[test]
fn affine_expand_reduce() {
    let mut c = Case::new(1);
    let x = c.param(&[3, 1, 4], 1.0, 0.0);
    let y = c.op(Affine { mul: -1.7, add: 0.3 }, &[x]);
    let e = c.op(
        Expand {
            shape: vec![2, 3, 5, 4],
        },
        &[y],
    );
    let s = c.op(
        ReduceSum {
            axes: vec![1, 3],
            keepdim: false,
        },
        &[e],
    );
    let k = c.op(
        ReduceSum {
            axes: vec![0],
            keepdim: true,
        },
        &[e],
    );
    c.check(&[s, k]);
}

#[test]
fn linear_and_matmul() {
    for bias in [false, true] {
        let mut c = Case::new(2);
        let x = c.param(&[2, 3, 5], 1.0, 0.0);
        let w = c.param(&[4, 5], 1.0, 0.0);
        let mut ins = vec![x, w];
        if bias {
            ins.push(c.param(&[4], 1.0, 0.0));
        }
        let y = c.op(Linear {}, &ins);
        c.check(&[y]);
    }
    // Every transpose combination, with the rhs broadcast over the batch ([1, k, n]) and without
    // batch dims (the lhs batch folded into rows); m = 3, k = 4, n = 5.
    for (i, (tl, tr)) in [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .enumerate()
    {
        for rhs_batch in [vec![1], vec![]] {
            let mut c = Case::new(3 + i as u64);
            let a = c.param(if tl { &[2, 4, 3] } else { &[2, 3, 4] }, 1.0, 0.0);
            let b_dims = [rhs_batch.clone(), if tr { vec![5, 4] } else { vec![4, 5] }].concat();
            let b = c.param(&b_dims, 1.0, 0.0);
            let op = MatMul {
                transpose_lhs: tl,
                transpose_rhs: tr,
            };
            let y = c.op(op, &[a, b]);
            c.check(&[y]);
        }
    }
}

#[test]
fn convolutions() {
    // (input hw, kernel, stride, padding): 3x3 s1 p1, 3x3 s2 p1 with a remainder, 1x1, 2x2 s2.
    for (i, (hw, k, s, p)) in [
        ([5, 6], 3, 1, 1),
        ([7, 6], 3, 2, 1),
        ([4, 4], 1, 1, 0),
        ([6, 4], 2, 2, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Case::new(20 + i as u64);
        let x = c.param(&[2, 3, hw[0], hw[1]], 1.0, 0.0);
        let w = c.param(&[4, 3, k, k], 0.5, 0.0);
        let b = c.param(&[4], 1.0, 0.0);
        let op = Conv2d {
            stride: [s, s],
            padding: [p, p],
            dilation: [1, 1],
            groups: 1,
        };
        let y = c.op(op, &[x, w, b]);
        c.check(&[y]);
    }
    let mut c = Case::new(30);
    let x = c.param(&[1, 3, 3, 4], 1.0, 0.0);
    let w = c.param(&[3, 2, 2, 2], 0.5, 0.0);
    let b = c.param(&[2], 1.0, 0.0);
    let op = ConvTranspose2d {
        stride: [2, 2],
        padding: [0, 0],
        output_padding: [0, 0],
        dilation: [1, 1],
    };
    let y = c.op(op, &[x, w, b]);
    c.check(&[y]);
}

#[test]
fn normalizations() {
    for (axis, shape) in [(2usize, vec![2, 3, 5]), (1, vec![2, 4, 3, 2])] {
        let mut c = Case::new(40);
        let x = c.param(&shape, 1.0, 0.5);
        let w = c.param(&[shape[axis]], 0.5, 1.0);
        let b = c.param(&[shape[axis]], 1.0, 0.0);
        let y = c.op(LayerNorm { axis, eps: 1e-6 }, &[x, w, b]);
        c.check(&[y]);
    }
    let mut c = Case::new(41);
    let x = c.param(&[2, 4, 3, 3], 1.0, 0.5);
    let w = c.param(&[4], 0.5, 1.0);
    let b = c.param(&[4], 1.0, 0.0);
    let y = c.op(GroupNorm { groups: 2, eps: 1e-5 }, &[x, w, b]);
    c.check(&[y]);

    // Batch norm: inference form (frozen statistics as non-trainable inputs) and training form.
    let mut c = Case::new(42);
    let x = c.param(&[2, 3, 2, 2], 1.0, 0.5);
    let w = c.param(&[3], 0.5, 1.0);
    let b = c.param(&[3], 1.0, 0.0);
    let mean = c.input(tensor(vec![0.1, -0.2, 0.3], &[3]), DType::F64);
    let var = c.input(tensor(vec![0.5, 1.5, 2.0], &[3]), DType::F64);
    let y = c.op(BatchNorm { eps: 1e-5 }, &[x, w, b, mean, var]);
    c.check(&[y]);
    let mut c = Case::new(43);
    let x = c.param(&[2, 3, 2, 2], 1.0, 0.5);
    let w = c.param(&[3], 0.5, 1.0);
    let b = c.param(&[3], 1.0, 0.0);
    let mean = c.input(tensor(vec![0.1, -0.2, 0.3], &[3]), DType::F64);
    let var = c.input(tensor(vec![0.5, 1.5, 2.0], &[3]), DType::F64);
    let n = c
        .graph
        .add_node(
            BatchNormTrain {
                eps: 1e-5,
                momentum: 0.1,
            },
            "case",
            &[x, w, b, mean, var],
        )
        .unwrap();
    c.check(&[Value::from(n)]);
}

#[test]
fn attention_terms() {
    let mut c = Case::new(50);
    let x = c.param(&[2, 3, 5], 1.0, 0.0);
    let y = c.op(Softmax { axis: 2 }, &[x]);
    let z = c.op(Softmax { axis: 1 }, &[x]);
    c.check(&[y, z]);
    // Decomposed tables with and without interpolation (length 2*max-1 = 7 vs 5).
    for len in [7, 5] {
        let mut c = Case::new(51);
        let t = c.param(&[len, 3], 1.0, 0.0);
        let y = c.op(RelPosGather { q_size: 4, k_size: 4 }, &[t]);
        c.check(&[y]);
    }
    let mut c = Case::new(52);
    let t = c.param(&[15, 2], 1.0, 0.0);
    let y = c.op(RelPosBias { window: [2, 3] }, &[t]);
    c.check(&[y]);
}

#[test]
fn layout_ops() {
    let mut c = Case::new(60);
    let x = c.param(&[2, 3, 4], 1.0, 0.0);
    let r = c.op(Reshape { shape: vec![6, 4] }, &[x]);
    let p = c.op(Permute { perm: vec![2, 0, 1] }, &[x]);
    let pad = c.op(
        Pad {
            pads: vec![[0, 0], [1, 2], [0, 1]],
        },
        &[x],
    );
    let s = c.op(
        Slice {
            axis: 2,
            start: 1,
            end: 3,
        },
        &[x],
    );
    let y = c.param(&[2, 1, 4], 1.0, 0.0);
    let cat = c.op(Concat { axis: 1 }, &[x, y, x]);
    c.check(&[r, p, pad, s, cat]);
}

#[test]
fn pooling_and_resizing() {
    for (k, s, p) in [(1, 2, 0), (3, 2, 1), (2, 2, 0)] {
        let mut c = Case::new(70);
        let x = c.param(&[1, 2, 5, 6], 1.0, 0.0);
        let op = MaxPool2d {
            kernel: [k, k],
            stride: [s, s],
            padding: [p, p],
        };
        let y = c.op(op, &[x]);
        c.check(&[y]);
    }
    for mode in [ResizeMode::Nearest, ResizeMode::Bilinear, ResizeMode::Bicubic] {
        for size in [[7, 5], [2, 3]] {
            let mut c = Case::new(71);
            let x = c.param(&[1, 2, 4, 4], 1.0, 0.0);
            let y = c.op(
                Resize {
                    size,
                    mode,
                    align_corners: false,
                },
                &[x],
            );
            c.check(&[y]);
        }
    }
}

#[test]
fn selections_and_roi_align() {
    let mut c = Case::new(80);
    let x = c.param(&[5, 3], 1.0, 0.0);
    let idx = c.input(Tensor::new(&[4i64, 0, 4, 2], &Device::Cpu).unwrap(), DType::I64);
    let y = c.op(IndexSelect::new(0), &[x, idx]);
    let z = c.param(&[3, 4, 2], 1.0, 0.0);
    let rows = c.input(Tensor::new(&[3i64, 0, 3], &Device::Cpu).unwrap(), DType::I64);
    let g = c.op(GatherRows::default(), &[z, rows]);
    c.check(&[y, g]);

    let mut c = Case::new(81);
    let f0 = c.param(&[1, 2, 8, 8], 1.0, 0.0);
    let f1 = c.param(&[1, 2, 4, 4], 1.0, 0.0);
    // Boxes in image pixels (stride 4 and 8): small ones go to level 0, the large one to 1,
    // one pokes out of the map.
    let boxes = vec![1.3, 2.1, 9.7, 12.2, 0.4, 3.3, 30.9, 29.1, 20.2, 18.7, 35.5, 33.9];
    let boxes = c.input(tensor(boxes, &[3, 4]), DType::F64);
    let op = RoiAlign {
        output_size: [2, 2],
        scales: vec![0.25, 0.125],
        sampling_ratio: 2,
        aligned: true,
        canonical_box_size: 16.0,
        canonical_level: 3,
        min_level: 2,
    };
    let y = c.op(op, &[f0, f1, boxes]);
    c.check(&[y]);
}

#[test]
fn drop_path_mask_product() {
    let mut c = Case::new(90);
    let x = c.param(&[4, 2, 3], 1.0, 0.0);
    let seed = c.input(Tensor::new(&[7i64], &Device::Cpu).unwrap(), DType::I64);
    let mask = c.op(
        DropPathMask {
            rate: 0.5,
            stream: 3,
            batch: 4,
        },
        &[seed],
    );
    let mask = c.op(Reshape { shape: vec![4, 1, 1] }, &[mask]);
    let mask = c.op(Cast { dtype: DType::F64 }, &[mask]);
    let y = c.op(Binary { kind: BinaryKind::Mul }, &[x, mask]);
    c.check(&[y]);
}

#[test]
fn errors_name_the_problem() {
    let mut c = Case::new(1);
    let x = c.param(&[2, 3], 1.0, 0.0);
    c.graph.set_output("y", x);
    let err = differentiate(&c.graph, "loss").unwrap_err().to_string();
    assert!(err.contains("no output named `loss`"), "{err}");
    let err = differentiate(&c.graph, "y").unwrap_err().to_string();
    assert!(err.contains("scalar"), "{err}");
}

#[test]
fn convolution_at_box_head_scale() {
    // 512 RoIs of 16 x 7 x 7: large enough that the CPU kernels split the work into tiles.
    let mut c = Case::new(31);
    let x = c.param(&[512, 16, 7, 7], 1.0, 0.0);
    let w = c.param(&[16, 16, 3, 3], 0.3, 0.0);
    let op = Conv2d {
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    };
    let y = c.op(op, &[x, w]);
    c.check(&[y]);
}

/// A graph input as the loss seed (the loss scale of mixed-precision training): every gradient
/// is the plain one times the scale. For powers of two the products are exact in float64 (no
/// value of this small graph comes near overflow or the subnormals), so the comparison is exact;
/// for 3 they agree to float64 rounding (each backward op rounds once more, relative 1e-12).
#[test]
fn loss_seed_input_scales_every_gradient() {
    use vitdet_passes::autodiff::{differentiate_with, DifferentiateOptions, LossSeed};
    let mut c = Case::new(77);
    let x = c.param(&[2, 3, 5], 1.0, 0.0);
    let w = c.param(&[4, 5], 0.5, 0.0);
    let b = c.param(&[4], 1.0, 0.0);
    let g = c.param(&[4], 0.5, 1.0);
    let h = c.op(Linear {}, &[x, w, b]);
    let h = c.op(LayerNorm { axis: 2, eps: 1e-6 }, &[h, g, b]);
    let h = c.op(Unary { kind: UnaryKind::Gelu }, &[h]);
    let loss = c.op(
        ReduceSum {
            axes: vec![0, 1, 2],
            keepdim: false,
        },
        &[h],
    );
    c.graph.set_output("loss", loss);
    let store = ParamStore::from_tensors(
        c.params
            .iter()
            .map(|(name, shape, vals)| (name.clone(), tensor(vals.clone(), shape))),
    );
    let plain = differentiate(&c.graph, "loss").unwrap();
    let seeded = |graph: &Graph| {
        differentiate_with(
            graph,
            "loss",
            &DifferentiateOptions {
                seed: LossSeed::Input("loss_scale".into()),
            },
        )
        .unwrap()
    };
    // Added when missing: f32, the loss's shape.
    let scaled = seeded(&c.graph);
    let (_, _, ty) = scaled.graph.inputs().find(|(_, n, _)| *n == "loss_scale").unwrap();
    assert_eq!((ty.dtype, ty.shape.clone()), (DType::F32, vec![]));
    assert_eq!(scaled.gradients, plain.gradients);
    let grads = |graph: &Graph, scale: Option<Tensor>| -> Vec<Vec<f64>> {
        let mut inputs: Vec<(&str, Tensor)> = Vec::new();
        if let Some(s) = scale {
            inputs.push(("loss_scale", s));
        }
        let out = run(graph, &store, &inputs, &Device::Cpu).unwrap();
        plain
            .gradients
            .iter()
            .map(|(_, o)| out.get(o).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap())
            .collect()
    };
    let reference = grads(&plain.graph, None);
    let scalar = |s: f32| Tensor::new(s, &Device::Cpu).unwrap();
    for s in [65536.0f32, 0.125, 1.0] {
        let got = grads(&scaled.graph, Some(scalar(s)));
        for (a, r) in got.iter().flatten().zip(reference.iter().flatten()) {
            assert_eq!(*a, s as f64 * r, "seed {s}");
        }
    }
    let got = grads(&scaled.graph, Some(scalar(3.0)));
    for (a, r) in got.iter().flatten().zip(reference.iter().flatten()) {
        assert!(
            (a - 3.0 * r).abs() <= 1e-12 * r.abs().max(1e-300),
            "seed 3: {a} vs {}",
            3.0 * r
        );
    }

    // An existing f32 [1] input is used as it is (reshaped and cast to the loss's [] f64).
    let mut with_input = c.graph.clone();
    with_input
        .add(
            Input {
                name: "loss_scale".into(),
                ty: TensorType::new(DType::F32, vec![1]),
            },
            "case",
            &[],
        )
        .unwrap();
    let scaled = seeded(&with_input);
    assert_eq!(scaled.graph.inputs().filter(|(_, n, _)| *n == "loss_scale").count(), 1);
    let got = grads(&scaled.graph, Some(Tensor::new(&[1024f32], &Device::Cpu).unwrap()));
    for (a, r) in got.iter().flatten().zip(reference.iter().flatten()) {
        assert_eq!(*a, 1024.0 * r);
    }

    // A seed input that is not a float scalar is refused by name.
    let mut bad = c.graph.clone();
    bad.add(
        Input {
            name: "loss_scale".into(),
            ty: TensorType::new(DType::F32, vec![2]),
        },
        "case",
        &[],
    )
    .unwrap();
    let err = differentiate_with(
        &bad,
        "loss",
        &DifferentiateOptions {
            seed: LossSeed::Input("loss_scale".into()),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("loss seed input `loss_scale`"), "{err}");
}
