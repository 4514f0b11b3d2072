use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use ditrun::backend::{set_cpu_threads, BackendKind};
use ditrun::bench::{self, BenchOptions};
use ditrun::data::{DatasetKind, PrepareOptions, Split};
use ditrun::dist::World;
use ditrun::flow::{SampleOptions, Sampler};
use ditrun::kernels::autocast::Precision;
use ditrun::model::{ClipTextConfig, TextDiTConfig};
use ditrun::sample::TrainedCheckpoint;
use ditrun::train::Resume;

#[derive(Parser)]
#[command(
    name = "ditrun",
    version,
    about = "Train a text-conditional Diffusion Transformer with flow matching"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a dataset as caption shards (WebDataset tar + index.json) to a path or store URL.
    Prepare(PrepareArgs),
    /// Train. With no --job, the built-in quickstart (= jobs/quickstart.yaml).
    Train {
        /// Job spec (YAML).
        #[arg(long)]
        job: Option<PathBuf>,
        /// Override a key: --set train.lr=3e-4 (repeatable; values are YAML).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        overrides: Vec<String>,
        /// auto (the latest valid checkpoint, if any), never, or a checkpoint URL.
        #[arg(long, default_value = "auto")]
        resume: Resume,
        /// Stop after this step with a checkpoint, as a preempted job would; `--resume auto`
        /// continues the same run.
        #[arg(long, value_name = "STEP")]
        stop_after: Option<u64>,
    },
    /// Run a ditrun command on several ranks through mpirun (one per GPU), and restart the job
    /// from its latest checkpoint when a rank dies: `ditrun launch --nproc-per-node auto -- train --job J`.
    Launch {
        /// Ranks on this node: a number, or auto (GPUs in CUDA_VISIBLE_DEVICES, else
        /// `nvidia-smi -L`, else one CPU rank per core, as torchrun does).
        #[arg(long, default_value = "auto")]
        nproc_per_node: String,
        /// Nodes in mpirun's hostfile (its `--hostfile`, or the MPI Operator's
        /// OMPI_MCA_orte_default_hostfile): the job runs nnodes × nproc-per-node ranks.
        #[arg(long, default_value_t = 1)]
        nnodes: usize,
        /// Restarts after a failed attempt, each from the latest committed checkpoint.
        #[arg(long, default_value_t = 0)]
        max_restarts: u32,
        /// The mpirun to use.
        #[arg(long, default_value = "mpirun")]
        mpirun: String,
        /// An extra mpirun argument, e.g. --mpirun-arg=--hostfile --mpirun-arg=hosts (repeatable).
        #[arg(long = "mpirun-arg", allow_hyphen_values = true, value_name = "ARG")]
        mpirun_args: Vec<String>,
        /// The ditrun command each rank runs, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Generate images from prompts with a checkpoint's EMA weights.
    Sample {
        /// A checkpoint (`.../step-000001000`) or a checkpoint folder (its latest).
        #[arg(long)]
        checkpoint: String,
        #[arg(long = "prompt", required = true)]
        prompts: Vec<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[arg(long, default_value_t = 1)]
        per_prompt: usize,
        /// One grid PNG: rows are prompts, columns images per prompt.
        #[arg(long, conflicts_with = "out_dir", required_unless_present = "out_dir")]
        out: Option<PathBuf>,
        /// One PNG per image, named after its prompt and index.
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// A classifier-free guidance sweep instead: one image per prompt (rows) and scale
        /// (columns, labelled), the same seed in every column, as one PNG at --out. Scales
        /// are comma-separated; given alone: 1,3,5,7.5,10,15.
        #[arg(long, value_delimiter = ',', num_args = 0..=1, default_missing_value = "1,3,5,7.5,10,15",
              requires = "out", conflicts_with = "out_dir", value_name = "SCALES")]
        cfg_sweep: Option<Vec<f64>>,
    },
    /// FID against the dataset's statistics and CLIP score of a checkpoint's EMA weights: one
    /// JSON line per guidance scale (stdout) and a table (stderr).
    Eval(EvalArgs),
    /// Print what a job file, checkpoint or shard folder holds, as JSON; or look inside a
    /// model (`ditrun inspect similarity --help`, `ditrun inspect cross-attention --help`).
    #[command(args_conflicts_with_subcommands = true)]
    Inspect {
        #[command(subcommand)]
        view: Option<InspectView>,
        /// A job file, checkpoint URL or shard folder.
        #[arg(required = true)]
        target: Option<String>,
    },
    /// Time full training steps of the seed model (loss, backward, AdamW) and print one JSON
    /// line with images/s.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct EvalArgs {
    /// A checkpoint (`.../step-000001000`) or a checkpoint folder (its latest).
    #[arg(long)]
    checkpoint: String,
    /// Generated images, balanced over the dataset's captions (default: the job's eval.samples).
    #[arg(long)]
    samples: Option<usize>,
    /// Guidance scales, comma-separated: one FID each (default: the job's eval.cfg).
    #[arg(long, value_delimiter = ',')]
    cfg: Vec<f64>,
    /// Sampler integration steps (default: the job's eval.steps).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Images per forward pass.
    #[arg(long)]
    batch_size: Option<usize>,
    /// The FID Inception's weights, any weights location (default: the job's eval.inception_weights).
    #[arg(long)]
    inception_weights: Option<String>,
    /// The CLIP file (vision tower and projections) for the CLIP score (default: eval.clip_weights,
    /// else text_encoder.weights; no score without either).
    #[arg(long)]
    clip_weights: Option<String>,
    /// The dataset FID compares with (default: the job's data.shards); its statistics are stored
    /// beside its shards as fid-stats.safetensors the first time.
    #[arg(long)]
    shards: Option<String>,
    /// Real images behind the dataset's statistics; 0 = all (default: eval.reference_samples).
    #[arg(long)]
    reference_samples: Option<usize>,
    /// Also FID per caption, against each caption's real images (default: eval.per_caption_fid).
    #[arg(long)]
    per_caption_fid: bool,
}

#[derive(clap::Args)]
struct PrepareArgs {
    dataset: DatasetKind,
    /// Where the shards go: a path, file://, s3://, gs://, az:// or memory:// URL.
    #[arg(long)]
    out: String,
    /// The raw dataset: CIFAR-10 archive (path or URL; default: the official download),
    /// Fashion-MNIST IDX folder (default: /usr/share/datasets/fashion-mnist).
    #[arg(long)]
    source: Option<String>,
    #[arg(long, value_enum, default_value_t = Split::Train)]
    split: Split,
    /// Samples to write (default: the whole split; synthetic: 1,000).
    #[arg(long)]
    samples: Option<usize>,
    #[arg(long, default_value_t = ditrun::data::prepare::DEFAULT_SAMPLES_PER_SHARD)]
    samples_per_shard: usize,
    /// Synthetic data only: image size and channels.
    #[arg(long)]
    image_size: Option<usize>,
    #[arg(long)]
    channels: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, value_enum, default_value_t = BackendKind::preferred())]
    backend: BackendKind,
    /// Encode every batch's captions with CLIP (the seed's loop) instead of the cache.
    #[arg(long)]
    clip: bool,
    /// Time only the gradient all-reduce of the seed model (72.6 MB) between the ranks
    /// (`mpirun -np N ditrun bench --allreduce`), against a memcpy of the same buffer.
    #[arg(long)]
    allreduce: bool,
    /// Also time each kind of operation alone at the model's shapes (forward and
    /// backward, times its calls per step) and print a table against the whole step.
    #[arg(long)]
    profile: bool,
    /// The matrix products' dtype: bf16 keeps f32 master weights, statistics and
    /// reductions (as `train.precision`).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Run burn's own ops instead of ditrun's fused CPU kernels (to compare).
    #[arg(long)]
    unfused: bool,
}

/// How `sample` and `inspect cross-attention` integrate from noise to image.
#[derive(clap::Args)]
struct SamplingArgs {
    /// Classifier-free guidance scale (1 = plain conditional).
    #[arg(long, default_value_t = 7.5)]
    cfg: f64,
    /// Integration steps from noise to image.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, value_enum, default_value_t = Sampler::Euler)]
    sampler: Sampler,
    /// Seeds the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn options(&self, per_prompt: usize) -> SampleOptions {
        SampleOptions {
            cfg: self.cfg,
            steps: self.steps,
            sampler: self.sampler,
            per_prompt,
            seed: self.seed,
        }
    }
}

#[derive(Subcommand)]
enum InspectView {
    /// How well a checkpoint trained on the synthetic set (the quickstart's coloured shapes)
    /// follows its prompts: samples each of the 12 captions with the EMA weights and reads every
    /// image's colour and shape back, printing the share right per caption and overall.
    Shapes {
        /// A checkpoint (`.../step-000001000`) or a checkpoint folder (its latest).
        #[arg(long)]
        checkpoint: String,
        #[arg(long, default_value_t = 10)]
        per_caption: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Also write the samples as a grid PNG, a row per caption.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Cosine similarity of the text encoder's pooled embeddings of the prompts: a table on
    /// stdout (`--json` for machines) and, with --out, a labelled heat-map PNG.
    Similarity {
        /// The checkpoint whose job names the text encoder (`.../step-000001000`, or a
        /// checkpoint folder for its latest).
        #[arg(long, conflicts_with = "job", required_unless_present = "job")]
        checkpoint: Option<String>,
        /// Or a job file (its `text_encoder` section).
        #[arg(long)]
        job: Option<PathBuf>,
        #[arg(long = "prompt", required = true)]
        prompts: Vec<String>,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Cross-attention maps: sample one image for the prompt with the checkpoint's EMA weights
    /// and show, for each real text token (start marker, word pieces, end marker), where on
    /// the image it was attended to: a PNG with a row per chosen time and a heat map per token
    /// (heads averaged; one block or the mean of all). `--json` prints the weights.
    CrossAttention {
        /// A checkpoint (`.../step-000001000`) or a checkpoint folder (its latest).
        #[arg(long)]
        checkpoint: String,
        #[arg(long)]
        prompt: String,
        /// `all` (the mean over blocks) or a block number from 0.
        #[arg(long, default_value = "all")]
        block: ditrun::viz::BlockChoice,
        /// Times to record at, comma-separated, 1 = noise, 0 = image; each is taken at the
        /// nearest integration step.
        #[arg(long, value_delimiter = ',', default_value = "1,0.5,0.1")]
        times: Vec<f64>,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[arg(long, required_unless_present = "json")]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            ditrun::error::eprint_whole_line(&format!("error: {error:#}"));
            ExitCode::FAILURE
        }
    }
}

fn all_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// One rank of `ditrun train` (the only one without a launcher). A rank that fails ends the
/// whole job at once, so that the others do not wait for it until their collective timeout.
fn train_rank(
    job: Option<PathBuf>,
    overrides: &[String],
    resume: &Resume,
    stop_after: Option<u64>,
) -> anyhow::Result<()> {
    let world = World::from_env()?;
    let job = ditrun::config::load_job(job.as_deref(), overrides)?;
    set_cpu_threads(
        job.train
            .threads
            .unwrap_or_else(|| world.default_cpu_threads()),
    );
    let gpu_ordinal = job
        .train
        .backend
        .resolve()?
        .is_gpu()
        .then_some(world.local_rank);
    let collective = ditrun::dist::connect(
        &world,
        Duration::from_secs_f64(job.dist.timeout_secs),
        gpu_ordinal,
    )?;
    // After connecting: MPI's start-up must not replace these handlers.
    ditrun::dist::signals::install(Duration::from_secs_f64(job.train.stop_grace_secs));
    let _rank_span = world
        .is_distributed()
        .then(|| tracing::info_span!("rank", rank = world.rank).entered());
    match ditrun::train::train_ranked(&job, resume, stop_after, &world, collective.as_ref()) {
        Ok(outcome) => {
            println!("{}", serde_json::to_string(&outcome)?);
            if outcome.exit_code != 0 {
                // Stopped by a signal with its checkpoint written: exit as the signal would
                // have ended us (143 for SIGTERM), after MPI is shut down cleanly.
                drop(collective);
                std::process::exit(outcome.exit_code);
            }
            Ok(())
        }
        Err(error) if world.is_distributed() => {
            tracing::error!(
                "rank {} of {} failed: {error}",
                world.rank,
                world.world_size
            );
            ditrun::error::eprint_whole_line(&format!(
                "error: rank {} of {}: {error:#}",
                world.rank, world.world_size
            ));
            collective.abort(1)
        }
        Err(error) => Err(error.into()),
    }
}

/// `ditrun sample`: the files written (a grid, one PNG per image, or the CFG sweep's grid).
fn sample(
    checkpoint: &str,
    prompts: &[String],
    options: &SampleOptions,
    out: Option<&Path>,
    out_dir: Option<&Path>,
    cfg_sweep: Option<&[f64]>,
) -> anyhow::Result<Vec<PathBuf>> {
    let trained = TrainedCheckpoint::load(checkpoint)?;
    let written = ditrun::with_backend!(trained.backend()?, B => match cfg_sweep {
        Some(scales) => {
            let out = out.expect("clap requires --out with --cfg-sweep");
            ditrun::sample::sweep_checkpoint::<B>(&trained, prompts, scales, options, out).map(|path| vec![path])
        }
        None => ditrun::sample::sample_checkpoint::<B>(&trained, prompts, options, out, out_dir),
    })?;
    Ok(written)
}

/// `ditrun eval`: FID and CLIP score per guidance scale, as JSON lines and a table.
fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let world = World::from_env()?;
    set_cpu_threads(world.default_cpu_threads());
    let trained = TrainedCheckpoint::load(&args.checkpoint)?;
    let timeout = Duration::from_secs_f64(trained.job.dist.timeout_secs);
    let collective = ditrun::dist::connect(&world, timeout, None)?;
    let request = ditrun::eval::EvalRequest {
        samples: args.samples,
        cfg: args.cfg,
        steps: args.steps,
        seed: args.seed,
        batch_size: args.batch_size,
        inception_weights: args.inception_weights,
        clip_weights: args.clip_weights,
        shards: args.shards,
        reference_samples: args.reference_samples,
        per_caption_fid: args.per_caption_fid,
    };
    let reports = ditrun::with_backend!(trained.backend()?, B =>
        ditrun::eval::eval_checkpoint::<B>(&trained, &request, &world, collective.as_ref()))?;
    if reports.is_empty() {
        return Ok(());
    }
    eprintln!("  cfg  samples        FID  CLIP score   seconds");
    for report in &reports {
        let clip = report
            .clip_score
            .map_or("-".to_string(), |score| format!("{score:.3}"));
        eprintln!(
            "{:5} {:8} {:10.4} {:>11} {:9.1}",
            report.cfg, report.samples, report.fid, clip, report.secs
        );
        for (caption, fid) in &report.fid_per_caption {
            eprintln!("      FID {fid:10.4}  {caption}");
        }
        println!("{}", serde_json::to_string(report)?);
    }
    Ok(())
}

/// `ditrun inspect <view>`: looks inside a trained model (or its text encoder) and prints, and
/// with `--out` draws, what it found.
fn inspect_model(view: InspectView) -> anyhow::Result<()> {
    match view {
        InspectView::Shapes {
            checkpoint,
            per_caption,
            sampling,
            out,
            json,
        } => {
            let trained = TrainedCheckpoint::load(&checkpoint)?;
            let options = sampling.options(per_caption);
            let score = ditrun::with_backend!(trained.backend()?, B => {
                ditrun::sample::score_synthetic::<B>(&trained, &options, out.as_deref())
            })?;
            let text = if json {
                serde_json::to_string(&score)?
            } else {
                score.table()
            };
            println!("{text}");
        }
        InspectView::Similarity {
            checkpoint,
            job,
            prompts,
            out,
            json,
        } => inspect_similarity(
            checkpoint.as_deref(),
            job.as_deref(),
            &prompts,
            out.as_deref(),
            json,
        )?,
        InspectView::CrossAttention {
            checkpoint,
            prompt,
            block,
            times,
            sampling,
            out,
            json,
        } => {
            let trained = TrainedCheckpoint::load(&checkpoint)?;
            let options = sampling.options(1);
            let report = ditrun::with_backend!(trained.backend()?, B => {
                let (model, mut cache) = trained.ema_model::<B>()?;
                ditrun::probe::cross_attention_maps(&model, &mut cache, &prompt, &options, block, &times)
            })?;
            if let Some(path) = &out {
                write_picture(&ditrun::viz::render_cross_attention(&report), path)?;
                println!("{}", path.display());
            }
            if json {
                println!("{}", serde_json::to_string(&report)?);
            }
        }
    }
    Ok(())
}

/// `ditrun inspect similarity`: the text encoder of a checkpoint's job or of a job file.
fn inspect_similarity(
    checkpoint: Option<&str>,
    job: Option<&Path>,
    prompts: &[String],
    out: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let job = match checkpoint {
        Some(url) => TrainedCheckpoint::load(url)?.job,
        None => ditrun::config::load_job(job, &[])?,
    };
    let (weights, encoder, seed) = (
        job.text_encoder.weights.as_deref(),
        job.clip_config(),
        job.train.seed,
    );
    let report = ditrun::with_backend!(job.train.backend.resolve()?, B => {
        ditrun::probe::similarity_report::<B>(weights, &encoder, seed, prompts)
    })?;
    if let Some(path) = out {
        write_picture(&ditrun::viz::render_similarity(&report), path)?;
    }
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for (i, (prompt, row)) in report.prompts.iter().zip(&report.matrix).enumerate() {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:6.3}")).collect();
            println!("{:>2} {}  {}", i + 1, cells.join(" "), prompt);
        }
    }
    Ok(())
}

/// A picture as a PNG file; an error names the file.
fn write_picture(canvas: &ditrun::viz::Canvas, path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, canvas.to_png()?).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// `ditrun prepare`: writes the shards and prints their index.
fn prepare(args: PrepareArgs) -> anyhow::Result<()> {
    let PrepareArgs {
        dataset,
        out,
        source,
        split,
        samples,
        samples_per_shard,
        image_size,
        channels,
        seed,
    } = args;
    let mut options = PrepareOptions::new(dataset, &ditrun::config::location_url(&out)?);
    options.source = source;
    options.split = split;
    options.samples = samples;
    options.samples_per_shard = samples_per_shard;
    options.image_size = image_size;
    options.channels = channels;
    options.seed = seed;
    let index = ditrun::data::prepare_with(&options)?;
    println!("{}", serde_json::to_string_pretty(&index)?);
    Ok(())
}

/// `ditrun launch`: mpirun with one rank per GPU (or core), restarting from the latest
/// checkpoint when a rank dies; exits with the job's code.
fn launch(
    nproc_per_node: &str,
    nodes: usize,
    max_restarts: u32,
    mpirun: String,
    mpirun_args: Vec<String>,
    command: Vec<String>,
) -> anyhow::Result<()> {
    let ranks = match nproc_per_node {
        "auto" => None,
        n => Some(n.parse::<usize>().map_err(|_| {
            anyhow::anyhow!("--nproc-per-node: expected a number or auto, got {n:?}")
        })?),
    };
    let options = ditrun::dist::launch::LaunchOptions {
        ranks,
        nodes,
        max_restarts,
        command,
        program: std::env::current_exe()?,
        mpirun,
        mpirun_args,
    };
    let code = ditrun::dist::launch::launch(&options)?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// `ditrun bench`: on every rank under mpirun (gradients averaged as in training); rank 0
/// prints the report.
fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let BenchArgs {
        batch,
        steps,
        warmup,
        threads,
        backend,
        clip,
        allreduce,
        profile,
        precision,
        unfused,
    } = args;
    ditrun::kernels::set_fused(!unfused);
    if backend.is_gpu() && !ditrun::backend::cuda_driver_present() {
        anyhow::bail!(
            "--backend {}: this machine has no NVIDIA driver (libcuda.so.1 not found)",
            backend.name()
        );
    }
    // Under mpirun every rank benchmarks and gradients are averaged as in training;
    // rank 0 prints the report.
    let world = World::from_env()?;
    let threads = threads.unwrap_or_else(|| world.default_cpu_threads());
    set_cpu_threads(threads);
    let gpu_ordinal = backend.is_gpu().then_some(world.local_rank);
    let collective = ditrun::dist::connect(&world, Duration::from_secs(600), gpu_ordinal)?;
    // One GPU and no launcher: the all-reduce still goes through NCCL, as a smoke test.
    #[cfg(feature = "cuda")]
    let collective = match gpu_ordinal {
        Some(ordinal) if allreduce && !world.is_distributed() && collective.device().is_none() => {
            ditrun::dist::nccl_single_process(ordinal)?
        }
        _ => collective,
    };
    let options = BenchOptions {
        backend,
        batch,
        steps: steps.max(1),
        warmup,
        threads,
        clip_per_batch: clip,
        precision,
        model: TextDiTConfig::new(),
        text: ClipTextConfig::new(),
    };
    let what = if allreduce {
        BenchWhat::AllReduce
    } else if profile && world.is_primary() {
        BenchWhat::Profile
    } else {
        BenchWhat::Steps
    };
    let report = ditrun::with_backend!(backend, B => Ok(bench_on::<B>(&options, what, collective.as_ref())))??;
    if world.is_primary() {
        println!("{report}");
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Prepare(args) => prepare(args)?,
        Command::Train {
            job,
            overrides,
            resume,
            stop_after,
        } => train_rank(job, &overrides, &resume, stop_after)?,
        Command::Launch {
            nproc_per_node,
            nnodes,
            max_restarts,
            mpirun,
            mpirun_args,
            command,
        } => launch(
            &nproc_per_node,
            nnodes,
            max_restarts,
            mpirun,
            mpirun_args,
            command,
        )?,
        Command::Eval(args) => eval(args)?,
        Command::Sample {
            checkpoint,
            prompts,
            sampling,
            per_prompt,
            out,
            out_dir,
            cfg_sweep,
        } => {
            set_cpu_threads(all_cores());
            let options = sampling.options(per_prompt);
            for path in sample(
                &checkpoint,
                &prompts,
                &options,
                out.as_deref(),
                out_dir.as_deref(),
                cfg_sweep.as_deref(),
            )? {
                println!("{}", path.display());
            }
        }
        Command::Inspect { view: None, target } => {
            let target = target.expect("clap requires a target without a subcommand");
            println!(
                "{}",
                serde_json::to_string_pretty(&ditrun::inspect::inspect(&target)?)?
            );
        }
        Command::Inspect {
            view: Some(view), ..
        } => {
            set_cpu_threads(all_cores());
            inspect_model(view)?;
        }
        Command::Bench(args) => bench(args)?,
    }
    Ok(())
}

/// What `ditrun bench` measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BenchWhat {
    Steps,
    /// The steps, then each op alone (`--profile`).
    Profile,
    AllReduce,
}

/// `ditrun bench` on the backend `B`: its report as printed (a JSON line, and a table).
fn bench_on<B: burn::prelude::Backend>(
    options: &BenchOptions,
    what: BenchWhat,
    collective: &dyn ditrun::dist::Collective,
) -> anyhow::Result<String> {
    if what == BenchWhat::AllReduce {
        let report = bench::allreduce::<B>(
            options.backend,
            collective,
            bench::SEED_MODEL_PARAMS,
            options.steps,
        )?;
        return Ok(serde_json::to_string(&report).expect("a report serialises"));
    }
    let report = bench::run::<B>(options, collective)?;
    let line = serde_json::to_string(&report).expect("a report serialises");
    if what != BenchWhat::Profile {
        return Ok(line);
    }
    let table = bench::profile_step::<B>(options, report.context_tokens, report.step_s).table();
    Ok(format!("{line}\n\n{table}"))
}
