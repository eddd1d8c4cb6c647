//! The executor: runs a verified graph node by node, frees every value after its last use and
//! measures its peak of live bytes.
//!
//! # Live bytes
//!
//! A *value* (one output of one node) is **live** from the moment its node has run until the
//! moment its last consumer has run; graph outputs stay live until the end of the run. The
//! executor holds exactly the live values. *Live bytes* are the sum of
//! [`TensorType::size_in_bytes`] over the live values (for a value with dynamic rows, its
//! bound, as the memory plan reserves), counting graph inputs (live from their
//! `input` node's position in the order) and computed values, but not parameters and buffers,
//! which are reported separately as [`RunOutput::param_bytes`].
//!
//! The peak is sampled once per node, **after the node's outputs are produced and before the
//! inputs it used for the last time (and any of its outputs nobody uses) are released**: at that
//! moment a real allocator holds both. [`vitdet_ir::Liveness::step`] is the single definition of this
//! accounting; the executor follows it to free tensors, and [`peak_live_bytes`] replays it
//! without executing anything, so a planner that computes liveness over the same order gets the
//! same number.
//!
//! Uses are counted per edge (`Graph::use_counts`: a value fed twice to one node has two uses,
//! both consumed by that node) plus one per graph output naming the value. With an explicit
//! order that omits some nodes, edges into omitted nodes do not count.
//!
//! # Measured peak
//!
//! When the process's global allocator is [`crate::alloc::CountingAllocator`], the run also
//! measures the heap: before each node the allocator's high-water mark is reset, and after the
//! node's outputs are held it is read back, so each step's figure covers its inputs, its outputs
//! and whatever the kernel allocated and freed in between (workspace, candle's internal copies).
//! Bytes are counted above the heap level at the start of the run, plus the graph inputs still
//! held at that step: their storage belongs to the caller (allocated before the run), but the
//! memory plan places them in its arena while they are live, so the measurement counts them the
//! same way. [`RunOutput::measured_peak_bytes`] is the maximum over the steps and compares
//! directly with the planner's arena (`vitdet_passes::memory`).
//!
//! # Placement
//!
//! Graph inputs and the results kernels make on the host (ops without inputs such as the
//! anchors, host loops) are moved to the run's device when their node runs. Where a host loop
//! will read such a value ([`crate::kernels::reads_on_host`]: the sampling seed, the anchors
//! and ground truth of the targets), the run keeps its host copy until the value dies and hands
//! that to the host loop, which on a GPU would otherwise copy the value back and wait for the
//! device. Data movement between them (the concatenation of the levels' anchors, the prefix of
//! sampled RoIs the mask targets take) also runs on the host copies. Host copies are host
//! memory, outside the live bytes.
//!
//! On a CUDA device the run also reads the device memory pool: [`RunOutput::device_peak_bytes`]
//! is its high-water mark above the level at the start (the pool is set to keep freed memory,
//! as PyTorch's caching allocator does, so steps after the first reuse it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use vitdet_ir::{Graph, Liveness, NodeIndex, Op, TensorType, Value};

use crate::dtype::{describe, matches};
use crate::error::{list_names, RuntimeError};
use crate::kernels::{self, KernelError};
use crate::params::ParamStore;

/// What a run produces.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// Graph outputs, in the graph's output order.
    pub outputs: Vec<(String, Tensor)>,
    /// Peak of live bytes over the run (see the module doc).
    pub peak_live_bytes: usize,
    /// Bytes of all the graph's parameters and buffers (held by the [`ParamStore`]).
    pub param_bytes: usize,
    /// Wall time spent in each op's kernels, by op name.
    pub op_seconds: BTreeMap<String, f64>,
    /// The same time by the nodes' scope, cut to its first [`SCOPE_DEPTH`] components
    /// (`backbone.net`, `backward/roi_heads.mask_head`, ...).
    pub scope_seconds: BTreeMap<String, f64>,
    /// Measured heap high-water mark of the run (see the module doc), or `None` when the
    /// counting allocator is not the global allocator.
    pub measured_peak_bytes: Option<usize>,
    /// The measured figure of each step of the order (same condition), for comparing a run
    /// with its memory plan node by node.
    pub measured_step_bytes: Option<Vec<usize>>,
    /// On a CUDA device: the high-water mark of device memory allocated from the pool during
    /// the run, above the level at its start (the device counterpart of
    /// `measured_peak_bytes`; see `crate::cuda::pool`). `None` on other devices.
    pub device_peak_bytes: Option<usize>,
    /// The most rows a `dynamic_prefix` node produced (the graph's dynamic values held at most
    /// this many), or `None` for a graph without dynamic rows. `Graph::with_rows` of it gives
    /// the graph to plan this run's memory exactly.
    pub dynamic_rows: Option<usize>,
}

impl RunOutput {
    /// The output named `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// The peak live bytes a run over `order` will measure, computed without executing anything.
/// The order must be valid as for [`run_with_order`].
pub fn peak_live_bytes(graph: &Graph, order: &[NodeIndex]) -> Result<usize, RuntimeError> {
    check_order(graph, order)?;
    let mut liveness = Liveness::new(graph, order);
    for &n in order {
        liveness.step(n);
    }
    Ok(liveness.peak_bytes())
}

/// Runs `graph` in its default order ([`Graph::topo_order`]). See [`run_with_order`].
pub fn run(
    graph: &Graph,
    params: &ParamStore,
    inputs: &[(&str, Tensor)],
    device: &Device,
) -> Result<RunOutput, RuntimeError> {
    let order = graph.topo_order()?;
    run_with_order(graph, params, inputs, device, &order)
}

/// Runs `graph` on `device`, executing the nodes in `order`: [`Program::new`] then
/// [`Program::run`], so the graph and the order are checked on every call (build the
/// [`Program`] once to run them repeatedly).
pub fn run_with_order(
    graph: &Graph,
    params: &ParamStore,
    inputs: &[(&str, Tensor)],
    device: &Device,
    order: &[NodeIndex],
) -> Result<RunOutput, RuntimeError> {
    Program::new(graph, order)?.run(params, inputs, device)
}

/// A graph and the order to execute it in, checked once: what repeated runs (training
/// steps, benchmark iterations, `infer --repeat`) execute without repeating the
/// checks, about 1 ms for vitdet-b's training step (`examples/host_overhead.rs`), all of it
/// time the device idles between steps.
pub struct Program<'g> {
    graph: &'g Graph,
    order: &'g [NodeIndex],
    /// The use counts of the order's values, before the first node (cloned by each run).
    liveness: Liveness<'g>,
    /// Values some kernel reads on the host ([`kernels::reads_on_host`]): made on the host
    /// (graph inputs, host loops' results) and moved to a GPU, they keep their host copy.
    read_on_host: HashSet<Value>,
    /// Outputs of constant nodes ([`kernels::is_constant`]) placed on a GPU by an earlier run,
    /// with their host copies, by node and device: later runs reuse them rather than make them
    /// on the host and copy them again.
    placed_constants: Mutex<HashMap<(NodeIndex, String), PlacedOutputs>>,
}

/// A node's outputs as made on the host and as placed on a device.
type PlacedOutputs = Vec<(Tensor, Tensor)>;

impl<'g> Program<'g> {
    /// Checks `graph` ([`Graph::verify`]) and `order`:
    /// * `order` lists nodes at most once each; every node's inputs must be produced earlier
    ///   in it (parameters are always available) and every graph output must be produced.
    ///   Nodes it omits are not run (e.g. dead code).
    pub fn new(graph: &'g Graph, order: &'g [NodeIndex]) -> Result<Program<'g>, RuntimeError> {
        graph.verify()?;
        check_order(graph, order)?;
        Ok(Program {
            graph,
            order,
            liveness: Liveness::new(graph, order),
            read_on_host: read_on_host(graph),
            placed_constants: Mutex::new(HashMap::new()),
        })
    }

    /// Whether a kernel reads `v` on the host, so a host copy of it is kept on a GPU run.
    pub fn reads_on_host(&self, v: Value) -> bool {
        self.read_on_host.contains(&v)
    }

    /// The graph the program runs.
    pub fn graph(&self) -> &'g Graph {
        self.graph
    }

    /// Runs the program on `device`.
    ///
    /// * `inputs` must feed every graph input exactly once, by name, with the declared shape
    ///   and dtype; tensors on another device are copied to `device`.
    /// * `params` must hold every parameter the graph declares, with its declared shape and
    ///   dtype; parameters on another device are copied for this run (keep the store on
    ///   `device` to avoid that: [`ParamStore::to_device`]).
    /// * Every kernel's outputs are checked against the types the graph declares.
    pub fn run(
        &self,
        params: &ParamStore,
        inputs: &[(&str, Tensor)],
        device: &Device,
    ) -> Result<RunOutput, RuntimeError> {
        execute(self, params, inputs, device, OpClock::Host)
    }

    /// [`Program::run`], waiting for the device after every op, so that
    /// [`RunOutput::op_seconds`] is each op's device time rather than the time to issue it (on
    /// a GPU, kernels run asynchronously; on the CPU the two are the same). Slower: for
    /// profiles.
    pub fn run_profiled(
        &self,
        params: &ParamStore,
        inputs: &[(&str, Tensor)],
        device: &Device,
    ) -> Result<RunOutput, RuntimeError> {
        execute(self, params, inputs, device, OpClock::Synced)
    }

    /// [`Program::run`] (no waits), with [`RunOutput::op_seconds`] and
    /// [`RunOutput::scope_seconds`] on the device's own clock: on a CUDA device, events
    /// recorded on the stream between the nodes charge each node the span from the end of the
    /// one before to its own end, its kernels plus any time the device waited for the host to
    /// issue them, so the spans add up to the run's time on the device. Placing the graph's
    /// inputs is charged to `input`. On the CPU, the same as `run`.
    pub fn run_device_timed(
        &self,
        params: &ParamStore,
        inputs: &[(&str, Tensor)],
        device: &Device,
    ) -> Result<RunOutput, RuntimeError> {
        execute(self, params, inputs, device, OpClock::DeviceEvents)
    }
}

/// How a run times its ops ([`RunOutput::op_seconds`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpClock {
    /// The host's time in each op: on a GPU, the time to issue it.
    Host,
    /// The host's time with the device waited for after each op.
    Synced,
    /// Spans between events on the device's stream (the host's time on the CPU).
    DeviceEvents,
}

fn execute(
    program: &Program,
    params: &ParamStore,
    inputs: &[(&str, Tensor)],
    device: &Device,
    clock: OpClock,
) -> Result<RunOutput, RuntimeError> {
    let (graph, order) = (program.graph, program.order);
    let mut liveness = program.liveness.clone();
    let mut fed = feed_inputs(graph, inputs)?;
    let param_values = gather_params(graph, params, device)?;

    // The values the executor holds, and their size by type.
    let mut held: HashMap<Value, Tensor> = HashMap::new();
    // Host copies of values made on the host and moved to `device` that a kernel reads on the
    // host: it reads these instead of copying the value back (a wait for the device).
    let mut host_copies: HashMap<Value, Tensor> = HashMap::new();
    let mut held_bytes = 0usize;
    let mut peak = 0usize;
    let mut op_seconds: BTreeMap<String, f64> = BTreeMap::new();
    let mut scope_seconds: BTreeMap<String, f64> = BTreeMap::new();
    let value_bytes = |v: Value| graph.value_type(v).size_in_bytes();
    let measuring = crate::alloc::installed();
    if measuring {
        crate::alloc::allocate_thread_slabs();
    }
    let mut measured_steps: Vec<usize> = Vec::with_capacity(if measuring { order.len() } else { 0 });
    // Bytes of graph inputs the executor holds (caller-owned storage, see the module doc).
    let mut held_input_bytes = 0usize;
    let mut dynamic_rows: Option<usize> = None;
    let heap_base = crate::alloc::current_bytes();
    let device_base = device_memory::start(device)?;
    let mut device_clock = match clock {
        OpClock::DeviceEvents => {
            let nodes = order.iter().filter(|&&n| device_clock::has_span(&graph.node(n).op));
            device_clock::DeviceClock::start(device, nodes.count())?
        }
        _ => None,
    };
    // The nodes the device clock marked, in order.
    let mut clocked: Vec<NodeIndex> = Vec::new();

    for &n in order {
        let node = graph.node(n);
        if measuring {
            crate::alloc::reset_peak();
        }
        // A constant placed on this GPU by an earlier run.
        let constant_key =
            (!device.is_cpu() && kernels::is_constant(&node.op)).then(|| (n, format!("{:?}", device.location())));
        let placed = constant_key.as_ref().and_then(|key| {
            let constants = program.placed_constants.lock().expect("placed constants");
            constants.get(key).cloned()
        });
        let reused = placed.is_some();
        let made: Vec<Tensor> = match &node.op {
            Op::Parameter(_) => Vec::new(),
            Op::Input(inp) => vec![fed.remove(inp.name.as_str()).expect("inputs were checked")],
            _ if reused => {
                let placed = placed.expect("a placed constant");
                let mut outputs = Vec::with_capacity(placed.len());
                for (output, (host, on_device)) in placed.into_iter().enumerate() {
                    let v = Value { node: n, output };
                    if program.reads_on_host(v) {
                        host_copies.insert(v, host);
                    }
                    outputs.push(on_device);
                }
                outputs
            }
            op => {
                let mut args = Vec::new();
                for (slot, v) in graph.inputs_of(n).into_iter().enumerate() {
                    let host = host_copies.get(&v).filter(|_| kernels::reads_on_host(op, slot));
                    let t = match param_values.get(&v.node).or(host) {
                        Some(t) => t.clone(),
                        None => held.get(&v).cloned().ok_or_else(|| {
                            RuntimeError::Order(format!(
                                "node %{} ({}) in `{}` reads %{}:{}, which the order has not produced",
                                n.index(),
                                node.op.name(),
                                node.scope,
                                v.node.index(),
                                v.output
                            ))
                        })?,
                    };
                    args.push(t);
                }
                let start = std::time::Instant::now();
                let outs = kernels::execute(op, &args).map_err(|e| match e {
                    KernelError::Unsupported(reason) => RuntimeError::Unsupported {
                        node: n.index(),
                        op: op.name().to_string(),
                        scope: node.scope.clone(),
                        reason,
                    },
                    KernelError::Candle(e) => kernel_error(graph, n, e.to_string()),
                })?;
                drop(args);
                if clock == OpClock::Synced {
                    device.synchronize()?;
                }
                let seconds = start.elapsed().as_secs_f64();
                add_seconds(&mut op_seconds, op.name(), seconds);
                add_seconds(&mut scope_seconds, scope_key(&node.scope), seconds);
                check_outputs(graph, n, &outs)?;
                if let Op::DynamicPrefix(_) = op {
                    dynamic_rows = dynamic_rows.max(Some(outs[0].dim(0)?));
                }
                // A host loop reads this data movement's result: make it from the host copies too.
                let wanted = || (0..outs.len()).any(|output| program.reads_on_host(Value { node: n, output }));
                if !device.is_cpu() && kernels::moves_data_only(op) && wanted() {
                    // A slot read on the host anyway (a prefix's count) may take the device value.
                    let copies: Option<Vec<Tensor>> = graph
                        .inputs_of(n)
                        .iter()
                        .enumerate()
                        .map(|(slot, v)| {
                            let device_value = || held.get(v).cloned().filter(|_| kernels::reads_on_host(op, slot));
                            host_copies.get(v).cloned().or_else(device_value)
                        })
                        .collect();
                    if let Some(copies) = copies {
                        let made = kernels::execute(op, &copies).map_err(|e| kernel_error(graph, n, e.to_string()))?;
                        for (output, t) in made.into_iter().enumerate() {
                            host_copies.insert(Value { node: n, output }, t);
                        }
                    }
                }
                outs
            }
        };
        // Ops without inputs (anchors, ...) and host loops given host copies make their
        // results on the host: place them, keeping the host copy where a kernel reads it there.
        let made_host = (constant_key.is_some() && !reused).then(|| made.clone());
        let outputs = made
            .into_iter()
            .enumerate()
            .map(|(output, t)| {
                if t.device().same_device(device) {
                    return Ok(t);
                }
                let v = Value { node: n, output };
                if t.device().is_cpu() && program.reads_on_host(v) {
                    host_copies.insert(v, t.clone());
                }
                t.to_device(device)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let (Some(key), Some(host)) = (constant_key, made_host) {
            let placed = host.into_iter().zip(outputs.iter().cloned()).collect();
            program
                .placed_constants
                .lock()
                .expect("placed constants")
                .insert(key, placed);
        }
        let is_input = matches!(node.op, Op::Input(_));
        for (output, t) in outputs.into_iter().enumerate() {
            let v = Value { node: n, output };
            held_bytes += value_bytes(v);
            if is_input {
                held_input_bytes += value_bytes(v);
            }
            held.insert(v, t);
        }
        peak = peak.max(held_bytes);
        if let Some(c) = device_clock.as_mut() {
            if device_clock::has_span(&node.op) {
                c.mark()?;
                clocked.push(n);
            }
        }
        if measuring {
            let heap = crate::alloc::peak_bytes().saturating_sub(heap_base);
            measured_steps.push(heap + held_input_bytes);
        }
        for v in liveness.step(n) {
            host_copies.remove(&v);
            if held.remove(&v).is_some() {
                held_bytes -= value_bytes(v);
                if matches!(graph.node(v.node).op, Op::Input(_)) {
                    held_input_bytes -= value_bytes(v);
                }
            }
        }
        debug_assert_eq!(held_bytes, liveness.live_bytes());
    }
    debug_assert_eq!(peak, liveness.peak_bytes());
    if let Some(c) = device_clock {
        op_seconds.clear();
        scope_seconds.clear();
        for (&n, seconds) in clocked.iter().zip(c.spans()?) {
            let node = graph.node(n);
            add_seconds(&mut op_seconds, node.op.name(), seconds);
            add_seconds(&mut scope_seconds, scope_key(&node.scope), seconds);
        }
    }

    let mut outputs = Vec::with_capacity(graph.outputs.len());
    for o in &graph.outputs {
        let t = match param_values.get(&o.value.node) {
            Some(t) => t.clone(),
            None => held.get(&o.value).cloned().ok_or_else(|| {
                RuntimeError::Order(format!(
                    "graph output `{}` (%{}:{}) was not produced by the order",
                    o.name,
                    o.value.node.index(),
                    o.value.output
                ))
            })?,
        };
        outputs.push((o.name.clone(), t));
    }
    Ok(RunOutput {
        outputs,
        peak_live_bytes: peak,
        param_bytes: graph.param_bytes(),
        op_seconds,
        scope_seconds,
        measured_peak_bytes: measuring.then(|| measured_steps.iter().copied().max().unwrap_or(0)),
        measured_step_bytes: measuring.then_some(measured_steps),
        device_peak_bytes: device_memory::peak_since(device, device_base)?,
        dynamic_rows,
    })
}

/// Adds `seconds` to `key`'s total, allocating the key only the first time (on a GPU the
/// executor's per-op host time is the dispatch cost).
fn add_seconds(totals: &mut BTreeMap<String, f64>, key: &str, seconds: f64) {
    match totals.get_mut(key) {
        Some(t) => *t += seconds,
        None => {
            totals.insert(key.to_string(), seconds);
        }
    }
}

/// Scope components [`RunOutput::scope_seconds`] keeps.
pub const SCOPE_DEPTH: usize = 2;

/// `scope` cut after its [`SCOPE_DEPTH`]th dot-separated component (`(root)` when empty).
fn scope_key(scope: &str) -> &str {
    if scope.is_empty() {
        return "(root)";
    }
    match scope.match_indices('.').nth(SCOPE_DEPTH - 1) {
        Some((i, _)) => &scope[..i],
        None => scope,
    }
}

/// Op times on the device's clock (CUDA events; no clock elsewhere).
mod device_clock {
    use vitdet_ir::Op;

    #[cfg(feature = "cuda")]
    pub use crate::cuda::events::DeviceClock;

    /// Whether a node of `op` gets a span: every node but parameters, which issue nothing.
    pub fn has_span(op: &Op) -> bool {
        !matches!(op, Op::Parameter(_))
    }

    #[cfg(not(feature = "cuda"))]
    pub use none::DeviceClock;

    #[cfg(not(feature = "cuda"))]
    mod none {
        use candle_core::Device;

        use crate::error::RuntimeError;

        /// Never made: without the `cuda` feature no device has a clock of its own.
        pub enum DeviceClock {}

        impl DeviceClock {
            pub fn start(_: &Device, _: usize) -> Result<Option<DeviceClock>, RuntimeError> {
                Ok(None)
            }

            pub fn mark(&mut self) -> Result<(), RuntimeError> {
                match *self {}
            }

            pub fn spans(self) -> Result<Vec<f64>, RuntimeError> {
                match self {}
            }
        }
    }
}

/// Device memory measurement around a run (CUDA's pool; nothing elsewhere).
mod device_memory {
    use candle_core::Device;

    use crate::error::RuntimeError;

    /// Keeps freed memory in the pool, restarts its high-water mark and returns the bytes in
    /// use, on a CUDA device.
    #[cfg(feature = "cuda")]
    pub fn start(device: &Device) -> Result<Option<u64>, RuntimeError> {
        use crate::cuda::pool;
        let Ok(dev) = device.as_cuda_device() else {
            return Ok(None);
        };
        let fail = |e: crate::kernels::KernelError| RuntimeError::DeviceMemory(e.to_string());
        device.synchronize()?;
        pool::keep_freed_memory(dev).map_err(fail)?;
        pool::reset_peak(dev).map_err(fail)?;
        Ok(Some(pool::used_bytes(dev).map_err(fail)?))
    }

    #[cfg(feature = "cuda")]
    pub fn peak_since(device: &Device, base: Option<u64>) -> Result<Option<usize>, RuntimeError> {
        let (Some(base), Ok(dev)) = (base, device.as_cuda_device()) else {
            return Ok(None);
        };
        device.synchronize()?;
        let peak = crate::cuda::pool::peak_bytes(dev).map_err(|e| RuntimeError::DeviceMemory(e.to_string()))?;
        Ok(Some(peak.saturating_sub(base) as usize))
    }

    #[cfg(not(feature = "cuda"))]
    pub fn start(_: &Device) -> Result<Option<u64>, RuntimeError> {
        Ok(None)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn peak_since(_: &Device, _: Option<u64>) -> Result<Option<usize>, RuntimeError> {
        Ok(None)
    }
}

fn kernel_error(graph: &Graph, n: NodeIndex, message: String) -> RuntimeError {
    let node = graph.node(n);
    RuntimeError::Kernel {
        node: n.index(),
        op: node.op.name().to_string(),
        scope: node.scope.clone(),
        message,
    }
}

fn check_outputs(graph: &Graph, n: NodeIndex, outs: &[Tensor]) -> Result<(), RuntimeError> {
    let want = &graph.node(n).outputs;
    let ok = outs.len() == want.len() && outs.iter().zip(want).all(|(t, ty)| matches(t, ty));
    if ok {
        return Ok(());
    }
    let show_t = outs.iter().map(describe).collect::<Vec<_>>().join(", ");
    let show_ty = want.iter().map(TensorType::to_string).collect::<Vec<_>>().join(", ");
    Err(kernel_error(
        graph,
        n,
        format!("kernel produced {show_t}, the graph declares {show_ty}"),
    ))
}

fn check_order(graph: &Graph, order: &[NodeIndex]) -> Result<(), RuntimeError> {
    let mut seen = HashSet::new();
    for &n in order {
        if graph.graph.node_weight(n).is_none() {
            return Err(RuntimeError::Order(format!("node %{} does not exist", n.index())));
        }
        if !seen.insert(n) {
            return Err(RuntimeError::Order(format!("node %{} is listed twice", n.index())));
        }
    }
    for n in order {
        for v in graph.inputs_of(*n) {
            if !seen.contains(&v.node) && !matches!(graph.node(v.node).op, Op::Parameter(_)) {
                let node = graph.node(*n);
                return Err(RuntimeError::Order(format!(
                    "node %{} ({}) in `{}` reads %{}:{}, whose node is not in the order",
                    n.index(),
                    node.op.name(),
                    node.scope,
                    v.node.index(),
                    v.output
                )));
            }
        }
    }
    for o in &graph.outputs {
        if !seen.contains(&o.value.node) && !matches!(graph.node(o.value.node).op, Op::Parameter(_)) {
            return Err(RuntimeError::Order(format!(
                "graph output `{}` is produced by a node not in the order",
                o.name
            )));
        }
    }
    Ok(())
}

/// The values some node reads in a slot its kernel reads on the host, and the inputs of the
/// data-movement ops that make those ([`kernels::moves_data_only`]), transitively.
fn read_on_host(graph: &Graph) -> HashSet<Value> {
    let mut values = HashSet::new();
    let Ok(order) = graph.topo_order() else {
        return values; // verification reports the cycle
    };
    for &n in order.iter().rev() {
        let op = &graph.node(n).op;
        let makes_read = kernels::moves_data_only(op)
            && (0..graph.node(n).outputs.len()).any(|output| values.contains(&Value { node: n, output }));
        for (slot, v) in graph.inputs_of(n).into_iter().enumerate() {
            if makes_read || kernels::reads_on_host(op, slot) {
                values.insert(v);
            }
        }
    }
    values
}

/// Checks the fed inputs against the graph's (the run places them when their node runs).
fn feed_inputs<'a>(graph: &'a Graph, inputs: &[(&str, Tensor)]) -> Result<HashMap<&'a str, Tensor>, RuntimeError> {
    let declared: HashMap<&'a str, &'a TensorType> = graph.inputs().map(|(_, name, ty)| (name, ty)).collect();
    let mut fed: HashMap<&'a str, Tensor> = HashMap::new();
    for (name, t) in inputs {
        let Some((&key, ty)) = declared.get_key_value(*name) else {
            let mut names: Vec<String> = declared.keys().map(|s| s.to_string()).collect();
            names.sort();
            return Err(RuntimeError::UnexpectedInput {
                name: name.to_string(),
                reason: format!("the graph has no such input (its inputs: {})", list_names(&names)),
            });
        };
        if fed.contains_key(key) {
            return Err(RuntimeError::UnexpectedInput {
                name: name.to_string(),
                reason: "fed more than once".into(),
            });
        }
        if !matches(t, ty) {
            return Err(RuntimeError::InputMismatch {
                name: name.to_string(),
                expected: ty.to_string(),
                found: describe(t),
            });
        }
        fed.insert(key, t.clone());
    }
    let mut missing: Vec<(&str, &TensorType)> = declared
        .iter()
        .filter(|(n, _)| !fed.contains_key(*n))
        .map(|(n, t)| (*n, *t))
        .collect();
    missing.sort_by_key(|(n, _)| *n);
    if let Some((name, ty)) = missing.first() {
        return Err(RuntimeError::MissingInput {
            name: name.to_string(),
            expected: ty.to_string(),
        });
    }
    Ok(fed)
}

/// The parameter tensors by node, checked against the graph and on `device`.
fn gather_params(
    graph: &Graph,
    params: &ParamStore,
    device: &Device,
) -> Result<HashMap<NodeIndex, Tensor>, RuntimeError> {
    params.check(graph)?;
    let mut out = HashMap::new();
    for (n, p) in graph.parameters() {
        let t = params.get(&p.name).expect("checked");
        let t = if t.device().same_device(device) {
            t.clone()
        } else {
            t.to_device(device)?
        };
        out.insert(n, t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn scope_keys_keep_two_components() {
        assert_eq!(super::scope_key("backbone.net.blocks.3.attn"), "backbone.net");
        assert_eq!(
            super::scope_key("backward/roi_heads.mask_head.conv1"),
            "backward/roi_heads.mask_head"
        );
        assert_eq!(super::scope_key("proposal_generator"), "proposal_generator");
        assert_eq!(super::scope_key(""), "(root)");
    }
}
