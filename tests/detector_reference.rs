use vitdet::models::{build_detector, ModelConfig};
#[test]
fn dump_params() {
    for preset in ["vitdet-tiny", "vit-tiny"] {
        let g = build_detector(&ModelConfig::preset(preset).unwrap()).unwrap();
        for (_, p) in g.parameters() {
            if !p.name.starts_with("backbone.") {
                println!("PARAM {preset} {} {:?} {:?}", p.name, p.ty.shape, p.ty.dtype);
            }
        }
        println!("NB {preset} {}", g.parameters().filter(|(_, p)| p.name.starts_with("backbone.")).count());
    }
}
