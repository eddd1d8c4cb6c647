//! The broadcasting binary CUDA kernels, run by the host emulator, against candle's CPU
//! broadcast ops (what the runtime's CPU kernels run) on the same inputs: add, sub, mul and div
//! in f32, f16 and bf16 over shapes that broadcast along leading, middle and trailing dims
//! (the eager attention's rel-pos adds among them), in the runtime's launch and in a small grid
//! whose blocks stride over the output. Both sides compute each element in f32 and round it
//! once, so the bits must agree exactly (NaN as NaN: division by the zeros drawn in).

use candle_core::{DType, Device, Tensor};
use vitdet_cuda_emu::binary::{binary, binary_with};
use vitdet_ir::ops::{Binary, BinaryKind};
use vitdet_runtime::cuda::Launch;
use vitdet_runtime::kernels::elementwise as cpu;

mod common;
use common::{values, Rng};

fn draw(rng: &mut Rng, dims: &[usize], dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    // Every 16th value an exact zero, so division meets 0 / 0 and x / 0.
    let v: Vec<f32> = rng
        .values(n, 4.0, 0.0)
        .into_iter()
        .enumerate()
        .map(|(i, x)| if i % 16 == 3 { 0.0 } else { x })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn same_bits(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    let (g, w) = (values(got), values(want));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(a == b || (a.is_nan() && b.is_nan()), "{what}: element {i}: {a} vs {b}");
    }
}

const KINDS: [BinaryKind; 4] = [BinaryKind::Add, BinaryKind::Sub, BinaryKind::Mul, BinaryKind::Div];

#[test]
fn broadcasting_shapes_equal_the_cpu() {
    let shapes: [(&[usize], &[usize]); 7] = [
        (&[2, 3, 4, 4, 4], &[2, 3, 4, 4, 1]),
        (&[2, 3, 4, 4, 4], &[2, 3, 4, 1, 4]),
        (&[5, 7], &[7]),
        (&[3, 1, 6], &[1, 4, 1]),
        (&[4, 1], &[3]),
        (&[2, 8, 3, 3], &[1, 8, 1, 1]),
        (&[1], &[2, 1, 3]),
    ];
    let mut rng = Rng(5);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (da, db) in shapes {
            let (a, b) = (draw(&mut rng, da, dtype), draw(&mut rng, db, dtype));
            for kind in KINDS {
                let want = cpu::binary(&Binary { kind }, &a, &b).unwrap();
                let got = binary(kind, &a, &b).unwrap();
                same_bits(&got, &want, &format!("{dtype:?} {da:?} {kind:?} {db:?}"));
                // And the operands swapped (the broadcast one first).
                let want = cpu::binary(&Binary { kind }, &b, &a).unwrap();
                let got = binary(kind, &b, &a).unwrap();
                same_bits(&got, &want, &format!("{dtype:?} {db:?} {kind:?} {da:?}"));
            }
        }
    }
}

#[test]
fn blocks_stride_over_the_output() {
    let mut rng = Rng(9);
    let (a, b) = (
        draw(&mut rng, &[6, 40, 9], DType::F32),
        draw(&mut rng, &[6, 1, 9], DType::F32),
    );
    let want = cpu::binary(&Binary { kind: BinaryKind::Add }, &a, &b).unwrap();
    let got = binary_with(BinaryKind::Add, &a, &b, Some(Launch::linear(3, 64))).unwrap();
    same_bits(&got, &want, "3 blocks of 64 threads over 2160 elements");
}
