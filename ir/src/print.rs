use std::fmt::Write;

use crate::error::IrError;
use crate::graph::{Graph, Value};
use crate::ops::Op;

fn value_name(v: Value) -> String {
    if v.output == 0 {
        format!("%{}", v.node.index())
    } else {
        format!("%{}:{}", v.node.index(), v.output)
    }
}

impl Graph {
    /// One line per node in execution order:
    /// `%7 = conv2d{stride=[1,1], ...}(%5, %6) : f32[1,256,64,64]  # backbone.simfp_4.0`.
    pub fn dump(&self) -> Result<String, IrError> {
        let mut s = String::new();
        for idx in self.topo_order()? {
            let node = &self.graph[idx];
            let outs: Vec<String> = node.outputs.iter().map(|t| t.to_string()).collect();
            let head = match &node.op {
                Op::Input(i) => format!("input \"{}\"", i.name),
                Op::Parameter(p) => format!("parameter \"{}\"{}", p.name, if p.trainable { "" } else { " (buffer)" }),
                op => {
                    let args: Vec<String> = self.inputs_of(idx).into_iter().map(value_name).collect();
                    let attrs = op.attrs_text();
                    let attrs = if attrs.is_empty() {
                        String::new()
                    } else {
                        format!("{{{attrs}}}")
                    };
                    format!("{}{}({})", op.name(), attrs, args.join(", "))
                }
            };
            let _ = writeln!(s, "%{} = {} : {}  # {}", idx.index(), head, outs.join(", "), node.scope);
        }
        for o in &self.outputs {
            let _ = writeln!(s, "output \"{}\" = {}", o.name, value_name(o.value));
        }
        Ok(s)
    }

    /// Graphviz dot: one box per node labelled with op, type and scope; parameters as ellipses.
    pub fn to_dot(&self) -> String {
        let mut s = String::from("digraph vitdet {\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
        let esc = |t: &str| t.replace('\\', "\\\\").replace('"', "\\\"");
        for idx in self.graph.node_indices() {
            let node = &self.graph[idx];
            let types: Vec<String> = node.outputs.iter().map(|t| t.to_string()).collect();
            let (label, shape) = match &node.op {
                Op::Input(i) => (format!("input {}", i.name), "invhouse"),
                Op::Parameter(p) => (p.name.clone(), "ellipse"),
                op => (format!("{}\\n{}", op.name(), esc(&node.scope)), "box"),
            };
            let _ = writeln!(
                s,
                "  n{} [label=\"{}\\n{}\", shape={}];",
                idx.index(),
                esc(&label),
                types.join(", "),
                shape
            );
        }
        for e in self.graph.edge_indices() {
            let (a, b) = self.graph.edge_endpoints(e).expect("edge endpoints");
            let _ = writeln!(s, "  n{} -> n{};", a.index(), b.index());
        }
        for (k, o) in self.outputs.iter().enumerate() {
            let _ = writeln!(
                s,
                "  out{k} [label=\"{}\", shape=house];\n  n{} -> out{k};",
                esc(&o.name),
                o.value.node.index()
            );
        }
        s.push_str("}\n");
        s
    }
}
