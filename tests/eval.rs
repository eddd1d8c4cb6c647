//! COCO evaluation and TIDE against pycocotools and tidecv (tests/fixtures/generate_eval.py),
//! the mask codec against pycocotools, and the `vitdet eval` command line.

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};
use vitdet::eval::{evaluate, CocoEval, Detections, GroundTruth, IouType};
use vitdet::mask::{box_iou, Rle, Runs};

/// Our evaluation does pycocotools' and tidecv's arithmetic in the same order except for
/// final means (numpy's pairwise sum vs a running sum), which moves results by ~1e-16 per
/// term; 1e-9 leaves room for that and still catches any real difference (one changed match
/// moves AP by >= 1e-4 on these fixtures).
const TOL: f64 = 1e-9;

fn path(name: &str) -> PathBuf {
    common::fixture(&format!("eval/{name}"))
}

/// Reads a fixture with exactly rounded floats, as Python wrote them.
fn read(name: &str) -> Value {
    vitdet::eval::json::parse(&std::fs::read_to_string(path(name)).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn runs_of(v: &Value) -> Runs {
    let rle: Rle = serde_json::from_value(v.clone()).unwrap();
    Runs::from_rle(&rle).unwrap()
}

#[test]
fn polygons_rasterize_as_pycocotools() {
    let cases = read("masks.json");
    let polys = cases["polygons"].as_array().unwrap();
    assert!(polys.len() >= 15);
    for c in polys {
        let name = c["name"].as_str().unwrap();
        let (h, w) = (
            c["height"].as_u64().unwrap() as usize,
            c["width"].as_u64().unwrap() as usize,
        );
        let parts: Vec<Runs> = c["polygons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| Runs::from_polygon(&floats(p), h, w).unwrap())
            .collect();
        let runs = Runs::union(&parts).unwrap();
        assert_eq!(runs.compress().counts, c["counts"].as_str().unwrap(), "{name}");
        assert_eq!(runs.area(), c["area"].as_u64().unwrap(), "{name}");
        assert_eq!(runs.to_bbox().to_vec(), floats(&c["bbox"]), "{name}");
        assert_eq!(
            Runs::from_compressed(c["counts"].as_str().unwrap(), h, w).unwrap(),
            runs,
            "{name}"
        );
        if let Some(rows) = c["rows"].as_array() {
            let want: Vec<u8> = rows
                .iter()
                .flat_map(|r| r.as_str().unwrap().bytes().map(|b| b - b'0').collect::<Vec<_>>())
                .collect();
            assert_eq!(runs.decode(), want, "{name}");
        }
    }
}

#[test]
fn uncompressed_rle_compresses_as_pycocotools() {
    for c in read("masks.json")["uncompressed"].as_array().unwrap() {
        let (h, w) = (
            c["height"].as_u64().unwrap() as usize,
            c["width"].as_u64().unwrap() as usize,
        );
        let counts: Vec<u32> = c["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let runs = Runs::new(h, w, counts).unwrap();
        assert_eq!(runs.compress().counts, c["compressed"].as_str().unwrap());
        assert_eq!(Runs::from_mask(&runs.decode(), h, w), runs);
    }
}

#[test]
fn mask_and_box_iou_match_pycocotools() {
    let cases = read("masks.json");
    // The same IEEE operations in the same order as maskApi.c: results are bit-identical.
    let m = &cases["mask_iou"];
    let dts: Vec<Runs> = m["dt"].as_array().unwrap().iter().map(runs_of).collect();
    let gts: Vec<Runs> = m["gt"].as_array().unwrap().iter().map(runs_of).collect();
    let crowd: Vec<bool> = m["iscrowd"].as_array().unwrap().iter().map(|v| v == 1).collect();
    let mut nonzero = 0;
    for (d, row) in dts.iter().zip(m["iou"].as_array().unwrap()) {
        for ((g, c), want) in gts.iter().zip(&crowd).zip(floats(row)) {
            assert_eq!(d.iou(g, *c), want);
            nonzero += usize::from(want > 0.0);
        }
    }
    assert!(nonzero >= 3, "the fixture should have overlapping masks");
    let b = &cases["box_iou"];
    let boxes = |k: &str| -> Vec<[f64; 4]> {
        b[k].as_array()
            .unwrap()
            .iter()
            .map(|x| floats(x).try_into().unwrap())
            .collect()
    };
    let (dts, gts) = (boxes("dt"), boxes("gt"));
    let crowd: Vec<bool> = b["iscrowd"].as_array().unwrap().iter().map(|v| v == 1).collect();
    for (d, row) in dts.iter().zip(b["iou"].as_array().unwrap()) {
        for ((g, c), want) in gts.iter().zip(&crowd).zip(floats(row)) {
            assert_eq!(box_iou(d, g, *c), want, "{d:?} vs {g:?} crowd {c}");
        }
    }
}

fn load(case: &str) -> (GroundTruth, Detections) {
    let gt = GroundTruth::load(&path(&format!("{case}_gt.json"))).unwrap();
    let dets = Detections::load(&path(&format!("{case}_dets.json")), &gt).unwrap();
    (gt, dets)
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= TOL, "{what}[{i}]: {g} vs pycocotools/tidecv {w}");
    }
}

/// Compares a report (as JSON) with a `*_expected.json`.
fn check_report(got: &Value, want: &Value, case: &str) {
    assert_close(&floats(&got["bbox"]), &floats(&want["bbox"]), &format!("{case} bbox"));
    assert_close(&floats(&got["segm"]), &floats(&want["segm"]), &format!("{case} segm"));
    for t in ["bbox", "segm"] {
        let (g, w) = (&got["tide"][t], &want["tide"][t]);
        let what = format!("{case} tide {t}");
        assert_close(&[g["ap50"].as_f64().unwrap()], &[w["ap50"].as_f64().unwrap()], &what);
        for k in ["Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"] {
            assert_close(
                &[g["main"][k].as_f64().unwrap()],
                &[w["main"][k].as_f64().unwrap()],
                &format!("{what} {k}"),
            );
            assert_eq!(g["counts"][k], w["counts"][k], "{what} count {k}");
        }
        for k in ["FalsePos", "FalseNeg"] {
            let (a, b) = (g["special"][k].as_f64().unwrap(), w["special"][k].as_f64().unwrap());
            assert_close(&[a], &[b], &format!("{what} {k}"));
        }
    }
}

#[test]
fn cocoeval_and_tide_match_pycocotools_and_tidecv() {
    for case in ["main", "edge"] {
        let (gt, dets) = load(case);
        let report = evaluate(&gt, &dets).unwrap();
        let want = read(&format!("{case}_expected.json"));
        check_report(&serde_json::to_value(&report).unwrap(), &want, case);
    }
    // The fixtures exercise what they claim to: every range evaluated in `main`, -1 for the
    // empty large range of `edge`, and each TIDE error type somewhere.
    let main = read("main_expected.json");
    assert!(
        floats(&main["bbox"]).iter().all(|&v| v > 0.0),
        "main: no empty or zero entry"
    );
    let edge = floats(&read("edge_expected.json")["bbox"]);
    assert_eq!((edge[5], edge[11]), (-1.0, -1.0));
    for k in ["Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"] {
        assert!(
            main["tide"]["bbox"]["counts"][k].as_u64().unwrap() > 0,
            "main has no {k} error"
        );
    }
}

#[test]
fn per_category_precision_is_minus_one_without_ground_truth() {
    let (gt, dets) = load("main");
    let e = CocoEval::run(&gt, &dets, IouType::Bbox).unwrap();
    // Category 20 is listed but never annotated: all its precision entries are -1.
    let k = e.cat_ids.iter().position(|&c| c == 20).unwrap();
    let nk = e.cat_ids.len();
    let (a, m) = (4, 3);
    for t in 0..10 {
        for r in 0..101 {
            for ai in 0..a {
                for mi in 0..m {
                    assert_eq!(e.precision[(((t * 101 + r) * nk + k) * a + ai) * m + mi], -1.0);
                }
            }
        }
    }
}

#[test]
fn boxes_only_results_skip_masks() {
    let gt = GroundTruth::load(&path("main_gt.json")).unwrap();
    let mut raw = read("main_dets.json");
    for d in raw.as_array_mut().unwrap() {
        d.as_object_mut().unwrap().remove("segmentation");
    }
    let dets = Detections::from_value(&raw, "boxes.json", &gt).unwrap();
    let report = evaluate(&gt, &dets).unwrap();
    let want = read("main_expected.json");
    // Box evaluation never looks at the masks.
    assert_close(&report.bbox, &floats(&want["bbox"]), "boxes-only bbox");
    assert!(report.segm.is_none() && report.tide.segm.is_none());
    assert_close(
        &[report.tide.bbox.ap50],
        &[want["tide"]["bbox"]["ap50"].as_f64().unwrap()],
        "boxes-only TIDE",
    );
}

#[test]
fn boxes_only_ground_truth_skips_masks() {
    let mut raw = read("main_gt.json");
    for a in raw["annotations"].as_array_mut().unwrap() {
        a.as_object_mut().unwrap().remove("segmentation");
    }
    let gt = GroundTruth::from_value(&raw, "boxes_gt.json").unwrap();
    let dets = Detections::load(&path("main_dets.json"), &gt).unwrap();
    let report = evaluate(&gt, &dets).unwrap();
    assert_close(
        &report.bbox,
        &floats(&read("main_expected.json")["bbox"]),
        "boxes-only GT bbox",
    );
    assert!(report.segm.is_none() && report.tide.segm.is_none());
    // Some annotations with masks and some without is an error naming the first without.
    let mut raw = read("main_gt.json");
    raw["annotations"][2].as_object_mut().unwrap().remove("segmentation");
    let gt = GroundTruth::from_value(&raw, "gt.json").unwrap();
    let id = raw["annotations"][2]["id"].as_i64().unwrap();
    let e = format!("{:#}", evaluate(&gt, &dets).unwrap_err());
    assert!(
        e.contains(&format!("annotation id {id}")) && e.contains("segmentation"),
        "{e}"
    );
}

fn gt_json() -> Value {
    json!({
        "images": [{"id": 1, "height": 20, "width": 30}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 50.0,
                          "bbox": [1, 1, 10, 5], "segmentation": [[1, 1, 11, 1, 11, 6, 1, 6]]}]
    })
}

fn error_of(gt: Value, dets: Value) -> String {
    let result = GroundTruth::from_value(&gt, "gt.json").and_then(|gt| {
        let dets = Detections::from_value(&dets, "dets.json", &gt)?;
        evaluate(&gt, &dets)
    });
    format!("{:#}", result.expect_err("should be refused"))
}

#[test]
fn bad_input_names_the_problem() {
    let det = json!({"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 5], "score": 0.5});
    let e = error_of(
        gt_json(),
        json!([{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]),
    );
    assert!(e.contains("dets.json: detection 0") && e.contains("image_id 7"), "{e}");

    let mut gt = gt_json();
    gt["annotations"][0].as_object_mut().unwrap().remove("area");
    let e = error_of(gt, json!([det]));
    assert!(e.contains("annotation id 5") && e.contains("area"), "{e}");

    let mut gt = gt_json();
    gt["annotations"][0]["segmentation"] = json!([[1, 1, 11, 1]]);
    let e = error_of(gt, json!([det]));
    assert!(e.contains("annotations[0] (id 5)") && e.contains("polygon"), "{e}");

    let mut gt = gt_json();
    let dup = gt["annotations"][0].clone();
    gt["annotations"].as_array_mut().unwrap().push(dup);
    assert!(error_of(gt, json!([])).contains("duplicate annotation id"));

    let bad_rle =
        json!([{"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": {"size": [20, 30], "counts": "0"}}]);
    let e = error_of(gt_json(), bad_rle);
    assert!(e.contains("detection 0") && e.contains("segmentation"), "{e}");

    let wrong_size =
        json!([{"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": {"size": [2, 2], "counts": "04"}}]);
    assert!(error_of(gt_json(), wrong_size).contains("image 1 is 20x30"));

    let nan_score = json!([{"image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "score": "high"}]);
    assert!(error_of(gt_json(), nan_score).contains("`score` must be a finite number"));

    let mut with_mask = det.clone();
    with_mask["segmentation"] = json!({"size": [20, 30], "counts": [600]});
    let e = error_of(gt_json(), json!([with_mask, det]));
    assert!(e.contains("detection 1 has none"), "{e}");

    let e = GroundTruth::load(&path("missing.json")).unwrap_err();
    assert!(format!("{e:#}").contains("missing.json"));
}

#[test]
fn hand_checked_perfect_and_empty_results() {
    // One object, one exact detection: every AP/AR over the evaluated ranges is 1, the
    // ranges without objects are -1, and TIDE finds nothing to fix.
    let gt = GroundTruth::from_value(&gt_json(), "gt.json").unwrap();
    let perfect = json!([{"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 5], "score": 0.9}]);
    let r = evaluate(&gt, &Detections::from_value(&perfect, "d.json", &gt).unwrap()).unwrap();
    // pycocotools' precision is tp / (tp + fp + eps): 1 - 2^-52 for a perfect detector, and
    // the mean of 1010 of those rounds within a few ulp of 1.
    assert_close(
        &r.bbox,
        &[1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0],
        "perfect",
    );
    assert!(r.bbox[0] < 1.0, "precision keeps pycocotools' eps");
    assert_eq!(r.tide.bbox.ap50, 100.0);
    assert_eq!(r.tide.bbox.main.miss, 0.0);
    // No detections: zero AP and recall where there is ground truth; TIDE counts one miss and
    // fixing it leaves nothing to average (AP 0).
    let r = evaluate(&gt, &Detections::from_value(&json!([]), "d.json", &gt).unwrap()).unwrap();
    assert_eq!(r.bbox, [0.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0]);
    assert_eq!(r.tide.bbox.counts.miss, 1);
}

fn vitdet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vitdet"))
        .args(args)
        .output()
        .expect("run vitdet")
}

#[test]
fn cli_eval_prints_json_and_text() {
    let (gt, dets) = (path("main_gt.json"), path("main_dets.json"));
    let (gt, dets) = (gt.to_str().unwrap(), dets.to_str().unwrap());
    let out = vitdet(&["eval", "--gt", gt, "--dets", dets, "--format", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    check_report(&got, &read("main_expected.json"), "cli main");

    let out = vitdet(&["eval", "--gt", gt, "--dets", dets]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let ap = floats(&read("main_expected.json")["bbox"])[0];
    let line = format!(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = {ap:.3}");
    assert!(text.contains(&line), "{text}");
    assert!(text.contains(" Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]"));
    assert!(text.contains("TIDE segm") && text.contains("Dupe"), "{text}");
}

#[test]
fn cli_eval_refuses_what_it_cannot_do() {
    // Evaluating a model needs its dataset: a missing one is named.
    let out = vitdet(&[
        "eval",
        "--model",
        "vitdet-b",
        "--weights",
        "w.safetensors",
        "--data",
        "coco",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("coco/annotations/instances_val.json"), "{err}");
    let out = vitdet(&["eval", "--model", "vitdet-b", "--data", "coco"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --model, --weights and --data"));

    let gt = path("main_gt.json");
    let out = vitdet(&["eval", "--gt", gt.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dets"));

    let gt = gt.to_str().unwrap();
    let out = vitdet(&["eval", "--gt", gt, "--dets", gt, "--dtype", "bf16"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device and --dtype apply to evaluating a model"));
    let out = vitdet(&[
        "eval",
        "--model",
        "vitdet-tiny",
        "--weights",
        gt,
        "--data",
        "coco",
        "--device",
        "tpu",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device `tpu`"));

    let out = vitdet(&["eval", "--gt", gt, "--dets", gt]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be a JSON list of detections"));
}
