//! `strata`: build an index from a KV dump, evaluate retrieval against exact attention, inspect
//! an index.

mod bench;
mod eval;
mod inspect;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use strata_index::params::apply_overrides;
use strata_index::{build_index, BuildParams};
use strata_storage::kvdump::KvDump;

/// mimalloc instead of glibc's malloc: a decoding step allocates and frees its search buffers
/// on rayon's threads, and glibc returned that memory to the kernel and faulted it back in on
/// every step (thousands of `brk` calls per second in `strata bench decode`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Tiered KV-cache retrieval for long-context decoding"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the index of every layer and KV head of a kvdump/1 file.
    Build {
        /// The kvdump/1 file (safetensors).
        dump: PathBuf,
        /// Index folder to create.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing index folder.
        #[arg(long)]
        force: bool,
        /// Override a build parameter: `--set name=value` (names: `strata inspect --defaults`).
        #[arg(long = "set", value_name = "NAME=VALUE")]
        overrides: Vec<String>,
    },
    /// Run every evaluation query of the dump and compare with exact attention.
    Eval(eval::EvalArgs),
    /// Benchmarks: `strata bench decode` (decoding steps at 32K-1M tokens vs exact attention).
    Bench(bench::BenchArgs),
    /// Print an index's parameters and statistics (or the defaults with --defaults).
    Inspect {
        /// Index folder.
        dir: Option<PathBuf>,
        /// Print every parameter with its default and exit.
        #[arg(long)]
        defaults: bool,
        /// Also read every segment file in full and check its checksum.
        #[arg(long)]
        verify: bool,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Build {
            dump,
            out,
            force,
            overrides,
        } => {
            let params = apply_overrides(&BuildParams::default(), &overrides)?;
            let dump = KvDump::open(&dump)?;
            let total = dump.num_layers() * dump.meta.kv_heads;
            let bar = Arc::new(ProgressBar::new(total as u64));
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} heads ({elapsed})")
                    .context("progress bar template")?,
            );
            bar.set_message("clustering");
            let b2 = bar.clone();
            let progress = move |done: usize, _total: usize| b2.set_position(done as u64);
            let report = build_index(&dump, &params, &out, force, &progress)?;
            bar.finish_and_clear();
            println!(
                "built {} ({} layers x {} kv heads, {} tokens) into {} in {:.2} s: {} lists, {} replicas, {:.1} MiB of segments, {:.1} MiB in RAM",
                dump.meta.model,
                dump.num_layers(),
                dump.meta.kv_heads,
                dump.meta.tokens,
                out.display(),
                report.seconds,
                report.lists,
                report.replicas,
                report.segment_bytes as f64 / (1 << 20) as f64,
                report.index_bytes as f64 / (1 << 20) as f64,
            );
            Ok(())
        }
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Inspect {
            dir,
            defaults,
            verify,
        } => inspect::run(dir.as_deref(), defaults, verify),
    }
}
