//! Parameters and launch geometry of the permute copy (`kernels/permute.cu`): `x.permute(perm)`
//! of a contiguous `x`, written contiguous. Shared by the CUDA path and the host emulator.
//!
//! candle's CUDA backend makes such a copy with its generic strided copy, element by element
//! over all six axes of a window partition; the plan here merges the axes that move together and
//! copies the contiguous innermost run in units of up to 16 bytes.

use super::sources::Module;
use super::Launch;

/// The kernel's CUDA C source.
pub const SOURCE: &str = include_str!("kernels/permute.cu");

/// Threads per block.
pub const THREADS: u32 = 256;
/// Most blocks of a launch; they stride over the rest.
pub const MAX_BLOCKS: usize = 1 << 16;
/// Most axes the kernel takes after merging (`PERMUTE_MAX_RANK`).
pub const MAX_RANK: usize = 8;

/// The permute module (no dtype: it moves bytes).
pub fn module() -> Module {
    Module::plain("permute", SOURCE)
}

/// The kernel's parameters (`struct PermuteDims` in the source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PermuteDims {
    pub rank: i32,
    /// Output units.
    pub total: i64,
    /// Output dims, in units on the innermost axis.
    pub dims: [i64; MAX_RANK],
    /// The input stride, in units, of each output axis.
    pub strides: [i64; MAX_RANK],
}

#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for PermuteDims {}

/// The alignment, in bytes, a buffer starting `offset_bytes` into a fresh allocation (256-byte
/// aligned, as CUDA's are) is known to have: what [`PermutePlan::new`] takes.
pub fn alignment_at(offset_bytes: usize) -> usize {
    if offset_bytes == 0 {
        256
    } else {
        1 << offset_bytes.trailing_zeros().min(8)
    }
}

/// How one permute copy runs: the parameters, the unit size in bytes and the index width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PermutePlan {
    pub dims: PermuteDims,
    /// Bytes a thread moves at once: 1, 2, 4, 8 or 16.
    pub unit: usize,
    /// Whether indices need 64 bits (an offset past `u32::MAX` units).
    pub wide: bool,
}

impl PermutePlan {
    /// The plan for `x.permute(perm)` of a contiguous `x` of `dims`, whose elements have
    /// `elem_bytes` bytes and whose first element (and the output's) sits at a multiple of
    /// `align_bytes` (0 is taken as unaligned past the element); an error names what is not a
    /// permutation of `dims`.
    pub fn new(dims: &[usize], perm: &[usize], elem_bytes: usize, align_bytes: usize) -> Result<PermutePlan, String> {
        let rank = dims.len();
        let mut seen = vec![false; rank];
        if perm.len() != rank || perm.iter().any(|&a| a >= rank || std::mem::replace(&mut seen[a], true)) {
            return Err(format!("{perm:?} is not a permutation of the axes of {dims:?}"));
        }
        if ![1, 2, 4, 8].contains(&elem_bytes) {
            return Err(format!(
                "the permute kernel copies 1, 2, 4 or 8-byte elements, not {elem_bytes}"
            ));
        }
        let mut input_strides = vec![1usize; rank];
        for a in (0..rank.saturating_sub(1)).rev() {
            input_strides[a] = input_strides[a + 1] * dims[a + 1];
        }
        // Output axes in order, size-1 axes dropped, neighbours that are neighbours in x merged.
        let mut axes: Vec<(usize, usize)> = Vec::new(); // (dim, input stride) in elements
        for &a in perm {
            let (n, s) = (dims[a], input_strides[a]);
            if n == 1 {
                continue;
            }
            match axes.last_mut() {
                Some((m, t)) if *t == s * n => {
                    *m *= n;
                    *t = s;
                }
                _ => axes.push((n, s)),
            }
        }
        if axes.is_empty() {
            axes.push((1, 1));
        }
        if axes.len() > MAX_RANK {
            return Err(format!(
                "the permute of {dims:?} by {perm:?} has {} axes that move apart; the kernel takes {MAX_RANK}",
                axes.len()
            ));
        }
        // The innermost axis in the widest unit that divides its bytes and the alignment.
        let (inner, inner_stride) = *axes.last().expect("one axis at least");
        let mut unit = elem_bytes;
        if inner_stride == 1 {
            for u in [16, 8, 4, 2] {
                if u > elem_bytes
                    && (inner * elem_bytes).is_multiple_of(u)
                    && align_bytes > 0
                    && align_bytes.is_multiple_of(u)
                {
                    unit = u;
                    break;
                }
            }
        }
        let per_unit = unit / elem_bytes;
        let last = axes.len() - 1;
        let mut p = PermuteDims {
            rank: axes.len() as i32,
            total: 1,
            dims: [1; MAX_RANK],
            strides: [0; MAX_RANK],
        };
        let mut reach = 0usize; // the largest input offset, in units
        for (i, &(n, s)) in axes.iter().enumerate() {
            let (n, s) = if i == last && per_unit > 1 {
                (n / per_unit, 1)
            } else {
                (n, s / per_unit)
            };
            p.dims[i] = n as i64;
            p.strides[i] = s as i64;
            p.total *= n as i64;
            reach += n.saturating_sub(1) * s;
        }
        // 32-bit indices only where the grid-stride loop's last step cannot wrap either.
        let last_step = p.total as u64 + (MAX_BLOCKS as u64) * THREADS as u64;
        let wide = last_step > u32::MAX as u64 || reach as u64 > u32::MAX as u64;
        Ok(PermutePlan { dims: p, unit, wide })
    }

    /// The entry point: `permute_u<bits>_i<index bits>`.
    pub fn kernel_name(&self) -> String {
        format!("permute_u{}_i{}", self.unit * 8, if self.wide { 64 } else { 32 })
    }

    /// One thread per output unit, up to [`MAX_BLOCKS`] blocks.
    pub fn launch(&self) -> Launch {
        Launch::linear(
            (self.dims.total as usize)
                .div_ceil(THREADS as usize)
                .clamp(1, MAX_BLOCKS),
            THREADS,
        )
    }
}

/// The kernel on candle CUDA tensors.
#[cfg(feature = "cuda")]
pub mod run {
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};

    use super::{module, PermutePlan};
    use crate::cuda::device::{cuda_device, function, launch_into_new};
    use crate::kernels::{KernelError, KernelResult};

    /// `x.permute(perm)`, contiguous, on `x`'s CUDA device. A permutation the kernel does not
    /// take (more than [`super::MAX_RANK`] axes moving apart) is copied by candle's strided copy
    /// instead.
    pub fn permute(x: &Tensor, perm: &[usize]) -> KernelResult<Tensor> {
        let x = x.contiguous()?;
        let shape: Vec<usize> = perm.iter().map(|&a| x.dims()[a]).collect();
        if x.elem_count() == 0 {
            return Ok(Tensor::zeros(shape, x.dtype(), x.device())?);
        }
        let elem = x.dtype().size_in_bytes();
        // A view starts where its offset puts it.
        let align = super::alignment_at(x.layout().start_offset() * elem);
        let Ok(plan) = PermutePlan::new(x.dims(), perm, elem, align) else {
            return Ok(x.permute(perm.to_vec())?.contiguous()?);
        };
        match x.dtype() {
            DType::U8 => permute_t::<u8>(&x, &plan, shape),
            DType::U32 => permute_t::<u32>(&x, &plan, shape),
            DType::I64 => permute_t::<i64>(&x, &plan, shape),
            DType::F16 => permute_t::<half::f16>(&x, &plan, shape),
            DType::BF16 => permute_t::<half::bf16>(&x, &plan, shape),
            DType::F32 => permute_t::<f32>(&x, &plan, shape),
            DType::F64 => permute_t::<f64>(&x, &plan, shape),
            t => Err(KernelError::Unsupported(format!("permute on CUDA: dtype {t:?}"))),
        }
    }

    fn permute_t<T: CudaDType + DeviceRepr>(x: &Tensor, plan: &PermutePlan, shape: Vec<usize>) -> KernelResult<Tensor> {
        let f = function(&cuda_device(x)?, &module(), &plan.kernel_name())?;
        launch_into_new::<T, _>(&f, &[x], x.elem_count(), &plan.dims, plan.launch(), shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_partition_merges_to_rows_of_channels_in_16_byte_units() {
        // [1, 5, 14, 5, 14, 768] bf16 -> windows first: the window column and the channels
        // stay together, 14 * 768 * 2 bytes = 1344 units of 16.
        let p = PermutePlan::new(&[1, 5, 14, 5, 14, 768], &[0, 1, 3, 2, 4, 5], 2, 256).unwrap();
        assert_eq!((p.unit, p.wide, p.dims.rank), (16, false, 4));
        assert_eq!(&p.dims.dims[..4], &[5, 5, 14, 1344]);
        assert_eq!(&p.dims.strides[..4], &[14 * 1344 * 5, 1344, 5 * 1344, 1]);
        assert_eq!(p.dims.total, 25 * 14 * 1344);
        assert_eq!(p.kernel_name(), "permute_u128_i32");
    }

    #[test]
    fn plans_fall_back_to_elements_where_the_inner_axis_moves_or_alignment_forbids() {
        // NCHW -> NHWC: the innermost output axis (channels) strides by H * W in x.
        let p = PermutePlan::new(&[2, 3, 4, 5], &[0, 2, 3, 1], 4, 256).unwrap();
        assert_eq!((p.unit, p.dims.rank), (4, 3));
        assert_eq!(&p.dims.dims[..3], &[2, 20, 3]);
        assert_eq!(&p.dims.strides[..3], &[60, 1, 20]);
        // A contiguous inner run at an odd offset moves element by element.
        let p = PermutePlan::new(&[4, 6], &[0, 1], 2, 2).unwrap();
        assert_eq!((p.unit, p.dims.rank, p.dims.total), (2, 1, 24));
        // The identity of a contiguous tensor is one run.
        let p = PermutePlan::new(&[4, 6], &[0, 1], 4, 256).unwrap();
        assert_eq!((p.unit, p.dims.rank, p.dims.total), (16, 1, 6));
        // All axes of size 1.
        let p = PermutePlan::new(&[1, 1], &[1, 0], 4, 256).unwrap();
        assert_eq!((p.dims.rank, p.dims.total), (1, 1));
        // An empty tensor plans (the launcher makes no call for it).
        let p = PermutePlan::new(&[0, 3, 4], &[2, 1, 0], 4, 256).unwrap();
        assert_eq!(p.dims.total, 0);
    }

    #[test]
    fn indices_widen_before_the_grid_stride_loop_could_wrap() {
        let step = MAX_BLOCKS * THREADS as usize;
        // u8 elements transposed (no wider unit): total = rows * cols.
        let plan = |rows: usize, cols: usize| PermutePlan::new(&[rows, cols], &[1, 0], 1, 256).unwrap();
        let fits = u32::MAX as usize - step;
        assert!(!plan(fits / 1024, 1024).wide);
        assert!(plan(fits / 1024 + 1, 1024).wide);
    }

    #[test]
    fn bad_permutations_and_element_sizes_are_named() {
        assert!(PermutePlan::new(&[2, 3], &[0, 0], 4, 256)
            .unwrap_err()
            .contains("not a permutation"));
        assert!(PermutePlan::new(&[2, 3], &[0], 4, 256)
            .unwrap_err()
            .contains("not a permutation"));
        assert!(PermutePlan::new(&[2, 3], &[1, 2], 4, 256)
            .unwrap_err()
            .contains("not a permutation"));
        assert!(PermutePlan::new(&[2, 3], &[1, 0], 3, 256).unwrap_err().contains("3"));
    }
}
