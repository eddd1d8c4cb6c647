//! Config presets, files (JSON / TOML), round trips and validation errors.

use std::path::PathBuf;

use vitdet_models::{presets, AttentionStrategy, Family, ModelConfig, ModelError, RelPos};

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vitdet-models-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn tiny_presets_match_the_fixture_script() {
    let c = ModelConfig::preset("vitdet-tiny").unwrap();
    assert_eq!(c.family, Family::Vitdet);
    assert_eq!(
        (c.image_size, c.patch_size, c.embed_dim, c.depth, c.num_heads),
        (128, 16, 32, 4, 2)
    );
    assert_eq!(
        (c.mlp_ratio, c.window_size, c.pretrain_img_size, c.out_channels),
        (4.0, 3, 224, 16)
    );
    assert_eq!(c.global_block_indices(), [1, 3]);
    assert_eq!(c.drop_path_rate, 0.0);
    assert_eq!(c.rel_pos_kind(), RelPos::Decomposed);

    let c = ModelConfig::preset("vit-tiny").unwrap();
    assert_eq!(c.family, Family::Vit);
    assert_eq!(
        (c.image_size, c.patch_size, c.embed_dim, c.depth, c.num_heads),
        (128, 16, 32, 8, 2)
    );
    assert_eq!((c.window_size, c.group_norm_groups, c.out_channels), (3, 8, 16));
    assert_eq!(c.global_block_indices(), [1, 3, 5, 7]);
    assert_eq!(c.pyramid_taps(), [1, 3, 5, 7]);
    assert!(c.layer_scale);
    assert_eq!(c.rel_pos_kind(), RelPos::SharedBias);
}

#[test]
fn large_presets() {
    let b = ModelConfig::preset("vitdet-b").unwrap();
    assert_eq!(
        (b.embed_dim, b.depth, b.num_heads, b.drop_path_rate),
        (768, 12, 12, 0.1)
    );
    assert_eq!(b.global_block_indices(), [2, 5, 8, 11]);
    let l = ModelConfig::preset("vitdet-l").unwrap();
    assert_eq!(
        (l.embed_dim, l.depth, l.num_heads, l.drop_path_rate),
        (1024, 24, 16, 0.4)
    );
    assert_eq!(l.global_block_indices(), [5, 11, 17, 23]);
    let h = ModelConfig::preset("vitdet-h").unwrap();
    assert_eq!(
        (h.embed_dim, h.depth, h.num_heads, h.drop_path_rate),
        (1280, 32, 16, 0.5)
    );
    assert_eq!(h.global_block_indices(), [7, 15, 23, 31]);
    for (vit, det) in [("vit-b", b.clone()), ("vit-l", l), ("vit-h", h)] {
        let v = ModelConfig::preset(vit).unwrap();
        assert_eq!(
            (v.embed_dim, v.depth, v.num_heads),
            (det.embed_dim, det.depth, det.num_heads)
        );
        assert_eq!(v.global_block_indices(), det.global_block_indices());
        assert_eq!(
            (v.window_size, v.image_size, v.group_norm_groups, v.layer_scale),
            (14, 1024, 32, false)
        );
        assert!(v.abs_pos);
        assert_eq!(v.rel_pos_kind(), RelPos::SharedBias);
    }
    assert_eq!(b.pixel_mean, [123.675, 116.28, 103.53]);
    assert_eq!(b.pixel_std, [58.395, 57.12, 57.375]);
    assert_eq!(b.norm_eps, 1e-6);
}

#[test]
fn unknown_preset_lists_valid_names() {
    let err = ModelConfig::preset("vit-xl").unwrap_err().to_string();
    for name in presets::NAMES {
        assert!(err.contains(name), "{err}");
    }
    let err = ModelConfig::load("vit-xl").unwrap_err().to_string();
    assert!(
        err.contains("vit-xl") && err.contains("vitdet-b") && err.contains(".json"),
        "{err}"
    );
}

#[test]
fn json_and_toml_round_trip() {
    for name in presets::NAMES {
        let cfg = ModelConfig::preset(name).unwrap();
        assert_eq!(ModelConfig::from_json_str(&cfg.to_json()).unwrap(), cfg, "{name} json");
        assert_eq!(ModelConfig::from_toml_str(&cfg.to_toml()).unwrap(), cfg, "{name} toml");
        let j = temp_file(&format!("{name}.json"), &cfg.to_json());
        let t = temp_file(&format!("{name}.toml"), &cfg.to_toml());
        assert_eq!(ModelConfig::load(j.to_str().unwrap()).unwrap(), cfg);
        assert_eq!(ModelConfig::load(t.to_str().unwrap()).unwrap(), cfg);
    }
}

#[test]
fn minimal_files_use_defaults() {
    let j = temp_file(
        "min.json",
        r#"{"family": "vit", "embed_dim": 64, "depth": 4, "num_heads": 4, "image_size": 256}"#,
    );
    let c = ModelConfig::load(j.to_str().unwrap()).unwrap();
    assert_eq!(c.global_block_indices(), [0, 1, 2, 3]);
    assert_eq!(
        (c.patch_size, c.window_size, c.out_channels, c.pretrain_img_size),
        (16, 14, 256, 224)
    );
    assert_eq!(c.attention, AttentionStrategy::Hybrid);
    assert_eq!(c.rel_pos_kind(), RelPos::SharedBias);

    let t = temp_file(
        "min.toml",
        "family = \"vitdet\"\nembed_dim = 64\ndepth = 8\nnum_heads = 4\nimage_size = 256\nattention = \"window\"\nrel_pos = \"none\"\n",
    );
    let c = ModelConfig::load(t.to_str().unwrap()).unwrap();
    assert_eq!(c.global_block_indices(), Vec::<usize>::new());
    assert_eq!(c.rel_pos_kind(), RelPos::Disabled);
    vitdet_models::build_backbone(&c).unwrap().verify().unwrap();
}

#[test]
fn files_can_start_from_a_preset() {
    let t = temp_file(
        "derived.toml",
        "preset = \"vitdet-b\"\nimage_size = 512\ndrop_path_rate = 0.0\n",
    );
    let c = ModelConfig::load(t.to_str().unwrap()).unwrap();
    let mut want = ModelConfig::preset("vitdet-b").unwrap();
    want.image_size = 512;
    want.drop_path_rate = 0.0;
    assert_eq!(c, want);
    let j = temp_file("derived.json", r#"{"preset": "vit-tiny", "attention": "global"}"#);
    let c = ModelConfig::load(j.to_str().unwrap()).unwrap();
    assert_eq!(c.global_block_indices(), (0..8).collect::<Vec<_>>());
    let bad = temp_file("badpreset.json", r#"{"preset": "vit-q"}"#);
    let err = ModelConfig::load(bad.to_str().unwrap()).unwrap_err().to_string();
    assert!(
        err.contains("badpreset.json") && err.contains("vit-q") && err.contains("vitdet-tiny"),
        "{err}"
    );
}

#[test]
fn file_errors_name_the_file_and_problem() {
    let missing = ModelConfig::load("/nonexistent/dir/model.json").unwrap_err();
    assert!(matches!(missing, ModelError::Io { .. }));
    assert!(missing.to_string().contains("/nonexistent/dir/model.json"), "{missing}");

    let unknown = temp_file(
        "unknown.json",
        r#"{"family": "vit", "embed_dim": 64, "depth": 4, "num_heads": 4, "heads": 2}"#,
    );
    let err = ModelConfig::load(unknown.to_str().unwrap()).unwrap_err().to_string();
    assert!(
        err.contains("unknown.json") && err.contains("unknown field `heads`"),
        "{err}"
    );

    let syntax = temp_file("syntax.toml", "family = \"vit\"\nembed_dim = \n");
    let err = ModelConfig::load(syntax.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("syntax.toml") && err.contains("line 2"), "{err}");

    let family = temp_file(
        "family.toml",
        "family = \"resnet\"\nembed_dim = 64\ndepth = 4\nnum_heads = 4\n",
    );
    let err = ModelConfig::load(family.to_str().unwrap()).unwrap_err().to_string();
    assert!(
        err.contains("family.toml") && err.contains("resnet") && err.contains("vitdet"),
        "{err}"
    );

    let invalid = temp_file(
        "invalid.json",
        r#"{"family": "vitdet", "embed_dim": 100, "depth": 4, "num_heads": 3}"#,
    );
    let err = ModelConfig::load(invalid.to_str().unwrap()).unwrap_err().to_string();
    assert!(
        err.contains("invalid.json") && err.contains("not divisible by `num_heads` 3"),
        "{err}"
    );
}

fn invalid(edit: impl FnOnce(&mut ModelConfig), needle: &str) {
    let mut c = ModelConfig::preset("vitdet-tiny").unwrap();
    edit(&mut c);
    let err = c.validate().unwrap_err();
    assert!(matches!(err, ModelError::Invalid(_)));
    assert!(err.to_string().contains(needle), "expected `{needle}` in: {err}");
    let err = vitdet_models::build_backbone(&c).unwrap_err();
    assert!(err.to_string().contains(needle), "expected `{needle}` in: {err}");
}

#[test]
fn invalid_configs_error_clearly() {
    invalid(|c| c.num_heads = 3, "`embed_dim` 32 is not divisible by `num_heads` 3");
    invalid(
        |c| c.image_size = 120,
        "`image_size` 120 is not divisible by `patch_size` 16",
    );
    invalid(
        |c| c.global_blocks = Some(vec![1, 4]),
        "`global_blocks` index 4 is out of range for depth 4",
    );
    invalid(|c| c.global_blocks = Some(vec![1, 1]), "lists block 1 twice");
    invalid(|c| c.depth = 0, "`depth` must be positive");
    invalid(|c| c.window_size = 0, "`window_size` must be positive");
    invalid(|c| c.drop_path_rate = 1.0, "`drop_path_rate` must be in [0, 1)");
    invalid(|c| c.pretrain_img_size = 200, "`pretrain_img_size` 200");
    invalid(|c| c.embed_dim = 34, "must be divisible by 4");
    invalid(|c| c.mlp_ratio = 0.0, "`mlp_ratio`");
    invalid(|c| c.pixel_std = [1.0, 0.0, 1.0], "`pixel_std`");
    invalid(
        |c| {
            c.rel_pos = Some(RelPos::SharedBias);
            c.rel_pos_global_size = Some(64)
        },
        "`rel_pos_global_size` only applies",
    );
    invalid(
        |c| {
            c.family = Family::Vit;
            c.depth = 6;
            c.global_blocks = None
        },
        "multiple of 4",
    );
    invalid(
        |c| {
            c.family = Family::Vit;
            c.group_norm_groups = 5
        },
        "`group_norm_groups` 5 must divide `embed_dim` 32",
    );
    invalid(
        |c| {
            c.family = Family::Vit;
            c.image_size = 112
        },
        "must be even",
    );
    // A window size is not needed when every block is global.
    let mut c = ModelConfig::preset("vitdet-tiny").unwrap();
    c.window_size = 0;
    c.attention = AttentionStrategy::Global;
    c.validate().unwrap();
}

#[test]
fn preset_tables_merge_field_by_field() {
    let cfg = ModelConfig::from_toml_str("preset = \"vitdet-tiny\"\n[detector]\nnum_classes = 4\n").unwrap();
    let tiny = ModelConfig::preset("vitdet-tiny").unwrap();
    assert_eq!(cfg.detector.num_classes, 4);
    assert_eq!(cfg.detector.box_head_conv_dim, tiny.detector.box_head_conv_dim);
    assert_eq!(cfg.detector.rpn_post_nms_topk, tiny.detector.rpn_post_nms_topk);
    let err = ModelConfig::from_toml_str("preset = \"vitdet-tiny\"\n[detector]\nnum_clases = 4\n");
    assert!(err.unwrap_err().to_string().contains("num_clases"));
}
