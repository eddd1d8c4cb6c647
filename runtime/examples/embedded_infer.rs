//! Embedding the runtime: load a compiled artifact and weights, run the backbone on an image.
//! Uses `vitdet-runtime` and `vitdet-ir` only — no compiler, no model builders.
//!
//! ```bash
//! cargo run --release -- compile --model vitdet-tiny --emit /tmp/vitdet-tiny.json
//! cargo run --release -p vitdet-runtime --example embedded_infer -- \
//!     /tmp/vitdet-tiny.json tests/fixtures/vitdet_tiny.safetensors tests/fixtures/preprocess_large.png
//! ```

use std::error::Error;

use vitdet_ir::Artifact;
use vitdet_runtime::{preprocess_image, run_with_order, Device, ParamStore};

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [artifact, weights, image] = args.as_slice() else {
        return Err("usage: embedded_infer ARTIFACT.json WEIGHTS.safetensors IMAGE".into());
    };
    let artifact = Artifact::from_json(&std::fs::read_to_string(artifact)?)?;
    let graph = &artifact.graph;
    let device = Device::Cpu;
    let params = ParamStore::load_safetensors(weights, graph, &device)?;
    // The input side comes from the graph's `image` input, [1, 3, S, S].
    let (_, _, ty) = graph
        .inputs()
        .find(|(_, name, _)| *name == "image")
        .ok_or("artifact has no `image` input")?;
    let pre = preprocess_image(image, ty.shape[3], &device)?;
    let out = run_with_order(graph, &params, &[("image", pre.image)], &device, &artifact.schedule)?;
    for (name, t) in &out.outputs {
        println!("{name}: {:?}", t.dims());
    }
    println!("peak live tensors: {} bytes", out.peak_live_bytes);
    Ok(())
}
