//! The tiny detectors run end to end on the CPU runtime (random weights) and their outputs keep
//! the documented invariants. (Numerics of the detection ops are tested in the runtime.)

use vitdet_models::{build_detector_for_image, ModelConfig};
use vitdet_runtime::{Device, ParamStore, Tensor};

#[test]
fn tiny_detectors_run_and_outputs_are_consistent() {
    let (h, w) = (96usize, 128usize);
    for name in ["vitdet-tiny", "vit-tiny"] {
        let mut cfg = ModelConfig::preset(name).unwrap();
        cfg.detector.score_thresh = 0.0; // random weights score ~1/81 per class
        let d = cfg.detector.detections_per_image;
        let g = build_detector_for_image(&cfg, [h, w]).unwrap();
        let dev = Device::Cpu;
        let params = ParamStore::init_random(&g, 3, &dev).unwrap();
        let image = Tensor::randn(0f32, 1.0, (1, 3, 128, 128), &dev).unwrap();
        let out = vitdet_runtime::run(&g, &params, &[("image", image)], &dev).unwrap_or_else(|e| panic!("{name}: {e}"));

        let valid = out.get("valid").unwrap().to_vec1::<u8>().unwrap();
        let n = valid.iter().filter(|&&v| v == 1).count();
        assert!(n > 0, "{name}: no detections at score threshold 0");
        assert!(
            valid[..n].iter().all(|&v| v == 1),
            "{name}: valid slots come first: {valid:?}"
        );
        let scores = out.get("scores").unwrap().to_vec1::<f32>().unwrap();
        assert!(
            scores[..n].windows(2).all(|p| p[0] >= p[1]),
            "{name}: descending scores {scores:?}"
        );
        assert!(scores[..n].iter().all(|&s| s > 0.0 && s <= 1.0), "{name}: {scores:?}");
        let classes = out.get("classes").unwrap().to_vec1::<i64>().unwrap();
        assert!(
            classes
                .iter()
                .all(|&c| (0..cfg.detector.num_classes as i64).contains(&c)),
            "{name}: {classes:?}"
        );
        let boxes = out.get("boxes").unwrap().to_vec2::<f32>().unwrap();
        for b in &boxes[..n] {
            assert!(
                0.0 <= b[0] && b[0] <= b[2] && b[2] <= w as f32,
                "{name}: box {b:?} outside {h}x{w}"
            );
            assert!(
                0.0 <= b[1] && b[1] <= b[3] && b[3] <= h as f32,
                "{name}: box {b:?} outside {h}x{w}"
            );
        }
        let masks = out.get("masks").unwrap();
        assert_eq!(masks.dims(), [d, 28, 28]);
        let m = masks.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            m.iter().all(|&p| (0.0..=1.0).contains(&p)),
            "{name}: mask probabilities"
        );
    }
}
