//! Convolutions on cuDNN: forward, input gradient (a transposed convolution) and weight
//! gradient, through cuDNN's convolution API. Each problem's algorithm is chosen once by timing
//! the candidates (`cudnnFind*`, as PyTorch does with `cudnn.benchmark` on): the legacy API's
//! heuristic ranking picked a forward 3x3 bf16 algorithm twice as slow as PyTorch's choice.
//! `VITDET_CUDNN_ALGO=heuristic` takes the heuristic's first fitting choice instead (no timing
//! runs; the first use of each shape is then cheaper).
//!
//! cuDNN is loaded at run time (`libcudnn.so.9`, or the file named by `$VITDET_CUDNN`), so
//! neither the build nor a machine without cuDNN needs it: there convolutions keep running on
//! the runtime's im2col kernel + cuBLAS, and [`status`] says why cuDNN is not in use.
//!
//! f32 convolutions run with `CUDNN_FMA_MATH` (no TF32, like the rest of the runtime's f32) and
//! never on the FFT or Winograd algorithms, whose transforms round differently from a direct sum;
//! f16/bf16 ones run on tensor cores, accumulating in f32.

use std::cell::Cell;
use std::ffi::{c_int, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Tensor};
use cudnn_sys::cudnn::sys::{self, Lib};
use vitdet_ir::ops::{Conv2d, Conv2dGradWeight, ConvTranspose2d};

use super::device::{bind, cuda_device, tensor, view, warn_once, Cache};
use crate::kernels::{KernelError, KernelResult};

/// Which implementation runs convolutions on CUDA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvEngine {
    /// cuDNN where it loads, else im2col + GEMM.
    Auto,
    /// cuDNN, or an error saying why it cannot load.
    Cudnn,
    /// The runtime's im2col kernel + cuBLAS GEMM.
    Im2Col,
}

thread_local! {
    static ENGINE: Cell<ConvEngine> = const { Cell::new(ConvEngine::Auto) };
}

/// Runs `f` with convolutions on this thread using `engine` (tests and benchmarks compare both).
pub fn with_engine<R>(engine: ConvEngine, f: impl FnOnce() -> R) -> R {
    struct Restore(ConvEngine);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENGINE.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(ENGINE.with(|e| e.replace(engine)));
    f()
}

/// Whether a convolution on `x` goes to cuDNN: on CUDA, in f32/f16/bf16, with the library loaded
/// (an error when [`ConvEngine::Cudnn`] is asked for and it cannot load).
pub fn takes(x: &Tensor) -> KernelResult<bool> {
    if !x.device().is_cuda() || data_type(x.dtype()).is_none() {
        return Ok(false);
    }
    match ENGINE.with(Cell::get) {
        ConvEngine::Im2Col => Ok(false),
        ConvEngine::Auto => Ok(library().is_ok()),
        ConvEngine::Cudnn => library().map(|_| true).map_err(KernelError::Unsupported),
    }
}

/// Runs one convolution on cuDNN, once [`takes`] said it goes there. Under
/// [`ConvEngine::Auto`], a problem cuDNN refuses (no algorithm for the shape or dtype) returns
/// `None`, so the caller runs it on the im2col path, and says so on stderr once per refusal;
/// under [`ConvEngine::Cudnn`] the refusal is the error.
pub fn or_im2col(f: impl FnOnce() -> KernelResult<Tensor>) -> KernelResult<Option<Tensor>> {
    match f() {
        Ok(y) => Ok(Some(y)),
        Err(e) if ENGINE.with(Cell::get) == ConvEngine::Auto => {
            warn_once(&e.to_string(), "this convolution runs on the im2col kernel instead");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// cuDNN's version when it is loaded, else why not (for reports).
pub fn status() -> Result<String, String> {
    let lib = library()?;
    let v = unsafe { (lib.cudnnGetVersion)() };
    Ok(format!("cuDNN {}.{}.{}", v / 10000, v % 10000 / 100, v % 100))
}

/// The library, loaded once. The bindings resolve every symbol up front and panic on a missing
/// one (a cuDNN older than they expect): that is caught and reported as a load failure.
fn library() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let candidates = match std::env::var("VITDET_CUDNN") {
            Ok(path) => vec![path],
            Err(_) => vec!["libcudnn.so.9".to_string(), "libcudnn.so".to_string()],
        };
        let mut why = Vec::new();
        for name in &candidates {
            match std::panic::catch_unwind(|| unsafe { Lib::new(name) }) {
                Ok(Ok(lib)) => return Ok(lib),
                Ok(Err(e)) => why.push(format!("{name}: {e}")),
                Err(_) => why.push(format!("{name}: lacks a cuDNN 9 symbol")),
            }
        }
        Err(format!(
            "cuDNN did not load ({}); put libcudnn.so.9 on LD_LIBRARY_PATH or name it in VITDET_CUDNN",
            why.join("; ")
        ))
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn lib() -> KernelResult<&'static Lib> {
    library().map_err(KernelError::Unsupported)
}

fn check(status: sys::cudnnStatus_t, what: &str) -> KernelResult<()> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    let text = lib()
        .map(|l| {
            unsafe { CStr::from_ptr((l.cudnnGetErrorString)(status)) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Err(KernelError::Unsupported(format!("cuDNN {what}: {status:?} {text}")))
}

fn data_type(dtype: DType) -> Option<sys::cudnnDataType_t> {
    match dtype {
        DType::F32 => Some(sys::cudnnDataType_t::CUDNN_DATA_FLOAT),
        DType::F16 => Some(sys::cudnnDataType_t::CUDNN_DATA_HALF),
        DType::BF16 => Some(sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16),
        _ => None,
    }
}

/// One cuDNN handle per device, bound to candle's stream; cuDNN handles are not for concurrent
/// use, so each call holds its lock.
struct Handle(sys::cudnnHandle_t);
// The handle is only used under its mutex.
unsafe impl Send for Handle {}

fn handle(dev: &CudaDevice) -> KernelResult<Arc<Mutex<Handle>>> {
    static HANDLES: Cache<String, Arc<Mutex<Handle>>> = OnceLock::new();
    let key = format!("{:?}", dev.id());
    let mut handles = HANDLES.get_or_init(Default::default).lock().expect("cuDNN handles");
    if let Some(h) = handles.get(&key) {
        return Ok(h.clone());
    }
    let lib = lib()?;
    let stream = dev.cuda_stream();
    bind(dev)?;
    let mut h: sys::cudnnHandle_t = std::ptr::null_mut();
    check(unsafe { (lib.cudnnCreate)(&mut h) }, "create")?;
    check(
        unsafe { (lib.cudnnSetStream)(h, stream.cu_stream() as sys::cudaStream_t) },
        "set stream",
    )?;
    let h = Arc::new(Mutex::new(Handle(h)));
    handles.insert(key, h.clone());
    Ok(h)
}

/// The three directions of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Direction {
    Forward,
    BackwardData,
    BackwardFilter,
}

/// One convolution in cuDNN's terms: its input `x`, filter `w` and output `y` dims (NCHW /
/// KCRS), whichever of them is being computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Problem {
    x: [usize; 4],
    w: [usize; 4],
    y: [usize; 4],
    padding: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    dtype: DType,
}

impl Problem {
    /// The convolution `op` of an `x` map by a `w` filter.
    fn new(x: [usize; 4], w: [usize; 4], op: &Conv2d, dtype: DType) -> KernelResult<Self> {
        let [ho, wo] = op
            .output_size([x[2], x[3]], [w[2], w[3]])
            .filter(|_| op.groups > 0)
            .ok_or_else(|| KernelError::Unsupported(format!("convolution {op:?} of {x:?} by {w:?} has no output")))?;
        Ok(Problem {
            x,
            w,
            y: [x[0], w[0], ho, wo],
            padding: op.padding,
            stride: op.stride,
            dilation: op.dilation,
            groups: op.groups,
            dtype,
        })
    }
}

fn int(v: usize, what: &str) -> KernelResult<c_int> {
    c_int::try_from(v).map_err(|_| KernelError::Unsupported(format!("cuDNN: {what} {v} exceeds a C int")))
}

fn dims4(d: [usize; 4], what: &str) -> KernelResult<[c_int; 4]> {
    Ok([int(d[0], what)?, int(d[1], what)?, int(d[2], what)?, int(d[3], what)?])
}

/// The descriptors of one [`Problem`], destroyed on drop.
struct Descriptors {
    lib: &'static Lib,
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl Descriptors {
    fn new(p: &Problem) -> KernelResult<Self> {
        let lib = lib()?;
        let dt = data_type(p.dtype)
            .ok_or_else(|| KernelError::Unsupported(format!("cuDNN convolution of {:?}", p.dtype)))?;
        let mut d = Descriptors {
            lib,
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
        };
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        unsafe {
            check((lib.cudnnCreateTensorDescriptor)(&mut d.x), "create input descriptor")?;
            check((lib.cudnnCreateTensorDescriptor)(&mut d.y), "create output descriptor")?;
            check((lib.cudnnCreateFilterDescriptor)(&mut d.w), "create filter descriptor")?;
            check(
                (lib.cudnnCreateConvolutionDescriptor)(&mut d.conv),
                "create convolution descriptor",
            )?;
            let [n, c, h, w] = dims4(p.x, "input dim")?;
            check(
                (lib.cudnnSetTensor4dDescriptor)(d.x, nchw, dt, n, c, h, w),
                "input descriptor",
            )?;
            let [n, c, h, w] = dims4(p.y, "output dim")?;
            check(
                (lib.cudnnSetTensor4dDescriptor)(d.y, nchw, dt, n, c, h, w),
                "output descriptor",
            )?;
            let [k, c, r, s] = dims4(p.w, "filter dim")?;
            check(
                (lib.cudnnSetFilter4dDescriptor)(d.w, dt, nchw, k, c, r, s),
                "filter descriptor",
            )?;
            let [ph, pw] = [int(p.padding[0], "padding")?, int(p.padding[1], "padding")?];
            let [sh, sw] = [int(p.stride[0], "stride")?, int(p.stride[1], "stride")?];
            let [dh, dw] = [int(p.dilation[0], "dilation")?, int(p.dilation[1], "dilation")?];
            check(
                (lib.cudnnSetConvolution2dDescriptor)(
                    d.conv,
                    ph,
                    pw,
                    sh,
                    sw,
                    dh,
                    dw,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    // Every dtype accumulates in f32.
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                ),
                "convolution descriptor",
            )?;
            let math = if p.dtype == DType::F32 {
                sys::cudnnMathType_t::CUDNN_FMA_MATH
            } else {
                sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            };
            check((lib.cudnnSetConvolutionMathType)(d.conv, math), "math type")?;
            check(
                (lib.cudnnSetConvolutionGroupCount)(d.conv, int(p.groups, "groups")?),
                "group count",
            )?;
            // The output descriptor must be the one cuDNN derives from the other three.
            let mut y = [0 as c_int; 4];
            let [yn, yc, yh, yw] = &mut y;
            check(
                (lib.cudnnGetConvolution2dForwardOutputDim)(d.conv, d.x, d.w, yn, yc, yh, yw),
                "output dims",
            )?;
            if y != dims4(p.y, "output dim")? {
                return Err(KernelError::Unsupported(format!(
                    "cuDNN derives output {y:?} for {p:?}, not {:?}",
                    p.y
                )));
            }
        }
        Ok(d)
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // Destroying a descriptor only fails for a null one, which these are not once created.
        unsafe {
            (self.lib.cudnnDestroyTensorDescriptor)(self.x);
            (self.lib.cudnnDestroyTensorDescriptor)(self.y);
            (self.lib.cudnnDestroyFilterDescriptor)(self.w);
            (self.lib.cudnnDestroyConvolutionDescriptor)(self.conv);
        }
    }
}

/// cuDNN's `cudnnConvolution*AlgoPerf_t` (the three share this layout), read with plain integers
/// so that no value cuDNN writes can fall outside a Rust enum.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct AlgoPerf {
    algo: c_int,
    status: c_int,
    time: f32,
    memory: usize,
    determinism: c_int,
    math_type: c_int,
    reserved: [c_int; 3],
}

/// The most workspace one convolution may take: the heuristics' first choices on the pyramid's
/// and heads' shapes are implicit GEMMs needing far less; the bound keeps a rarer pick from
/// raising a training step's peak by gigabytes (the im2col path's tiles are 128 MiB).
const WORKSPACE_LIMIT: usize = 256 << 20;

/// Algorithms whose transforms round differently from a direct sum, kept off f32 (cuDNN's
/// numbering: forward FFT 4, FFT_TILING 5, WINOGRAD 6, WINOGRAD_NONFUSED 7; backward data FFT 2,
/// FFT_TILING 3, WINOGRAD 4, WINOGRAD_NONFUSED 5; backward filter FFT 2, WINOGRAD 4,
/// WINOGRAD_NONFUSED 5, FFT_TILING 6).
fn transform_algorithm(direction: Direction, algo: c_int) -> bool {
    match direction {
        Direction::Forward => (4..=7).contains(&algo),
        Direction::BackwardData => (2..=5).contains(&algo),
        Direction::BackwardFilter => matches!(algo, 2 | 4..=6),
    }
}

/// Whether algorithms are ranked by cuDNN's heuristic (`VITDET_CUDNN_ALGO=heuristic`) rather
/// than by timing them.
fn heuristic_ranking() -> bool {
    static HEURISTIC: OnceLock<bool> = OnceLock::new();
    *HEURISTIC.get_or_init(|| std::env::var("VITDET_CUDNN_ALGO").is_ok_and(|v| v == "heuristic"))
}

/// The algorithm and workspace bytes for a problem: the fastest by cuDNN's timing runs (or its
/// heuristic ranking, see [`heuristic_ranking`]) that fits, cached per problem.
fn algorithm(
    h: sys::cudnnHandle_t,
    d: &Descriptors,
    p: &Problem,
    direction: Direction,
) -> KernelResult<(c_int, usize)> {
    static CHOSEN: Cache<(Problem, Direction), (c_int, usize)> = OnceLock::new();
    let chosen = CHOSEN.get_or_init(Default::default);
    if let Some(&c) = chosen.lock().expect("cuDNN algorithms").get(&(*p, direction)) {
        return Ok(c);
    }
    let lib = d.lib;
    // As many entries as cuDNN may return: it can list an algorithm once per math type.
    let mut most: c_int = 0;
    let status = unsafe {
        match direction {
            Direction::Forward => (lib.cudnnGetConvolutionForwardAlgorithmMaxCount)(h, &mut most),
            Direction::BackwardData => (lib.cudnnGetConvolutionBackwardDataAlgorithmMaxCount)(h, &mut most),
            Direction::BackwardFilter => (lib.cudnnGetConvolutionBackwardFilterAlgorithmMaxCount)(h, &mut most),
        }
    };
    check(status, &format!("{direction:?} algorithm count"))?;
    let mut perf = vec![AlgoPerf::default(); most.max(1) as usize];
    let mut count: c_int = 0;
    let heuristic = heuristic_ranking();
    // Both calls take the same arguments and fill the same records, best first.
    let status = unsafe {
        match direction {
            Direction::Forward => (if heuristic {
                lib.cudnnGetConvolutionForwardAlgorithm_v7
            } else {
                lib.cudnnFindConvolutionForwardAlgorithm
            })(
                h,
                d.x,
                d.w,
                d.conv,
                d.y,
                perf.len() as c_int,
                &mut count,
                perf.as_mut_ptr().cast(),
            ),
            Direction::BackwardData => (if heuristic {
                lib.cudnnGetConvolutionBackwardDataAlgorithm_v7
            } else {
                lib.cudnnFindConvolutionBackwardDataAlgorithm
            })(
                h,
                d.w,
                d.y,
                d.conv,
                d.x,
                perf.len() as c_int,
                &mut count,
                perf.as_mut_ptr().cast(),
            ),
            Direction::BackwardFilter => (if heuristic {
                lib.cudnnGetConvolutionBackwardFilterAlgorithm_v7
            } else {
                lib.cudnnFindConvolutionBackwardFilterAlgorithm
            })(
                h,
                d.x,
                d.y,
                d.conv,
                d.w,
                perf.len() as c_int,
                &mut count,
                perf.as_mut_ptr().cast(),
            ),
        }
    };
    check(status, &format!("{direction:?} algorithm for {p:?}"))?;
    let mut pick = None;
    for a in &perf[..(count.max(0) as usize).min(perf.len())] {
        if a.status != 0 || (p.dtype == DType::F32 && transform_algorithm(direction, a.algo)) {
            continue;
        }
        // The heuristics' memory column is an estimate: the workspace is what cuDNN asks for.
        // An algorithm whose workspace query fails is passed over like a refused one.
        let Ok(bytes) = workspace_bytes(h, d, direction, a.algo) else {
            continue;
        };
        if bytes <= WORKSPACE_LIMIT {
            pick = Some((a.algo, bytes));
            break;
        }
    }
    let pick =
        pick.ok_or_else(|| KernelError::Unsupported(format!("cuDNN has no {direction:?} algorithm for {p:?}")))?;
    chosen.lock().expect("cuDNN algorithms").insert((*p, direction), pick);
    Ok(pick)
}

/// The workspace `algo` needs for the descriptors' problem in `direction`.
fn workspace_bytes(h: sys::cudnnHandle_t, d: &Descriptors, direction: Direction, algo: c_int) -> KernelResult<usize> {
    let mut bytes = 0usize;
    let lib = d.lib;
    let status = unsafe {
        match direction {
            Direction::Forward => {
                (lib.cudnnGetConvolutionForwardWorkspaceSize)(h, d.x, d.w, d.conv, d.y, fwd_algo(algo)?, &mut bytes)
            }
            Direction::BackwardData => (lib.cudnnGetConvolutionBackwardDataWorkspaceSize)(
                h,
                d.w,
                d.y,
                d.conv,
                d.x,
                bwd_data_algo(algo)?,
                &mut bytes,
            ),
            Direction::BackwardFilter => (lib.cudnnGetConvolutionBackwardFilterWorkspaceSize)(
                h,
                d.x,
                d.y,
                d.conv,
                d.w,
                bwd_filter_algo(algo)?,
                &mut bytes,
            ),
        }
    };
    check(status, &format!("{direction:?} workspace of algorithm {algo}"))?;
    Ok(bytes)
}

/// cuDNN's algorithm numbers as the bindings' enums, for the numbers cuDNN defines.
macro_rules! algo_enum {
    ($name:ident, $ty:ty, $count:expr) => {
        fn $name(algo: c_int) -> KernelResult<$ty> {
            if (0..$count).contains(&algo) {
                // The enum is repr(u32) with every value in 0..count.
                Ok(unsafe { std::mem::transmute::<u32, $ty>(algo as u32) })
            } else {
                Err(KernelError::Unsupported(format!(
                    "cuDNN algorithm number {algo} is not one of {}",
                    stringify!($ty)
                )))
            }
        }
    };
}
algo_enum!(fwd_algo, sys::cudnnConvolutionFwdAlgo_t, 8);
algo_enum!(bwd_data_algo, sys::cudnnConvolutionBwdDataAlgo_t, 6);
algo_enum!(bwd_filter_algo, sys::cudnnConvolutionBwdFilterAlgo_t, 7);

/// Runs one direction of `p`: `a` and `b` are its two operands in cuDNN's argument order
/// (forward x, w; backward data w, dy; backward filter x, dy); the result has `out_dims`.
fn run<T: CudaDType + DeviceRepr>(
    p: &Problem,
    direction: Direction,
    a: &Tensor,
    b: &Tensor,
    out_dims: [usize; 4],
) -> KernelResult<Tensor> {
    let dev = cuda_device(a)?;
    let stream = dev.cuda_stream();
    bind(&dev)?;
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let h = handle(&dev)?;
    let h = h.lock().expect("cuDNN handle");
    let d = Descriptors::new(p)?;
    let (algo, ws_bytes) = algorithm(h.0, &d, p, direction)?;
    let out_len: usize = out_dims.iter().product();
    // Every element is written (beta = 0 means cuDNN never reads the output).
    let mut out = unsafe { dev.alloc::<T>(out_len.max(1)) }?;
    let workspace = unsafe { dev.alloc::<u8>(ws_bytes.max(1)) }?;
    {
        let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
        let (va, vb) = (view::<T>(&sa, la)?, view::<T>(&sb, lb)?);
        let (pa, _ga) = va.device_ptr(&stream);
        let (pb, _gb) = vb.device_ptr(&stream);
        let (pw, _gw) = workspace.device_ptr(&stream);
        let (po, _go) = candle_core::cuda_backend::cudarc::driver::DevicePtrMut::device_ptr_mut(&mut out, &stream);
        let (alpha, beta) = (1f32, 0f32);
        let alpha = &alpha as *const f32 as *const c_void;
        let beta = &beta as *const f32 as *const c_void;
        let (pa, pb, pw, po) = (
            pa as *const c_void,
            pb as *const c_void,
            pw as *mut c_void,
            po as *mut c_void,
        );
        let lib = d.lib;
        // The algorithm numbers came from cuDNN for this very problem and direction.
        let status = unsafe {
            match direction {
                Direction::Forward => (lib.cudnnConvolutionForward)(
                    h.0,
                    alpha,
                    d.x,
                    pa,
                    d.w,
                    pb,
                    d.conv,
                    fwd_algo(algo)?,
                    pw,
                    ws_bytes,
                    beta,
                    d.y,
                    po,
                ),
                Direction::BackwardData => (lib.cudnnConvolutionBackwardData)(
                    h.0,
                    alpha,
                    d.w,
                    pa,
                    d.y,
                    pb,
                    d.conv,
                    bwd_data_algo(algo)?,
                    pw,
                    ws_bytes,
                    beta,
                    d.x,
                    po,
                ),
                Direction::BackwardFilter => (lib.cudnnConvolutionBackwardFilter)(
                    h.0,
                    alpha,
                    d.x,
                    pa,
                    d.y,
                    pb,
                    d.conv,
                    bwd_filter_algo(algo)?,
                    pw,
                    ws_bytes,
                    beta,
                    d.w,
                    po,
                ),
            }
        };
        check(status, &format!("{direction:?} {p:?} (algorithm {algo})"))?;
    }
    Ok(tensor(out, out_dims.to_vec(), &dev))
}

fn dispatch(p: &Problem, direction: Direction, a: &Tensor, b: &Tensor, out: [usize; 4]) -> KernelResult<Tensor> {
    if a.dtype() != b.dtype() {
        return Err(KernelError::Unsupported(format!(
            "cuDNN convolution operands differ in dtype: {:?} and {:?}",
            a.dtype(),
            b.dtype()
        )));
    }
    // cuDNN refuses empty tensors (a batch of 0 RoIs): an empty output, or a weight gradient
    // summed over no terms, is zeros.
    if a.elem_count() == 0 || b.elem_count() == 0 {
        return Ok(Tensor::zeros(out.to_vec(), a.dtype(), a.device())?);
    }
    match p.dtype {
        DType::F32 => run::<f32>(p, direction, a, b, out),
        DType::F16 => run::<half::f16>(p, direction, a, b, out),
        DType::BF16 => run::<half::bf16>(p, direction, a, b, out),
        d => Err(KernelError::Unsupported(format!("cuDNN convolution of {d:?}"))),
    }
}

fn four(t: &Tensor) -> KernelResult<[usize; 4]> {
    let (a, b, c, d) = t.dims4()?;
    Ok([a, b, c, d])
}

/// `conv2d` without bias: x [N, C, H, W], w [O, C / groups, kh, kw].
pub fn conv2d(op: &Conv2d, x: &Tensor, w: &Tensor) -> KernelResult<Tensor> {
    let p = Problem::new(four(x)?, four(w)?, op, x.dtype())?;
    dispatch(&p, Direction::Forward, x, w, p.y)
}

/// `conv_transpose2d` without bias: x [N, C_in, H, W], w [C_in, C_out, kh, kw] (PyTorch's
/// layout, which is the filter of the convolution it transposes), as that convolution's
/// backward-data pass.
pub fn conv_transpose2d(op: &ConvTranspose2d, x: &Tensor, w: &Tensor) -> KernelResult<Tensor> {
    let [n, _, h, wd] = four(x)?;
    let wdims = four(w)?;
    let out = |i: usize, a: usize| {
        let (i1, k1) = (i.checked_sub(1), wdims[2 + a].checked_sub(1));
        i1.zip(k1)
            .and_then(|(i1, k1)| {
                (i1 * op.stride[a] + op.dilation[a] * k1 + op.output_padding[a] + 1).checked_sub(2 * op.padding[a])
            })
            .filter(|&v| v > 0)
            .ok_or_else(|| KernelError::Unsupported(format!("conv_transpose2d {op:?} leaves no output for {i}")))
    };
    let y_dims = [n, wdims[1], out(h, 0)?, out(wd, 1)?];
    let conv = Conv2d {
        stride: op.stride,
        padding: op.padding,
        dilation: op.dilation,
        groups: 1,
    };
    let p = Problem::new(y_dims, wdims, &conv, x.dtype())?;
    if p.y != four(x)? {
        return Err(KernelError::Unsupported(format!(
            "conv_transpose2d {op:?}: input {:?} is not what a convolution of {y_dims:?} yields",
            x.dims()
        )));
    }
    dispatch(&p, Direction::BackwardData, w, x, y_dims)
}

/// `conv2d`'s weight gradient: x [N, C, H, W], dy [N, O, Ho, Wo] -> [O, C / groups, kh, kw].
pub fn conv2d_grad_weight(op: &Conv2dGradWeight, x: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
    let xd = four(x)?;
    let w = [dy.dim(1)?, xd[1] / op.groups, op.kernel[0], op.kernel[1]];
    let p = Problem::new(xd, w, &op.conv(), x.dtype())?;
    if p.y != four(dy)? {
        return Err(KernelError::Unsupported(format!(
            "conv2d_grad_weight {op:?}: output gradient {:?} does not fit input {:?}",
            dy.dims(),
            x.dims()
        )));
    }
    dispatch(&p, Direction::BackwardFilter, x, dy, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The descriptors of the runtime's convolution shapes, checked by cuDNN itself (a host-only
    /// call, so no GPU is needed): the output it derives must be the one the runtime allocates.
    #[test]
    fn descriptors_agree_with_cudnn_on_output_dims() {
        if let Err(why) = library() {
            assert!(std::env::var_os("VITDET_CUDNN").is_none(), "{why}");
            eprintln!("skipped: {why}");
            return;
        }
        let conv = |padding, stride, dilation, groups| Conv2d {
            stride,
            padding,
            dilation,
            groups,
        };
        let same = Conv2d::same(1);
        for (x, w, op) in [
            ([1, 256, 256, 256], [256, 256, 3, 3], same.clone()),
            ([512, 256, 14, 14], [256, 256, 3, 3], same.clone()),
            ([2, 6, 17, 19], [5, 6, 5, 3], conv([1, 2], [2, 1], [1, 2], 1)),
            ([2, 8, 9, 9], [4, 4, 3, 3], conv([0, 0], [2, 2], [1, 1], 2)),
        ] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let p = Problem::new(x, w, &op, dtype).unwrap();
                Descriptors::new(&p).unwrap();
            }
        }
        // An output that is not the convolution's is refused.
        let mut wrong = Problem::new([1, 4, 8, 8], [4, 4, 3, 3], &same, DType::F32).unwrap();
        wrong.y[3] += 1;
        assert!(Descriptors::new(&wrong).is_err());
        // A convolution with no output is refused before cuDNN sees it.
        assert!(Problem::new([1, 1, 2, 2], [1, 1, 3, 3], &Conv2d::same(0), DType::F32).is_err());
    }
}
