//! The `vitdet` command line, end to end: reports, artifacts, inference and error messages.

mod common;

use common::{fails, fixture, ok, vitdet};

#[test]
fn compile_reports_detectron2_parameter_counts() {
    let text = ok(&["compile", "--model", "vitdet-b", "--format", "json"]);
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["model"], "vitdet-b");
    assert_eq!(r["mode"], "infer");
    assert_eq!(r["image_size"], 1024);
    assert_eq!(r["params_by_scope"]["backbone.net"], 85_889_024);
    assert_eq!(r["params_by_scope"]["backbone"], 91_449_024);
    assert_eq!(r["params"], 110_895_792, "detectron2's ViTDet-B Mask R-CNN");
    assert_eq!(r["params_by_scope"]["proposal_generator"], 1_184_015);
    let text = ok(&["compile", "--model", "vitdet-b", "--backbone-only", "--format", "json"]);
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["params"], 91_449_024);
    for key in ["nodes", "flops", "activations", "peak_memory_bytes"] {
        assert!(r[key].as_u64().unwrap() > 0, "{key} missing or zero: {text}");
    }
}

#[test]
fn compile_writes_artifact_dot_and_dump() {
    let dir = tempfile::tempdir().unwrap();
    let emit = dir.path().join("a.json");
    let dot = dir.path().join("g.dot");
    let dump = dir.path().join("g.txt");
    let text = ok(&[
        "compile",
        "--model",
        "vit-tiny",
        "--emit",
        emit.to_str().unwrap(),
        "--dot",
        dot.to_str().unwrap(),
        "--dump-ir",
        dump.to_str().unwrap(),
    ]);
    assert!(text.contains("params") && text.contains("backbone.net"), "{text}");
    let artifact = vitdet::ir::Artifact::from_json(&std::fs::read_to_string(&emit).unwrap()).unwrap();
    assert_eq!(artifact.mode, "infer");
    assert_eq!(artifact.metadata["model"]["family"], "vit");
    let graph = &artifact.graph;
    assert!(std::fs::read_to_string(&dot).unwrap().starts_with("digraph"));
    let dump = std::fs::read_to_string(&dump).unwrap();
    assert_eq!(
        dump.lines().filter(|l| l.starts_with('%')).count(),
        graph.graph.node_count()
    );
}

#[test]
fn compile_takes_config_files_and_rejects_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("m.toml");
    std::fs::write(&toml, "preset = \"vitdet-tiny\"\ndepth = 2\nglobal_blocks = [1]\n").unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&ok(&["compile", "--model", toml.to_str().unwrap(), "--format", "json"])).unwrap();
    assert!(r["params"].as_u64().unwrap() > 0);

    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        "{\"family\": \"vitdet\", \"embed_dim\": 30, \"depth\": 2, \"num_heads\": 4}",
    )
    .unwrap();
    let err = fails(&["compile", "--model", bad.to_str().unwrap()]);
    assert!(err.contains("embed_dim"), "{err}");
    let err = fails(&["compile", "--model", "vitdet-q"]);
    assert!(
        err.contains("vitdet-b") && err.contains("vit-tiny"),
        "lists the presets: {err}"
    );
    let err = fails(&["compile", "--model", "vitdet-b", "--image-size", "1000"]);
    assert!(err.contains("1000"), "{err}");
}

/// `infer --model vitdet-tiny` on the fixture weights and image, `--dump path` and `extra`
/// flags: the printed summary and the dumped tensors.
fn infer_dump(
    path: &std::path::Path,
    extra: &[&str],
) -> (String, std::collections::HashMap<String, candle_core::Tensor>) {
    let weights = fixture("vitdet_tiny.safetensors");
    let image = fixture("preprocess_large.png");
    let mut args = vec![
        "infer",
        "--model",
        "vitdet-tiny",
        "--weights",
        weights.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--dump",
        path.to_str().unwrap(),
    ];
    args.extend(extra);
    let text = ok(&args);
    (
        text,
        candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap(),
    )
}

#[test]
fn infer_dumps_pyramid_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (text, t) = infer_dump(&dir.path().join("f.safetensors"), &[]);
    assert!(text.contains("p2") && text.contains("measured peak"), "{text}");
    let shapes: Vec<(String, Vec<usize>)> = ["p2", "p3", "p4", "p5", "p6"]
        .iter()
        .map(|n| (n.to_string(), t[*n].dims().to_vec()))
        .collect();
    assert_eq!(
        shapes,
        vec![
            ("p2".into(), vec![1, 16, 32, 32]),
            ("p3".into(), vec![1, 16, 16, 16]),
            ("p4".into(), vec![1, 16, 8, 8]),
            ("p5".into(), vec![1, 16, 4, 4]),
            ("p6".into(), vec![1, 16, 2, 2]),
        ]
    );
}

/// `infer --dtype bf16|f16`: the backbone autocast with its attention fused, weights converted
/// on load, the dump still f32. Against the f32 run with the same weights and image: bf16 keeps
/// 8 significant bits (unit roundoff 2^-9 = 2e-3) and f16 11 (2^-12 = 2.4e-4); a few such
/// roundings per block through the tiny model's blocks and the pyramid measure 9e-3 and 1.2e-3
/// relative L2 here, so the bounds are twice to three times that.
#[test]
fn infer_in_mixed_precision_tracks_f32() {
    let dir = tempfile::tempdir().unwrap();
    let image = fixture("preprocess_large.png");
    let dump = |dtype: &str| {
        let (text, t) = infer_dump(&dir.path().join(format!("{dtype}.safetensors")), &["--dtype", dtype]);
        assert!(text.contains(&format!("vitdet-tiny ({dtype})")), "{text}");
        t
    };
    let reference = dump("f32");
    for (dtype, bound) in [("bf16", 2e-2), ("f16", 4e-3)] {
        let got = dump(dtype);
        for name in ["p2", "p3", "p4", "p5", "p6"] {
            assert_eq!(got[name].dtype(), candle_core::DType::F32, "{dtype} {name}");
            let (rel, _) = common::compare(&got[name], &reference[name]);
            assert!(rel <= bound, "{dtype} {name}: relative L2 {rel:.2e} > {bound:.0e}");
            assert!(
                rel > 0.0,
                "{dtype} {name}: identical to f32, so it did not run in {dtype}"
            );
        }
    }

    // The whole detector in bf16: the same detections as in f32 (category, box IoU >= 0.99),
    // but for a few near the top-k cut, where this random init's scores (all near 0.014)
    // differ by less than bf16's rounding and so may trade places.
    let detections = |dtype: &str| {
        let out = dir.path().join(format!("det_{dtype}"));
        let mut args = detect_args(image.to_str().unwrap(), out.to_str().unwrap(), "0");
        args.extend(["--dtype", dtype]);
        let text = ok(&args);
        assert!(text.contains(&format!("vitdet-tiny ({dtype})")), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("detections.json")).unwrap()).unwrap();
        json.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let b = bbox(r);
                (
                    r["category_id"].as_u64().unwrap(),
                    [b[0], b[1], b[0] + b[2], b[1] + b[3]],
                )
            })
            .collect::<Vec<_>>()
    };
    let iou = |a: [f64; 4], b: [f64; 4]| {
        let inter = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0) * (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
    };
    let (want, got) = (detections("f32"), detections("bf16"));
    assert!(
        !got.is_empty() && got.len() == want.len(),
        "{} vs {}",
        got.len(),
        want.len()
    );
    let matched = got
        .iter()
        .filter(|(c, b)| want.iter().any(|(wc, wb)| wc == c && iou(*b, *wb) >= 0.99))
        .count();
    assert!(
        4 * matched >= 3 * want.len(),
        "{matched} of {} detections match f32's",
        want.len()
    );

    let err = fails(&["infer", "--image", image.to_str().unwrap(), "--dtype", "fp8"]);
    assert!(err.contains("--dtype") && err.contains("fp8"), "{err}");
}

#[test]
fn infer_without_weights_says_so() {
    let image = fixture("preprocess.png");
    let out = vitdet(&[
        "infer",
        "--model",
        "vit-tiny",
        "--image",
        image.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("random init") && err.contains("seed 3"), "{err}");
}

#[test]
fn infer_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let image = fixture("preprocess.png");
    let image = image.to_str().unwrap();

    let err = fails(&[
        "infer",
        "--model",
        "vitdet-tiny",
        "--weights",
        "/nonexistent/w.safetensors",
        "--image",
        image,
    ]);
    assert!(err.contains("/nonexistent/w.safetensors"), "{err}");

    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"definitely not safetensors").unwrap();
    let err = fails(&[
        "infer",
        "--model",
        "vitdet-tiny",
        "--weights",
        corrupt.to_str().unwrap(),
        "--image",
        image,
    ]);
    assert!(err.contains("corrupt.safetensors"), "{err}");

    // The other family's weights: missing and unexpected keys are both named.
    let other = fixture("vit_tiny.safetensors");
    let err = fails(&[
        "infer",
        "--model",
        "vitdet-tiny",
        "--weights",
        other.to_str().unwrap(),
        "--image",
        image,
    ]);
    assert!(
        err.contains("parameter(s) missing: `backbone.net.blocks.0.attn.rel_pos_h`"),
        "{err}"
    );
    assert!(
        err.contains("unexpected key(s): `backbone.adapter.up2.0.bias`"),
        "{err}"
    );

    // Right keys, wrong shapes: a config with narrower pyramid outputs.
    let narrow = dir.path().join("narrow.toml");
    std::fs::write(&narrow, "preset = \"vitdet-tiny\"\nout_channels = 8\n").unwrap();
    let weights = fixture("vitdet_tiny.safetensors");
    let err = fails(&[
        "infer",
        "--model",
        narrow.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--image",
        image,
    ]);
    assert!(
        err.contains("backbone.simfp_2.4.norm.bias`: expected shape [8], found [16]"),
        "{err}"
    );

    let err = fails(&["infer", "--model", "vitdet-tiny", "--image", image, "--device", "tpu"]);
    assert!(err.contains("unknown device `tpu`"), "{err}");
    if !cfg!(feature = "cuda") {
        let err = fails(&["infer", "--model", "vitdet-tiny", "--image", image, "--device", "cuda"]);
        assert!(err.contains("CUDA is unavailable"), "{err}");
    }

    let not_image = dir.path().join("x.png");
    std::fs::write(&not_image, b"hello").unwrap();
    let err = fails(&[
        "infer",
        "--model",
        "vitdet-tiny",
        "--image",
        not_image.to_str().unwrap(),
    ]);
    assert!(err.contains("x.png"), "{err}");
    let err = fails(&["infer", "--model", "vitdet-tiny", "--image", "/nonexistent/img.jpg"]);
    assert!(err.contains("/nonexistent/img.jpg"), "{err}");
}

/// The paper's Table 5 at 1024x1024: params within 1%, fvcore FLOPs within 5%, activations
/// within 10%. Our FLOPs are a static upper bound (the mask head always runs on the maximum of
/// 100 detections; the paper averages runtime counts over images), see the README.
#[test]
fn table5_model_complexity() {
    for (model, params, gflops, mact) in [("vit-b", 116e6, 853e9, 1532e6), ("vit-l", 339e6, 1907e9, 2727e6)] {
        let r: serde_json::Value =
            serde_json::from_str(&ok(&["compile", "--model", model, "--format", "json"])).unwrap();
        let rel = |key: &str, paper: f64| (r[key].as_f64().unwrap() - paper).abs() / paper;
        assert!(rel("params", params) <= 0.01, "{model} params {}", r["params"]);
        assert!(rel("flops", gflops) <= 0.05, "{model} flops {}", r["flops"]);
        assert!(
            rel("activations", mact) <= 0.10,
            "{model} activations {}",
            r["activations"]
        );
    }
}

/// A COCO result's `bbox` (x, y, w, h).
fn bbox(result: &serde_json::Value) -> Vec<f64> {
    result["bbox"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// `infer --model vitdet-tiny --image IMAGE --out OUT --score-thresh T`.
fn detect_args<'a>(image: &'a str, out: &'a str, thresh: &'a str) -> Vec<&'a str> {
    vec![
        "infer",
        "--model",
        "vitdet-tiny",
        "--image",
        image,
        "--out",
        out,
        "--score-thresh",
        thresh,
    ]
}

#[test]
fn infer_out_writes_coco_results_and_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("single");
    let image = fixture("preprocess_large.png");
    let text = ok(&detect_args(image.to_str().unwrap(), out.to_str().unwrap(), "0"));
    assert!(text.contains("detections"), "{text}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("detections.json")).unwrap()).unwrap();
    let results = results.as_array().unwrap();
    assert!(!results.is_empty(), "score threshold 0 keeps detections");
    for r in results {
        assert!(vitdet::coco::CATEGORY_IDS.contains(&(r["category_id"].as_u64().unwrap() as u32)));
        let b = bbox(r);
        assert!(
            b[0] >= 0.0 && b[1] >= 0.0 && b[2] > 0.0 && b[3] > 0.0 && b[0] + b[2] <= 100.001 && b[1] + b[3] <= 60.001,
            "{b:?}"
        );
        assert_eq!(r["segmentation"]["size"], serde_json::json!([60, 100]));
    }
    let png = image::open(out.join("detections.png")).unwrap();
    assert_eq!((png.width(), png.height()), (100, 60));

    // A folder with one unreadable file: the others' results survive.
    let folder = dir.path().join("images");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(fixture("preprocess.png"), folder.join("000000000007.png")).unwrap();
    std::fs::copy(fixture("preprocess_large.png"), folder.join("b.png")).unwrap();
    std::fs::write(folder.join("broken.jpg"), b"not a jpeg").unwrap();
    let out2 = dir.path().join("folder");
    let output = vitdet(&detect_args(folder.to_str().unwrap(), out2.to_str().unwrap(), "0"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("broken.jpg"));
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("detections.json")).unwrap()).unwrap();
    let ids: std::collections::BTreeSet<u64> = results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["image_id"].as_u64().unwrap())
        .collect();
    assert!(ids.contains(&7), "numeric file names give COCO image ids: {ids:?}");
    assert!(out2.join("b.detections.png").exists() && out2.join("000000000007.detections.png").exists());

    // A higher threshold keeps fewer detections; a bad threshold is an error naming it.
    let out3 = dir.path().join("strict");
    ok(&detect_args(image.to_str().unwrap(), out3.to_str().unwrap(), "0.9"));
    let strict: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out3.join("detections.json")).unwrap()).unwrap();
    assert!(strict.as_array().unwrap().len() < results.as_array().unwrap().len());
    let err = fails(&detect_args(image.to_str().unwrap(), out3.to_str().unwrap(), "1.5"));
    assert!(err.contains("score-thresh"), "{err}");

    // The JSON report gives each image's kernel time per op kind and per scope.
    let out4 = dir.path().join("json");
    let mut args = detect_args(image.to_str().unwrap(), out4.to_str().unwrap(), "0");
    args.extend(["--format", "json"]);
    let report: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let names = |key: &str| -> Vec<String> {
        report["images"][0][key]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| pair[0].as_str().unwrap().to_string())
            .collect()
    };
    assert!(names("op_seconds").contains(&"conv2d".to_string()));
    let scopes = names("scope_seconds");
    assert!(
        scopes.contains(&"backbone.net".to_string()) && scopes.iter().any(|s| s.starts_with("roi_heads.")),
        "{scopes:?}"
    );
}

#[test]
fn compile_bench_reports_fps() {
    let r: serde_json::Value =
        serde_json::from_str(&ok(&["compile", "--model", "vit-tiny", "--bench", "--format", "json"])).unwrap();
    let b = &r["benchmark"];
    assert!(
        b["fps"].as_f64().unwrap() > 0.0 && b["seconds"].as_f64().unwrap() > 0.0,
        "{b}"
    );
    assert_eq!(
        b["measured_peak_activation_bytes"], r["peak_activation_bytes"],
        "measured equals planned"
    );
    // The binary counts its heap: the run's high-water mark stays within 3% of the arena
    // planned at the rows the mask head ran on (the executor follows the plan's order and drop
    // points; kernel workspace is planned), which is at most the compiled arena.
    let (heap, arena) = (
        b["measured_heap_peak_bytes"].as_f64().unwrap(),
        b["planned_arena_bytes_at_rows"].as_f64().unwrap(),
    );
    assert!(b["dynamic_rows"].as_u64().unwrap() >= 1, "{b}");
    assert!(arena <= r["arena_bytes"].as_f64().unwrap(), "{b}");
    assert!((heap / arena - 1.0).abs() <= 0.03, "heap {heap} vs arena {arena}");
    let text = ok(&["compile", "--model", "vitdet-tiny", "--bench"]);
    assert!(text.contains("fps"), "{text}");
}

#[test]
fn compile_train_mode_plans_the_training_step() {
    let infer: serde_json::Value =
        serde_json::from_str(&ok(&["compile", "--model", "vitdet-tiny", "--format", "json"])).unwrap();
    for model in ["vitdet-tiny", "vit-b"] {
        let text = ok(&["compile", "--model", model, "--mode", "train", "--format", "json"]);
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(r["mode"], "train");
        let (arena, bound) = (
            r["arena_bytes"].as_u64().unwrap(),
            r["lower_bound_bytes"].as_u64().unwrap(),
        );
        // The planner packs every activation into one arena within 5% of its lower bound.
        assert!(
            bound > 0 && arena >= bound && arena as f64 <= 1.05 * bound as f64,
            "{model}: {arena} vs {bound}"
        );
        if model == "vitdet-tiny" {
            assert!(r["nodes"].as_u64().unwrap() > infer["nodes"].as_u64().unwrap());
            assert_eq!(
                r["params"], infer["params"],
                "training and inference share their parameters"
            );
        }
    }
    let err = fails(&[
        "compile",
        "--model",
        "vitdet-tiny",
        "--mode",
        "train",
        "--backbone-only",
    ]);
    assert!(err.contains("--backbone-only"), "{err}");
}

#[test]
fn compile_infer_fuses_the_attention_and_mixed_precision_halves_the_activations() {
    let json = |args: &[&str]| -> serde_json::Value { serde_json::from_str(&ok(args)).unwrap() };
    let compile = |extra: &[&str]| {
        let mut args = vec!["compile", "--model", "vitdet-tiny", "--format", "json"];
        args.extend(extra);
        json(&args)
    };
    let f32 = compile(&[]);
    let bf16 = compile(&["--dtype", "bf16"]);
    for (r, dtype) in [(&f32, "f32"), (&bf16, "bf16")] {
        assert_eq!(r["dtype"], dtype);
        assert_eq!(r["fused_attention"], 4, "every attention block of vitdet-tiny");
    }
    assert_eq!(bf16["params"], f32["params"]);
    let peak = |r: &serde_json::Value| r["peak_activation_bytes"].as_u64().unwrap();
    // Activations autocast to bf16 (norms and softmax stay f32): at most 60% of the f32 peak.
    assert!(
        peak(&bf16) * 10 <= peak(&f32) * 6,
        "bf16 peak {} vs f32 {}",
        peak(&bf16),
        peak(&f32)
    );
    // `--no-fuse` keeps the attention as built: in f32 that is the graph itself, not lowered,
    // holding each block's [heads, N, N] scores, which set the peak at 512 px (1024 tokens).
    let unfused = compile(&["--no-fuse"]);
    assert!(
        unfused.get("dtype").is_none(),
        "f32 without fusion is the graph as built"
    );
    assert!(unfused.get("fused_attention").is_none());
    let (fused, unfused) = (
        compile(&["--image-size", "512"]),
        compile(&["--image-size", "512", "--no-fuse"]),
    );
    assert!(
        peak(&unfused) > 2 * peak(&fused),
        "unfused {} vs fused {}",
        peak(&unfused),
        peak(&fused)
    );
    let unfused_bf16 = compile(&["--dtype", "bf16", "--no-fuse"]);
    assert_eq!(unfused_bf16["fused_attention"], 0);
    let err = fails(&["compile", "--model", "vitdet-tiny", "--checkpoint", "blocks"]);
    assert!(err.contains("apply to --mode train"), "{err}");
}

#[test]
fn kernels_checks_its_arguments_and_needs_a_cuda_build() {
    let err = fails(&["kernels", "--compute", "sm90"]);
    assert!(err.contains("--compute `sm90`"), "{err}");
    let err = fails(&["kernels", "--head-dims", "64,256"]);
    assert!(err.contains("256 is outside"), "{err}");
    if !cfg!(feature = "cuda") {
        let err = fails(&["kernels"]);
        assert!(err.contains("no CUDA support"), "{err}");
    }
}
