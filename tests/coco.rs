//! COCO run-length encoding against pycocotools (tests/fixtures/generate_coco.py).

mod common;

use vitdet::coco::{rle_encode, CATEGORY_IDS, CLASS_NAMES};

#[test]
fn rle_matches_pycocotools() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("coco_rle.json")).unwrap()).unwrap();
    assert!(cases.len() >= 7);
    for c in cases {
        let (h, w) = (
            c["height"].as_u64().unwrap() as usize,
            c["width"].as_u64().unwrap() as usize,
        );
        let mask: Vec<u8> = c["rows"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_str().unwrap().bytes().map(|b| b - b'0').collect::<Vec<_>>())
            .collect();
        let rle = rle_encode(&mask, h, w);
        assert_eq!(rle.size, [h, w]);
        assert_eq!(rle.counts, c["counts"].as_str().unwrap(), "case {}", c["name"]);
        let area: u64 = mask.iter().map(|&v| v as u64).sum();
        assert_eq!(area, c["area"].as_u64().unwrap());
    }
}

#[test]
fn category_table_is_coco() {
    assert_eq!(CATEGORY_IDS.len(), 80);
    assert!(CATEGORY_IDS.windows(2).all(|w| w[0] < w[1]));
    assert_eq!((CATEGORY_IDS[0], CATEGORY_IDS[79]), (1, 90));
    assert_eq!((CLASS_NAMES[0], CLASS_NAMES[79]), ("person", "toothbrush"));
}

#[test]
fn results_use_coco_ids_xywh_and_rle() {
    use vitdet::detections::{coco_results, draw, Categories, Detection};
    let mut mask = vec![0u8; 6 * 8];
    for y in 1..4 {
        for x in 2..6 {
            mask[y * 8 + x] = 1;
        }
    }
    let dets = vec![Detection {
        bbox: [2.0, 1.0, 6.0, 4.0],
        score: 0.9,
        class: 11,
        mask: Some(mask.clone()),
    }];
    let r = coco_results(&dets, 42, 6, 8, &Categories::coco());
    let j = serde_json::to_value(&r).unwrap();
    assert_eq!(j[0]["image_id"], 42);
    assert_eq!(j[0]["category_id"], 13, "class 11 (stop sign) is COCO id 13");
    assert_eq!(j[0]["bbox"], serde_json::json!([2.0, 1.0, 4.0, 3.0]));
    assert_eq!(j[0]["segmentation"]["size"], serde_json::json!([6, 8]));
    assert_eq!(j[0]["segmentation"]["counts"], rle_encode(&mask, 6, 8).counts);

    // Drawing changes the pixels under the mask and box, and leaves far-away pixels alone.
    let img = image::RgbImage::from_pixel(200, 120, image::Rgb([10, 20, 30]));
    let mut big = vec![0u8; 200 * 120];
    for y in 60..80 {
        for x in 50..90 {
            big[y * 200 + x] = 1;
        }
    }
    let dets = vec![Detection {
        bbox: [40.0, 50.0, 100.0, 90.0],
        score: 0.9,
        class: 11,
        mask: Some(big),
    }];
    let out = draw(&img, &dets, &Categories::coco());
    assert_ne!(out.get_pixel(70, 70), img.get_pixel(70, 70), "mask pixels are tinted");
    assert_ne!(out.get_pixel(40, 70), img.get_pixel(40, 70), "box edge is drawn");
    assert_eq!(
        out.get_pixel(45, 85),
        img.get_pixel(45, 85),
        "inside the box, outside the mask"
    );
    assert_eq!(out.get_pixel(199, 119), img.get_pixel(199, 119), "far away");
}
