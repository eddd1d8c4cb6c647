//! Runs the runtime's CUDA C kernels on the host, to test them where no GPU exists.
//!
//! `build.rs` compiles the sources in `runtime/src/cuda/kernels` as C++ against
//! `emu/cuda_emu.h`, which runs each block's threads as OS threads meeting at a barrier. The
//! functions here launch them with the runtime's own launch geometry
//! ([`vitdet_runtime::cuda`]) in the order the CUDA path does, on f32 host buffers, so tests
//! can compare them with the runtime's CPU kernels. One module per kernel family, one
//! `emu/<family>.cpp` translation unit each.

use std::ffi::c_void;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

pub mod activation;
pub mod adamw;
pub mod binary;
pub mod detection;
pub mod im2col;
pub mod norm;
pub mod permute;
pub mod softmax;
pub mod window_attention;

pub type Result<T> = std::result::Result<T, String>;

/// A CPU tensor's elements as f32, in row-major order.
pub fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())
}

/// A CPU tensor from f32 elements.
pub fn tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu).map_err(|e| e.to_string())
}

/// A CPU tensor's elements in its storage type: f32 values, or the bits of f16 / bf16 ones.
pub(crate) enum Elems {
    F32(Vec<f32>),
    Bits16(Vec<u16>),
}

impl Elems {
    pub(crate) fn of(t: &Tensor) -> Result<Elems> {
        let t = t
            .flatten_all()
            .and_then(|t| t.contiguous())
            .map_err(|e| e.to_string())?;
        let (storage, layout) = t.storage_and_layout();
        let (a, b) = layout.contiguous_offsets().ok_or("tensor is not contiguous")?;
        Ok(match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => Elems::F32(v[a..b].to_vec()),
            Storage::Cpu(CpuStorage::F16(v)) => Elems::Bits16(v[a..b].iter().map(|x| x.to_bits()).collect()),
            Storage::Cpu(CpuStorage::BF16(v)) => Elems::Bits16(v[a..b].iter().map(|x| x.to_bits()).collect()),
            _ => return Err(format!("expected an f32/f16/bf16 CPU tensor, found {:?}", t.dtype())),
        })
    }

    /// A buffer of as many elements, every byte 0xFF (a NaN in each storage type), so an
    /// element the kernel fails to write shows.
    pub(crate) fn unwritten_like(&self) -> Elems {
        match self {
            Elems::F32(v) => Elems::F32(vec![f32::from_bits(u32::MAX); v.len()]),
            Elems::Bits16(v) => Elems::Bits16(vec![u16::MAX; v.len()]),
        }
    }

    /// [`Elems::unwritten_like`] of `len` elements of `dtype` (f32, f16 or bf16).
    pub(crate) fn unwritten(dtype: DType, len: usize) -> Result<Elems> {
        match dtype {
            DType::F32 => Ok(Elems::F32(vec![f32::from_bits(u32::MAX); len])),
            DType::F16 | DType::BF16 => Ok(Elems::Bits16(vec![u16::MAX; len])),
            t => Err(format!("expected f32, f16 or bf16, found {t:?}")),
        }
    }

    pub(crate) fn ptr(&self) -> *const c_void {
        match self {
            Elems::F32(v) => v.as_ptr().cast(),
            Elems::Bits16(v) => v.as_ptr().cast(),
        }
    }

    pub(crate) fn mut_ptr(&mut self) -> *mut c_void {
        match self {
            Elems::F32(v) => v.as_mut_ptr().cast(),
            Elems::Bits16(v) => v.as_mut_ptr().cast(),
        }
    }

    pub(crate) fn into_tensor(self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let bytes: Vec<u8> = match self {
            Elems::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Elems::Bits16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        Tensor::from_raw_buffer(&bytes, dtype, shape, &Device::Cpu).map_err(|e| e.to_string())
    }
}
