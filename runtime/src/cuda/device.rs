//! Compiling, caching and launching the kernels on candle CUDA tensors (feature `cuda`).
//!
//! A module is compiled by NVRTC for the device's compute capability on first use (a few
//! seconds per module), kept for the process and on disk ([`kernel_cache_dir`]), and loaded
//! once per device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Shape, Storage, Tensor};

use super::sources::Module;
use super::Launch;
use crate::kernels::{KernelError, KernelResult};

fn unsupported(m: impl std::fmt::Display) -> KernelError {
    KernelError::Unsupported(m.to_string())
}

/// A process-wide map filled on first use (compiled modules, library handles, chosen algorithms).
pub type Cache<K, V> = OnceLock<Mutex<HashMap<K, V>>>;

/// Prints `warning: {text}; {instead}` on stderr the first time this `text` comes up in the
/// process: a library refusing a problem the runtime then runs another way.
pub fn warn_once(text: &str, instead: &str) {
    static SAID: Cache<String, ()> = OnceLock::new();
    let mut said = SAID.get_or_init(Default::default).lock().expect("warnings said");
    if said.insert(text.to_string(), ()).is_none() {
        eprintln!("warning: {text}; {instead}");
    }
}

/// The CUDA device of a tensor, or an error naming what is not on one.
pub fn cuda_device(t: &Tensor) -> KernelResult<CudaDevice> {
    Ok(t.device().as_cuda_device()?.clone())
}

/// Makes `dev`'s context current on this thread (for libraries called outside candle).
pub fn bind(dev: &CudaDevice) -> KernelResult<()> {
    dev.cuda_stream()
        .context()
        .bind_to_thread()
        .map_err(|e| unsupported(format!("binding the CUDA context: {e}")))
}

/// The GPU's name as the driver reports it (`NVIDIA H100 80GB HBM3`).
pub fn device_name(dev: &CudaDevice) -> KernelResult<String> {
    dev.cuda_stream().context().name().map_err(unsupported)
}

/// The device's compute capability, (major, minor).
pub fn compute_capability(dev: &CudaDevice) -> KernelResult<(i32, i32)> {
    dev.cuda_stream().context().compute_capability().map_err(unsupported)
}

/// `compute_XY` for the device (static: NVRTC's options take `&'static str`).
fn arch(dev: &CudaDevice) -> KernelResult<&'static str> {
    static ARCHS: Cache<(i32, i32), &'static str> = OnceLock::new();
    let (major, minor) = compute_capability(dev)?;
    let mut archs = ARCHS.get_or_init(Default::default).lock().expect("arch cache");
    Ok(*archs
        .entry((major, minor))
        .or_insert_with(|| Box::leak(format!("compute_{major}{minor}").into_boxed_str())))
}

/// PTX of `module` for `arch`: from this process's cache, else from the disk cache
/// ([`kernel_cache_dir`]), else compiled by NVRTC and stored in both.
pub fn ptx(module: &Module, arch: &'static str) -> KernelResult<Arc<String>> {
    static CACHE: Cache<(String, &'static str), Arc<String>> = OnceLock::new();
    let key = (module.name(), arch);
    if let Some(p) = CACHE.get_or_init(Default::default).lock().expect("ptx cache").get(&key) {
        return Ok(p.clone());
    }
    let program = module.program();
    // The file name carries a hash of the program text, so an edited kernel never reads a stale
    // file; an unreadable or unwritable cache only costs a compile.
    let file = cache_file(module, arch, &program);
    let cached = file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .filter(|p| p.contains(".entry"));
    let ptx = match cached {
        Some(p) => p,
        None => compile(module, arch, &program, file.as_deref())?,
    };
    let ptx = Arc::new(ptx);
    CACHE
        .get_or_init(Default::default)
        .lock()
        .expect("ptx cache")
        .insert(key, ptx.clone());
    Ok(ptx)
}

/// The disk cache's file for `module` compiled for `arch`.
fn cache_file(module: &Module, arch: &str, program: &str) -> Option<std::path::PathBuf> {
    kernel_cache_dir().map(|d| d.join(format!("{}_{arch}_{:016x}.ptx", module.name(), fnv1a(program))))
}

/// NVRTC's PTX of `program`, stored in `file` when there is one.
fn compile(module: &Module, arch: &'static str, program: &str, file: Option<&std::path::Path>) -> KernelResult<String> {
    let opts = CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(program, opts)
        .map_err(|e| {
            unsupported(format!(
                "NVRTC could not compile kernel module `{}` for {arch}: {}",
                module.name(),
                compile_error_text(&e)
            ))
        })?
        .to_src();
    if let Some(f) = file {
        let _ = f.parent().map(std::fs::create_dir_all);
        let _ = crate::write_atomic(f, ptx.as_bytes());
    }
    Ok(ptx)
}

/// NVRTC's error with the head of its log: a refused instruction repeats on every line that
/// uses it, thousands of lines that would bury the first one.
fn compile_error_text(e: &CompileError) -> String {
    const LINES: usize = 12;
    let CompileError::CompileError { nvrtc, log, .. } = e else {
        return e.to_string();
    };
    let log = log.to_string_lossy();
    let lines: Vec<&str> = log.lines().collect();
    let mut text = format!("{nvrtc:?}\n{}", lines[..lines.len().min(LINES)].join("\n"));
    if lines.len() > LINES {
        text.push_str(&format!("\n... ({} more lines)", lines.len() - LINES));
    }
    text
}

/// Where compiled kernels are kept between runs: `VITDET_KERNEL_CACHE` (empty: no disk
/// cache), else `$XDG_CACHE_HOME/vitdet/kernels`, else `~/.cache/vitdet/kernels`.
pub fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    match std::env::var_os("VITDET_KERNEL_CACHE") {
        Some(d) if d.is_empty() => None,
        Some(d) => Some(PathBuf::from(d)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("vitdet").join("kernels")),
    }
}

/// 64-bit FNV-1a: a hash that stays the same across builds and Rust versions.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Compiles `module` for compute capability `major.minor` without a device (for tests).
pub fn compile_for(module: &Module, major: i32, minor: i32) -> KernelResult<Arc<String>> {
    ptx(module, Box::leak(format!("compute_{major}{minor}").into_boxed_str()))
}

/// A loaded kernel entry point and the stream it launches on (the device's).
pub struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    /// Lets launches use `bytes` of dynamic shared memory (above 48 KiB needs the opt-in).
    pub fn allow_shared_bytes(&self, bytes: usize) -> KernelResult<()> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as A;
        let bytes = i32::try_from(bytes).map_err(|_| unsupported(format!("{bytes} bytes of shared memory")))?;
        self.func
            .set_attribute(A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)
            .map_err(|e| unsupported(format!("{bytes} bytes of shared memory: {e}")))
    }

    /// A launch of this kernel: push the arguments, then `launch`.
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// The function `name` of `module` on `dev` (the module is loaded once per device).
pub fn function(dev: &CudaDevice, module: &Module, name: &str) -> KernelResult<Kernel> {
    static LOADED: Cache<(String, String), Arc<CudaModule>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let key = (format!("{:?}", dev.id()), module.name());
    let loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .expect("module cache")
        .get(&key)
        .cloned();
    let loaded = match loaded {
        Some(m) => m,
        None => {
            let arch = arch(dev)?;
            let ptx = ptx(module, arch)?;
            let m = match stream.context().load_module(Ptx::from_src(ptx.as_str())) {
                Ok(m) => m,
                // PTX from the disk cache that this driver does not take (written by a newer
                // NVRTC elsewhere): compile it here, replacing the file, and load that.
                Err(first) => {
                    let program = module.program();
                    let file = cache_file(module, arch, &program);
                    let fresh = compile(module, arch, &program, file.as_deref())?;
                    if *fresh == *ptx {
                        return Err(unsupported(format!(
                            "loading kernel module `{}`: {first}",
                            module.name()
                        )));
                    }
                    stream
                        .context()
                        .load_module(Ptx::from_src(fresh.as_str()))
                        .map_err(candle_core::Error::wrap)?
                }
            };
            LOADED
                .get_or_init(Default::default)
                .lock()
                .expect("module cache")
                .insert(key, m.clone());
            m
        }
    };
    let func = loaded
        .load_function(name)
        .map_err(|e| unsupported(format!("kernel `{name}` of module `{}`: {e}", module.name())))?;
    Ok(Kernel { func, stream })
}

/// candle's launch configuration for a [`Launch`].
pub fn config(l: Launch, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
        block_dim: (l.block[0], l.block[1], l.block[2]),
        shared_mem_bytes,
    }
}

/// The suffix of a kernel's entry point for `dtype` (`_f32`, `_f16`, `_bf16`).
pub fn suffix(dtype: DType) -> KernelResult<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        d => Err(unsupported(format!(
            "the CUDA kernels take f32, f16 or bf16, not {d:?}"
        ))),
    }
}

/// The device buffer behind a contiguous tensor's storage, from its first element.
pub fn view<'a, T: CudaDType>(storage: &'a Storage, layout: &Layout) -> KernelResult<CudaView<'a, T>> {
    if !layout.is_contiguous() {
        return Err(unsupported("CUDA kernel operand is not contiguous"));
    }
    match storage {
        Storage::Cuda(s) => {
            let start = layout.start_offset();
            Ok(s.as_cuda_slice::<T>()?
                .slice(start..start + layout.shape().elem_count()))
        }
        _ => Err(unsupported("CUDA kernel operand is not on a CUDA device")),
    }
}

/// A zero-filled device buffer of `len` elements.
pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(dev: &CudaDevice, len: usize) -> KernelResult<CudaSlice<T>> {
    Ok(dev.alloc_zeros::<T>(len.max(1))?)
}

/// Launches `f` with the contiguous `inputs` (elements of `T`, in order), a new buffer of `len`
/// elements of `T` that the kernel writes in full, and `params`; returns the tensor of `shape`
/// owning that buffer. The shape of the elementwise kernels' launches.
pub fn launch_into_new<T: CudaDType + DeviceRepr, P: DeviceRepr>(
    f: &Kernel,
    inputs: &[&Tensor],
    len: usize,
    params: &P,
    launch: Launch,
    shape: impl Into<Shape>,
) -> KernelResult<Tensor> {
    let dev = cuda_device(inputs[0])?;
    let inputs = inputs
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    // Every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<T>(len.max(1)) }?;
    {
        let storages: Vec<_> = inputs.iter().map(|t| t.storage_and_layout()).collect();
        let views = storages
            .iter()
            .map(|(s, l)| view::<T>(s, l))
            .collect::<KernelResult<Vec<_>>>()?;
        let mut l = f.builder();
        for v in &views {
            l.arg(v);
        }
        l.arg(&mut out).arg(params);
        unsafe { l.launch(config(launch, 0)) }.map_err(candle_core::Error::wrap)?;
    }
    Ok(tensor(out, shape, &dev))
}

/// A tensor owning `slice`, of `shape`.
pub fn tensor<T: CudaDType>(slice: CudaSlice<T>, shape: impl Into<Shape>, dev: &CudaDevice) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(slice, dev.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

#[cfg(test)]
mod tests {
    use candle_core::cuda_backend::cudarc::nvrtc::result::NvrtcError;
    use candle_core::cuda_backend::cudarc::nvrtc::sys::nvrtcResult;

    use super::*;

    #[test]
    fn compile_errors_keep_the_head_of_the_log() {
        let log: String = (1..=40).map(|i| format!("line {i}: error\n")).collect();
        let e = CompileError::CompileError {
            nvrtc: NvrtcError(nvrtcResult::NVRTC_ERROR_COMPILATION),
            options: vec![],
            log: std::ffi::CString::new(log).unwrap(),
        };
        let text = compile_error_text(&e);
        assert!(
            text.contains("line 1: error") && text.contains("line 12: error"),
            "{text}"
        );
        assert!(!text.contains("line 13: error"), "{text}");
        assert!(text.ends_with("... (28 more lines)"), "{text}");
    }
}
