//! Parameter groups: each trainable parameter's learning rate and weight decay.
//!
//! **Learning rate.** detectron2 ViTDet's layer-wise decay (`get_vit_lr_decay_rate` in
//! `projects/ViTDet`, applied through `get_default_optimizer_params(lr_factor_func=...)`): under
//! `backbone`, names containing `.pos_embed` or `.patch_embed` are layer 0, names containing
//! `.blocks.<i>.` (and not `.residual.`) are layer `i + 1`, everything else (pyramid, adapter,
//! FPN, the vit family's shared relative-position tables, RPN, RoI heads) is layer
//! `num_layers + 1`. The multiplier is `decay_rate ^ (num_layers + 1 - layer)` and a parameter's
//! learning rate `base_lr * multiplier`, both in f64 as Python computes them.
//!
//! **Weight decay.** `weight_decay` for every parameter except (the rule; [`NoDecay`]):
//! norm weights and biases (LayerNorm, detectron2's channel LayerNorm, GroupNorm, BatchNorm),
//! all biases, position tables (`pos_embed`, `rel_pos_h`, `rel_pos_w`, BEiT's
//! `relative_position_bias_table`) and layer-scale gammas (`gamma_1`, `gamma_2`), which get 0.
//! Layer-scale gammas follow the BEiT/timm convention of exempting every 1-d scale parameter:
//! they multiply a residual branch like a norm weight does, and decaying them towards 0 would
//! switch blocks off. This differs from detectron2's stock ViTDet config in two places, on
//! purpose: detectron2 decays biases and relative-position tables (only `torch.nn` norm modules
//! and `pos_embed` are exempt there, and its own channel `LayerNorm` is not a `torch.nn` norm, so
//! the pyramid's LNs are decayed too).
//!
//! **Defaults.** [`GroupConfig::paper`]: base lr 1e-4 and weight decay 0.1 (detectron2's
//! `common/optim.py` AdamW), decay rate 0.7 up to 12 blocks (ViT-B), 0.8 up to 24 (ViT-L), 0.9
//! beyond (ViT-H, 32 blocks), as in the ViTDet configs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use vitdet_ir::{Graph, Op, Value};

use super::OptimError;

/// Whether a parameter is the weight or bias of a normalization layer, from its detectron2
/// name alone: a module component containing `norm` (`norm1`, `norm2`, `conv1.norm`,
/// `fpn_lateral2.norm`, ...), or one of the two norms the state dicts name by position — the
/// LayerNorm of the vitdet family's 4x pyramid branch (`backbone.simfp_2.1`) and the GroupNorm
/// of the vit family's 4x adapter branch (`backbone.adapter.up4.1`).
pub fn is_norm_name(name: &str) -> bool {
    let mut parts: Vec<&str> = name.split('.').collect();
    if parts.len() < 2 {
        return false;
    }
    parts.pop(); // the leaf (`weight`, `bias`)
    let module = parts.join(".");
    parts.iter().any(|p| p.contains("norm")) || module == "backbone.simfp_2.1" || module == "backbone.adapter.up4.1"
}

/// Why a parameter gets no weight decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoDecay {
    Norm,
    Bias,
    PositionTable,
    LayerScale,
}

impl fmt::Display for NoDecay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NoDecay::Norm => "norm",
            NoDecay::Bias => "bias",
            NoDecay::PositionTable => "position table",
            NoDecay::LayerScale => "layer scale",
        })
    }
}

/// Leaf names of position tables (absolute embedding, decomposed and BEiT relative tables).
const POSITION_TABLES: [&str; 4] = ["pos_embed", "rel_pos_h", "rel_pos_w", "relative_position_bias_table"];

/// The reason `info` is exempt from weight decay, or `None` if it is decayed (see the module doc).
pub fn no_decay_reason(info: &ParamInfo) -> Option<NoDecay> {
    let leaf = info.name.rsplit('.').next().unwrap_or("");
    if info.is_norm {
        Some(NoDecay::Norm)
    } else if leaf == "bias" {
        Some(NoDecay::Bias)
    } else if POSITION_TABLES.contains(&leaf) {
        Some(NoDecay::PositionTable)
    } else if leaf == "gamma_1" || leaf == "gamma_2" {
        Some(NoDecay::LayerScale)
    } else {
        None
    }
}

/// detectron2's layer id of a parameter for a ViT of `num_layers` blocks (see the module doc).
/// Errors for a `.blocks.` index that is not a number or not below `num_layers` (detectron2 would
/// silently give such a parameter a multiplier above 1).
pub fn layer_id(name: &str, num_layers: usize) -> Result<usize, OptimError> {
    if !name.starts_with("backbone") {
        return Ok(num_layers + 1);
    }
    if name.contains(".pos_embed") || name.contains(".patch_embed") {
        return Ok(0);
    }
    if let Some(at) = name.find(".blocks.") {
        if !name.contains(".residual.") {
            let index = name[at..].split('.').nth(2).unwrap_or("");
            let bad = |message: String| OptimError::ParamName {
                name: name.to_string(),
                message,
            };
            let i: usize = index
                .parse()
                .map_err(|_| bad(format!("`.blocks.` is followed by `{index}`, not a block number")))?;
            if i >= num_layers {
                return Err(bad(format!(
                    "block {i} does not exist in a {num_layers}-block ViT (check num_layers)"
                )));
            }
            return Ok(i + 1);
        }
    }
    Ok(num_layers + 1)
}

/// `decay_rate ^ (num_layers + 1 - layer_id(name))`, detectron2's `get_vit_lr_decay_rate`.
pub fn lr_decay_multiplier(name: &str, decay_rate: f64, num_layers: usize) -> Result<f64, OptimError> {
    let id = layer_id(name, num_layers)?;
    // Python's `float ** int` is C `pow`, which `powf` calls too (`powi` can round differently).
    Ok(decay_rate.powf((num_layers + 1 - id) as f64))
}

/// What the grouping needs to know of a trainable parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    /// Weight or bias of a normalization layer.
    pub is_norm: bool,
}

impl ParamInfo {
    /// A parameter whose norm-ness follows [`is_norm_name`].
    pub fn new(name: impl Into<String>, shape: Vec<usize>) -> Self {
        let name = name.into();
        let is_norm = is_norm_name(&name);
        ParamInfo { name, shape, is_norm }
    }

    /// The trainable parameters of `graph` (buffers excluded), in name order. A parameter is a
    /// norm parameter if the graph feeds it (directly or through casts) as the weight or bias of
    /// a LayerNorm, GroupNorm or BatchNorm, or if [`is_norm_name`] says so.
    pub fn from_graph(graph: &Graph) -> Vec<ParamInfo> {
        let mut norm = BTreeSet::new();
        for idx in graph.graph.node_indices() {
            if matches!(
                graph.node(idx).op,
                Op::LayerNorm(_) | Op::GroupNorm(_) | Op::BatchNorm(_) | Op::BatchNormTrain(_)
            ) {
                for v in graph.inputs_of(idx).into_iter().skip(1) {
                    if let Some(name) = source_parameter(graph, v) {
                        norm.insert(name);
                    }
                }
            }
        }
        let mut infos: Vec<ParamInfo> = graph
            .parameters()
            .filter(|(_, p)| p.trainable)
            .map(|(_, p)| ParamInfo {
                name: p.name.clone(),
                shape: p.ty.shape.clone(),
                is_norm: norm.contains(p.name.as_str()) || is_norm_name(&p.name),
            })
            .collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// The parameter a value comes from, looking through casts.
fn source_parameter(graph: &Graph, mut v: Value) -> Option<&str> {
    loop {
        match &graph.node(v.node).op {
            Op::Parameter(p) => return Some(p.name.as_str()),
            Op::Cast(_) => v = *graph.inputs_of(v.node).first()?,
            _ => return None,
        }
    }
}

/// Settings of the grouping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroupConfig {
    /// Learning rate of a parameter with multiplier 1 (the heads), before the schedule.
    pub base_lr: f64,
    /// Weight decay of the decayed parameters.
    pub weight_decay: f64,
    /// Layer-wise learning-rate decay per block (1 disables it).
    pub lr_decay_rate: f64,
    /// Blocks of the ViT trunk (12 for B, 24 for L, 32 for H).
    pub num_layers: usize,
}

impl GroupConfig {
    /// The paper's / ViTDet's defaults for a trunk of `num_layers` blocks (see the module doc).
    pub fn paper(num_layers: usize) -> Self {
        let lr_decay_rate = if num_layers <= 12 {
            0.7
        } else if num_layers <= 24 {
            0.8
        } else {
            0.9
        };
        GroupConfig {
            base_lr: 1e-4,
            weight_decay: 0.1,
            lr_decay_rate,
            num_layers,
        }
    }

    pub fn validate(&self) -> Result<(), OptimError> {
        let check = |what: &str, v: f64, ok: bool| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(OptimError::Config(format!("{what} {v} is out of range")))
            }
        };
        check("base learning rate", self.base_lr, self.base_lr >= 0.0)?;
        check("weight decay", self.weight_decay, self.weight_decay >= 0.0)?;
        check(
            "layer-wise lr decay rate (must be in (0, 1])",
            self.lr_decay_rate,
            self.lr_decay_rate > 0.0 && self.lr_decay_rate <= 1.0,
        )
    }
}

/// One parameter's hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ParamHyper {
    /// detectron2's layer id (0 embeddings, `i + 1` block `i`, `num_layers + 1` the rest).
    pub layer_id: usize,
    /// Layer-wise decay multiplier.
    pub lr_mult: f64,
    /// `base_lr * lr_mult`: the learning rate before the schedule.
    pub lr: f64,
    pub weight_decay: f64,
    /// Why the weight decay is 0, if it is.
    pub no_decay: Option<NoDecay>,
}

/// Every trainable parameter's hyperparameters.
#[derive(Debug, Clone)]
pub struct ParamGroups {
    config: GroupConfig,
    params: BTreeMap<String, ParamHyper>,
    numel: BTreeMap<String, u64>,
}

impl ParamGroups {
    /// Assigns hyperparameters to `params` (see the module doc). Errors for an invalid setting,
    /// a duplicate name, or a block index outside the trunk.
    pub fn new(params: &[ParamInfo], config: GroupConfig) -> Result<Self, OptimError> {
        config.validate()?;
        let mut out = BTreeMap::new();
        let mut numel = BTreeMap::new();
        for info in params {
            let id = layer_id(&info.name, config.num_layers)?;
            let lr_mult = lr_decay_multiplier(&info.name, config.lr_decay_rate, config.num_layers)?;
            let no_decay = no_decay_reason(info);
            let hyper = ParamHyper {
                layer_id: id,
                lr_mult,
                lr: config.base_lr * lr_mult,
                weight_decay: if no_decay.is_some() { 0.0 } else { config.weight_decay },
                no_decay,
            };
            if out.insert(info.name.clone(), hyper).is_some() {
                return Err(OptimError::ParamName {
                    name: info.name.clone(),
                    message: "listed twice".into(),
                });
            }
            numel.insert(info.name.clone(), info.numel());
        }
        Ok(ParamGroups {
            config,
            params: out,
            numel,
        })
    }

    pub fn config(&self) -> GroupConfig {
        self.config
    }

    /// A parameter's hyperparameters; `None` if it is not trainable.
    pub fn get(&self, name: &str) -> Option<&ParamHyper> {
        self.params.get(name)
    }

    /// (name, hyperparameters) in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ParamHyper)> {
        self.params.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// One row per (layer, decayed or not): what `vitdet` prints as the groups report.
    pub fn report(&self) -> GroupsReport {
        let n = self.config.num_layers;
        let mut rows: BTreeMap<(usize, bool), GroupRow> = BTreeMap::new();
        for (name, h) in &self.params {
            let decayed = h.no_decay.is_none();
            let row = rows.entry((h.layer_id, !decayed)).or_insert_with(|| GroupRow {
                group: match h.layer_id {
                    0 => "embeddings".to_string(),
                    id if id <= n => format!("block {}", id - 1),
                    _ => "rest".to_string(),
                },
                layer_id: h.layer_id,
                decayed,
                params: 0,
                elements: 0,
                lr_mult: h.lr_mult,
                lr: h.lr,
                weight_decay: h.weight_decay,
            });
            row.params += 1;
            row.elements += self.numel[name];
        }
        GroupsReport {
            config: self.config,
            rows: rows.into_values().collect(),
        }
    }
}

/// One line of the groups report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRow {
    /// `embeddings`, `block <i>` or `rest`.
    pub group: String,
    pub layer_id: usize,
    /// Whether this row's parameters are weight-decayed.
    pub decayed: bool,
    /// Parameter tensors in the row.
    pub params: usize,
    /// Scalar elements in the row.
    pub elements: u64,
    pub lr_mult: f64,
    pub lr: f64,
    pub weight_decay: f64,
}

/// The groups in a table: printable ([`fmt::Display`]) and serializable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupsReport {
    pub config: GroupConfig,
    pub rows: Vec<GroupRow>,
}

impl fmt::Display for GroupsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "base lr {:e}, weight decay {}, layer-wise lr decay {} over {} blocks",
            c.base_lr, c.weight_decay, c.lr_decay_rate, c.num_layers
        )?;
        writeln!(
            f,
            "{:<12} {:>5} {:>7} {:>12} {:>10} {:>10} {:>6}",
            "group", "decay", "params", "elements", "lr mult", "lr", "wd"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<12} {:>5} {:>7} {:>12} {:>10.4e} {:>10.4e} {:>6}",
                r.group,
                if r.decayed { "yes" } else { "no" },
                r.params,
                r.elements,
                r.lr_mult,
                r.lr,
                r.weight_decay
            )?;
        }
        let params: usize = self.rows.iter().map(|r| r.params).sum();
        let elements: u64 = self.rows.iter().map(|r| r.elements).sum();
        write!(f, "{:<12} {:>5} {:>7} {:>12}", "total", "", params, elements)
    }
}
