use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use ditrun::backend::{set_cpu_threads, BackendKind};
use ditrun::bench::{self, BenchOptions};
use ditrun::model::{ClipTextConfig, TextDiTConfig};

#[derive(Parser)]
#[command(name = "ditrun", version, about = "Train a text-conditional Diffusion Transformer with flow matching")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time full training steps of the seed model (loss, backward, AdamW) and print one JSON
    /// line with images/s.
    Bench {
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
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench { batch, steps, warmup, threads, backend, clip } => {
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
            });
            set_cpu_threads(threads);
            let report = bench::run(&BenchOptions {
                backend,
                batch,
                steps: steps.max(1),
                warmup,
                threads,
                clip_per_batch: clip,
                model: TextDiTConfig::new(),
                text: ClipTextConfig::new(),
            })?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}
