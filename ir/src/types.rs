use std::fmt;

use serde::{Deserialize, Serialize};

/// Element types a value can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    U32,
    U8,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::U32 => "u32",
            DType::U8 => "u8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The static type of a value: element type and shape.
///
/// With `dynamic_rows`, the leading dim is an upper bound: at run time the value holds that
/// many rows or fewer (XLA's bounded dynamic dimension). Such values come from
/// [`crate::ops::DynamicPrefix`] and flow only through ops whose [`crate::OpRule::rows`] accepts
/// them; plans and costs use the bound.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dynamic_rows: bool,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl Into<Vec<usize>>) -> Self {
        TensorType {
            dtype,
            shape: shape.into(),
            dynamic_rows: false,
        }
    }

    /// The same type with a dynamic leading dim bounded by the static one.
    pub fn with_dynamic_rows(mut self) -> Self {
        self.dynamic_rows = true;
        self
    }

    pub fn f32(shape: impl Into<Vec<usize>>) -> Self {
        Self::new(DType::F32, shape)
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }

    /// A static type of the same dtype (a dynamic row count is not carried over: whether an
    /// output's rows are dynamic is the op's [`crate::OpRule::rows`] to say).
    pub fn with_shape(&self, shape: impl Into<Vec<usize>>) -> Self {
        TensorType::new(self.dtype, shape)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        if let (true, Some(rows)) = (self.dynamic_rows, dims.first_mut()) {
            rows.insert_str(0, "<=");
        }
        write!(f, "{}[{}]", self.dtype, dims.join(","))
    }
}
