//! The CUDA C sources of the runtime's kernels and the program text NVRTC compiles.

/// Storage types, conversions and helpers every kernel source starts with.
pub const COMMON: &str = include_str!("kernels/common.cuh");
/// Fused windowed attention, forward and backward ([`super::window_attention`]).
pub const WINDOW_ATTENTION: &str = include_str!("kernels/window_attention.cu");

/// One kernel module: its source and the compile-time constants it is specialized on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Module {
    pub source: &'static str,
    pub defines: Vec<(&'static str, String)>,
}

impl Module {
    /// A name unique to the source and its constants (the cache key of the compiled module).
    pub fn name(&self) -> String {
        let mut name = match self.source {
            s if std::ptr::eq(s, WINDOW_ATTENTION) => "window_attention".to_string(),
            _ => format!("module{:x}", self.source.as_ptr() as usize),
        };
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
