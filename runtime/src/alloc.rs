//! Process-wide allocator tuning for large tensors (opt-in).
//!
//! candle allocates a fresh `Vec` for every op result. With glibc's default settings, any
//! allocation above the (dynamic, at most 32 MiB) mmap threshold is served by a fresh `mmap`
//! and returned with `munmap` when freed, so every large result pays one page fault per 4 KiB
//! page on first touch. On the 2-core development VM this made an elementwise op on a
//! `[12, 4096, 4096]` f32 tensor (global attention scores of ViT-B at 1024x1024) take 0.68 s
//! instead of 0.15 s, and one on a `[4096, 3072]` tensor 40 ms instead of 7 ms.
//!
//! [`retain_freed_memory`] raises glibc's mmap and trim thresholds to 2 GiB, so large blocks
//! come from the heap and freed memory is kept for reuse instead of being returned to the
//! kernel. The process's resident size then stays at its high-water mark, which is what a
//! one-shot inference or a training loop reaches anyway. Applications (the CLI, benchmarks)
//! call it once at startup; the library never changes allocator settings by itself.
//!
//! [`CountingAllocator`] (opt-in, installed with `#[global_allocator]`) counts the heap bytes
//! held and their high-water mark, so the executor can report a run's measured peak beside the
//! memory planner's arena.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Allocates, on every thread that runs kernels (the rayon pool's and the caller's), the
/// packing slab the `gemm` crate keeps per thread for the life of the process (the L2 cache's
/// size, 1 MiB on the development machine). A thread otherwise allocates it on its first
/// product, and which threads compute the first products depends on scheduling: a measured
/// run would then count it or not by chance. The executor calls this before measuring.
pub fn allocate_thread_slabs() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        let touch = || gemm_common::gemm::L2_SLAB.with(|_| ());
        rayon::broadcast(|_| touch());
        touch();
    });
}

/// Raises glibc's `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` to 2 GiB (see the module doc).
/// Returns whether the settings were applied (false on non-glibc targets).
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::os::raw::c_int, value: std::os::raw::c_int) -> std::os::raw::c_int;
        }
        const M_TRIM_THRESHOLD: std::os::raw::c_int = -1;
        const M_MMAP_THRESHOLD: std::os::raw::c_int = -3;
        // SAFETY: mallopt only changes allocator parameters; both values are valid.
        unsafe { mallopt(M_MMAP_THRESHOLD, i32::MAX) == 1 && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// A global allocator that counts the heap bytes the process holds: [`std::alloc::System`]
/// plus two atomics (bytes held now, and the high-water mark since the last
/// [`CountingAllocator::reset_peak`]). Binaries and tests that want measured memory install it:
///
/// ```ignore
/// #[global_allocator]
/// static ALLOC: vitdet_runtime::alloc::CountingAllocator = vitdet_runtime::alloc::CountingAllocator;
/// ```
///
/// The counters are process-wide (every thread's allocations count), so a measurement is only
/// meaningful while nothing else allocates concurrently: the executor's measured peak is exact
/// for a run that has the process to itself (worker threads it starts itself, e.g. gemm's,
/// count as they should). Counting costs two relaxed atomic updates per allocation.
pub struct CountingAllocator;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Set by the first allocation through [`CountingAllocator`]: then it is the global allocator.
static INSTALLED: AtomicBool = AtomicBool::new(false);

impl CountingAllocator {
    /// Whether this allocator is the process's global allocator (it has served an allocation).
    pub fn installed() -> bool {
        INSTALLED.load(Ordering::Relaxed)
    }

    /// Heap bytes held now (requested sizes, not the allocator's rounding).
    pub fn current_bytes() -> usize {
        CURRENT.load(Ordering::Relaxed)
    }

    /// Highest [`CountingAllocator::current_bytes`] since the last reset.
    pub fn peak_bytes() -> usize {
        PEAK.load(Ordering::Relaxed)
    }

    /// Restarts the high-water mark from the bytes held now.
    pub fn reset_peak() {
        PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn grew(bytes: usize) {
        let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }

    fn shrank(bytes: usize) {
        CURRENT.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Free functions for the counters, for callers that do not name the type.
pub fn installed() -> bool {
    CountingAllocator::installed()
}
/// See [`CountingAllocator::current_bytes`].
pub fn current_bytes() -> usize {
    CountingAllocator::current_bytes()
}
/// See [`CountingAllocator::peak_bytes`].
pub fn peak_bytes() -> usize {
    CountingAllocator::peak_bytes()
}
/// See [`CountingAllocator::reset_peak`].
pub fn reset_peak() {
    CountingAllocator::reset_peak()
}

// SAFETY: every call forwards to `System` with the caller's layout; the counters only observe.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        Self::shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // Counted as the new block arriving before the old one leaves, which is what a
            // moving realloc holds at its worst.
            Self::grew(new_size);
            Self::shrank(layout.size());
        }
        p
    }
}
