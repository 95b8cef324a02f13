//! `strata bench decode`: decoding steps of a Llama-3-8B-shaped session (32 query heads, 8 KV
//! heads, head dim 128) over contexts of 32K-1M tokens, against exact CPU attention over the
//! same KV in the same run. Two exact baselines are timed on every warm step: the headline one
//! reads K and V once per KV head for its group of query heads (GQA); the other, once per query
//! head, as the first measurements did (four times the memory traffic).
//!
//! Keys, values and queries are resampled from the shared SmolLM2 dump: each synthetic 128-dim
//! head concatenates two real 64-dim heads (runs of consecutive real positions, so local
//! structure survives), plus a little noise. Queries of consecutive steps come from consecutive
//! real query positions, so they are as similar as real decoding queries are; the four query
//! heads of a group are four distinct pairs of the source's query heads. This is data for
//! speed and scale; quality claims come from `strata eval` on real dumps.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use strata_engine::attention::{merge, Attended};
use strata_engine::cpu::{attend_f32, attend_group_f16, attend_group_f32};
use strata_engine::metrics::output_error;
use strata_engine::{Engine, EngineParams, SessionSpec, StepTelemetry};
use strata_index::linalg::dot;
use strata_index::params::{apply_overrides, apply_owned_overrides, override_name};
use strata_index::{BuildParams, HeadArrays, SearchParams};
use strata_storage::kvdump::KvDump;
use strata_storage::reader::{open_reader, ReadRequest, ReaderPreference};

const Q_HEADS: usize = 32;
const KV_HEADS: usize = 8;
const DIM: usize = 128;
const MODEL_LAYERS: usize = 32;
/// Length of the runs of consecutive source positions a synthetic head is made of.
const RUN: usize = 256;
/// Noise added to resampled rows, relative to each channel's spread.
const NOISE: f32 = 0.02;
/// Largest context whose K/V the bench also keeps as f16 for the f16 exact baseline (half as
/// much again as the f32 source arrays: 0.5 GiB per layer at 128K).
const EXACT_F16_MAX_TOKENS: usize = 1 << 18;

#[derive(Args)]
pub struct BenchArgs {
    /// What to benchmark (only `decode` for now).
    what: String,
    /// Context sizes in tokens, comma-separated.
    #[arg(long, default_value = "32768,131072")]
    tokens: String,
    /// Layers of the 32 to materialise and step (a subset keeps 1M-token runs within disk).
    #[arg(long, default_value_t = 1)]
    layers: usize,
    /// Measured steps per phase (cold, warm).
    #[arg(long, default_value_t = 48)]
    steps: usize,
    /// Measured cold steps, when not `--steps` (few cold steps keep a profile of warm steps clean).
    #[arg(long)]
    cold_steps: Option<usize>,
    /// Extra steps with a small fold threshold, to measure steps while a fold runs.
    #[arg(long, default_value_t = 400)]
    fold_steps: usize,
    /// The shared SmolLM2 dump the KV is resampled from.
    #[arg(long, default_value = "../shared/data/smollm2-jargon-8k.safetensors")]
    source: PathBuf,
    /// Folder for the session folders (emptied first, unless `--reuse-index`).
    #[arg(long, default_value = "out/bench-decode")]
    root: PathBuf,
    /// Keep the session folders of an earlier run with the same `--root`, so that each context's
    /// index is reused (found by content hash) instead of rebuilt: for repeated timing runs.
    #[arg(long)]
    reuse_index: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Override a search, build or engine parameter: `--set name=value`.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    overrides: Vec<String>,
    /// RAM tier as a fraction of the index size for the prefetch phase (0 skips it).
    #[arg(long, default_value_t = 0.25)]
    tier_fraction: f64,
    /// Skip the exact-attention baseline.
    #[arg(long)]
    no_exact: bool,
}

/// Removes what earlier runs appended to the sessions under `root` (their tails), keeping each
/// base index: the next session over the same context starts from the prefill, as with a fresh
/// build, and the engine removes the delta indexes that no tail lists any more when it opens.
fn forget_appended_tokens(root: &std::path::Path) -> Result<()> {
    for session in std::fs::read_dir(root)? {
        let session = session?.path();
        if !session.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&session)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with("tail.strata") {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// Synthetic layer: per KV head, `tokens × DIM` keys and values.
struct Layer {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

/// The same layer stored as f16 (little-endian bytes), as a KV cache holds it.
struct LayerF16 {
    keys: Vec<Vec<u8>>,
    values: Vec<Vec<u8>>,
}

impl LayerF16 {
    fn of(layer: &Layer) -> LayerF16 {
        let halve = |heads: &[Vec<f32>]| -> Vec<Vec<u8>> {
            heads
                .iter()
                .map(|h| {
                    h.iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                        .collect()
                })
                .collect()
        };
        LayerF16 {
            keys: halve(&layer.keys),
            values: halve(&layer.values),
        }
    }

    fn bytes(&self) -> u64 {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|h| h.len() as u64)
            .sum()
    }
}

/// K and V of one layer, per KV head, that exact attention can run over.
trait ExactRows: Sync {
    /// Attention of `qs` over the first `rows` tokens of KV head `h` (all of them: `None`).
    fn attend(&self, h: usize, rows: Option<usize>, qs: &[&[f32]], scale: f32) -> Vec<Attended>;
}

impl ExactRows for Layer {
    fn attend(&self, h: usize, rows: Option<usize>, qs: &[&[f32]], scale: f32) -> Vec<Attended> {
        let n = rows.map_or(self.keys[h].len(), |r| r * DIM);
        attend_group_f32(&self.keys[h][..n], &self.values[h][..n], qs, scale, DIM)
    }
}

impl ExactRows for LayerF16 {
    fn attend(&self, h: usize, rows: Option<usize>, qs: &[&[f32]], scale: f32) -> Vec<Attended> {
        let n = rows.map_or(self.keys[h].len(), |r| r * DIM * 2);
        attend_group_f16(&self.keys[h][..n], &self.values[h][..n], qs, scale, DIM)
    }
}

struct Source {
    dump: KvDump,
    key_std: Vec<Vec<f32>>,
    value_std: Vec<Vec<f32>>,
}

fn channel_std(rows: &[f32], dim: usize) -> Vec<f32> {
    let n = (rows.len() / dim) as f32;
    (0..dim)
        .map(|d| {
            let mean = rows.iter().skip(d).step_by(dim).sum::<f32>() / n;
            let var = rows
                .iter()
                .skip(d)
                .step_by(dim)
                .map(|x| (x - mean).powi(2))
                .sum::<f32>()
                / n;
            var.sqrt()
        })
        .collect()
}

impl Source {
    fn open(path: &Path) -> Result<Source> {
        let dump = KvDump::open(path)?;
        if dump.query_positions.is_empty() {
            bail!("{}: no queries to drive the steps with", path.display());
        }
        if dump.meta.head_dim * 2 != DIM {
            bail!(
                "{}: head dim {} cannot make {DIM}-dim heads",
                path.display(),
                dump.meta.head_dim
            );
        }
        let mut key_std = Vec::new();
        let mut value_std = Vec::new();
        for l in 0..dump.num_layers() {
            for h in 0..dump.meta.kv_heads {
                key_std.push(channel_std(dump.keys.slice2(l, h), dump.meta.head_dim));
                value_std.push(channel_std(dump.values.slice2(l, h), dump.meta.head_dim));
            }
        }
        Ok(Source {
            dump,
            key_std,
            value_std,
        })
    }

    /// The two source (layer, kv head) pairs of synthetic KV head `h` of layer `layer`.
    fn pair(&self, layer: usize, h: usize) -> [(usize, usize); 2] {
        let (nl, nk) = (self.dump.num_layers(), self.dump.meta.kv_heads);
        let a = ((layer * KV_HEADS + h) % nl, h % nk);
        let b = ((a.0 + 2) % nl, (h + 1) % nk);
        [a, b]
    }

    /// Rows `[start, start + n)` of synthetic layer `layer`.
    fn rows(&self, layer: usize, start: usize, n: usize, seed: u64) -> Layer {
        let half = DIM / 2;
        let t_src = self.dump.meta.tokens;
        let mut keys = Vec::with_capacity(KV_HEADS);
        let mut values = Vec::with_capacity(KV_HEADS);
        let heads: Vec<(Vec<f32>, Vec<f32>)> = (0..KV_HEADS)
            .into_par_iter()
            .map(|h| {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                    seed ^ ((layer * 64 + h) as u64) << 32 ^ start as u64,
                );
                let mut k = vec![0f32; n * DIM];
                let mut v = vec![0f32; n * DIM];
                for (side, &(sl, sk)) in self.pair(layer, h).iter().enumerate() {
                    let (ks, vs) = (
                        self.dump.keys.slice2(sl, sk),
                        self.dump.values.slice2(sl, sk),
                    );
                    let std_i = sl * self.dump.meta.kv_heads + sk;
                    let mut src = rng.random_range(0..t_src);
                    for i in 0..n {
                        if (start + i).is_multiple_of(RUN) {
                            src = rng.random_range(0..t_src);
                        }
                        let s = (src + (start + i) % RUN) % t_src;
                        for d in 0..half {
                            let noise_k: f32 = rng.random::<f32>() - 0.5;
                            let noise_v: f32 = rng.random::<f32>() - 0.5;
                            k[i * DIM + side * half + d] =
                                ks[s * half + d] + NOISE * self.key_std[std_i][d] * noise_k;
                            v[i * DIM + side * half + d] =
                                vs[s * half + d] + NOISE * self.value_std[std_i][d] * noise_v;
                        }
                    }
                }
                (k, v)
            })
            .collect();
        for (k, v) in heads {
            keys.push(k);
            values.push(v);
        }
        Layer { keys, values }
    }

    /// The real query head (of the source KV head `sk`) that half `side` of synthetic query
    /// head `g` of its group comes from. Sides take `g mod 3` and `(g + ⌊g/3⌋) mod 3` of the
    /// source's three query heads per KV head, so the group's four heads are four distinct
    /// pairs ((0,0), (1,1), (2,2), (0,1)): no head of a group repeats another, which would
    /// flatter anything shared within the group.
    fn src_query_head(&self, sk: usize, g: usize, side: usize) -> usize {
        let src_group = self.dump.group_size();
        let within = if side == 0 { g } else { g + g / src_group };
        sk * src_group + within % src_group
    }

    /// Prefill queries of KV head `h`'s query heads (`rows × DIM`) for query-aware clustering:
    /// made from the dump's train queries the way step queries are made from its evaluation
    /// queries, so the index never sees the queries it is measured with.
    fn train_queries(&self, layer: usize, h: usize) -> Vec<f32> {
        let d = &self.dump;
        let half = DIM / 2;
        let Some(train) = d.train_queries.as_ref() else {
            return Vec::new();
        };
        let rows = train.shape[2];
        let group = Q_HEADS / KV_HEADS;
        let mut out = vec![0f32; group * rows * DIM];
        for g in 0..group {
            for (side, &(sl, sk)) in self.pair(layer, h).iter().enumerate() {
                let src_head = self.src_query_head(sk, g, side);
                for i in 0..rows {
                    let at = (g * rows + i) * DIM + side * half;
                    out[at..at + half].copy_from_slice(train.row(sl, src_head, i));
                }
            }
        }
        out
    }

    /// Queries of every query head for step `step` of layer `layer`.
    fn queries(&self, layer: usize, step: usize, rng: &mut impl Rng) -> Vec<f32> {
        let d = &self.dump;
        let half = DIM / 2;
        let qi = step % d.query_positions.len();
        let mut out = vec![0f32; Q_HEADS * DIM];
        let group = Q_HEADS / KV_HEADS;
        for qh in 0..Q_HEADS {
            let h = qh / group;
            for (side, &(sl, sk)) in self.pair(layer, h).iter().enumerate() {
                let src_head = self.src_query_head(sk, qh % group, side);
                let q = d.queries.row(sl, src_head, qi);
                for j in 0..half {
                    out[qh * DIM + side * half + j] =
                        q[j] * (1.0 + NOISE * (rng.random::<f32>() - 0.5));
                }
            }
        }
        out
    }
}

/// How a bench step is run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StepMode {
    Plain,
    /// The RAM tier is emptied before the step.
    Cold,
    /// Exact attention over the same KV is computed too, for time and output error.
    CheckedAgainstExact,
}

#[derive(Serialize, Default, Clone)]
struct Phase {
    steps: usize,
    step_us_p50: f64,
    step_us_p99: f64,
    step_us_max: f64,
    ssd_bytes_per_step: f64,
    ssd_reads_per_step: f64,
    ram_hit_rate: f64,
    prefetch_hit_rate: f64,
    search_us_per_head: f64,
    io_us_per_head: f64,
    attention_us_per_head: f64,
    /// `search_us_per_head` by phase (µs per query head; I/O is `io_us_per_head`).
    search_phases_us_per_head: PhasesUs,
    tokens_attended_per_head: f64,
    /// Bytes the searches read per step (centroids, codes, estimate statistics, full keys
    /// scored, values attended), summed over query heads: each head counts what it touched,
    /// even where a head of its group touched it first.
    search_bytes_per_step: f64,
}

/// [`strata_index::SearchPhases`] in µs per query head.
#[derive(Serialize, Clone, Default)]
struct PhasesUs {
    centroids: f64,
    codes: f64,
    select: f64,
    rerank: f64,
    estimate: f64,
    gather: f64,
}

#[derive(Serialize)]
struct ContextResult {
    tokens: usize,
    layers: usize,
    /// The probe fraction this context's searches used (see `bench_probe`).
    probe_fraction: f32,
    /// Seconds to build the index, or to open it when `index_reused`.
    build_seconds: f64,
    index_reused: bool,
    index_disk_bytes: u64,
    session_resident_bytes: u64,
    cold: Phase,
    warm: Phase,
    tier_limited: Vec<TierPhase>,
    /// Exact attention, one pass over K and V per KV head for its group of query heads.
    exact_us_p50: Option<f64>,
    speedup_vs_exact_warm_p50: Option<f64>,
    /// Exact attention one query head at a time (K and V read once per query head).
    exact_per_query_head_us_p50: Option<f64>,
    speedup_vs_exact_per_query_head_warm_p50: Option<f64>,
    /// Largest output error between the two exact baselines (they must agree).
    exact_baselines_max_difference: Option<f64>,
    /// Exact attention (GQA-aware) over the same K/V stored as f16, as a KV cache holds them:
    /// half the memory traffic of the f32 baseline. Not run above `EXACT_F16_MAX_TOKENS`.
    exact_f16_us_p50: Option<f64>,
    speedup_vs_exact_f16_warm_p50: Option<f64>,
    /// Its output error against the f32 exact attention (f16 rounding of K and V).
    exact_f16_output_error_mean: Option<f64>,
    output_error_vs_exact_mean: Option<f64>,
    /// The output error of exact top-`budget` attention without an estimate of the rest (see
    /// `oracle_attention`): what the same budget gives with perfect retrieval.
    oracle_output_error_mean: Option<f64>,
    fold: Option<FoldResult>,
    disk_probe: DiskProbe,
    /// Its passes read the warm step's search bytes: `pass_us_p50` is what reading them alone
    /// takes if every byte comes from DRAM (a group's query heads share many lists, so some
    /// come from the caches instead).
    ram_probe: RamProbe,
    peak_rss_bytes: u64,
    source_arrays_bytes: u64,
}

#[derive(Serialize, Clone)]
struct TierPhase {
    prefetch: bool,
    tier_bytes: u64,
    #[serde(flatten)]
    phase: Phase,
    /// Prefetched lists that a step then used, over all lists prefetched.
    prefetch_accuracy: f64,
}

#[derive(Serialize, Clone)]
struct FoldResult {
    steps: usize,
    steps_while_folding: usize,
    step_us_max_while_folding: f64,
    step_us_p50_while_folding: f64,
    step_us_max_otherwise: f64,
    folds_installed: u64,
}

/// The disk under a cold step's reads (see `DiskProber`).
#[derive(Serialize, Clone, Default, Debug)]
struct DiskProbe {
    reader: String,
    /// Passes timed: one after each cold step.
    passes: usize,
    /// Median reads per pass, their size (a cold step's mean read, rounded up to 4 KiB) and
    /// the batches they are issued in (a step's group fetches).
    reads: usize,
    read_bytes: usize,
    batches: usize,
    /// Median time of a pass: the SSD part of a cold step, as this disk serves it then.
    pass_us_p50: f64,
    /// All passes' bytes over all passes' time.
    mb_per_s: f64,
}

/// Scattered reads the size of an f16 key or value row, from arrays far larger than the CPU
/// caches, on every core with a prefetch running ahead: the rate at which a warm step's reads
/// can at best arrive from DRAM (see `probe_ram`).
#[derive(Serialize, Clone)]
struct RamProbe {
    row_bytes: usize,
    /// Bytes each timed pass reads: a warm step's search bytes.
    pass_bytes: u64,
    pass_us_p50: f64,
    gb_per_s: f64,
}

/// Timed passes of the RAM probe (the median is kept).
const RAM_PROBE_PASSES: usize = 7;

/// Rows the RAM probe's prefetch runs ahead (16 and 32 read alike on this machine; 0 read
/// about a fifth slower).
const RAM_PROBE_PREFETCH_ROWS: usize = 16;

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// The median of `v`, None when it is empty (a baseline that was not run).
fn median(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| percentile(v, 0.5))
}

/// The mean of `v`, None when it is empty.
fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The bench's search setting where it departs from `SearchParams::default()` (tuned on 8K–16K
/// real dumps): at 32K–1M tokens a 1% budget and a 5% probe, but never fewer than
/// `BENCH_PROBE_MIN_KEYS` keys probed. The floor comes from the oracle yardstick: at 32K, 5%
/// (1,638 keys) left the output error above exact top-1% attention's, 10% brought it below.
/// `--set` overrides them (an explicit `probe_fraction` is used as given, without the floor).
const BENCH_BUDGET: f32 = 0.01;
const BENCH_PROBE_FRACTION: f32 = 0.05;
const BENCH_PROBE_MIN_KEYS: usize = 4096;

/// The probe fraction for a context of `tokens`: the bench's, raised to its floor in keys,
/// unless `--set probe_fraction=…` chose one.
fn bench_probe(search: &SearchParams, overrides: &[String], tokens: usize) -> f32 {
    let chosen = overrides
        .iter()
        .any(|o| override_name(o) == "probe_fraction");
    if chosen {
        search.probe_fraction
    } else {
        search
            .probe_fraction
            .max(BENCH_PROBE_MIN_KEYS as f32 / tokens.max(1) as f32)
            .min(1.0)
    }
}

fn bench_params(o: &[String]) -> Result<(SearchParams, BuildParams, EngineParams)> {
    let search = SearchParams {
        budget: BENCH_BUDGET,
        probe_fraction: BENCH_PROBE_FRACTION,
        ..Default::default()
    };
    let (search, rest) = apply_owned_overrides(&search, o)?;
    let (build, rest) = apply_owned_overrides(&BuildParams::default(), &rest)?;
    let engine = apply_overrides(&EngineParams::default(), &rest)?;
    Ok((search, build, engine))
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.what != "decode" {
        bail!("unknown benchmark `{}` (known: decode)", args.what);
    }
    let sizes: Vec<usize> = args
        .tokens
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .with_context(|| format!("--tokens: `{s}`"))
        })
        .collect::<Result<_>>()?;
    if args.layers == 0 || args.layers > MODEL_LAYERS {
        bail!("--layers must be in 1..={MODEL_LAYERS}");
    }
    // Bounds that keep every size product of the bench far inside usize and u32.
    const MAX_TOKENS: usize = 1 << 26;
    const MAX_STEPS: usize = 1 << 20;
    if let Some(t) = sizes.iter().find(|&&t| t == 0 || t > MAX_TOKENS) {
        bail!("--tokens: {t} is outside 1..={MAX_TOKENS}");
    }
    let steps = [args.steps, args.cold_steps.unwrap_or(0), args.fold_steps];
    if steps.iter().any(|&s| s > MAX_STEPS) || args.steps == 0 {
        bail!("--steps must be in 1..={MAX_STEPS}, --cold-steps and --fold-steps at most that");
    }
    let (search, build, engine_params) = bench_params(&args.overrides)?;
    let source = Source::open(&args.source)?;
    println!(
        "bench decode: Llama-3-8B shape ({Q_HEADS} q heads, {KV_HEADS} kv heads, dim {DIM}), {} of {MODEL_LAYERS} layers, budget {:.2}% + {} sink + {} recent, probe {:.0}% (at least {BENCH_PROBE_MIN_KEYS} keys unless set), RAM budget {} MiB (tier {} MiB)",
        args.layers,
        search.budget * 100.0,
        search.sink_tokens,
        search.recent_tokens,
        search.probe_fraction * 100.0,
        engine_params.ram_budget_bytes >> 20,
        engine_params.ram_cache_bytes >> 20
    );
    let kernels = strata_index::simd::kernels();
    println!("  kernels: {kernels}");
    let mut results = Vec::new();
    for &tokens in &sizes {
        let search = SearchParams {
            probe_fraction: bench_probe(&search, &args.overrides, tokens),
            ..search.clone()
        };
        results.push(run_context(
            &args,
            &source,
            tokens,
            &search,
            &build,
            &engine_params,
        )?);
    }
    println!();
    println!(
        "{:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>10} {:>8} {:>10} {:>8} {:>8} {:>10} {:>9} {:>8} {:>9}",
        "tokens",
        "build s",
        "cold p50",
        "cold p99",
        "warm p50",
        "warm p99",
        "exact p50",
        "speedup",
        "exact/qh",
        "speedup",
        "exact f16",
        "speedup",
        "err",
        "oracle err",
        "ssdKB/st",
        "ram hit",
        "prefetch"
    );
    for r in &results {
        println!(
            "{:>8} {:>7.1} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>10.0} {:>8.1} {:>10.0} {:>8.1} {:>10.0} {:>8.1} {:>8.4} {:>10.4} {:>9.0} {:>8.3} {:>9.3}",
            r.tokens,
            r.build_seconds,
            r.cold.step_us_p50,
            r.cold.step_us_p99,
            r.warm.step_us_p50,
            r.warm.step_us_p99,
            r.exact_us_p50.unwrap_or(f64::NAN),
            r.speedup_vs_exact_warm_p50.unwrap_or(f64::NAN),
            r.exact_per_query_head_us_p50.unwrap_or(f64::NAN),
            r.speedup_vs_exact_per_query_head_warm_p50.unwrap_or(f64::NAN),
            r.exact_f16_us_p50.unwrap_or(f64::NAN),
            r.speedup_vs_exact_f16_warm_p50.unwrap_or(f64::NAN),
            r.output_error_vs_exact_mean.unwrap_or(f64::NAN),
            r.oracle_output_error_mean.unwrap_or(f64::NAN),
            r.cold.ssd_bytes_per_step / 1024.0,
            r.warm.ram_hit_rate,
            r.tier_limited.iter().find(|t| t.prefetch).map(|t| t.phase.prefetch_hit_rate).unwrap_or(f64::NAN),
        );
        let (w, ph) = (&r.warm, &r.warm.search_phases_us_per_head);
        println!(
            "{:>8}   warm search per query head: {:.0} us = centroids {:.0} + codes {:.0} + select {:.0} + re-rank {:.0} + estimate {:.0} + gather {:.0} + lists {:.0}",
            "", w.search_us_per_head, ph.centroids, ph.codes, ph.select, ph.rerank, ph.estimate, ph.gather, w.io_us_per_head
        );
        println!(
            "{:>8}   warm searches read {:.1} MB per step ({:.2} GB/s at the warm p50); the RAM probe read as many bytes in scattered {}-byte rows at {:.1} GB/s, in {:.0} us",
            "",
            w.search_bytes_per_step / 1e6,
            w.search_bytes_per_step / w.step_us_p50 / 1e3,
            r.ram_probe.row_bytes,
            r.ram_probe.gb_per_s,
            r.ram_probe.pass_us_p50
        );
        let (c, d) = (&r.cold, &r.disk_probe);
        println!(
            "{:>8}   cold p50 {:.0} us: {:.1} MB in {:.0} reads per step; as many {} KiB reads in {} batches took the disk probe {:.0} us (median of {} passes, one after each cold step; {:.0} MB/s), {:.0} us with the warm p50 on top",
            "",
            c.step_us_p50,
            c.ssd_bytes_per_step / 1e6,
            c.ssd_reads_per_step,
            d.read_bytes >> 10,
            d.batches,
            d.pass_us_p50,
            d.passes,
            d.mb_per_s,
            d.pass_us_p50 + r.warm.step_us_p50
        );
        for t in &r.tier_limited {
            println!(
                "{:>8}   tier {} MiB, prefetch {:<5}: p50 {:.0} us, p99 {:.0} us, RAM hit {:.3}, prefetch hit {:.3} (accuracy {:.3}), SSD {:.0} KiB/step",
                "",
                t.tier_bytes >> 20,
                t.prefetch,
                t.phase.step_us_p50,
                t.phase.step_us_p99,
                t.phase.ram_hit_rate,
                t.phase.prefetch_hit_rate,
                t.prefetch_accuracy,
                t.phase.ssd_bytes_per_step / 1024.0
            );
        }
        if let Some(f) = &r.fold {
            println!(
                "{:>8}   fold: {} of {} steps ran while a fold was building; max {:.0} us (p50 {:.0}) vs max {:.0} us otherwise; {} delta indexes installed",
                "", f.steps_while_folding, f.steps, f.step_us_max_while_folding, f.step_us_p50_while_folding, f.step_us_max_otherwise, f.folds_installed
            );
        }
    }
    if let Some(path) = &args.json {
        let v = serde_json::json!({
            "search_params": search, "build_params": build, "engine_params": engine_params,
            "layers": args.layers, "kernels": kernels, "results": results,
        });
        strata_storage::durable::atomic_write(path, &serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn run_context(
    args: &BenchArgs,
    source: &Source,
    tokens: usize,
    search: &SearchParams,
    build: &BuildParams,
    engine_params: &EngineParams,
) -> Result<ContextResult> {
    let root = args.root.join(format!("t{tokens}"));
    if root.exists() && !args.reuse_index {
        std::fs::remove_dir_all(&root)
            .with_context(|| format!("cannot empty {}", root.display()))?;
    }
    if root.exists() && args.reuse_index {
        forget_appended_tokens(&root)?;
    }
    let t0 = Instant::now();
    let layers: Vec<Layer> = (0..args.layers)
        .map(|l| source.rows(l, 0, tokens, 7))
        .collect();
    let source_bytes = (args.layers * KV_HEADS * tokens * DIM * 8) as u64;
    eprintln!(
        "  {tokens} tokens: synthetic KV ready in {:.1} s (probe {:.1}%)",
        t0.elapsed().as_secs_f64(),
        search.probe_fraction * 100.0
    );
    let spec = SessionSpec {
        // Named apart from the data of earlier builds (whose query heads repeated within a
        // group), so that `--reuse-index` never reopens an index fitted to other queries.
        model: "llama-3-8b-shaped (resampled SmolLM2, distinct group heads)".into(),
        layers: (0..args.layers).collect(),
        q_heads: Q_HEADS,
        kv_heads: KV_HEADS,
        head_dim: DIM,
        softmax_scale: vec![1.0 / (DIM as f32).sqrt(); args.layers],
        token_ids: (0..tokens as i64).collect(),
    };
    let train: Vec<Vec<f32>> = (0..args.layers)
        .flat_map(|l| (0..KV_HEADS).map(move |h| (l, h)))
        .map(|(l, h)| source.train_queries(l, h))
        .collect();
    let prefill: Vec<HeadArrays> = layers
        .iter()
        .flat_map(|l| l.keys.iter().zip(&l.values))
        .zip(&train)
        .map(|((k, v), q)| HeadArrays {
            keys: k,
            values: v,
            queries: q,
        })
        .collect();
    let engine = Engine::new(
        &root,
        engine_params.clone(),
        search.clone(),
        build.clone(),
        ReaderPreference::Auto,
    )?;
    let t0 = Instant::now();
    let id = engine.create_session(spec.clone(), Some(&prefill))?;
    let build_seconds = t0.elapsed().as_secs_f64();
    let info = engine.info(id)?;
    eprintln!(
        "  {tokens} tokens: index {} in {build_seconds:.1} s ({} MiB on disk)",
        if info.reused_index { "reused" } else { "built" },
        info.disk_bytes >> 20
    );

    // Steps append real-looking tokens after the prefill.
    let steps = args.steps;
    let cold_steps = args.cold_steps.unwrap_or(steps);
    let extra_tokens = cold_steps + 3 * steps + args.fold_steps + 40;
    let extra_layers: Vec<Layer> = (0..args.layers)
        .map(|l| source.rows(l, tokens, extra_tokens, 11))
        .collect();
    let mut qrng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut appended = 0usize;
    let mut errors = Vec::new();
    let mut exact_us = Vec::new();
    let mut exact_per_head_us = Vec::new();
    let mut exact_f16_us = Vec::new();
    let mut f16_error = Vec::new();
    let mut oracle_errors = Vec::new();
    let mut baselines_differ = 0f64;
    // The f16 copies for the f16 exact baseline (none when it is not run).
    let halves: Vec<(LayerF16, LayerF16)> = if args.no_exact || tokens > EXACT_F16_MAX_TOKENS {
        Vec::new()
    } else {
        layers
            .iter()
            .zip(&extra_layers)
            .map(|(p, e)| (LayerF16::of(p), LayerF16::of(e)))
            .collect()
    };
    // Runs `count` steps of every layer, each appending the next synthetic token.
    let mut run_steps =
        |engine: &Engine, id: u64, count: usize, mode: StepMode| -> Result<Vec<StepTelemetry>> {
            let mut out = Vec::with_capacity(count * args.layers);
            for _ in 0..count {
                for l in 0..args.layers {
                    if mode == StepMode::Cold {
                        engine.clear_cache();
                    }
                    let q = source.queries(l, appended, &mut qrng);
                    let row = |heads: &[Vec<f32>]| -> Vec<f32> {
                        heads
                            .iter()
                            .flat_map(|h| h[appended * DIM..(appended + 1) * DIM].iter().copied())
                            .collect()
                    };
                    let (nk, nv) = (row(&extra_layers[l].keys), row(&extra_layers[l].values));
                    let step = engine.step(id, l, &q, &nk, &nv)?;
                    if mode == StepMode::CheckedAgainstExact && !args.no_exact {
                        // Every baseline over the same KV and queries, each timed.
                        let (n, scale) = (appended + 1, spec.softmax_scale[l]);
                        let timed = |baseline: &dyn Fn() -> Vec<Vec<f32>>, times: &mut Vec<f64>| {
                            let t = Instant::now();
                            let out = baseline();
                            times.push(t.elapsed().as_secs_f64() * 1e6);
                            out
                        };
                        let (prefill, extra) = (&layers[l], &extra_layers[l]);
                        let exact = timed(
                            &|| exact_attention(prefill, extra, n, &q, scale),
                            &mut exact_us,
                        );
                        let per_head = timed(
                            &|| exact_attention_per_query_head(prefill, extra, n, &q, scale),
                            &mut exact_per_head_us,
                        );
                        for ((h, e), p) in step.heads.iter().zip(&exact).zip(&per_head) {
                            errors.push(output_error(&h.output, e));
                            baselines_differ = baselines_differ.max(output_error(p, e));
                        }
                        let oracle = oracle_attention(prefill, extra, n, &q, scale, search);
                        for (o, e) in oracle.iter().zip(&exact) {
                            oracle_errors.push(output_error(o, e));
                        }
                        if let Some((prefill, extra)) = halves.get(l) {
                            let f16 = timed(
                                &|| exact_attention(prefill, extra, n, &q, scale),
                                &mut exact_f16_us,
                            );
                            for (x, e) in f16.iter().zip(&exact) {
                                f16_error.push(output_error(x, e));
                            }
                        }
                    }
                    out.push(step.telemetry);
                }
                appended += 1;
            }
            Ok(out)
        };

    engine.set_prefetch(false);
    // Cold: the RAM tier is emptied before every step (segment reads are O_DIRECT, so the OS
    // page cache does not help either).
    // The disk's speed drifts from minute to minute: each cold step is followed by a probe of
    // the same reads, so that both medians come from the same stretch of time.
    let mut prober = DiskProber::open(&info.dir.join("index"))?;
    let mut cold = Vec::with_capacity(cold_steps * args.layers);
    for _ in 0..cold_steps {
        let t = run_steps(&engine, id, 1, StepMode::Cold)?;
        let reads: u64 = t.iter().map(|x| x.ssd_reads).sum();
        let bytes: u64 = t.iter().map(|x| x.ssd_bytes).sum();
        prober.pass(
            (reads as f64 / t.len().max(1) as f64).round() as usize,
            bytes as f64 / reads.max(1) as f64,
            KV_HEADS,
        )?;
        cold.extend(t);
    }
    let disk_probe = prober.summary();
    // Warm: the whole index placed in the RAM tier (it fits the default tier), a few steps,
    // then measured steps. Prefetch has nothing to add here; it is measured below with a tier
    // smaller than the index.
    let preloaded = engine.preload(id)?;
    eprintln!(
        "  {tokens} tokens: {} MiB of lists placed in the RAM tier",
        preloaded >> 20
    );
    run_steps(&engine, id, 8, StepMode::Plain)?;
    engine.reset_cache_stats();
    let warm = run_steps(&engine, id, steps, StepMode::CheckedAgainstExact)?;
    let cache = engine.cache_stats();
    let phase = |t: &[StepTelemetry], ram: f64, pre: f64| {
        let us: Vec<f64> = t.iter().map(|x| x.total_ns as f64 / 1e3).collect();
        let n = t.len().max(1) as f64;
        let heads = n * Q_HEADS as f64;
        Phase {
            steps: t.len(),
            step_us_p50: percentile(&us, 0.5),
            step_us_p99: percentile(&us, 0.99),
            step_us_max: us.iter().copied().fold(0.0, f64::max),
            ssd_bytes_per_step: t.iter().map(|x| x.ssd_bytes as f64).sum::<f64>() / n,
            ssd_reads_per_step: t.iter().map(|x| x.ssd_reads as f64).sum::<f64>() / n,
            ram_hit_rate: ram,
            prefetch_hit_rate: pre,
            search_us_per_head: t.iter().map(|x| x.search_ns as f64).sum::<f64>() / heads / 1e3,
            search_bytes_per_step: t.iter().map(|x| x.search_bytes as f64).sum::<f64>() / n,
            attention_us_per_head: t.iter().map(|x| x.attention_ns as f64).sum::<f64>()
                / heads
                / 1e3,
            io_us_per_head: t.iter().map(|x| x.io_ns as f64).sum::<f64>() / heads / 1e3,
            search_phases_us_per_head: {
                let per_head = |f: fn(&StepTelemetry) -> u64| {
                    t.iter().map(|x| f(x) as f64).sum::<f64>() / heads / 1e3
                };
                PhasesUs {
                    centroids: per_head(|x| x.search_phases.centroids_ns),
                    codes: per_head(|x| x.search_phases.codes_ns),
                    select: per_head(|x| x.search_phases.select_ns),
                    rerank: per_head(|x| x.search_phases.rerank_ns),
                    estimate: per_head(|x| x.search_phases.estimate_ns),
                    gather: per_head(|x| x.search_phases.gather_ns),
                }
            },
            tokens_attended_per_head: t.iter().map(|x| x.tokens_attended as f64).sum::<f64>()
                / heads,
        }
    };
    let lookups = (cache.hits + cache.misses).max(1) as f64;
    let warm_phase = phase(&warm, cache.hits as f64 / lookups, 0.0);
    let cold_phase = phase(&cold, 0.0, 0.0);
    let source_arrays: Vec<&[f32]> = layers
        .iter()
        .flat_map(|l| l.keys.iter().chain(&l.values))
        .map(|a| a.as_slice())
        .collect();
    let ram_probe = probe_ram(&source_arrays, warm_phase.search_bytes_per_step as u64);
    let resident = engine.info(id)?.resident_bytes;

    // Prefetch: a RAM tier smaller than the index, so steps keep needing lists from the SSD;
    // the same steps without and with prefetch.
    engine.close_session(id)?;
    let mut tier_limited = Vec::new();
    if engine_params.prefetch && args.tier_fraction > 0.0 {
        let tier = (info.disk_bytes as f64 * args.tier_fraction) as u64;
        let ep = EngineParams {
            ram_cache_bytes: tier,
            prefetch: true,
            ..engine_params.clone()
        };
        let e3 = Engine::new(
            &root,
            ep,
            search.clone(),
            build.clone(),
            ReaderPreference::Auto,
        )?;
        let id3 = e3.create_session(spec.clone(), None)?;
        for on in [false, true] {
            e3.set_prefetch(on);
            run_steps(&e3, id3, 8, StepMode::Plain)?;
            e3.reset_cache_stats();
            let t = run_steps(&e3, id3, steps, StepMode::Plain)?;
            let c = e3.cache_stats();
            log::debug!("tier phase (prefetch {on}): {c:?}");
            let lookups = (c.hits + c.misses).max(1) as f64;
            // Of the lists a step needed that were not already resident, the share the prefetch
            // had brought in before the step asked.
            let not_resident = (c.prefetch_hits + c.misses).max(1) as f64;
            tier_limited.push(TierPhase {
                prefetch: on,
                tier_bytes: tier,
                phase: phase(
                    &t,
                    c.hits as f64 / lookups,
                    c.prefetch_hits as f64 / not_resident,
                ),
                prefetch_accuracy: c.prefetch_hits as f64 / c.prefetch_insertions.max(1) as f64,
            });
        }
        e3.close_session(id3)?;
    }

    // Append with a small fold threshold: steps keep going while a fold builds in the background.
    let fold = if args.fold_steps > 0 {
        let fold_params = EngineParams {
            fold_tokens: (args.fold_steps / 3).max(64) as u32,
            ..engine_params.clone()
        };
        let e2 = Engine::new(
            &root,
            fold_params,
            search.clone(),
            build.clone(),
            ReaderPreference::Auto,
        )?;
        e2.set_prefetch(false);
        let id2 = e2.create_session(spec.clone(), None)?;
        // Warm, like the warm phase: otherwise the slowest steps "not folding" are this fresh
        // engine's first, cold ones, and the comparison says nothing about folds.
        e2.preload(id2)?;
        let t = run_steps(&e2, id2, args.fold_steps, StepMode::Plain)?;
        let us = |folding: bool| -> Vec<f64> {
            t.iter()
                .filter(|x| x.folding == folding)
                .map(|x| x.total_ns as f64 / 1e3)
                .collect()
        };
        let (lat_fold, lat_other) = (us(true), us(false));
        let deltas = t.iter().map(|x| x.deltas).max().unwrap_or(0);
        e2.finish_folds(id2)?;
        Some(FoldResult {
            steps: args.fold_steps,
            steps_while_folding: lat_fold.len(),
            step_us_max_while_folding: lat_fold.iter().copied().fold(0.0, f64::max),
            step_us_p50_while_folding: percentile(&lat_fold, 0.5),
            step_us_max_otherwise: lat_other.iter().copied().fold(0.0, f64::max),
            folds_installed: deltas,
        })
    } else {
        None
    };

    let exact_p50 = median(&exact_us);
    let exact_per_head_p50 = median(&exact_per_head_us);
    let exact_f16_p50 = median(&exact_f16_us);
    let warm_p50 = warm_phase.step_us_p50;
    Ok(ContextResult {
        tokens,
        probe_fraction: search.probe_fraction,
        layers: args.layers,
        build_seconds,
        index_reused: info.reused_index,
        index_disk_bytes: info.disk_bytes,
        session_resident_bytes: resident,
        cold: cold_phase,
        warm: warm_phase,
        tier_limited,
        exact_us_p50: exact_p50,
        speedup_vs_exact_warm_p50: exact_p50.map(|e| e / warm_p50),
        exact_per_query_head_us_p50: exact_per_head_p50,
        speedup_vs_exact_per_query_head_warm_p50: exact_per_head_p50.map(|e| e / warm_p50),
        exact_baselines_max_difference: exact_p50.map(|_| baselines_differ),
        exact_f16_us_p50: exact_f16_p50,
        speedup_vs_exact_f16_warm_p50: exact_f16_p50.map(|e| e / warm_p50),
        exact_f16_output_error_mean: mean(&f16_error),
        output_error_vs_exact_mean: mean(&errors),
        oracle_output_error_mean: mean(&oracle_errors),
        fold,
        disk_probe,
        ram_probe,
        peak_rss_bytes: peak_rss(),
        source_arrays_bytes: source_bytes
            + halves
                .iter()
                .map(|(p, e)| p.bytes() + e.bytes())
                .sum::<u64>(),
    })
}

/// Exact attention of all query heads over the prefill plus `appended` tokens (f32 or f16 rows,
/// both cores), one pass over K and V per KV head for its whole group of query heads (GQA): the
/// baseline a careful CPU implementation gives. The prefill and the appended part are attended
/// separately and merged by log-sum-exp, so nothing is copied.
fn exact_attention<L: ExactRows>(
    prefill: &L,
    extra: &L,
    appended: usize,
    q: &[f32],
    scale: f32,
) -> Vec<Vec<f32>> {
    let group = Q_HEADS / KV_HEADS;
    let per_kv: Vec<Vec<Vec<f32>>> = (0..KV_HEADS)
        .into_par_iter()
        .map(|h| {
            let qs: Vec<&[f32]> = (h * group..(h + 1) * group)
                .map(|qh| &q[qh * DIM..(qh + 1) * DIM])
                .collect();
            let a = prefill.attend(h, None, &qs, scale);
            let b = extra.attend(h, Some(appended), &qs, scale);
            a.into_iter()
                .zip(b)
                .map(|(x, y)| merge(&[x, y]).output)
                .collect()
        })
        .collect();
    per_kv.into_iter().flatten().collect()
}

/// The yardstick for a sparse answer at the same budget: attention of each query head over the
/// tokens the engine treats as static (sinks, appended tokens, recent window) plus the exact
/// top `budget` of the prefill by logit, with no estimate of the rest (the "oracle" of
/// `strata eval`). Not timed: it reads every key, as exact attention does.
fn oracle_attention(
    prefill: &Layer,
    extra: &Layer,
    appended: usize,
    q: &[f32],
    scale: f32,
    search: &SearchParams,
) -> Vec<Vec<f32>> {
    per_query_head(q, |h, qv| {
        let base = prefill.keys[h].len() / DIM;
        let position = base + appended - 1;
        let prefill_logits = logits(&prefill.keys[h], qv, scale);
        // The base index's own static rule: sinks and the window's overlap with it.
        let is_static = |t: usize| search.is_static(t, position);
        let mut open: Vec<usize> = (0..base).filter(|&t| !is_static(t)).collect();
        let k = search.budget_tokens(base - 1).min(open.len());
        if k < open.len() {
            open.select_nth_unstable_by(k, |&a, &b| {
                prefill_logits[b].total_cmp(&prefill_logits[a])
            });
        }
        let rows = (0..base)
            .filter(|&t| is_static(t))
            .chain(open[..k].iter().copied());
        let (mut attended, mut values) = (Vec::new(), Vec::new());
        for t in rows {
            attended.push(prefill_logits[t]);
            values.extend_from_slice(&prefill.values[h][t * DIM..(t + 1) * DIM]);
        }
        // Every appended token is static, as in the engine until its tail reaches `fold_tokens`
        // (4,096 by default, far more than the checked steps append).
        let n = appended * DIM;
        attended.extend(logits(&extra.keys[h][..n], qv, scale));
        values.extend_from_slice(&extra.values[h][..n]);
        attend_f32(&attended, &values, DIM).output
    })
}

/// `scale·q·k` for each `DIM`-wide key row.
fn logits(keys: &[f32], q: &[f32], scale: f32) -> Vec<f32> {
    keys.chunks_exact(DIM).map(|k| scale * dot(k, q)).collect()
}

/// `f(kv_head, query)` for every query head, in parallel, in query-head order.
fn per_query_head(q: &[f32], f: impl Fn(usize, &[f32]) -> Vec<f32> + Sync) -> Vec<Vec<f32>> {
    (0..Q_HEADS)
        .into_par_iter()
        .map(|qh| f(qh / (Q_HEADS / KV_HEADS), &q[qh * DIM..(qh + 1) * DIM]))
        .collect()
}

/// The same attention computed one query head at a time, each pass reading its KV head's K and
/// V again (the baseline of the first measurements, kept for comparison with them).
fn exact_attention_per_query_head(
    prefill: &Layer,
    extra: &Layer,
    appended: usize,
    q: &[f32],
    scale: f32,
) -> Vec<Vec<f32>> {
    per_query_head(q, |h, qv| {
        let part = |keys: &[f32], values: &[f32]| attend_f32(&logits(keys, qv, scale), values, DIM);
        let n = appended * DIM;
        merge(&[
            part(&prefill.keys[h], &prefill.values[h]),
            part(&extra.keys[h][..n], &extra.values[h][..n]),
        ])
        .output
    })
}

/// What the disk gives a cold step. Each pass reads as many reads as a step made, of its mean
/// size (4 KiB aligned, as lists are padded), at random places of a segment, in one batch per
/// group fetch (`batches`, one per KV head, each within its own region of the file and in file
/// order) issued from the rayon pool as the step's groups are. A batch of a few large
/// sequential reads would overstate what a step's ~20 KiB lists get.
struct DiskProber {
    seg: PathBuf,
    reader: Box<dyn strata_storage::reader::ListReader>,
    rng: rand_chacha::ChaCha8Rng,
    passes: Vec<ProbePass>,
}

/// One pass of the disk probe.
struct ProbePass {
    reads: usize,
    read_bytes: u64,
    batches: usize,
    us: f64,
}

impl DiskProber {
    fn open(index_dir: &Path) -> Result<DiskProber> {
        let seg = std::fs::read_dir(index_dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
            .context("no segment file to probe")?;
        let reader = open_reader(&seg, ReaderPreference::Auto)?;
        Ok(DiskProber {
            seg,
            reader,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(17),
            passes: Vec::new(),
        })
    }

    fn pass(&mut self, reads: usize, mean_read_bytes: f64, batches: usize) -> Result<()> {
        const ALIGN: u64 = 4096;
        let len = self.reader.file_len();
        let read_bytes =
            ((mean_read_bytes.max(1.0) as u64).div_ceil(ALIGN) * ALIGN).min(len / ALIGN * ALIGN);
        let (reads, batches) = (reads.max(1), batches.max(1));
        if read_bytes == 0 {
            bail!("segment {} is shorter than one read", self.seg.display());
        }
        // A segment holds its heads one after another, so a group fetch reads within one
        // head's share of the file: batch `b` reads within the `b`-th of `batches` regions.
        let per_batch = reads.div_ceil(batches);
        let region = (len / batches as u64).max(read_bytes);
        let slots = (region - read_bytes) / ALIGN + 1;
        // O_DIRECT skips the page cache; a fallback reader would not.
        strata_storage::reader::drop_page_cache(&self.seg);
        let rng = &mut self.rng;
        let mut reqs: Vec<ReadRequest> = (0..reads)
            .map(|i| {
                let start = ((i / per_batch) as u64 * region).min(len - region) / ALIGN * ALIGN;
                ReadRequest {
                    offset: start + rng.random_range(0..slots) * ALIGN,
                    len: read_bytes as usize,
                }
            })
            .collect();
        // A group fetch asks for its lists in id order, which is file order.
        reqs.chunks_mut(per_batch)
            .for_each(|batch| batch.sort_unstable_by_key(|r| r.offset));
        let t = Instant::now();
        let reader = &self.reader;
        reqs.par_chunks(per_batch)
            .map(|batch| reader.read_batch(batch).map(|_| ()))
            .collect::<Result<Vec<()>, _>>()?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        self.passes.push(ProbePass {
            reads,
            read_bytes,
            batches,
            us,
        });
        Ok(())
    }

    fn summary(&self) -> DiskProbe {
        let p50 = |f: fn(&ProbePass) -> f64| {
            percentile(&self.passes.iter().map(f).collect::<Vec<_>>(), 0.5)
        };
        let bytes: f64 = self
            .passes
            .iter()
            .map(|p| p.reads as f64 * p.read_bytes as f64)
            .sum();
        let us: f64 = self.passes.iter().map(|p| p.us).sum();
        DiskProbe {
            reader: self.reader.kind().to_string(),
            passes: self.passes.len(),
            reads: p50(|p| p.reads as f64) as usize,
            read_bytes: p50(|p| p.read_bytes as f64) as usize,
            batches: p50(|p| p.batches as f64) as usize,
            pass_us_p50: p50(|p| p.us),
            mb_per_s: if us > 0.0 { bytes / us } else { 0.0 },
        }
    }
}

/// Reads `pass_bytes` in rows of `DIM` f16 (256 bytes) at random places of `arrays` (the
/// source K/V: hundreds of MB, far beyond the CPU caches), on every core, with a prefetch
/// `RAM_PROBE_PREFETCH_ROWS` ahead as the search does; one byte of each cache line is enough
/// to bring the line in.
fn probe_ram(arrays: &[&[f32]], pass_bytes: u64) -> RamProbe {
    let row_bytes = DIM * std::mem::size_of::<half::f16>();
    let rows_in = |a: &[f32]| std::mem::size_of_val(a) / row_bytes;
    let rows = (pass_bytes as usize / row_bytes).max(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let mut times = Vec::with_capacity(RAM_PROBE_PASSES);
    for _ in 0..RAM_PROBE_PASSES {
        let picks: Vec<&[u8]> = (0..rows)
            .map(|_| {
                let a = arrays[rng.random_range(0..arrays.len())];
                let r = rng.random_range(0..rows_in(a));
                &bytemuck::cast_slice::<f32, u8>(a)[r * row_bytes..(r + 1) * row_bytes]
            })
            .collect();
        let t = Instant::now();
        let touched: u64 = picks
            .par_chunks(rows.div_ceil(64))
            .map(|chunk| {
                let mut sum = 0u64;
                for (i, row) in chunk.iter().enumerate() {
                    if let Some(ahead) = chunk.get(i + RAM_PROBE_PREFETCH_ROWS) {
                        strata_index::simd::prefetch(ahead);
                    }
                    sum += row.iter().step_by(64).map(|&b| b as u64).sum::<u64>();
                }
                sum
            })
            .sum();
        times.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(touched);
    }
    let us = percentile(&times, 0.5);
    let read = (rows * row_bytes) as u64;
    RamProbe {
        row_bytes,
        pass_bytes: read,
        pass_us_p50: us,
        gb_per_s: read as f64 / us / 1e3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_floor_applies_unless_a_probe_is_set() {
        let search = SearchParams {
            probe_fraction: BENCH_PROBE_FRACTION,
            ..Default::default()
        };
        // 4,096 keys of 32K are 12.5%; 5% of 128K is more than the floor.
        assert_eq!(bench_probe(&search, &[], 32768), 0.125);
        assert_eq!(bench_probe(&search, &[], 131072), BENCH_PROBE_FRACTION);
        assert_eq!(bench_probe(&search, &["budget=0.02".into()], 2048), 1.0);
        // An explicit probe is used as given.
        assert_eq!(
            bench_probe(&search, &["probe_fraction=0.05".into()], 32768),
            0.05
        );
    }

    #[test]
    fn the_ram_probe_reads_whole_rows_of_what_it_is_asked() {
        let arrays = [vec![1f32; 1 << 16], vec![2f32; 1 << 15]];
        let views: Vec<&[f32]> = arrays.iter().map(|a| a.as_slice()).collect();
        let p = probe_ram(&views, 1_000_000);
        assert_eq!(p.row_bytes, 256);
        assert_eq!(p.pass_bytes, 1_000_000 / 256 * 256);
        assert!(p.pass_us_p50 > 0.0 && p.gb_per_s.is_finite() && p.gb_per_s > 0.0);
    }

    #[test]
    fn the_disk_probe_reads_a_steps_worth_in_aligned_batches() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("layer-000.seg"), vec![7u8; 1 << 20]).unwrap();
        let mut prober = DiskProber::open(dir.path()).unwrap();
        for reads in [10, 12, 14] {
            prober.pass(reads, 5000.0, 3).unwrap();
        }
        let p = prober.summary();
        assert_eq!(
            (p.passes, p.reads, p.read_bytes, p.batches),
            (3, 12, 8192, 3)
        );
        assert!(p.pass_us_p50 > 0.0 && p.mb_per_s > 0.0);
        // A segment shorter than one aligned read is refused, by name.
        std::fs::write(dir.path().join("layer-000.seg"), vec![7u8; 1000]).unwrap();
        let mut short = DiskProber::open(dir.path()).unwrap();
        let e = short.pass(10, 5000.0, 3).unwrap_err().to_string();
        assert!(
            e.contains("layer-000.seg") && e.contains("shorter than one read"),
            "{e}"
        );
        // No segment at all.
        let empty = tempfile::tempdir().unwrap();
        let e = DiskProber::open(empty.path()).err().unwrap().to_string();
        assert!(e.contains("no segment file"), "{e}");
    }
}
