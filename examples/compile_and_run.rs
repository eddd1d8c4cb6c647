//! Using the facade library: compile a preset, inspect its report, run it on an image.
//!
//! ```bash
//! cargo run --release --example compile_and_run -- vit-tiny tests/fixtures/preprocess_large.png
//! ```

use anyhow::{Context, Result};
use vitdet::compile::{compile, CompileOptions, Target};
use vitdet::runtime::{preprocess_image, run_with_order, Device, ParamStore};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "vit-tiny".into());
    let image = args.next().context("usage: compile_and_run MODEL IMAGE")?;
    let compiled = compile(&CompileOptions {
        model,
        image_size: None,
        attention: None,
        target: Target::Backbone,
    })?;
    let r = &compiled.report;
    println!(
        "{}: {} params, {} multiply-adds, planned peak {} bytes",
        r.model, r.cost.params, r.cost.flops, r.peak_memory_bytes
    );

    let device = Device::Cpu;
    let params = ParamStore::init_random(&compiled.graph, 0, &device)?;
    let pre = preprocess_image(&image, compiled.config.image_size, &device)?;
    let out = run_with_order(
        &compiled.graph,
        &params,
        &[("image", pre.image)],
        &device,
        &compiled.order,
    )?;
    for (name, t) in &out.outputs {
        println!("{name}: {:?}", t.dims());
    }
    println!(
        "measured peak {} bytes of live tensors (planned {})",
        out.peak_live_bytes, r.peak_activation_bytes
    );
    Ok(())
}
