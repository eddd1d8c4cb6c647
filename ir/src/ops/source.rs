//! Graph sources: named inputs and parameters.

use serde::{Deserialize, Serialize};

use super::OpRule;
use crate::types::TensorType;

/// A named graph input (e.g. the preprocessed `image`), fed by the caller at run time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Input {
    pub name: String,
    pub ty: TensorType,
}

impl OpRule for Input {
    fn name(&self) -> &'static str {
        "input"
    }
    fn arity(&self) -> (usize, usize) {
        (0, 0)
    }
    fn infer(&self, _: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        static_source(&self.ty)
    }
}

/// How a parameter is initialized when no weights are loaded (seeded by the runtime).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Init {
    Zeros,
    Ones,
    /// Normal with the given std, truncated at +-2 std. (timm's `trunc_normal_(std=s)` cuts at
    /// +-2 absolute, which for small `s` is no truncation at all.)
    TruncNormal {
        std: f64,
    },
    /// Normal with the given std.
    Normal {
        std: f64,
    },
    /// Uniform in [-bound, bound].
    Uniform {
        bound: f64,
    },
}

/// A named tensor the model owns: `name` is its state-dict key (detectron2's where the module
/// exists there). `trainable == false` marks buffers such as BatchNorm running statistics, which
/// are loaded and saved but are not counted as parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Parameter {
    pub name: String,
    pub ty: TensorType,
    pub init: Init,
    pub trainable: bool,
}

impl OpRule for Parameter {
    fn name(&self) -> &'static str {
        "parameter"
    }
    fn arity(&self) -> (usize, usize) {
        (0, 0)
    }
    fn infer(&self, _: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        static_source(&self.ty)
    }
}

/// Sources have static shapes: dynamic rows only arise inside a graph, from a count it computes.
fn static_source(ty: &TensorType) -> Result<Vec<TensorType>, String> {
    if ty.dynamic_rows {
        return Err(format!("{ty}: graph inputs and parameters have static shapes"));
    }
    Ok(vec![ty.clone()])
}
