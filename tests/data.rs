//! Training data: the synthetic dataset, the COCO loader, large-scale jitter and batching.

mod common;

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use serde_json::{json, Value};
use vitdet::coco::rle_encode;
use vitdet::data::lsj::{crop_offset, nearest_index, resize_nearest, resize_scale_shape};
use vitdet::data::rng::{Domain, Stream};
use vitdet::data::synthetic::{generate, synth_image, Split, SynthOptions, SYNTH_CATEGORIES};
use vitdet::data::{
    collate, eval_sample, mask_box, CocoDataset, GtInstance, LsjConfig, LsjParams, TrainLoader, TrainSampler,
};
use vitdet::runtime::preprocess::{normalize_and_pad, shortest_edge_shape};
use vitdet::runtime::Device;

fn synth(dir: &Path, train: usize, val: usize, size: usize, seed: u64) {
    generate(&SynthOptions {
        out: dir.to_path_buf(),
        train,
        val,
        size,
        seed,
    })
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Synthetic dataset

#[test]
fn synthetic_images_are_deterministic_and_independent_of_count() {
    let a = synth_image(64, 7, Split::Train, 3);
    let b = synth_image(64, 7, Split::Train, 3);
    assert_eq!(a.image, b.image);
    assert_eq!(a.instances, b.instances);
    let other = synth_image(64, 7, Split::Val, 3);
    assert_ne!(a.image, other.image, "splits draw from different streams");
    let reseeded = synth_image(64, 8, Split::Train, 3);
    assert_ne!(a.image, reseeded.image);

    // Two runs, different image counts: shared files are byte-identical.
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    synth(d1.path(), 4, 2, 64, 11);
    synth(d2.path(), 6, 2, 64, 11);
    for f in ["train/000001.png", "train/000004.png", "val/000002.png"] {
        assert_eq!(
            std::fs::read(d1.path().join(f)).unwrap(),
            std::fs::read(d2.path().join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        std::fs::read(d1.path().join("annotations/instances_val.json")).unwrap(),
        std::fs::read(d2.path().join("annotations/instances_val.json")).unwrap()
    );
}

#[test]
fn synthetic_instances_are_exact_visible_masks() {
    let size = 96;
    let min_area = 16usize.max(size * size / 400);
    let mut classes_seen = [false; 4];
    let mut edge_contrast = Vec::new();
    for i in 0..40 {
        let s = synth_image(size, 3, Split::Train, i);
        assert!((1..=4).contains(&s.instances.len()), "image {i}: {}", s.instances.len());
        let mut owner = vec![0u8; size * size];
        for inst in &s.instances {
            classes_seen[(inst.category_id - 1) as usize] = true;
            let area = inst.mask.iter().filter(|&&v| v == 1).count();
            assert!(inst.mask.iter().all(|&v| v <= 1));
            assert!(area >= min_area, "image {i}: visible area {area} < {min_area}");
            for (p, &v) in inst.mask.iter().enumerate() {
                owner[p] += v;
            }
        }
        // Visible masks never overlap: each pixel shows at most one shape.
        assert!(owner.iter().all(|&c| c <= 1), "image {i}: overlapping visible masks");
        // The picture follows the masks: across each mask's left/right border the color jumps
        // (shapes get a color at L1 distance >= 150 from the background under them, noise is
        // +-14 per channel), while inside a mask neighbours differ by noise and shading only.
        for inst in &s.instances {
            let (mut edge, mut n_edge, mut inner, mut n_inner) = (0.0, 0, 0.0, 0);
            for y in 0..size {
                for x in 0..size - 1 {
                    let (a, b) = (inst.mask[y * size + x], inst.mask[y * size + x + 1]);
                    if a == 0 && b == 0 {
                        continue;
                    }
                    let (pa, pb) = (
                        s.image.get_pixel(x as u32, y as u32),
                        s.image.get_pixel(x as u32 + 1, y as u32),
                    );
                    let d: f64 = (0..3).map(|c| (pa[c] as f64 - pb[c] as f64).abs()).sum();
                    if a != b {
                        edge += d;
                        n_edge += 1;
                    } else {
                        inner += d;
                        n_inner += 1;
                    }
                }
            }
            edge /= n_edge.max(1) as f64;
            inner /= n_inner.max(1) as f64;
            edge_contrast.push(edge);
            // Noise of +-8 per channel: |difference| averages 16/3 per channel, 16 over three;
            // shading adds under 2 per pixel step at this size.
            assert!(
                inner < 25.0,
                "image {i}: neighbours inside a mask differ by {inner:.1} on average"
            );
        }
    }
    edge_contrast.sort_by(f64::total_cmp);
    let median = edge_contrast[edge_contrast.len() / 2];
    // Colors are >= 150 (L1) from the mean background under the shape, so a border step is
    // about that or more (other shapes, shading and noise move it either way; 236 with this
    // seed). Painting that ignored the masks would put most of these steps near the noise level.
    assert!(median > 100.0, "median contrast across mask borders {median:.1}");
    assert_eq!(classes_seen, [true; 4], "40 images show every class");
}

#[test]
fn synthetic_json_is_coco_and_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 12, 3, 64, 5);
    let text = std::fs::read_to_string(dir.path().join("annotations/instances_train.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["images"].as_array().unwrap().len(), 12);
    assert_eq!(doc["categories"].as_array().unwrap().len(), SYNTH_CATEGORIES.len());
    for (i, img) in doc["images"].as_array().unwrap().iter().enumerate() {
        let s = synth_image(64, 5, Split::Train, i as u64);
        let on_disk = image::open(dir.path().join("train").join(img["file_name"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!(on_disk, s.image, "PNG is lossless");
        let anns: Vec<&Value> = doc["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["image_id"] == img["id"])
            .collect();
        assert_eq!(anns.len(), s.instances.len());
        for (a, inst) in anns.iter().zip(&s.instances) {
            let (x0, y0, x1, y1) = mask_box(&inst.mask, 64, 64).unwrap();
            assert_eq!(a["category_id"], inst.category_id);
            assert_eq!(a["iscrowd"], 0);
            assert_eq!(
                a["area"].as_f64().unwrap(),
                inst.mask.iter().filter(|&&v| v != 0).count() as f64
            );
            assert_eq!(
                a["bbox"],
                json!([x0 as f64, y0 as f64, (x1 - x0) as f64, (y1 - y0) as f64])
            );
            assert_eq!(a["segmentation"]["counts"], rle_encode(&inst.mask, 64, 64).counts);
        }
    }

    let ds = CocoDataset::load(
        dir.path().join("annotations/instances_train.json"),
        dir.path().join("train"),
    )
    .unwrap();
    ds.check_images().unwrap();
    assert_eq!(ds.len(), 12);
    assert_eq!(ds.num_classes(), 4);
    for i in 0..ds.len() {
        let s = synth_image(64, 5, Split::Train, i as u64);
        let inst = ds.instances(i).unwrap();
        assert_eq!(inst.len(), s.instances.len());
        for (a, b) in inst.iter().zip(&s.instances) {
            assert_eq!(a.mask, b.mask, "RLE decodes back to the exact mask");
            assert_eq!(ds.category_id(a.class), Some(b.category_id));
        }
        assert_eq!(ds.load_image(i).unwrap(), s.image);
    }
    let e = ds.eval_sample(3, 32).unwrap();
    assert_eq!((e.sample.image_hw, e.original_hw), ([32, 32], [64, 64]));
    assert_eq!(e.sample.classes.len(), ds.instances(3).unwrap().len());
    let (used, report) = ds.training_images();
    assert_eq!(used.len(), 12);
    assert_eq!(report.skipped_images, 0);
}

#[test]
fn synth_cli_writes_the_dataset_and_rejects_bad_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vitdet"))
        .args([
            "data", "synth", "--train", "3", "--val", "1", "--size", "48", "--seed", "2", "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 images"));
    assert!(dir.path().join("annotations/instances_val.json").is_file());
    assert!(dir.path().join("train/000003.png").is_file());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vitdet"))
        .args(["data", "synth", "--size", "8", "--out"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size 8 is out of range"));
}

// ---------------------------------------------------------------------------------------------
// COCO loader

/// Writes `doc` as `instances.json` and the given images (solid gray, `(w, h)`) in `dir`.
fn write_coco(dir: &Path, doc: &Value, images: &[(&str, u32, u32)]) -> PathBuf {
    for &(name, w, h) in images {
        RgbImage::from_pixel(w, h, Rgb([100, 110, 120]))
            .save(dir.join(name))
            .unwrap();
    }
    let p = dir.join("instances.json");
    std::fs::write(&p, serde_json::to_string(doc).unwrap()).unwrap();
    p
}

/// A small valid dataset: image 5 (7x6) with a polygon, a compressed RLE, an uncompressed RLE
/// and a crowd annotation; image 9 with only a crowd annotation; image 12 with nothing.
fn small_doc() -> Value {
    // The polygon's pixel centers inside are x 1..=4, y 1..=3 (pycocotools' rasterization of
    // this rectangle, checked with pycocotools.mask.frPyObjects + decode).
    let mut rect = vec![0u8; 6 * 7];
    for y in 1..4 {
        for x in 1..5 {
            rect[y * 7 + x] = 1;
        }
    }
    // Column-major runs of `rect`: 7 zeros (column 0 and the top of column 1), then per
    // column 1..=4 three ones and three zeros, the last run ending with the two empty columns
    // (2 + 6 + 6).
    let counts = json!([7, 3, 3, 3, 3, 3, 3, 3, 14]);
    json!({
        "images": [
            {"id": 5, "file_name": "a.png", "height": 6, "width": 7},
            {"id": 9, "file_name": "b.png", "height": 6, "width": 7},
            {"id": 12, "file_name": "c.png", "height": 6, "width": 7},
        ],
        "categories": [
            {"id": 40, "name": "forty"},
            {"id": 3, "name": "three"},
            {"id": 17, "name": "seventeen"},
        ],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 17, "bbox": [1, 1, 4, 3], "iscrowd": 0,
             "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4], [0, 0, 1]]},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [1, 1, 4, 3], "iscrowd": 0,
             "segmentation": {"size": [6, 7], "counts": rle_encode(&rect, 6, 7).counts}},
            {"id": 3, "image_id": 5, "category_id": 40, "bbox": [1, 1, 4, 3],
             "segmentation": {"size": [6, 7], "counts": counts}},
            {"id": 4, "image_id": 5, "category_id": 40, "bbox": [0, 0, 7, 6], "iscrowd": 1,
             "segmentation": {"size": [6, 7], "counts": counts}},
            {"id": 5, "image_id": 9, "category_id": 3, "bbox": [0, 0, 2, 2], "iscrowd": 1,
             "segmentation": {"size": [6, 7], "counts": counts}},
            {"id": 6, "image_id": 9, "category_id": 3, "bbox": [0, 0, 2, 2], "iscrowd": 0,
             "segmentation": [[0, 0, 1, 1]]},
        ],
    })
}

#[test]
fn coco_loader_decodes_every_segmentation_form_and_filters_like_detectron2() {
    let dir = tempfile::tempdir().unwrap();
    let json = write_coco(
        dir.path(),
        &small_doc(),
        &[("a.png", 7, 6), ("b.png", 7, 6), ("c.png", 7, 6)],
    );
    let ds = CocoDataset::load(&json, dir.path()).unwrap();
    // Contiguous classes in sorted category-id order: 3 -> 0, 17 -> 1, 40 -> 2.
    assert_eq!(ds.num_classes(), 3);
    assert_eq!(
        (ds.class_index(3), ds.class_index(17), ds.class_index(40)),
        (Some(0), Some(1), Some(2))
    );
    assert_eq!(ds.category_id(1), Some(17));
    assert_eq!(ds.class_index(4), None);
    assert_eq!(ds.categories[2].name, "forty");

    let inst = ds.instances(ds.image_index(5).unwrap()).unwrap();
    assert_eq!(inst.len(), 3, "the crowd annotation is not a training instance");
    assert_eq!(inst.iter().map(|i| i.class).collect::<Vec<_>>(), [1, 0, 2]);
    assert_eq!(inst[0].mask, inst[1].mask, "polygon and compressed RLE agree");
    assert_eq!(inst[0].mask, inst[2].mask, "polygon and uncompressed RLE agree");
    assert_eq!(mask_box(&inst[0].mask, 6, 7), Some((1, 1, 5, 4)));

    // Image 9: its only non-crowd annotation has no valid polygon; image 12 has none at all.
    let (used, report) = ds.training_images();
    assert_eq!(used, vec![ds.image_index(5).unwrap()]);
    assert_eq!((report.images, report.used, report.skipped_images), (3, 1, 2));
    assert_eq!(report.crowd_annotations, 2);
    assert_eq!(report.annotations_without_mask, 1);
    ds.check_images().unwrap();
}

fn load_err(doc: &Value, images: &[(&str, u32, u32)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let json = write_coco(dir.path(), doc, images);
    format!("{:#}", CocoDataset::load(&json, dir.path()).unwrap_err())
}

#[test]
fn coco_loader_errors_name_the_problem() {
    let imgs = [("a.png", 7, 6), ("b.png", 7, 6), ("c.png", 7, 6)];
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let e = format!("{:#}", CocoDataset::load(&missing, dir.path()).unwrap_err());
    assert!(e.contains("nope.json"), "{e}");

    std::fs::write(dir.path().join("bad.json"), "{\"images\": [").unwrap();
    let e = format!(
        "{:#}",
        CocoDataset::load(dir.path().join("bad.json"), dir.path()).unwrap_err()
    );
    assert!(e.contains("not valid JSON"), "{e}");

    let mut doc = small_doc();
    doc["images"][1].as_object_mut().unwrap().remove("height");
    let e = load_err(&doc, &imgs);
    assert!(e.contains("images[1]") && e.contains("`height`"), "{e}");

    let mut doc = small_doc();
    doc["images"][0]["width"] = json!("seven");
    let e = load_err(&doc, &imgs);
    assert!(e.contains("images[0].width") && e.contains("\"seven\""), "{e}");

    let mut doc = small_doc();
    doc["annotations"][2]["image_id"] = json!(77);
    let e = load_err(&doc, &imgs);
    assert!(e.contains("annotations[2] (id 3)") && e.contains("image_id 77"), "{e}");

    let mut doc = small_doc();
    doc["annotations"][0]["category_id"] = json!(99);
    let e = load_err(&doc, &imgs);
    assert!(e.contains("category_id 99"), "{e}");

    let mut doc = small_doc();
    doc["annotations"][1]["segmentation"]["size"] = json!([7, 6]);
    let e = load_err(&doc, &imgs);
    assert!(e.contains("RLE size [7, 6]"), "{e}");

    let mut doc = small_doc();
    doc["annotations"][2]["segmentation"]["counts"] = json!([7, 3]);
    let e = load_err(&doc, &imgs);
    assert!(e.contains("sum to 10"), "{e}");

    let mut doc = small_doc();
    doc["annotations"][3]["bbox"] = json!([0, 0, 1]);
    let e = load_err(&doc, &imgs);
    assert!(e.contains("annotations[3] (id 4).bbox"), "{e}");

    let mut doc = small_doc();
    doc["images"][2]["id"] = json!(5);
    let e = load_err(&doc, &imgs);
    assert!(e.contains("image id 5 appears twice"), "{e}");

    let e = format!(
        "{:#}",
        CocoDataset::load(write_coco(dir.path(), &small_doc(), &[]), dir.path().join("missing")).unwrap_err()
    );
    assert!(e.contains("missing") && e.contains("folder"), "{e}");
}

#[test]
fn coco_loader_errors_for_unreadable_or_wrongly_sized_images() {
    let dir = tempfile::tempdir().unwrap();
    // a.png: the wrong size; b.png: not an image; c.png: absent.
    let json = write_coco(dir.path(), &small_doc(), &[("a.png", 8, 6)]);
    std::fs::write(dir.path().join("b.png"), b"not a png").unwrap();
    let ds = CocoDataset::load(&json, dir.path()).unwrap();
    let e = format!("{:#}", ds.load_image(0).unwrap_err());
    assert!(e.contains("a.png is 8x6") && e.contains("7x6"), "{e}");
    let e = format!("{:#}", ds.check_images().unwrap_err());
    assert!(e.contains("a.png is 8x6"), "{e}");
    let e = format!("{:#}", ds.load_image(1).unwrap_err());
    assert!(e.contains("b.png"), "{e}");
    let e = format!("{:#}", ds.load_image(2).unwrap_err());
    assert!(e.contains("c.png"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Large-scale jitter

/// A 96x128 (h x w) test image with a gradient (so flips and crops show) and two instances.
fn test_image() -> (RgbImage, Vec<GtInstance>) {
    let (w, h) = (128u32, 96u32);
    let img = RgbImage::from_fn(w, h, |x, y| Rgb([(x * 2) as u8, (y * 2) as u8, ((x + y) % 256) as u8]));
    let mut a = vec![0u8; (w * h) as usize];
    let mut b = vec![0u8; (w * h) as usize];
    for y in 10..40 {
        for x in 5..30 {
            a[y * w as usize + x] = 1;
        }
    }
    for y in 50..90 {
        for x in 100..126 {
            b[y * w as usize + x] = 1;
        }
    }
    (
        img,
        vec![GtInstance { class: 2, mask: a }, GtInstance { class: 0, mask: b }],
    )
}

#[test]
fn lsj_at_scale_one_without_flip_is_the_identity() {
    let (img, inst) = test_image();
    // 96x128 with S = 128 at scale 1: output_scale = min(128/96, 128/128) = 1, so no resize and
    // no crop (nothing exceeds S).
    let cfg = LsjConfig::vitdet(128);
    let p = LsjParams {
        flip: false,
        scale: 1.0,
        crop: 0.73,
    };
    let s = cfg.apply(&img, &inst, &p).unwrap();
    assert_eq!(s.image_hw, [96, 128]);
    assert_eq!(s.image.dims(), &[3, 128, 128]);
    let expected = normalize_and_pad(&img, 128, &Device::Cpu).unwrap();
    assert_eq!(common::f32s(&s.image), common::f32s(&expected));
    assert_eq!(s.classes, vec![2, 0]);
    assert_eq!(s.boxes, vec![[5.0, 10.0, 30.0, 40.0], [100.0, 50.0, 126.0, 90.0]]);
    for (m, orig) in s.masks.iter().zip(&inst) {
        assert_eq!(&m[..96 * 128], &orig.mask[..], "inside the image the mask is unchanged");
        assert!(m[96 * 128..].iter().all(|&v| v == 0), "padding rows are empty");
    }
}

#[test]
fn lsj_flip_mirrors_image_masks_and_boxes() {
    let (img, inst) = test_image();
    let cfg = LsjConfig::vitdet(128);
    let p = LsjParams {
        flip: true,
        scale: 1.0,
        crop: 0.0,
    };
    let s = cfg.apply(&img, &inst, &p).unwrap();
    let flipped = image::imageops::flip_horizontal(&img);
    let expected = normalize_and_pad(&flipped, 128, &Device::Cpu).unwrap();
    assert_eq!(common::f32s(&s.image), common::f32s(&expected));
    // x -> w - x for box edges (w = 128).
    assert_eq!(s.boxes, vec![[98.0, 10.0, 123.0, 40.0], [2.0, 50.0, 28.0, 90.0]]);
    for (m, orig) in s.masks.iter().zip(&inst) {
        for y in 0..96 {
            for x in 0..128 {
                assert_eq!(m[y * 128 + x], orig.mask[y * 128 + 127 - x]);
            }
        }
    }

    // Narrower than S: the flip mirrors the image's own width, not the padded one.
    let narrow = image::imageops::crop_imm(&img, 0, 0, 100, 96).to_image();
    let nm: Vec<GtInstance> = inst
        .iter()
        .map(|g| GtInstance {
            class: g.class,
            mask: (0..96).flat_map(|y| g.mask[y * 128..y * 128 + 100].to_vec()).collect(),
        })
        .collect();
    // output_scale = min(128/96, 128/100) = 1.28 would resize; use S = 100 to keep scale 1.
    let s = LsjConfig::vitdet(100).apply(&narrow, &nm, &p).unwrap();
    assert_eq!(s.image_hw, [96, 100]);
    assert_eq!(s.boxes[0], [70.0, 10.0, 95.0, 40.0]);
}

#[test]
fn resize_scale_and_crop_follow_detectron2_formulas() {
    // ResizeScale: output_scale = min(S*scale/h, S*scale/w), sides round(side * output_scale)
    // with numpy's ties-to-even (values checked with numpy).
    // 480x640, S=1024, scale 0.5: min(512/480, 512/640) = 0.8 -> 384 x 512.
    assert_eq!(resize_scale_shape(480, 640, 1024, 0.5), (384, 512));
    // 640x480 (portrait), S=1024, scale 2: min(2048/640, 2048/480) = 3.2 -> 2048 x 1536.
    assert_eq!(resize_scale_shape(640, 480, 1024, 2.0), (2048, 1536));
    // 5x10, S=10, scale 0.5: output_scale 0.5, h = 2.5 -> 2 (tie to even), w = 5.
    assert_eq!(resize_scale_shape(5, 10, 10, 0.5), (2, 5));
    // scale 0.7: output_scale 0.7, h = 3.5 -> 4 (tie to even), w = 7.
    assert_eq!(resize_scale_shape(5, 10, 10, 0.7), (4, 7));
    // 96x128 at S=128, scale 0.1: min(12.8/96, 12.8/128) = 0.1 -> 9.6 -> 10, 12.8 -> 13.
    assert_eq!(resize_scale_shape(96, 128, 128, 0.1), (10, 13));

    // FixedSizeCrop: offset round(max(size - S, 0) * u), the same u on both axes.
    assert_eq!(
        crop_offset(300, 133, 128, 0.5),
        (86, 2),
        "172 * 0.5 = 86; 5 * 0.5 = 2.5 -> 2"
    );
    assert_eq!(crop_offset(100, 90, 128, 0.9), (0, 0), "nothing to crop");

    // The sample's valid size follows: 96x128 at scale 0.5 -> 48x64; at scale 2 -> 192x256,
    // cropped to 128x128.
    let (img, inst) = test_image();
    let cfg = LsjConfig::vitdet(128);
    for (scale, hw) in [(0.5, [48, 64]), (2.0, [128, 128]), (1.5, [128, 128]), (0.1, [10, 13])] {
        let s = cfg
            .apply(
                &img,
                &inst,
                &LsjParams {
                    flip: false,
                    scale,
                    crop: 0.5,
                },
            )
            .unwrap();
        assert_eq!(s.image_hw, hw, "scale {scale}");
    }
}

#[test]
fn nearest_resize_matches_pillow() {
    // Pillow 13's Image.resize(NEAREST) on a row 0..n picks these source pixels.
    assert_eq!(nearest_index(5, 3), vec![0, 2, 4]);
    assert_eq!(nearest_index(3, 7), vec![0, 0, 1, 1, 1, 2, 2]);
    assert_eq!(nearest_index(10, 4), vec![1, 3, 6, 8]);
    let m: Vec<u8> = (0..6).collect(); // 2x3
    assert_eq!(resize_nearest(&m, 2, 3, 4, 3), vec![0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]);
}

#[test]
fn lsj_boxes_are_tight_boxes_of_the_masks() {
    let cfg = LsjConfig::vitdet(64);
    let mut seen_empty_drop = false;
    for i in 0..30u64 {
        let s = synth_image(64, 9, Split::Train, i);
        let inst: Vec<GtInstance> = s
            .instances
            .iter()
            .map(|g| GtInstance {
                class: (g.category_id - 1) as usize,
                mask: g.mask.clone(),
            })
            .collect();
        let p = cfg.draw(&mut Stream::new(1, Domain::Lsj, i, 0));
        let out = cfg.apply(&s.image, &inst, &p).unwrap();
        seen_empty_drop |= out.classes.len() < inst.len();
        let [h, w] = out.image_hw;
        let img = common::f32s(&out.image);
        // Padding (outside the valid region) is exactly zero in every channel.
        for c in 0..3 {
            for y in 0..64 {
                for x in 0..64 {
                    if y >= h || x >= w {
                        assert_eq!(img[c * 64 * 64 + y * 64 + x], 0.0);
                    }
                }
            }
        }
        for (b, m) in out.boxes.iter().zip(&out.masks) {
            let (x0, y0, x1, y1) = mask_box(m, 64, 64).expect("empty masks are dropped");
            assert_eq!(*b, [x0 as f32, y0 as f32, x1 as f32, y1 as f32]);
            assert!(x1 <= w && y1 <= h, "masks stay inside the valid region");
        }
    }
    assert!(seen_empty_drop, "some crop in 30 draws cuts an instance away entirely");
}

#[test]
fn lsj_draws_depend_only_on_seed_iteration_and_index() {
    let cfg = LsjConfig::vitdet(128);
    let a = cfg.draw(&mut Stream::new(4, Domain::Lsj, 1000, 3));
    let b = cfg.draw(&mut Stream::new(4, Domain::Lsj, 1000, 3));
    assert_eq!(a, b);
    let draws: Vec<LsjParams> = (0..200)
        .map(|i| cfg.draw(&mut Stream::new(4, Domain::Lsj, i, 0)))
        .collect();
    assert!(draws
        .iter()
        .all(|p| (0.1..2.0).contains(&p.scale) && (0.0..1.0).contains(&p.crop)));
    let flips = draws.iter().filter(|p| p.flip).count();
    // Binomial(200, 1/2): mean 100, sd ~7.1; 60..140 is beyond 5.6 sd.
    assert!((60..140).contains(&flips), "{flips} flips in 200");
    assert_ne!(draws[0], draws[1]);
}

// ---------------------------------------------------------------------------------------------
// Sampler, loader, batches, validation inputs

#[test]
fn sampler_shuffles_each_epoch_reproducibly() {
    let s = TrainSampler::new(10, 3).unwrap();
    let p0 = s.permutation(0);
    let mut sorted = p0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_ne!(p0, s.permutation(1));
    assert_eq!(p0, TrainSampler::new(10, 3).unwrap().permutation(0));
    // Positions 7..13 span the end of epoch 0 and the start of epoch 1.
    let idx = s.indices(7, 6);
    assert_eq!(idx[..3], p0[7..]);
    assert_eq!(idx[3..], s.permutation(1)[..3]);
    assert!(TrainSampler::new(0, 1).is_err());
}

#[test]
fn loader_rebuilds_any_iteration_alone() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 6, 0, 48, 1);
    let load = || {
        CocoDataset::load(
            dir.path().join("annotations/instances_train.json"),
            dir.path().join("train"),
        )
        .unwrap()
    };
    let loader = TrainLoader::new(load(), LsjConfig::vitdet(48), 4, 77).unwrap();
    assert_eq!(loader.epoch_len(), 6);
    let batch = loader.samples(5).unwrap();
    // A fresh loader asked for iteration 5, slot 2 only, gives the same sample.
    let again = TrainLoader::new(load(), LsjConfig::vitdet(48), 4, 77).unwrap();
    let one = again.sample(5, 2).unwrap();
    assert_eq!(common::f32s(&one.image), common::f32s(&batch[2].image));
    assert_eq!(one.boxes, batch[2].boxes);
    assert_eq!(one.masks, batch[2].masks);
    assert_eq!(one.classes, batch[2].classes);
    // Another seed changes the stream.
    let other = TrainLoader::new(load(), LsjConfig::vitdet(48), 4, 78).unwrap();
    let differs = (0..4).any(|i| {
        other.batch_images(i) != loader.batch_images(i)
            || common::f32s(&other.sample(i, 0).unwrap().image) != common::f32s(&loader.sample(i, 0).unwrap().image)
    });
    assert!(differs);
    assert!(loader.sample(0, 4).is_err(), "slot outside the batch");
}

#[test]
fn collate_pads_and_truncates_ground_truth() {
    let (img, inst) = test_image();
    let cfg = LsjConfig::vitdet(128);
    let p = LsjParams {
        flip: false,
        scale: 1.0,
        crop: 0.0,
    };
    let two = cfg.apply(&img, &inst, &p).unwrap();
    let one = cfg.apply(&img, &inst[..1], &p).unwrap();
    let b = collate(&[two.clone(), one], 3).unwrap();
    assert_eq!(b.images.dims(), &[2, 3, 128, 128]);
    assert_eq!(b.gt_boxes.dims(), &[2, 3, 4]);
    assert_eq!(b.gt_masks.dims(), &[2, 3, 128, 128]);
    assert_eq!(b.num_instances, vec![2, 1]);
    let valid: Vec<u8> = b.gt_valid.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(valid, vec![1, 1, 0, 1, 0, 0]);
    let classes: Vec<i64> = b.gt_classes.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(classes, vec![2, 0, 0, 2, 0, 0]);
    let boxes: Vec<f32> = b.gt_boxes.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(boxes[4..8], [100.0, 50.0, 126.0, 90.0]);
    assert_eq!(boxes[8..12], [0.0; 4]);
    assert_eq!(b.truncated, 0);
    let t = collate(&[two], 1).unwrap();
    assert_eq!((t.num_instances[0], t.truncated), (1, 1));
    assert!(collate(&[], 4).is_err());
}

#[test]
fn eval_sample_resizes_the_long_side_to_s() {
    let (img, inst) = test_image();
    // Long side 128 -> 64: 96x128 becomes 48x64, as the inference preprocessing computes.
    let e = eval_sample(&img, &inst, 64).unwrap();
    assert_eq!(shortest_edge_shape(96, 128, 64, 64).0, 48);
    assert_eq!(e.sample.image_hw, [48, 64]);
    assert_eq!(e.original_hw, [96, 128]);
    assert_eq!(e.scale, 0.5);
    // Nearest-resized masks at exactly half: source pixel 2k + 1 (Pillow's centers), so the box
    // [5, 10, 30, 40) keeps columns 2..=14 (2k+1 in 5..30) and rows 5..=19.
    assert_eq!(e.sample.boxes[0], [2.0, 5.0, 15.0, 20.0]);
    assert_eq!(e.sample.image.dims(), &[3, 64, 64]);
}
