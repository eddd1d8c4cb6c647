//! The host time of checking a training step before it runs (`Program::new`: graph
//! verification, order check, use counts), which `run_with_order` pays on every call and a
//! `Program` built once does not: the median of 20 checks of the model's bf16 training step.
//!
//!     cargo run --release --example host_overhead [-- MODEL]     # default vitdet-b

use std::time::Instant;

use anyhow::Result;
use vitdet::compile::{compile_train, load_config, TrainOptions};
use vitdet_passes::Precision;
use vitdet_runtime::Program;

fn main() -> Result<()> {
    let model = std::env::args().nth(1).unwrap_or_else(|| "vitdet-b".to_string());
    let step = compile_train(
        load_config(&model, None, None)?,
        &TrainOptions {
            fuse_attention: true,
            precision: Precision::Bf16,
            ..Default::default()
        },
    )?;
    let mut times: Vec<f64> = (0..20)
        .map(|_| {
            let start = Instant::now();
            Program::new(&step.graph, &step.order).map(|_| start.elapsed().as_secs_f64())
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    println!(
        "{model} bf16 training step: {} nodes, checking graph and order {:.2} ms (median of 20)",
        step.graph.graph.node_count(),
        times[10] * 1e3
    );
    Ok(())
}
