//! Conversions between the IR's element types and candle's.

use candle_core::DType as CDType;
use vitdet_ir::{DType, TensorType};

/// The candle dtype that stores an IR dtype (every IR dtype has one).
pub fn to_candle(d: DType) -> CDType {
    match d {
        DType::F32 => CDType::F32,
        DType::F16 => CDType::F16,
        DType::BF16 => CDType::BF16,
        DType::F64 => CDType::F64,
        DType::I64 => CDType::I64,
        DType::U32 => CDType::U32,
        DType::U8 => CDType::U8,
    }
}

/// The IR dtype of a candle dtype, if the IR has it.
pub fn from_candle(d: CDType) -> Option<DType> {
    Some(match d {
        CDType::F32 => DType::F32,
        CDType::F16 => DType::F16,
        CDType::BF16 => DType::BF16,
        CDType::F64 => DType::F64,
        CDType::I64 => DType::I64,
        CDType::U32 => DType::U32,
        CDType::U8 => DType::U8,
        _ => return None,
    })
}

/// `f32[1,3,4,4]`-style text for a candle tensor, matching `TensorType`'s `Display`.
pub fn describe(t: &candle_core::Tensor) -> String {
    let dims: Vec<String> = t.dims().iter().map(|d| d.to_string()).collect();
    format!("{}[{}]", t.dtype().as_str(), dims.join(","))
}

/// Whether a tensor has this type: exactly its shape, or for a type with dynamic rows, at
/// most its bound of rows and exactly its other dims.
pub fn matches(t: &candle_core::Tensor, ty: &TensorType) -> bool {
    let dims = t.dims();
    let shape_ok = if ty.dynamic_rows {
        dims.len() == ty.rank() && dims[0] <= ty.shape[0] && dims[1..] == ty.shape[1..]
    } else {
        dims == ty.shape.as_slice()
    };
    shape_ok && t.dtype() == to_candle(ty.dtype)
}
