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
