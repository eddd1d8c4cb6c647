//! `vitdet kernels`: compiles the runtime's CUDA kernel modules ahead of time into the kernel
//! cache (`VITDET_KERNEL_CACHE`, else `~/.cache/vitdet/kernels`), so the first run on a GPU does
//! not spend seconds per module in NVRTC. Needs NVRTC only, not a GPU: the PTX is compiled for
//! the named compute capability, and the driver finishes it for the device when it loads.

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct KernelsArgs {
    /// Compute capability to compile for, as major and minor digits (90: H100 / H200, 80: A100).
    #[arg(long, default_value = "90")]
    pub compute: String,
    /// Attention head dims to compile the attention kernels for, comma-separated (default: those
    /// of every preset).
    #[arg(long, value_delimiter = ',')]
    pub head_dims: Vec<usize>,
}

/// The head dims of every preset, ascending.
pub fn preset_head_dims() -> Vec<usize> {
    let mut dims: Vec<usize> = vitdet_models::presets::NAMES
        .iter()
        .filter_map(|n| vitdet_models::presets::get(n))
        .map(|c| c.head_dim())
        .collect();
    dims.sort_unstable();
    dims.dedup();
    dims
}

/// `(major, minor)` from digits such as `90` or `8.6`.
pub fn parse_compute(text: &str) -> Result<(i32, i32)> {
    let digits: String = text.chars().filter(|c| *c != '.').collect();
    let ok = (2..=3).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit());
    if !ok {
        bail!("--compute `{text}`: expected a compute capability such as 90 (9.0) or 86");
    }
    let (major, minor) = digits.split_at(digits.len() - 1);
    Ok((major.parse()?, minor.parse()?))
}

pub fn run(args: KernelsArgs) -> Result<()> {
    let (major, minor) = parse_compute(&args.compute)?;
    let head_dims = if args.head_dims.is_empty() {
        preset_head_dims()
    } else {
        args.head_dims.clone()
    };
    if let Some(hd) = head_dims.iter().find(|&&d| d == 0 || d > 128) {
        bail!("--head-dims: {hd} is outside the attention kernels' 1..=128");
    }
    compile_all(major, minor, &head_dims)
}

#[cfg(feature = "cuda")]
fn compile_all(major: i32, minor: i32, head_dims: &[usize]) -> Result<()> {
    use std::time::Instant;
    use vitdet_runtime::cuda::{device, runtime_modules};
    let cache = device::kernel_cache_dir()
        .ok_or_else(|| anyhow::anyhow!("VITDET_KERNEL_CACHE is empty: there is no kernel cache to fill"))?;
    eprintln!("compiling for compute_{major}{minor} into {}", cache.display());
    let start = Instant::now();
    let modules = runtime_modules(head_dims);
    for m in &modules {
        let t = Instant::now();
        device::compile_for(m, major, minor).map_err(|e| anyhow::anyhow!("{e}"))?;
        println!("{:<70} {:>7.2} s", m.name(), t.elapsed().as_secs_f64());
    }
    println!(
        "{} modules in {:.1} s ({})",
        modules.len(),
        start.elapsed().as_secs_f64(),
        cache.display()
    );
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn compile_all(_major: i32, _minor: i32, _head_dims: &[usize]) -> Result<()> {
    bail!("vitdet kernels: this build has no CUDA support (rebuild with `--features cuda`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_capabilities_parse() {
        assert_eq!(parse_compute("90").unwrap(), (9, 0));
        assert_eq!(parse_compute("8.6").unwrap(), (8, 6));
        assert_eq!(parse_compute("100").unwrap(), (10, 0));
        for bad in ["9", "sm_90", "", "1000"] {
            assert!(parse_compute(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn preset_head_dims_are_the_tiny_base_and_huge_ones() {
        // 32 / 2 (tiny), 768 / 12 and 1024 / 16 (B, L), 1280 / 16 (H).
        assert_eq!(preset_head_dims(), [16, 64, 80]);
    }
}
