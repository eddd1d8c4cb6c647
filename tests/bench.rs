//! `vitdet bench`: the op table at a small scale times every op on the CPU, `--list` gives the
//! full-size shapes the PyTorch baseline script reads, the end-to-end step runs, and a CUDA
//! device on a CPU-only build is a clear error.

mod common;

use common::{fails, ok};
use serde_json::Value;

/// Every row of the table, in order.
const OPS: &[&str] = &[
    "linear_qkv",
    "linear_fc1",
    "attention_window",
    "attention_window_grad",
    "attention_global",
    "attention_global_grad",
    "window_partition",
    "rel_pos_add_window",
    "rel_pos_add_global",
    "matmul_scores_global",
    "softmax",
    "layer_norm",
    "conv3x3",
    "conv3x3_grad_input",
    "conv3x3_grad_weight",
    "conv1x1",
    "conv_transpose2x2",
    "top_k",
];

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn names(report: &Value) -> Vec<&str> {
    report["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect()
}

fn row<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["ops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap()
}

fn shapes(row: &Value) -> Vec<Vec<u64>> {
    row["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn small_op_table_times_every_op_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ops.json");
    let text = ok(&[
        "bench",
        "--ops",
        "--small",
        "--device",
        "cpu",
        "--dtype",
        "bf16",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--format",
        "json",
        "--out",
        out.to_str().unwrap(),
    ]);
    // With --out, the file holds the JSON and standard output the text table.
    assert!(text.starts_with("op "), "{text}");
    let report = json(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(names(&report), OPS);
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["scale"], 8);
    for op in report["ops"].as_array().unwrap() {
        let name = &op["name"];
        assert!(op.get("error").is_none(), "{name}: {}", op["error"]);
        let (median, min) = (op["median_ms"].as_f64().unwrap(), op["min_ms"].as_f64().unwrap());
        assert!(
            median > 0.0 && min > 0.0 && min <= median,
            "{name}: median {median} min {min}"
        );
        assert_eq!(op["iters"], 3, "{name}");
        assert_eq!(op["dtype"], "bf16", "{name}");
        assert!(!op["shape"].as_str().unwrap().is_empty(), "{name}");
        // Selection and copies do no arithmetic.
        if name != "top_k" && name != "window_partition" {
            assert!(op["flops"].as_u64().unwrap() > 0, "{name} has no FLOP count");
        }
    }
    // The small table divides every size by 8 (the 64x64 token grid becomes 8x8).
    assert_eq!(
        shapes(row(&report, "linear_qkv")),
        [vec![64, 96], vec![288, 96], vec![288]]
    );
}

#[test]
fn op_list_has_the_vitdet_b_shapes_at_1024() {
    let list = json(&ok(&["bench", "--ops", "--list", "--format", "json"]));
    assert_eq!(names(&list), OPS);
    assert_eq!(list["scale"], 1);
    assert_eq!(
        shapes(row(&list, "linear_qkv")),
        [vec![4096, 768], vec![2304, 768], vec![2304]]
    );
    assert_eq!(
        shapes(row(&list, "linear_fc1")),
        [vec![4096, 768], vec![3072, 768], vec![3072]]
    );
    let window = row(&list, "attention_window");
    assert_eq!(window["op"]["op"], "window_attention");
    assert_eq!(window["op"]["heads"], 12);
    assert_eq!(window["op"]["window"], serde_json::json!([14, 14]));
    assert_eq!(
        shapes(window),
        [vec![1, 64, 64, 2304], vec![2304], vec![14, 14, 64], vec![14, 14, 64]]
    );
    // The backward takes the forward's inputs, its outputs (lse of 25 windows) and dout.
    let grad = row(&list, "attention_window_grad");
    assert_eq!(grad["op"]["op"], "window_attention_grad");
    assert_eq!(
        shapes(grad)[4..],
        [vec![1, 64, 64, 768], vec![25, 12, 196], vec![1, 64, 64, 768]]
    );
    assert_eq!(
        row(&list, "attention_global")["op"]["window"],
        serde_json::json!([64, 64])
    );
    // The eager attention's copies and adds at the issue table's shapes.
    assert_eq!(shapes(row(&list, "window_partition")), [vec![1, 5, 14, 5, 14, 768]]);
    assert_eq!(
        shapes(row(&list, "rel_pos_add_window")),
        [vec![300, 14, 14, 14, 14], vec![300, 14, 14, 14, 1]]
    );
    assert_eq!(
        shapes(row(&list, "rel_pos_add_global")),
        [vec![12, 64, 64, 64, 64], vec![12, 64, 64, 64, 1]]
    );
    assert_eq!(
        shapes(row(&list, "matmul_scores_global")),
        [vec![12, 4096, 64], vec![12, 4096, 64]]
    );
    assert_eq!(shapes(row(&list, "softmax")), [vec![12, 4096, 4096]]);
    assert_eq!(shapes(row(&list, "conv3x3"))[0], [1, 256, 256, 256]);
    assert_eq!(
        shapes(row(&list, "conv3x3_grad_weight")),
        [[1, 256, 256, 256], [1, 256, 256, 256]]
    );
    assert_eq!(shapes(row(&list, "conv1x1"))[1], [256, 768, 1, 1]);
    assert_eq!(shapes(row(&list, "conv_transpose2x2"))[1], [768, 384, 2, 2]);
    let top_k = row(&list, "top_k");
    assert_eq!(
        (top_k["op"]["k"].as_u64(), shapes(top_k)),
        (Some(2000), vec![vec![1, 196_608]])
    );
    // Nothing ran.
    assert!(list["ops"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o.get("median_ms").is_none()));
}

#[test]
fn end_to_end_step_runs_on_the_cpu() {
    let report = json(&ok(&[
        "bench",
        "--model",
        "vitdet-tiny",
        "--mode",
        "infer",
        "--dtype",
        "bf16",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--format",
        "json",
    ]));
    assert_eq!(
        (report["mode"].as_str(), report["dtype"].as_str()),
        (Some("infer"), Some("bf16"))
    );
    assert!(report["median_ms"].as_f64().unwrap() > 0.0);
    assert!(report["fused_attention"].as_u64().unwrap() > 0);
    assert!(report["planned_arena_bytes"].as_u64().unwrap() > 0);
    // The mask head ran on the valid detections (at least one row), and the plan at those rows
    // is no larger than the plan at the bound.
    let rows = report["dynamic_rows"].as_u64().unwrap();
    assert!((1..=100).contains(&rows), "{rows}");
    let at_rows = report["planned_arena_bytes_at_rows"].as_u64().unwrap();
    assert!(at_rows > 0 && at_rows <= report["planned_arena_bytes"].as_u64().unwrap());
    // The same kernel time, split by op kind and by scope.
    let total = |key: &str| -> f64 {
        report[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["host_ms"].as_f64().unwrap())
            .sum()
    };
    let scopes: Vec<&str> = report["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["scope"].as_str().unwrap())
        .collect();
    assert!(scopes.contains(&"backbone.net"), "{scopes:?}");
    assert!(scopes.iter().all(|s| s.split('.').count() <= 2), "{scopes:?}");
    let (by_op, by_scope) = (total("ops"), total("scopes"));
    assert!(
        by_op > 0.0 && (by_op - by_scope).abs() <= 1e-6 * by_op,
        "{by_op} vs {by_scope} ms"
    );
}

#[test]
fn bench_errors_are_clear() {
    if !cfg!(feature = "cuda") {
        let err = fails(&["bench", "--ops", "--small", "--device", "cuda"]);
        assert!(err.contains("CUDA is unavailable"), "{err}");
    }
    let err = fails(&["bench", "--ops", "--small", "--dtype", "f64"]);
    assert!(err.contains("--dtype"), "{err}");
    let err = fails(&["bench"]);
    assert!(err.contains("--ops") && err.contains("--model"), "{err}");
    let err = fails(&["bench", "--ops", "--model", "vitdet-b"]);
    assert!(err.contains("cannot be used with"), "{err}");
}
