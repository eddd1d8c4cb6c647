//! The program text NVRTC compiles: compile-time constants, the common header, one kernel
//! source. Each kernel family keeps its source next to its launch code (`include_str!` of
//! `kernels/<family>.cu`).

/// Storage types, conversions and helpers every kernel source starts with.
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// One kernel module: a family's source and the compile-time constants it is specialized on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Module {
    /// The family's name (`window_attention`, ...).
    pub family: &'static str,
    pub source: &'static str,
    pub defines: Vec<(&'static str, String)>,
}

impl Module {
    /// A module without compile-time constants.
    pub fn plain(family: &'static str, source: &'static str) -> Module {
        Module {
            family,
            source,
            defines: Vec::new(),
        }
    }

    /// The module with entry points for `dtype` only (f32, f16 or bf16; others keep all three),
    /// which cuts NVRTC's compile time to a third.
    pub fn for_dtype(mut self, dtype: candle_core::DType) -> Module {
        let (t, s) = match dtype {
            candle_core::DType::F32 => ("float", "f32"),
            candle_core::DType::F16 => ("f16_t", "f16"),
            candle_core::DType::BF16 => ("bf16_t", "bf16"),
            _ => return self,
        };
        self.defines.push(("VITDET_T", t.to_string()));
        self.defines.push(("VITDET_S", s.to_string()));
        if dtype != candle_core::DType::F32 {
            self.defines.push(("VITDET_HALF", "1".to_string()));
        }
        self
    }

    /// A name unique to the family and its constants (the cache key of the compiled module).
    pub fn name(&self) -> String {
        let mut name = self.family.to_string();
        for (k, v) in &self.defines {
            name.push_str(&format!("_{k}{v}"));
        }
        name
    }

    /// The program text: the defines, the common header, then the source.
    pub fn program(&self) -> String {
        let mut text = String::new();
        for (k, v) in &self.defines {
            text.push_str(&format!("#define {k} {v}\n"));
        }
        text.push_str(COMMON);
        text.push('\n');
        text.push_str(self.source);
        text
    }
}
