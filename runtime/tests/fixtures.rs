//! Kernels and preprocessing against PyTorch references (`tests/fixtures/`, made by
//! `generate.py`: inputs rounded to f32, references computed in f64 and stored as f32).
//!
//! Tolerances: the fixtures README's, `atol 1e-5` for float ops (f32 arithmetic on O(1) values
//! plus 0.5 ulp of output rounding), `rtol 1e-5` added for GELU (inputs up to |9|), exact for
//! pure gathers (rel-pos q3/k3, BEiT bias, nearest, max-pool).

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::*;
use vitdet_ir::ops::*;
use vitdet_ir::Op;
use vitdet_runtime::kernels;
use vitdet_runtime::preprocess;

fn ops() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures_dir().join("ops.safetensors"), &Device::Cpu)
        .expect("tests/fixtures/ops.safetensors")
}

fn run1(op: impl Into<Op>, inputs: &[&Tensor]) -> Nd {
    let inputs: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
    Nd::from_tensor(&kernels::execute(&op.into(), &inputs).unwrap()[0])
}

fn want(f: &HashMap<String, Tensor>, name: &str) -> Nd {
    Nd::from_tensor(f.get(name).unwrap_or_else(|| panic!("fixture tensor `{name}`")))
}

#[test]
fn bicubic_matches_pytorch() {
    let f = ops();
    for (name, size) in [("8", [8, 8]), ("20", [20, 20]), ("5x11", [5, 11])] {
        let got = run1(
            Resize {
                size,
                mode: ResizeMode::Bicubic,
                align_corners: false,
            },
            &[&f["bicubic_in"]],
        );
        assert_close(
            &got,
            &want(&f, &format!("bicubic_out_{name}")),
            1e-5,
            0.0,
            &format!("bicubic {name}"),
        );
    }
}

#[test]
fn rel_pos_gather_matches_detectron2() {
    let f = ops();
    let t = &f["relpos_table"];
    assert_close(
        &run1(RelPosGather { q_size: 3, k_size: 3 }, &[t]),
        &want(&f, "relpos_gather_q3_k3"),
        0.0,
        0.0,
        "q3 k3 (gather)",
    );
    assert_close(
        &run1(RelPosGather { q_size: 7, k_size: 7 }, &[t]),
        &want(&f, "relpos_gather_q7_k7"),
        1e-5,
        0.0,
        "q7 k7 (interpolated)",
    );
    assert_close(
        &run1(RelPosGather { q_size: 4, k_size: 7 }, &[t]),
        &want(&f, "relpos_gather_q4_k7"),
        1e-5,
        0.0,
        "q4 k7 (interpolated, scaled)",
    );
}

#[test]
fn beit_bias_matches() {
    let f = ops();
    let got = run1(RelPosBias { window: [3, 3] }, &[&f["beit_table"]]);
    assert_close(&got, &want(&f, "beit_bias_3x3"), 0.0, 0.0, "beit bias");
}

#[test]
fn gelu_matches_exact_erf() {
    let f = ops();
    let got = run1(Unary { kind: UnaryKind::Gelu }, &[&f["gelu_in"]]);
    assert_close(&got, &want(&f, "gelu_out"), 1e-5, 1e-5, "gelu");
}

#[test]
fn group_norm_matches() {
    let f = ops();
    let got = run1(
        GroupNorm { groups: 4, eps: 1e-5 },
        &[&f["groupnorm_in"], &f["groupnorm_w"], &f["groupnorm_b"]],
    );
    assert_close(&got, &want(&f, "groupnorm_out"), 1e-5, 0.0, "group norm");
}

#[test]
fn channel_layer_norm_matches() {
    let f = ops();
    let got = run1(
        LayerNorm { axis: 1, eps: 1e-6 },
        &[&f["channel_ln_in"], &f["channel_ln_w"], &f["channel_ln_b"]],
    );
    assert_close(&got, &want(&f, "channel_ln_out"), 1e-5, 0.0, "channel LN");
}

#[test]
fn deconv_matches() {
    let f = ops();
    let got = run1(
        ConvTranspose2d::upsample(2),
        &[&f["deconv_in"], &f["deconv_w"], &f["deconv_b"]],
    );
    assert_close(&got, &want(&f, "deconv_out"), 1e-5, 0.0, "deconv k2 s2");
}

#[test]
fn nearest_and_maxpool_match() {
    let f = ops();
    let got = run1(
        Resize {
            size: [6, 6],
            mode: ResizeMode::Nearest,
            align_corners: false,
        },
        &[&f["nearest_in"]],
    );
    assert_close(&got, &want(&f, "nearest_out"), 0.0, 0.0, "nearest x2");
    let got = run1(MaxPool2d::new(1, 2), &[&f["maxpool_in"]]);
    assert_close(&got, &want(&f, "maxpool_k1s2_out"), 0.0, 0.0, "maxpool k1 s2");
    let got = run1(MaxPool2d::new(2, 2), &[&f["maxpool_in"]]);
    assert_close(&got, &want(&f, "maxpool_k2s2_out"), 0.0, 0.0, "maxpool k2 s2");
}

// ---------------------------------------------------------------- preprocessing

fn preprocess_expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures_dir().join("preprocess_expected.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn preprocess_matches_detectron2() {
    let f = preprocess_expected();
    for (file, suffix, hw) in [
        ("preprocess.png", "", (48, 64)),
        ("preprocess_large.png", "_large", (38, 64)),
    ] {
        let path = fixtures_dir().join(file);
        let p = preprocess::preprocess_image(&path, 64, &Device::Cpu).unwrap();
        assert_eq!(p.resized_hw, hw, "{file}");
        assert_eq!(p.image.dims(), [1, 3, 64, 64]);

        // The resize reproduces Pillow's fixed-point BILINEAR exactly.
        let img = preprocess::load_rgb(&path).unwrap();
        let resized = preprocess::resize_bilinear_pillow(&img, hw.1, hw.0);
        let got = Nd::new(&[hw.0, hw.1, 3], resized.as_raw().iter().map(|&v| v as f64).collect());
        let want_resized = want(&f, &format!("resized_uint8{suffix}"));
        assert_close(&got, &want_resized, 0.0, 0.0, &format!("{file}: resized pixels"));

        // Normalization and padding of the exact pixels: (x - mean) / std in f64, rounded to f32.
        assert_close(
            &Nd::from_tensor(&p.image),
            &want(&f, &format!("image{suffix}")),
            0.0,
            0.0,
            &format!("{file}: image"),
        );
    }
}

#[test]
fn normalization_is_exact_on_reference_pixels() {
    // Independent of the resize: normalize PIL's own pixels and compare.
    let f = preprocess_expected();
    for suffix in ["", "_large"] {
        let px = &f[&format!("resized_uint8{suffix}")];
        let (h, w, _) = px.dims3().unwrap();
        let data: Vec<u8> = px
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v as u8)
            .collect();
        let img = image::RgbImage::from_raw(w as u32, h as u32, data).unwrap();
        let t = preprocess::normalize_and_pad(&img, 64, &Device::Cpu).unwrap();
        assert_close(
            &Nd::from_tensor(&t),
            &want(&f, &format!("image{suffix}")),
            0.0,
            0.0,
            "normalize + pad",
        );
    }
}
