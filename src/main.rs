//! The `vitdet` command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use vitdet::compile::{CompileOptions, Target};

/// Counts heap bytes, so runs report their measured peak beside the planned arena.
#[global_allocator]
static ALLOC: vitdet::runtime::alloc::CountingAllocator = vitdet::runtime::alloc::CountingAllocator;

#[derive(Parser)]
#[command(
    name = "vitdet",
    version,
    about = "Compiler and runtime for the ViT-based Mask R-CNN"
)]
struct Cli {
    /// CPU threads for kernels (default: all cores, or RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Infer,
    Train,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// Choices of `compile --mode train` (and `study`).
#[derive(clap::Args, Clone)]
struct TrainArgs {
    /// Attention strategy: window (no global blocks), hybrid (the config's global blocks) or
    /// global (every block); default: the config's.
    #[arg(long, value_enum)]
    attention: Option<AttentionArg>,
    /// Activation checkpointing (train mode): none, blocks (every block), global (the global
    /// blocks) or auto (the cheapest recomputation that fits --budget). Default: auto when
    /// --budget is given, else none.
    #[arg(long, value_enum)]
    checkpoint: Option<CheckpointArg>,
    /// Memory budget of the training step, e.g. 16GiB or 800MB (train mode).
    #[arg(long)]
    budget: Option<String>,
    /// Images per optimizer step, run as per-image passes with gradients accumulated (train mode).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Precision: f32, or autocast to bf16 / f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Keep the unfused attention subgraph (both modes fuse the windowed and global attention
    /// by default).
    #[arg(long)]
    no_fuse: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum AttentionArg {
    Window,
    Hybrid,
    Global,
}

#[derive(Clone, Copy, ValueEnum)]
enum CheckpointArg {
    None,
    Blocks,
    Global,
    Auto,
}

impl TrainArgs {
    fn attention(&self) -> Option<vitdet::models::AttentionStrategy> {
        use vitdet::models::AttentionStrategy as A;
        self.attention.map(|a| match a {
            AttentionArg::Window => A::Window,
            AttentionArg::Hybrid => A::Hybrid,
            AttentionArg::Global => A::Global,
        })
    }

    fn options(&self) -> Result<vitdet::compile::TrainOptions> {
        use vitdet::compile::CheckpointChoice as C;
        // `--attention` reaches the config through `CompileOptions::attention`.
        Ok(vitdet::compile::TrainOptions {
            fuse_attention: !self.no_fuse,
            checkpoint: self.checkpoint.map(|c| match c {
                CheckpointArg::None => C::None,
                CheckpointArg::Blocks => C::Blocks,
                CheckpointArg::Global => C::Global,
                CheckpointArg::Auto => C::Auto,
            }),
            budget_bytes: self
                .budget
                .as_deref()
                .map(vitdet::compile::parse_bytes)
                .transpose()
                .context("--budget")?,
            batch: self.batch,
            precision: vitdet::compile::parse_dtype_flag(&self.dtype)?,
            ..Default::default()
        })
    }

    /// The flags that only mean something for a training step.
    fn train_only_flags(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.checkpoint.is_some() {
            v.push("--checkpoint");
        }
        if self.budget.is_some() {
            v.push("--budget");
        }
        if self.batch != 1 {
            v.push("--batch");
        }
        v
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum StudyFormat {
    Text,
    Markdown,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Build, verify and schedule a model's graph; report parameters, FLOPs, activations and
    /// planned peak memory.
    Compile {
        /// Preset (vit-b, vit-l, vit-h, vitdet-b, vitdet-l, vitdet-h, vit-tiny, vitdet-tiny) or a
        /// JSON/TOML config file.
        #[arg(long, default_value = "vit-b")]
        model: String,
        /// Input side in pixels (overrides the config's).
        #[arg(long)]
        image_size: Option<usize>,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Write the compiled artifact (graph + schedule + config) as JSON.
        #[arg(long)]
        emit: Option<PathBuf>,
        /// Write the graph as Graphviz dot.
        #[arg(long)]
        dot: Option<PathBuf>,
        /// Write the one-line-per-node text dump.
        #[arg(long)]
        dump_ir: Option<PathBuf>,
        /// Compile the backbone and feature pyramid only (outputs p2..p6), not the detector.
        #[arg(long)]
        backbone_only: bool,
        /// `infer`: the test-time graph; `train`: one training step (losses and gradients).
        #[arg(long, value_enum, default_value = "infer")]
        mode: Mode,
        /// Also run the graph once (random weights and input) and report its speed (fps).
        #[arg(long)]
        bench: bool,
        /// Device for --bench: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Also predict the time of a pass (a training step in train mode) on this device
        /// profile: v100-32gb, a100-80gb, h100-80gb, h200-141gb.
        #[arg(long)]
        profile: Option<String>,
        /// `vitdet bench --ops --format json` reports timed on the profile's device
        /// (comma-separated or repeated), whose op efficiencies replace the assumed ones.
        #[arg(long, value_delimiter = ',', requires = "profile")]
        calibration: Vec<PathBuf>,
        /// The profile of the GPU the --calibration reports were timed on, where it is another
        /// GPU of the --profile's architecture (h200-141gb for an h100-80gb prediction).
        #[arg(long, requires = "calibration")]
        calibrated_on: Option<String>,
        #[command(flatten)]
        train: TrainArgs,
    },
    /// The paper's Table 3 as a command: peak memory and step time of training configurations,
    /// predicted by the compiler (and measured on the CPU with --measure).
    Study {
        #[arg(long, default_value = "vit-l")]
        model: String,
        /// Input side in pixels (overrides the config's).
        #[arg(long)]
        image_size: Option<usize>,
        /// Comma-separated dimensions to sweep: attention, checkpoint, budget, image-size, batch,
        /// dtype, fusion.
        #[arg(long, default_value = "attention,checkpoint")]
        sweep: String,
        /// Also run every configuration on --device: measured step time and memory.
        #[arg(long)]
        measure: bool,
        /// Where --measure runs: cpu, or cuda / cuda:N (a build with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Timed steps per measured configuration (after a warm-up step).
        #[arg(long, default_value_t = 2)]
        steps: usize,
        /// Device profile of the predicted times: v100-32gb (the paper's), a100-80gb, h100-80gb,
        /// h200-141gb.
        #[arg(long, default_value = "v100-32gb")]
        profile: String,
        /// `vitdet bench --ops --format json` reports timed on the profile's device
        /// (comma-separated or repeated): their ops' efficiencies replace the profile's assumed
        /// 60% / 75% of the peaks.
        #[arg(long, value_delimiter = ',')]
        calibration: Vec<PathBuf>,
        /// The profile of the GPU the --calibration reports were timed on, where it is another
        /// GPU of the --profile's architecture: each call keeps the time it spent beyond its
        /// roofline there, and its roofline is recomputed at the --profile's peaks.
        #[arg(long, requires = "calibration")]
        calibrated_on: Option<String>,
        /// Precision of every row unless swept: f32, bf16 or f16. Default f16 (the paper's
        /// automatic mixed precision), f32 with --measure on the CPU (which runs f32 graphs).
        #[arg(long)]
        dtype: Option<String>,
        /// Compile the fused attention (the default study runs attention as the paper's eager
        /// PyTorch does, materializing the probabilities).
        #[arg(long)]
        fuse: bool,
        /// Images per optimizer step unless swept.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, value_enum, default_value = "text")]
        format: StudyFormat,
        /// Write the Pareto plot (memory vs time) as SVG.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Run the detector on an image or a folder of images (`--out DIR`: COCO results
    /// `detections.json` and pictures), or the backbone alone (`--dump`: p2..p6).
    Infer {
        #[arg(long, default_value = "vitdet-tiny")]
        model: String,
        /// safetensors file with detectron2 state-dict keys; without it a seeded random init is used.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// PNG or JPEG image; with --out also a folder of them.
        #[arg(long)]
        image: PathBuf,
        /// Run the whole detector and write detections.json (COCO results) and pictures here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Score threshold of the detections (default: the model's, 0.05).
        #[arg(long)]
        score_thresh: Option<f64>,
        /// Write p2..p6 (NCHW f32, batch 1) to this safetensors file.
        #[arg(long)]
        dump: Option<PathBuf>,
        /// Seed of the random init used without --weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to run: `cpu`, or `cuda` / `cuda:N` (needs a build with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Forward passes to time (the median is reported).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Precision: f32, or autocast to bf16 / f16 with the attention fused (f32 weights are
        /// converted on load; --dump still writes f32).
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// COCO box and mask AP (pycocotools' 12 numbers) and the TIDE error breakdown of a
    /// results file against a ground-truth instances file.
    Eval {
        /// COCO instances JSON (images, annotations, categories).
        #[arg(long)]
        gt: Option<PathBuf>,
        /// COCO results JSON: a list of {image_id, category_id, score, bbox, [segmentation]}.
        #[arg(long)]
        dets: Option<PathBuf>,
        /// Evaluate a model directly: preset or config (with --weights and --data).
        #[arg(long)]
        model: Option<String>,
        /// Weights or training checkpoint (safetensors) for --model.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// COCO-layout dataset: annotations/instances_<split>.json and <split>/.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Dataset split evaluated with --data.
        #[arg(long, default_value = "val")]
        split: String,
        /// Where --model runs: cpu (default), or cuda / cuda:N.
        #[arg(long)]
        device: Option<String>,
        /// Precision of --model: f32 (default), or autocast to bf16 / f16 with the attention fused.
        #[arg(long)]
        dtype: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Train a detector on a COCO-layout dataset (progress bar, metrics.jsonl, atomic
    /// checkpoints, exact resume).
    Train(vitdet::train::cli::TrainArgs),
    /// The whole pipeline on a CPU in minutes: synthetic dataset, training, COCO evaluation and
    /// a picture of the detections.
    Demo(vitdet::demo::DemoArgs),
    /// Time the runtime's kernels on the CPU or a GPU: ViTDet-B's hot ops one by one (`--ops`)
    /// or one end-to-end inference or training step (`--model`).
    Bench(vitdet::bench::cli::BenchArgs),
    /// Compile the CUDA kernels ahead of time into the kernel cache (NVRTC; no GPU needed).
    Kernels(vitdet::precompile::KernelsArgs),
    /// Datasets: `synth` writes a synthetic instance-segmentation dataset in COCO layout.
    Data {
        #[command(subcommand)]
        command: vitdet::data::DataCommand,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // candle and its matmul read the thread count from here; set before any kernel runs.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
    // One-shot runs reach their high-water mark anyway: keep freed memory for reuse instead of
    // paying a page fault per 4 KiB on every large tensor.
    vitdet::runtime::alloc::retain_freed_memory();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data { command } => vitdet::data::run_cli(command)?,
        Command::Train(args) => vitdet::train::cli::run(args)?,
        Command::Demo(args) => vitdet::demo::run(args)?,
        Command::Bench(args) => vitdet::bench::cli::run(args)?,
        Command::Kernels(args) => vitdet::precompile::run(args)?,
        Command::Compile {
            model,
            image_size,
            format,
            emit,
            dot,
            dump_ir,
            backbone_only,
            mode,
            bench,
            device,
            profile,
            calibration,
            calibrated_on,
            train,
        } => {
            // Inference as `vitdet infer` runs it: fused attention (unless `--no-fuse`) and
            // autocast to `--dtype`; f32 without fusion is the graph as built.
            let mut lowering = None;
            if mode == Mode::Infer {
                let flags = train.train_only_flags();
                if !flags.is_empty() {
                    anyhow::bail!("{} apply to --mode train", flags.join(", "));
                }
                let precision = vitdet::compile::parse_dtype_flag(&train.dtype)?;
                if precision != vitdet::passes::Precision::F32 || !train.no_fuse {
                    lowering = Some((precision, !train.no_fuse));
                }
            }
            let target = match (mode, backbone_only) {
                (Mode::Train, true) => {
                    anyhow::bail!("--backbone-only compiles an inference graph; drop it for --mode train")
                }
                (Mode::Train, false) if bench => {
                    anyhow::bail!("--bench times inference; `vitdet train` reports the training step's speed")
                }
                (Mode::Train, false) => Target::Train(train.options()?),
                (Mode::Infer, true) => Target::Backbone,
                (Mode::Infer, false) => Target::Detector { image_hw: None },
            };
            let mut compiled = vitdet::compile::compile_with(
                &CompileOptions {
                    model,
                    image_size,
                    attention: train.attention(),
                    target,
                },
                lowering,
            )?;
            if let Some(name) = profile {
                let profile = vitdet::study::device_profile(&name, &calibration, calibrated_on.as_deref())?;
                let passes = compiled.report.train.as_ref().map_or(1, |t| t.batch);
                compiled.report.predicted_time = Some(
                    vitdet::report::PredictedTime::new(&compiled.graph, &compiled.order, passes, &profile)
                        .map_err(anyhow::Error::msg)?,
                );
            }
            if bench {
                let device = vitdet::infer::parse_device(&device)?;
                compiled.report.benchmark = Some(vitdet::bench::benchmark(&compiled, &device)?);
            }
            let artifact = emit
                .map(|p| -> Result<_> { Ok((p, compiled.artifact()?.to_json()?)) })
                .transpose()?;
            let dot = dot.map(|p| (p, compiled.graph.to_dot()));
            let dump = dump_ir
                .map(|p| -> Result<_> { Ok((p, compiled.graph.dump()?)) })
                .transpose()?;
            for (path, text) in [artifact, dot, dump].into_iter().flatten() {
                vitdet::runtime::write_atomic(&path, text.as_bytes())
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&compiled.report)?),
                Format::Text => print!("{}", compiled.report.to_text()),
            }
        }
        Command::Study {
            model,
            image_size,
            sweep,
            measure,
            device,
            steps,
            profile,
            calibration,
            calibrated_on,
            dtype,
            fuse,
            batch,
            format,
            plot,
        } => {
            use vitdet::study;
            let device = vitdet::infer::parse_device(&device)?;
            let dtype = dtype.unwrap_or_else(|| if measure && device.is_cpu() { "f32" } else { "f16" }.to_string());
            let base = vitdet::compile::TrainOptions {
                fuse_attention: fuse,
                batch,
                precision: vitdet::compile::parse_dtype_flag(&dtype)?,
                ..Default::default()
            };
            let opts = study::StudyOptions {
                model,
                image_size,
                sweep: study::Dim::parse_list(&sweep).context("--sweep")?,
                base,
                profile,
                calibration,
                calibrated_on,
                measure,
                device,
                steps,
            };
            let result = study::run_study(&opts, &|what| eprintln!("compiling {what}"))?;
            match format {
                StudyFormat::Text => print!("{}", study::to_text(&result)),
                StudyFormat::Markdown => print!("{}", study::to_markdown(&result)),
                StudyFormat::Json => println!("{}", serde_json::to_string_pretty(&result)?),
            }
            if let Some(path) = plot {
                study::write_plot(&result, &path)?;
                eprintln!("wrote {}", path.display());
            }
        }
        Command::Eval {
            gt,
            dets,
            model,
            weights,
            data,
            split,
            device,
            dtype,
            format,
        } => {
            if model.is_some() || weights.is_some() || data.is_some() {
                if gt.is_some() || dets.is_some() {
                    anyhow::bail!("give either --gt/--dets or --model/--weights/--data, not both");
                }
                let (Some(model), Some(weights), Some(data)) = (model, weights, data) else {
                    anyhow::bail!("evaluating a model needs --model, --weights and --data");
                };
                let runner = vitdet::detect::Runner {
                    device: vitdet::infer::parse_device(device.as_deref().unwrap_or("cpu"))?,
                    precision: vitdet::compile::parse_dtype_flag(dtype.as_deref().unwrap_or("f32"))?,
                };
                let config = vitdet::models::ModelConfig::load(&model)?;
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} images, {per_sec}, eta {eta}")
                        .expect("valid progress template"),
                );
                let eval = vitdet::train::validate::evaluate_split(
                    &config,
                    &weights,
                    &data,
                    &split,
                    &runner,
                    &mut |done, total| {
                        bar.set_length(total as u64);
                        bar.set_position(done as u64);
                    },
                )?;
                bar.finish_and_clear();
                match format {
                    Format::Json => println!("{}", serde_json::to_string_pretty(&eval.report)?),
                    Format::Text => print!("{}", eval.report.to_text()),
                }
                return Ok(());
            }
            let (Some(gt), Some(dets)) = (gt, dets) else {
                anyhow::bail!("vitdet eval needs --gt GT.json and --dets DETS.json");
            };
            if device.is_some() || dtype.is_some() {
                anyhow::bail!("--device and --dtype apply to evaluating a model (--model, --weights, --data)");
            }
            let gt = vitdet::eval::GroundTruth::load(&gt)?;
            let dets = vitdet::eval::Detections::load(&dets, &gt)?;
            let report = vitdet::eval::evaluate(&gt, &dets)?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Text => print!("{}", report.to_text()),
            }
        }
        Command::Infer {
            model,
            weights,
            image,
            out,
            score_thresh,
            dump,
            seed,
            device,
            repeat,
            dtype,
            format,
        } => {
            let device = vitdet::infer::parse_device(&device)?;
            let precision = vitdet::compile::parse_dtype_flag(&dtype)?;
            if let Some(out) = out {
                if dump.is_some() {
                    anyhow::bail!("--dump writes backbone features and --out detections: run them separately");
                }
                let summary = vitdet::detect::detect(&vitdet::detect::DetectOptions {
                    model,
                    weights,
                    image,
                    out,
                    score_thresh,
                    seed,
                    runner: vitdet::detect::Runner { device, precision },
                })?;
                match format {
                    Format::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
                    Format::Text => print!("{}", summary.to_text()),
                }
                return Ok(());
            }
            if score_thresh.is_some() {
                anyhow::bail!("--score-thresh applies to detections: add --out DIR");
            }
            let opts = vitdet::infer::InferOptions {
                model,
                weights,
                image,
                dump,
                seed,
                repeat,
                device,
                precision,
            };
            let result = vitdet::infer::infer(&opts)?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&result.summary)?),
                Format::Text => print!("{}", result.summary.to_text()),
            }
        }
    }
    Ok(())
}
