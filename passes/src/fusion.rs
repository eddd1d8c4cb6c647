//! Windowed-attention fusion: rewrites the attention subgraph the model builders emit into one
//! [`WindowAttention`] node between the qkv and output-projection linears.
//!
//! # What is matched
//! Candidates are the `softmax` nodes whose scope ends in `attn` (detectron2's `Attention`
//! module). From each, the pass walks the exact pattern of `models/src/attention.rs` and checks
//! every op, attribute and shape on the way:
//!
//! * core: `linear(x) -> reshape [Bw, N, 3, heads, hd] -> permute [2,0,3,1,4] -> reshape
//!   [3, Bw*heads, N, hd] -> slice/reshape into q, k, v`, `affine(q, scale) @ k^T`, the
//!   relative-position term, `softmax(axis 2) @ v`, `reshape [Bw, heads, h, w, hd] -> permute
//!   [0,2,3,1,4] -> reshape [Bw, h, w, C] -> linear (proj)`;
//! * relative-position term: none; a BEiT bias `[heads, N, N]` added through a
//!   `[Bw, heads, N, N]` view; or detectron2's decomposed term (the two batched matmuls of q
//!   with `[h, h, hd]` / `[w, w, hd]` embeddings, broadcast-added through a
//!   `[Bw*heads, h, w, h, w]` view);
//! * around it, when both are present and agree: the window partition (`pad` bottom/right,
//!   `reshape -> permute [0,1,3,2,4,5] -> reshape` to `[B*nW, ws, ws, C]`) before the qkv
//!   linear and the unpartition (`reshape -> permute -> reshape` and the crop `slice`s) after
//!   the projection. Without them (global blocks) the fused op is the one-window case.
//!
//! Every value strictly inside the region must be used only inside it (graph outputs count as
//! uses); otherwise the rewrite would have to keep it and the candidate is left alone. Any
//! candidate that does not match is left untouched and listed in
//! [`FusionReport::unmatched`] with the first check that failed.
//!
//! # The rewrite
//! `linear(x0, w_qkv, b_qkv)` on the unpadded tokens (`x0` the partition's input), then
//! `window_attention(qkv, b_qkv, rel...)`, then `linear(out, w_proj, b_proj)`, which replaces
//! every use of the region's result. The qkv linear now runs on `B*H*W` instead of
//! `B*Hp*Wp` tokens, and so does the projection. Dead nodes are then removed
//! ([`eliminate_dead_code`], which also renumbers densely in program order) and the graph is
//! verified.
//!
//! # Saved activation bytes
//! [`FusedBlock::saved_activation_bytes`] is, for training, the bytes of forward values the
//! backward must keep that the fusion removes: the values inside the matched region that the
//! unfused region's VJP rules read (both operands of every `matmul`, the input of a `linear`
//! when it is inside the region, i.e. the partitioned tokens, and the `softmax` output), minus
//! what the fused region's backward reads instead: the new `qkv` value, `out` and `lse`
//! (saturating at 0). Values read by both versions (the block's input tokens, parameters, the
//! relative-position inputs) cancel and are not counted.

use std::collections::{HashMap, HashSet};

use vitdet_ir::ops::{Linear, MatMul, WindowAttention, WindowRelPos};
use vitdet_ir::{Graph, IrError, NodeIndex, Op, Value};

use crate::dce::eliminate_dead_code;

/// Why the pass failed (a candidate that does not match is not an error: it is reported).
#[derive(Debug, thiserror::Error)]
pub enum FusionError {
    #[error("fusion produced an invalid graph: {0}")]
    Ir(#[from] IrError),
}

/// The rewritten graph and what was done.
#[derive(Clone, Debug)]
pub struct Fused {
    pub graph: Graph,
    pub report: FusionReport,
}

/// What the pass fused and what it left alone.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct FusionReport {
    /// Number of fused attention regions (`blocks.len()`).
    pub fused: usize,
    pub blocks: Vec<FusedBlock>,
    /// Attention candidates left untouched, with the reason.
    pub unmatched: Vec<UnmatchedAttention>,
}

/// One fused region.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FusedBlock {
    /// Scope of the attention module (`backbone.net.blocks.3.attn`).
    pub scope: String,
    /// Window side in tokens (a global block: the grid's height).
    pub window: usize,
    /// Windows per image (1 for a global block).
    pub windows: usize,
    /// See the module doc.
    pub saved_activation_bytes: u64,
}

/// An attention candidate the pass did not fuse.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct UnmatchedAttention {
    pub scope: String,
    pub reason: String,
}

/// Fuses every recognized attention region of `graph` (see the module doc).
pub fn fuse_attention(graph: &Graph) -> Result<Fused, FusionError> {
    graph.verify()?;
    let consumers = consumers(graph);
    let mut report = FusionReport::default();
    let mut matches = Vec::new();
    for idx in graph.topo_order()? {
        let node = graph.node(idx);
        if !matches!(node.op, Op::Softmax(_)) || node.scope.rsplit('.').next() != Some("attn") {
            continue;
        }
        match Matcher::new(graph, &consumers).attention(idx) {
            Ok(m) => matches.push(m),
            Err(reason) => report.unmatched.push(UnmatchedAttention {
                scope: node.scope.clone(),
                reason,
            }),
        }
    }
    let mut g = graph.clone();
    for m in &matches {
        let saved = rewrite(&mut g, m)?;
        let kept_by_fused = saved.1;
        report.blocks.push(FusedBlock {
            scope: m.scope.clone(),
            window: m.window[0],
            windows: m.windows_per_image,
            saved_activation_bytes: saved.0.saturating_sub(kept_by_fused),
        });
    }
    report.fused = report.blocks.len();
    let graph = eliminate_dead_code(&g)?;
    graph.verify()?;
    Ok(Fused { graph, report })
}

/// A matched region.
struct Match {
    scope: String,
    /// Unpadded tokens `[B, H, W, C]` the new qkv linear reads.
    tokens: Value,
    qkv_linear: NodeIndex,
    qkv_weight: Value,
    qkv_bias: Option<Value>,
    proj_linear: NodeIndex,
    proj_weight: Value,
    proj_bias: Option<Value>,
    rel_pos: WindowRelPos,
    rel_inputs: Vec<Value>,
    heads: usize,
    window: [usize; 2],
    windows_per_image: usize,
    scale: f64,
    /// The region's result, whose uses the new projection takes over.
    result: Value,
    /// Nodes the rewrite makes dead.
    nodes: HashSet<NodeIndex>,
}

/// Adds the fused nodes and reroutes the result; returns (bytes the unfused backward keeps,
/// bytes the fused backward keeps).
fn rewrite(g: &mut Graph, m: &Match) -> Result<(u64, u64), IrError> {
    let unfused = unfused_saved_bytes(g, m);
    let qkv_scope = g.node(m.qkv_linear).scope.clone();
    let proj_scope = g.node(m.proj_linear).scope.clone();
    let mut ins = vec![m.tokens, m.qkv_weight];
    ins.extend(m.qkv_bias);
    let qkv = g.add(Linear {}, &qkv_scope, &ins)?;
    let op = WindowAttention {
        heads: m.heads,
        window: m.window,
        scale: m.scale,
        rel_pos: m.rel_pos,
        qkv_bias: m.qkv_bias.is_some(),
    };
    let mut ins = vec![qkv];
    ins.extend(m.qkv_bias);
    ins.extend(&m.rel_inputs);
    let wa = g.add_node(op, &m.scope, &ins)?;
    let (out, lse) = (Value { node: wa, output: 0 }, Value { node: wa, output: 1 });
    let mut ins = vec![out, m.proj_weight];
    ins.extend(m.proj_bias);
    let proj = g.add(Linear {}, &proj_scope, &ins)?;
    g.replace_uses(m.result, proj);
    let bytes = |g: &Graph, v: Value| g.value_type(v).size_in_bytes() as u64;
    let fused = bytes(g, qkv) + bytes(g, out) + bytes(g, lse);
    Ok((unfused, fused))
}

/// Bytes of the region's values that the unfused VJP rules read (see the module doc).
fn unfused_saved_bytes(g: &Graph, m: &Match) -> u64 {
    let mut kept: HashSet<Value> = HashSet::new();
    let inside = |v: &Value| m.nodes.contains(&v.node);
    for &n in &m.nodes {
        let ins = g.inputs_of(n);
        match &g.node(n).op {
            Op::MatMul(_) => kept.extend(ins.iter().filter(|v| inside(v))),
            Op::Linear(_) => kept.extend(ins.first().filter(|v| inside(v))),
            Op::Softmax(_) => {
                kept.insert(Value::from(n));
            }
            _ => {}
        }
    }
    kept.iter().map(|&v| g.value_type(v).size_in_bytes() as u64).sum()
}

/// The nodes reading each value (once per input slot).
fn consumers(g: &Graph) -> HashMap<Value, Vec<NodeIndex>> {
    let mut map: HashMap<Value, Vec<NodeIndex>> = HashMap::new();
    for n in g.graph.node_indices() {
        for v in g.inputs_of(n) {
            map.entry(v).or_default().push(n);
        }
    }
    map
}

/// Walks and checks the pattern; errors are the reasons reported for unmatched candidates.
struct Matcher<'g> {
    g: &'g Graph,
    consumers: &'g HashMap<Value, Vec<NodeIndex>>,
    nodes: HashSet<NodeIndex>,
}

type Check<T> = Result<T, String>;

impl<'g> Matcher<'g> {
    fn new(g: &'g Graph, consumers: &'g HashMap<Value, Vec<NodeIndex>>) -> Self {
        Matcher {
            g,
            consumers,
            nodes: HashSet::new(),
        }
    }

    fn describe(&self, v: Value) -> String {
        let n = self.g.node(v.node);
        format!("%{} ({}: {})", v.node.index(), n.op.name(), self.g.value_type(v))
    }

    fn shape(&self, v: Value) -> &[usize] {
        &self.g.value_type(v).shape
    }

    /// The producer of `v` if it is the single-output op `name`; records it as inside the
    /// region and returns its inputs.
    fn producer(&mut self, v: Value, name: &str) -> Check<(&'g Op, Vec<Value>)> {
        let g = self.g;
        let node = g.node(v.node);
        if node.op.name() != name || v.output != 0 {
            return Err(format!("expected {name} producing {}", self.describe(v)));
        }
        self.nodes.insert(v.node);
        Ok((&node.op, g.inputs_of(v.node)))
    }

    /// The input of `v`'s producer, which must be `reshape` to `shape`.
    fn reshape_of(&mut self, v: Value, shape: &[usize]) -> Check<Value> {
        let (op, ins) = self.producer(v, "reshape")?;
        match op {
            Op::Reshape(r) if r.shape == shape => Ok(ins[0]),
            _ => Err(format!("expected reshape to {shape:?} producing {}", self.describe(v))),
        }
    }

    fn permute_of(&mut self, v: Value, perm: &[usize]) -> Check<Value> {
        let (op, ins) = self.producer(v, "permute")?;
        match op {
            Op::Permute(p) if p.perm == perm => Ok(ins[0]),
            _ => Err(format!("expected permute {perm:?} producing {}", self.describe(v))),
        }
    }

    /// `(lhs, rhs)` of the `matmul` producing `v`, with the given rhs transpose flag and the lhs
    /// as stored.
    fn matmul_of(&mut self, v: Value, transpose_rhs: bool) -> Check<(Value, Value)> {
        let (op, ins) = self.producer(v, "matmul")?;
        match op {
            Op::MatMul(m) if m == &MatMul::new(transpose_rhs) => Ok((ins[0], ins[1])),
            _ => Err(format!(
                "expected matmul (transpose_rhs {transpose_rhs}) producing {}",
                self.describe(v)
            )),
        }
    }

    fn add_of(&mut self, v: Value) -> Check<(Value, Value)> {
        let (op, ins) = self.producer(v, "binary")?;
        match op {
            Op::Binary(b) if b.kind == vitdet_ir::ops::BinaryKind::Add => Ok((ins[0], ins[1])),
            _ => Err(format!("expected add producing {}", self.describe(v))),
        }
    }

    /// The single consumer of `v` (a node reading it once; not a graph output).
    fn sole_consumer(&self, v: Value) -> Check<NodeIndex> {
        let users = self.consumers.get(&v).map(Vec::as_slice).unwrap_or(&[]);
        let is_output = self.g.outputs.iter().any(|o| o.value == v);
        match (users, is_output) {
            ([u], false) => Ok(*u),
            _ => Err(format!(
                "{} has other uses than the attention pattern",
                self.describe(v)
            )),
        }
    }

    /// Follows `v`'s sole consumer, which must be `reshape` to `shape`.
    fn then_reshape(&mut self, v: Value, shape: &[usize]) -> Check<Value> {
        let u = Value::from(self.sole_consumer(v)?);
        self.reshape_of(u, shape)?;
        Ok(u)
    }

    fn then_permute(&mut self, v: Value, perm: &[usize]) -> Check<Value> {
        let u = Value::from(self.sole_consumer(v)?);
        self.permute_of(u, perm)?;
        Ok(u)
    }

    /// Matches the region around the softmax node `sm`.
    fn attention(mut self, sm: NodeIndex) -> Check<Match> {
        let g = self.g;
        let scope = g.node(sm).scope.clone();
        let probs = Value::from(sm);
        let (op, ins) = self.producer(probs, "softmax")?;
        let ps = self.shape(probs).to_vec();
        match op {
            Op::Softmax(s) if s.axis == 2 && ps.len() == 3 && ps[1] == ps[2] => {}
            _ => {
                return Err(format!(
                    "softmax {} is not over the keys of [B*heads, N, N]",
                    self.describe(probs)
                ))
            }
        }
        let (bh, n) = (ps[0], ps[1]);
        let logits = ins[0];

        // Output side: @ v, head merge, projection.
        let pv = Value::from(self.sole_consumer(probs)?);
        let (lhs, v) = self.matmul_of(pv, false)?;
        if lhs != probs {
            return Err("the probabilities are not the left operand of `@ v`".into());
        }
        let hd = self.shape(pv)[2];
        let out5 = Value::from(self.sole_consumer(pv)?);
        let (op, _) = self.producer(out5, "reshape")?;
        let split = match op {
            Op::Reshape(r) => r.shape.clone(),
            _ => return Err(format!("expected the head split producing {}", self.describe(out5))),
        };
        let [bw, heads, h, w, hd2]: [usize; 5] = split.clone().try_into().map_err(|_| {
            format!(
                "expected the head split [B, heads, h, w, hd], found {}",
                self.describe(out5)
            )
        })?;
        if bw * heads != bh || h * w != n || hd2 != hd {
            return Err(format!("head split {split:?} does not fit {}", self.describe(pv)));
        }
        let c = heads * hd;
        let merged = self.then_permute(out5, &[0, 2, 3, 1, 4])?;
        let merged = self.then_reshape(merged, &[bw, h, w, c])?;
        let proj_linear = self.sole_consumer(merged)?;
        let proj = Value::from(proj_linear);
        let (_, pins) = self.producer(proj, "linear")?;
        if pins[0] != merged || self.shape(pins[1]) != [c, c] {
            return Err(format!(
                "expected the projection linear [{c}, {c}] on {}",
                self.describe(merged)
            ));
        }

        // Input side: q, k, v from the qkv linear.
        let (rel_pos, rel_inputs, (qs, k)) = self.rel_term(logits, bh, [h, w], hd, heads)?;
        let (q, scale) = {
            let (op, ins) = self.producer(qs, "affine")?;
            match op {
                Op::Affine(a) if a.add == 0.0 => (ins[0], a.mul),
                _ => return Err(format!("expected the query scale producing {}", self.describe(qs))),
            }
        };
        let t_q = self.split_of(q, 0, [bh, n, hd])?;
        let t_k = self.split_of(k, 1, [bh, n, hd])?;
        let t_v = self.split_of(v, 2, [bh, n, hd])?;
        if t_q != t_k || t_q != t_v {
            return Err("q, k and v do not come from one qkv tensor".into());
        }
        let t = self.reshape_of(t_q, &[3, bh, n, hd])?;
        let t = self.permute_of(t, &[2, 0, 3, 1, 4])?;
        let qkv = self.reshape_of(t, &[bw, n, 3, heads, hd])?;
        let qkv_linear = qkv.node;
        let (_, lins) = self.producer(qkv, "linear")?;
        if self.shape(lins[0]) != [bw, h, w, c] || self.shape(lins[1]) != [3 * c, c] {
            return Err(format!(
                "expected the qkv linear [{}, {c}] on [Bw, h, w, C], found {}",
                3 * c,
                self.describe(qkv)
            ));
        }
        let (qkv_weight, qkv_bias) = (lins[1], lins.get(2).copied());
        let (proj_weight, proj_bias) = (pins[1], pins.get(2).copied());

        // Window partition and unpartition, when both are there and agree.
        let (tokens, result, window, windows_per_image) = match self.partition(lins[0], proj, [h, w], c) {
            Some(p) => p,
            None => (lins[0], proj, [h, w], 1),
        };

        // Everything inside the region but its result must be used only inside it.
        for &nd in &self.nodes {
            for out in 0..g.node(nd).outputs.len() {
                let v = Value { node: nd, output: out };
                if v == result {
                    continue;
                }
                if g.outputs.iter().any(|o| o.value == v) {
                    return Err(format!("{} is a graph output", self.describe(v)));
                }
                let users = self.consumers.get(&v).map(Vec::as_slice).unwrap_or(&[]);
                if users.iter().any(|u| !self.nodes.contains(u)) {
                    return Err(format!("{} is also used outside the attention", self.describe(v)));
                }
            }
        }
        Ok(Match {
            scope,
            tokens,
            qkv_linear,
            qkv_weight,
            qkv_bias,
            proj_linear,
            proj_weight,
            proj_bias,
            rel_pos,
            rel_inputs,
            heads,
            window,
            windows_per_image,
            scale,
            result,
            nodes: self.nodes,
        })
    }

    /// The relative-position term between the scores and the logits: (family, its inputs,
    /// the operands `(scale q, k)` of the scores `q @ k^T`). Checks every node of the term.
    fn rel_term(
        &mut self,
        logits: Value,
        bh: usize,
        [h, w]: [usize; 2],
        hd: usize,
        heads: usize,
    ) -> Check<(WindowRelPos, Vec<Value>, (Value, Value))> {
        let n = h * w;
        let bw = bh / heads;
        if let Op::MatMul(_) = self.g.node(logits.node).op {
            let scores = self.matmul_of(logits, true)?;
            return Ok((WindowRelPos::None, vec![], scores));
        }
        let sum = self.reshape_of(logits, &[bh, n, n])?;
        let (a, b) = self.add_of(sum)?;
        if self.shape(a).len() == 4 {
            // BEiT: reshape [Bw, heads, N, N] (+) bias [heads, N, N].
            if self.shape(b) != [heads, n, n] {
                return Err(format!(
                    "expected a bias [{heads}, {n}, {n}], found {}",
                    self.describe(b)
                ));
            }
            let m = self.reshape_of(a, &[bw, heads, n, n])?;
            let scores = self.matmul_of(m, true)?;
            return Ok((WindowRelPos::Bias, vec![b], scores));
        }
        // Decomposed: (scores5 + rel_h5) + rel_w5.
        let (a5, relh5) = self.add_of(a)?;
        let m = self.reshape_of(a5, &[bh, h, w, h, w])?;
        let scores = self.matmul_of(m, true)?;
        // The term reads the unscaled query, the scale's input.
        let q = self.g.inputs_of(scores.0.node)[0];
        let rh = self.decomposed_axis(relh5, q, [h, w], hd, bh, true)?;
        let rw = self.decomposed_axis(b, q, [h, w], hd, bh, false)?;
        Ok((WindowRelPos::Decomposed, vec![rh, rw], scores))
    }

    /// One decomposed term: for the height axis
    /// `reshape [BH,h,w,h,1] <- permute [1,0,2,3] <- reshape [h,BH,w,h] <- matmul^T(qh, rh)`
    /// with `qh = reshape [h, BH*w, hd] <- permute [1,0,2,3] <- reshape [BH,h,w,hd] <- q`;
    /// the width axis likewise. Returns the embeddings input (`rh` / `rw`).
    fn decomposed_axis(
        &mut self,
        v: Value,
        q: Value,
        [h, w]: [usize; 2],
        hd: usize,
        bh: usize,
        height: bool,
    ) -> Check<Value> {
        let (len, other) = if height { (h, w) } else { (w, h) };
        let (view, perm_out, perm_q) = if height {
            (vec![bh, h, w, h, 1], [1, 0, 2, 3], [1, 0, 2, 3])
        } else {
            (vec![bh, h, w, 1, w], [1, 2, 0, 3], [2, 0, 1, 3])
        };
        let t = self.reshape_of(v, &view)?;
        let t = self.permute_of(t, &perm_out)?;
        let t = self.reshape_of(t, &[len, bh, other, len])?;
        let (qx, table) = self.matmul_of(t, true)?;
        if self.shape(table) != [len, len, hd] {
            return Err(format!(
                "expected rel-pos embeddings [{len}, {len}, {hd}], found {}",
                self.describe(table)
            ));
        }
        let t = self.reshape_of(qx, &[len, bh * other, hd])?;
        let t = self.permute_of(t, &perm_q)?;
        let src = self.reshape_of(t, &[bh, h, w, hd])?;
        if src != q {
            return Err("the rel-pos term does not read the attention's query".into());
        }
        Ok(table)
    }

    /// `reshape [BH, N, hd] <- slice axis 0 [i, i+1) <- t`: returns `t`.
    fn split_of(&mut self, v: Value, i: usize, shape: [usize; 3]) -> Check<Value> {
        let s = self.reshape_of(v, &shape)?;
        let (op, ins) = self.producer(s, "slice")?;
        match op {
            Op::Slice(sl) if sl.axis == 0 && sl.start == i && sl.end == i + 1 => Ok(ins[0]),
            _ => Err(format!(
                "expected slice {i}..{} of the qkv heads, found {}",
                i + 1,
                self.describe(s)
            )),
        }
    }

    /// The partition before `xw [B*nW, ws, ws, C]` and the unpartition after `proj`, if both
    /// match detectron2's and agree: (unpadded tokens, cropped result, window, windows per
    /// image). On any mismatch the nodes tentatively visited are forgotten.
    fn partition(
        &mut self,
        xw: Value,
        proj: Value,
        [h, w]: [usize; 2],
        c: usize,
    ) -> Option<(Value, Value, [usize; 2], usize)> {
        let saved = self.nodes.clone();
        let found = self.try_partition(xw, proj, [h, w], c);
        if found.is_none() {
            self.nodes = saved;
        }
        found
    }

    fn try_partition(
        &mut self,
        xw: Value,
        proj: Value,
        [h, w]: [usize; 2],
        c: usize,
    ) -> Option<(Value, Value, [usize; 2], usize)> {
        if h != w {
            return None;
        }
        let ws = h;
        let bw = self.shape(xw)[0];
        // Input: [B, Hp, Wp, C] -> reshape [B, nh, ws, nw, ws, C] -> permute -> reshape.
        let t = self.reshape_of(xw, &[bw, ws, ws, c]).ok()?;
        let t = self.permute_of(t, &[0, 1, 3, 2, 4, 5]).ok()?;
        let s6 = self.shape(t).to_vec();
        let (b, nh, nw) = (s6[0], s6[1], s6[3]);
        if s6 != [b, nh, ws, nw, ws, c] || b * nh * nw != bw {
            return None;
        }
        let padded = self.reshape_of(t, &[b, nh, ws, nw, ws, c]).ok()?;
        let (hp, wp) = (nh * ws, nw * ws);
        let (tokens, [ph, pw]) = match &self.g.node(padded.node).op {
            Op::Pad(p) => {
                let pads = p.pads.clone();
                if pads.len() != 4 || pads[0] != [0, 0] || pads[3] != [0, 0] || pads[1][0] != 0 || pads[2][0] != 0 {
                    return None;
                }
                let (_, ins) = self.producer(padded, "pad").ok()?;
                (ins[0], [pads[1][1], pads[2][1]])
            }
            _ => (padded, [0, 0]),
        };
        if ph >= ws || pw >= ws || self.shape(tokens) != [b, hp - ph, wp - pw, c] {
            return None;
        }
        // Output: reshape [B, nh, nw, ws, ws, C] -> permute -> reshape [B, Hp, Wp, C] -> crops.
        let u = self.then_reshape(proj, &[b, nh, nw, ws, ws, c]).ok()?;
        let u = self.then_permute(u, &[0, 1, 3, 2, 4, 5]).ok()?;
        let mut u = self.then_reshape(u, &[b, hp, wp, c]).ok()?;
        for (axis, pad, len) in [(1, ph, hp - ph), (2, pw, wp - pw)] {
            if pad == 0 {
                continue;
            }
            let next = Value::from(self.sole_consumer(u).ok()?);
            let (op, _) = self.producer(next, "slice").ok()?;
            match op {
                Op::Slice(s) if s.axis == axis && s.start == 0 && s.end == len => u = next,
                _ => return None,
            }
        }
        Some((tokens, u, [ws, ws], nh * nw))
    }
}
