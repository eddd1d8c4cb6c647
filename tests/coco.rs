//! COCO run-length encoding against pycocotools (tests/fixtures/generate_coco.py).

mod common;

use vitdet::coco::{rle_encode, CATEGORY_IDS, CLASS_NAMES};

#[test]
fn rle_matches_pycocotools() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("coco_rle.json")).unwrap()).unwrap();
    assert!(cases.len() >= 7);
    for c in cases {
        let (h, w) = (c["height"].as_u64().unwrap() as usize, c["width"].as_u64().unwrap() as usize);
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
