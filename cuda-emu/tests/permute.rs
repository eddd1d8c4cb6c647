//! The permute copy kernel, run by the host emulator, against candle's `permute(..).contiguous()`
//! on the CPU, byte for byte: ViTDet's permutes at small sizes (window partition and its
//! inverse, the qkv split, NCHW <-> NHWC), random shapes with size-1 axes and random
//! permutations, every element size, buffers at aligned and odd offsets (which change the unit
//! the plan copies in), and 64-bit indices forced.

use candle_core::{DType, Tensor};
use common::Rng;

mod common;
use vitdet_cuda_emu::permute::permute;
use vitdet_runtime::cuda::Launch;

fn as_dtype(x: &Tensor, dtype: DType) -> Tensor {
    match dtype {
        // Integers from the random values' bits, so every byte varies.
        DType::U8 | DType::U32 | DType::I64 => {
            let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let ints: Vec<u32> = v.iter().map(|f| f.to_bits()).collect();
            let t = Tensor::from_vec(ints, x.dims(), x.device()).unwrap();
            match dtype {
                DType::U8 => t.to_dtype(DType::U8).unwrap(),
                DType::I64 => t.to_dtype(DType::I64).unwrap(),
                _ => t,
            }
        }
        _ => x.to_dtype(dtype).unwrap(),
    }
}

/// Checks one case; returns the unit size the plan chose.
fn check(x: &Tensor, perm: &[usize], offset: usize, wide: bool) -> usize {
    check_with(x, perm, offset, wide, None)
}

/// [`check`] launched with `launch` instead of the plan's geometry.
fn check_with(x: &Tensor, perm: &[usize], offset: usize, wide: bool, launch: Option<Launch>) -> usize {
    let what = format!(
        "{:?} {:?} by {perm:?}, offset {offset}, wide {wide}, launch {launch:?}",
        x.dims(),
        x.dtype()
    );
    let (got, plan) = permute(x, perm, offset, wide, launch).unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = x.permute(perm.to_vec()).unwrap().contiguous().unwrap();
    assert_eq!(got.dims(), want.dims(), "{what}");
    let (g, w) = (
        got.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap(),
        want.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap(),
    );
    // f64 holds every f32/f16/bf16/u8/u32 exactly; compare bits so NaN payloads and -0 count.
    let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&g), bits(&w), "{what}: plan {plan:?}");
    plan.unit
}

#[test]
fn vitdet_permutes_copy_exactly() {
    let mut rng = Rng(7);
    let cases: &[(&[usize], &[usize])] = &[
        // Window partition of a 2x3 grid of 4x4 windows, 24 channels, and back.
        (&[1, 2, 4, 3, 4, 24], &[0, 1, 3, 2, 4, 5]),
        (&[1, 2, 3, 4, 4, 24], &[0, 1, 3, 2, 4, 5]),
        // The qkv split: [B, N, 3, heads, hd] -> [3, B, heads, N, hd].
        (&[1, 16, 3, 4, 8], &[2, 0, 3, 1, 4]),
        // NCHW -> NHWC and back.
        (&[2, 6, 5, 7], &[0, 2, 3, 1]),
        (&[2, 5, 7, 6], &[0, 3, 1, 2]),
    ];
    for (shape, perm) in cases {
        let x = rng.tensor(shape, 1.0);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            check(&as_dtype(&x, dtype), perm, 0, false);
        }
    }
    // The partition moves rows of channels in 16-byte units (4 * 24 * 2 bytes).
    let x = as_dtype(&rng.tensor(&[1, 2, 4, 3, 4, 24], 1.0), DType::BF16);
    assert_eq!(check(&x, &[0, 1, 3, 2, 4, 5], 0, false), 16);
}

#[test]
fn random_permutations_of_every_element_size_at_any_alignment_copy_exactly() {
    let mut rng = Rng(11);
    let mut units = std::collections::BTreeSet::new();
    for case in 0..60 {
        let rank = 1 + (rng.next_state() % 6) as usize;
        let shape: Vec<usize> = (0..rank).map(|_| 1 + (rng.next_state() % 5) as usize).collect();
        // Sometimes a wide innermost axis, which lets the plan use wide units.
        let mut shape = shape;
        if case % 3 == 0 {
            *shape.last_mut().unwrap() = 16;
        }
        let mut perm: Vec<usize> = (0..rank).collect();
        for i in (1..rank).rev() {
            perm.swap(i, (rng.next_state() % (i as u64 + 1)) as usize);
        }
        // Keep the last axis last now and then: the contiguous-run path.
        if case % 2 == 0 {
            let at = perm.iter().position(|&a| a == rank - 1).unwrap();
            perm.remove(at);
            perm.push(rank - 1);
        }
        let x = rng.tensor(&shape, 1.0);
        let dtype = [DType::U8, DType::BF16, DType::F32, DType::I64, DType::F16, DType::U32][case % 6];
        let x = as_dtype(&x, dtype);
        for offset in [0, 1, 3] {
            units.insert(check(&x, &perm, offset, case % 5 == 0));
        }
    }
    // Every unit the kernel has was exercised.
    assert_eq!(units.into_iter().collect::<Vec<_>>(), [1, 2, 4, 8, 16]);
}

#[test]
fn fewer_threads_than_units_stride_over_the_rest() {
    // 2 blocks of 32 threads over 3 * 5 * 40 f32 elements, in both index widths and in units of
    // 4 and 16 bytes.
    let x = Rng(5).tensor(&[3, 5, 40], 1.0);
    let small = Launch {
        grid: [2, 1, 1],
        block: [32, 1, 1],
    };
    for wide in [false, true] {
        assert_eq!(check_with(&x, &[1, 0, 2], 0, wide, Some(small)), 16);
        assert_eq!(check_with(&x, &[2, 0, 1], 0, wide, Some(small)), 4);
    }
}
