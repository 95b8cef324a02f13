//! `strata eval`: every evaluation query of every layer and query head of a dump, through one or
//! more retrieval methods, scored against exact attention with the metrics of DESIGN.md.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use strata_engine::attention::{attend_logits, merge, Attended};
use strata_engine::metrics::{covered_mass, output_error, recall_at_k, ExactAttention};
use strata_engine::EngineParams;
use strata_index::baselines::exact::Exact;
use strata_index::baselines::hnsw::HnswIp;
use strata_index::baselines::ivf::PlainIvf;
use strata_index::baselines::{BaselineParams, HeadRetriever};
use strata_index::linalg::dot;
use strata_index::params::{apply_overrides, apply_owned_overrides, override_name, param_rows};
use strata_index::search::log_sum_exp;
#[cfg(not(feature = "faiss"))]
use strata_index::IndexError;
use strata_index::{Index, Retrieved, SearchParams};
use strata_storage::cache::RamCache;
use strata_storage::kvdump::KvDump;
use strata_storage::reader::{drop_page_cache, ReaderPreference};

/// Methods `strata eval` knows, in the order `all` runs them.
const METHODS: [&str; 6] = ["exact", "oracle", "strata", "ivf", "ivf-faiss", "hnsw"];

#[derive(Args)]
pub struct EvalArgs {
    /// The kvdump/1 file.
    dump: PathBuf,
    /// Index folder built from the same dump (needed by `strata`).
    #[arg(long)]
    index: Option<PathBuf>,
    /// Attended tokens beyond the static ones, as a fraction of visible keys, in (0, 1]
    /// (default: `SearchParams`' budget, or `--set budget=…`).
    #[arg(long)]
    budget: Option<f32>,
    /// Adaptive budget (strata only): attend tokens in descending exact score until the
    /// estimated covered mass, static tokens included, reaches this target in (0, 1]; never more
    /// than `--budget`.
    #[arg(long)]
    target_mass: Option<f32>,
    /// Comma-separated methods: strata, exact, oracle, ivf (plain k-means IVF), ivf-faiss, hnsw,
    /// or `all`.
    #[arg(long, default_value = "strata")]
    method: String,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Override a search or baseline parameter: `--set name=value`.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    overrides: Vec<String>,
    /// Empty the RAM tier (and the OS page cache of the segments) before every query.
    #[arg(long)]
    cold: bool,
    /// Segment reader: auto, uring, pread or mmap.
    #[arg(long, default_value = "auto")]
    reader: String,
    /// Evaluate only every n-th query position (1 = all).
    #[arg(long, default_value_t = 1)]
    query_stride: usize,
    /// Leave the per-query `attended` lists out of the JSON.
    #[arg(long)]
    no_query_detail: bool,
}

#[derive(Default, Clone, Serialize)]
struct Summary {
    #[serde(rename = "recall@10")]
    recall_10: f64,
    #[serde(rename = "recall@100")]
    recall_100: f64,
    covered_mass: f64,
    /// Error of the output the engine returns: the exact part merged with the remainder
    /// estimate when the method gives one.
    output_error: f64,
    /// Error of the exact part alone (static ∪ attended), without the remainder estimate.
    output_error_exact_only: f64,
    attended_fraction: f64,
    scored_fraction: f64,
    bytes_read_fraction: f64,
    /// Whole posting lists fetched from the tiers (ids, keys and values of every member), as a
    /// share of the visible keys' fp16 K+V: the list-granular traffic behind the rows counted in
    /// `bytes_read_fraction`. 0 for the in-RAM baselines.
    list_bytes_fraction: f64,
    /// `bytes_read_fraction` by part: centroids, codes, estimate statistics, full keys scored,
    /// values attended.
    bytes_by_part: BytesByPart,
    ssd_bytes_per_query: f64,
    ssd_reads_per_query: f64,
    ram_hit_rate: f64,
    search_us_p50: f64,
    search_us_p99: f64,
    search_us_mean: f64,
    queries: usize,
}

#[derive(Serialize, Default, Clone, Copy)]
struct BytesByPart {
    centroids: f64,
    codes: f64,
    estimate: f64,
    keys: f64,
    values: f64,
}

#[derive(Default)]
struct Acc {
    sums: [f64; 16],
    lists: f64,
    lists_ram: f64,
    times_us: Vec<f64>,
    n: usize,
}

impl Acc {
    fn add(&mut self, m: &QueryMetrics) {
        let v = [
            m.recall_10,
            m.recall_100,
            m.covered_mass,
            m.output_error,
            m.attended_fraction,
            m.scored_fraction,
            m.bytes_read_fraction,
            m.ssd_bytes,
            m.ssd_reads,
            m.output_error_exact_only,
            m.list_bytes_fraction,
            m.bytes_by_part.centroids,
            m.bytes_by_part.codes,
            m.bytes_by_part.estimate,
            m.bytes_by_part.keys,
            m.bytes_by_part.values,
        ];
        for (s, x) in self.sums.iter_mut().zip(v) {
            *s += x;
        }
        self.lists += m.lists_read;
        self.lists_ram += m.lists_from_ram;
        self.times_us.push(m.search_us);
        self.n += 1;
    }

    fn merge(&mut self, o: &Acc) {
        for (s, x) in self.sums.iter_mut().zip(o.sums) {
            *s += x;
        }
        self.lists += o.lists;
        self.lists_ram += o.lists_ram;
        self.times_us.extend_from_slice(&o.times_us);
        self.n += o.n;
    }

    fn summary(&self) -> Summary {
        let n = self.n.max(1) as f64;
        let mut t = self.times_us.clone();
        t.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            if t.is_empty() {
                0.0
            } else {
                t[((t.len() - 1) as f64 * p).round() as usize]
            }
        };
        Summary {
            recall_10: self.sums[0] / n,
            recall_100: self.sums[1] / n,
            covered_mass: self.sums[2] / n,
            output_error: self.sums[3] / n,
            output_error_exact_only: self.sums[9] / n,
            attended_fraction: self.sums[4] / n,
            scored_fraction: self.sums[5] / n,
            bytes_read_fraction: self.sums[6] / n,
            list_bytes_fraction: self.sums[10] / n,
            bytes_by_part: BytesByPart {
                centroids: self.sums[11] / n,
                codes: self.sums[12] / n,
                estimate: self.sums[13] / n,
                keys: self.sums[14] / n,
                values: self.sums[15] / n,
            },
            ssd_bytes_per_query: self.sums[7] / n,
            ssd_reads_per_query: self.sums[8] / n,
            ram_hit_rate: if self.lists > 0.0 {
                self.lists_ram / self.lists
            } else {
                0.0
            },
            search_us_p50: pct(0.5),
            search_us_p99: pct(0.99),
            search_us_mean: t.iter().sum::<f64>() / t.len().max(1) as f64,
            queries: self.n,
        }
    }
}

struct QueryMetrics {
    recall_10: f64,
    recall_100: f64,
    covered_mass: f64,
    /// Error of the output the engine returns: the exact part merged with the remainder
    /// estimate when the method gives one.
    output_error: f64,
    /// Error of the exact part alone (static ∪ attended), without the remainder estimate.
    output_error_exact_only: f64,
    attended_fraction: f64,
    scored_fraction: f64,
    bytes_read_fraction: f64,
    list_bytes_fraction: f64,
    bytes_by_part: BytesByPart,
    ssd_bytes: f64,
    ssd_reads: f64,
    lists_read: f64,
    lists_from_ram: f64,
    search_us: f64,
}

#[derive(Serialize)]
struct QueryRecord {
    layer: usize,
    head: usize,
    query: usize,
    position: usize,
    attended: Vec<u32>,
}

#[derive(Serialize)]
struct LayerSummary {
    layer: usize,
    model_layer: usize,
    #[serde(flatten)]
    summary: Summary,
}

#[derive(Serialize)]
struct HeadSummary {
    layer: usize,
    head: usize,
    #[serde(flatten)]
    summary: Summary,
}

#[derive(Serialize)]
struct RunReport {
    method: String,
    dump: String,
    model: String,
    budget: f32,
    target_mass: Option<f32>,
    cold: bool,
    reader: Option<String>,
    search_params: SearchParams,
    baseline_params: BaselineParams,
    summary: Summary,
    per_layer: Vec<LayerSummary>,
    per_head: Vec<HeadSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queries: Option<Vec<QueryRecord>>,
}

fn parse_methods(s: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for m in s.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        if m == "all" {
            out.extend(METHODS.iter().map(|m| m.to_string()));
        } else if METHODS.contains(&m) {
            out.push(m.to_string());
        } else {
            bail!("unknown method `{m}` (known: {}, all)", METHODS.join(", "));
        }
    }
    if out.is_empty() {
        bail!("no method given");
    }
    out.dedup();
    Ok(out)
}

pub fn run(args: EvalArgs) -> Result<()> {
    let methods = parse_methods(&args.method)?;
    // `--set` names go to whichever parameter struct owns them; unknown names are an error.
    let (mut params, rest) = apply_owned_overrides(&SearchParams::default(), &args.overrides)?;
    let (engine, rest) = apply_owned_overrides(&EngineParams::default(), &rest)?;
    // Eval opens an index, not an engine: of the engine's parameters only the RAM tier applies.
    if let Some(o) = args.overrides.iter().find(|o| {
        let name = override_name(o);
        name != "ram_cache_bytes"
            && param_rows(&EngineParams::default())
                .iter()
                .any(|(n, _)| n == name)
    }) {
        bail!("--set {o}: eval uses no engine parameter but ram_cache_bytes");
    }
    if let Some(b) = args.budget {
        if args.overrides.iter().any(|o| override_name(o) == "budget") {
            bail!("--budget and --set budget=… both given; use one");
        }
        params.budget = b;
    }
    if args.target_mass.is_some() {
        params.target_mass = args.target_mass;
    }
    params.validate()?;
    let baseline = apply_overrides(&BaselineParams::default(), &rest)?;
    baseline.validate()?;
    if args.query_stride == 0 {
        bail!("--query-stride must be at least 1");
    }
    let reader: ReaderPreference = args
        .reader
        .parse()
        .map_err(|e| anyhow::anyhow!("--reader: {e}"))?;
    let dump = KvDump::open(&args.dump)?;
    if dump.query_positions.is_empty() {
        bail!("{} holds no evaluation queries", args.dump.display());
    }

    let index = if methods.iter().any(|m| m == "strata") {
        let dir = args
            .index
            .as_ref()
            .context("method strata needs --index DIR (build one with `strata build`)")?;
        let cache = Arc::new(RamCache::new(engine.ram_cache_bytes));
        let index = Index::open(dir, reader, cache)?;
        let src = &index.manifest().source;
        if src.content_hash.to_native() != dump.content_hash()
            || src.head_dim.to_native() as usize != dump.meta.head_dim
            || src.kv_heads.to_native() as usize != dump.meta.kv_heads
            || src.layers.len() != dump.num_layers()
        {
            bail!(
                "index {} was built from {} (another context or shape than {})",
                dir.display(),
                src.dump_path,
                args.dump.display()
            );
        }
        Some(index)
    } else {
        None
    };

    let mut reports = Vec::new();
    for method in &methods {
        let report = run_method(method, &dump, index.as_ref(), &params, &baseline, &args)?;
        reports.push(report);
    }
    print_table(&reports, &dump);
    if let Some(path) = &args.json {
        let value = if reports.len() == 1 {
            serde_json::to_value(&reports[0])?
        } else {
            serde_json::json!({ "runs": reports })
        };
        // Atomic: a full disk leaves no truncated file behind at the path.
        strata_storage::durable::atomic_write(path, &serde_json::to_vec(&value)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn run_method(
    method: &str,
    dump: &KvDump,
    index: Option<&Index>,
    params: &SearchParams,
    baseline: &BaselineParams,
    args: &EvalArgs,
) -> Result<RunReport> {
    let meta = &dump.meta;
    let dim = meta.head_dim;
    let group = dump.group_size();
    let n_queries = dump.query_positions.len();
    let mut per_layer_acc: Vec<Acc> = (0..dump.num_layers()).map(|_| Acc::default()).collect();
    let mut per_head = Vec::new();
    let mut records = Vec::new();
    let started = std::time::Instant::now();
    if let Some(ix) = index {
        ix.cache().clear();
        ix.cache().reset_stats();
    }

    #[allow(clippy::needless_range_loop)]
    // l indexes the dump, the accumulators and the index alike
    for l in 0..dump.num_layers() {
        let scale = meta.softmax_scale[l];
        for kvh in 0..meta.kv_heads {
            let keys = dump.keys.slice2(l, kvh);
            let values = dump.values.slice2(l, kvh);
            let prepared: Option<Box<dyn HeadRetriever + '_>> = match method {
                "exact" => Some(Box::new(Exact {
                    keys,
                    dim,
                    full: true,
                })),
                "oracle" => Some(Box::new(Exact {
                    keys,
                    dim,
                    full: false,
                })),
                "ivf" => Some(Box::new(PlainIvf::build(keys, dim, baseline))),
                "hnsw" => Some(Box::new(HnswIp::build(keys, dim, baseline))),
                "ivf-faiss" => Some(faiss_baseline(keys, dim, baseline)?),
                _ => None,
            };
            for qh in kvh * group..(kvh + 1) * group {
                let mut acc = Acc::default();
                for qi in (0..n_queries).step_by(args.query_stride) {
                    let position = dump.query_positions[qi];
                    let q = dump.queries.row(l, qh, qi);
                    if args.cold {
                        if let Some(ix) = index {
                            ix.cache().clear();
                            for seg in ix.segments() {
                                drop_page_cache(seg.path());
                            }
                        }
                    }
                    let retrieved = match (&prepared, index) {
                        (Some(p), _) => p.retrieve(q, position, params)?,
                        (None, Some(ix)) => {
                            // The engine attends the static tokens itself and knows their
                            // log-sum-exp exactly; the adaptive budget counts it as covered.
                            let static_lse =
                                static_log_sum_exp(q, position, keys, dim, scale, params);
                            ix.search_with_static(l, kvh, q, position, params, Some(static_lse))?
                        }
                        (None, None) => bail!("method {method} has no index"),
                    };
                    let (m, attended) = score_query(
                        method, &retrieved, q, position, keys, values, dim, scale, params,
                    )
                    .with_context(|| {
                        format!("layer {l} head {qh} query {qi} (position {position})")
                    })?;
                    acc.add(&m);
                    if !args.no_query_detail {
                        records.push(QueryRecord {
                            layer: l,
                            head: qh,
                            query: qi,
                            position,
                            attended,
                        });
                    }
                }
                per_head.push(HeadSummary {
                    layer: l,
                    head: qh,
                    summary: acc.summary(),
                });
                per_layer_acc[l].merge(&acc);
            }
        }
        eprintln!(
            "  {method}: layer {} done ({:.1} s)",
            meta.layers[l],
            started.elapsed().as_secs_f64()
        );
    }
    let mut total = Acc::default();
    for a in &per_layer_acc {
        total.merge(a);
    }
    Ok(RunReport {
        method: method.to_string(),
        dump: dump.path.display().to_string(),
        model: meta.model.clone(),
        budget: params.budget,
        target_mass: params.target_mass,
        cold: args.cold,
        reader: index
            .filter(|_| method == "strata")
            .and_then(|i| i.reader_kind())
            .map(|k| k.to_string()),
        search_params: params.clone(),
        baseline_params: baseline.clone(),
        summary: total.summary(),
        per_layer: per_layer_acc
            .iter()
            .enumerate()
            .map(|(l, a)| LayerSummary {
                layer: l,
                model_layer: meta.layers[l],
                summary: a.summary(),
            })
            .collect(),
        per_head,
        queries: (!args.no_query_detail).then_some(records),
    })
}

#[cfg(feature = "faiss")]
fn faiss_baseline<'a>(
    keys: &'a [f32],
    dim: usize,
    baseline: &BaselineParams,
) -> Result<Box<dyn HeadRetriever + 'a>> {
    Ok(Box::new(
        strata_index::baselines::faiss_ivf::FaissIvfFlat::build(keys, dim, baseline)?,
    ))
}

#[cfg(not(feature = "faiss"))]
fn faiss_baseline<'a>(
    _keys: &'a [f32],
    _dim: usize,
    _baseline: &BaselineParams,
) -> Result<Box<dyn HeadRetriever + 'a>> {
    Err(IndexError::Baseline {
        name: "ivf-faiss",
        problem: "this binary was built without the `faiss` feature (cargo build --features faiss)"
            .into(),
    }
    .into())
}

/// Checks what a method returned and computes the metrics of one query. The attended set is
/// the static tokens plus the retrieved ones; the output is attention over exactly that set.
#[allow(clippy::too_many_arguments)]
fn score_query(
    method: &str,
    r: &Retrieved,
    q: &[f32],
    position: usize,
    keys: &[f32],
    values: &[f32],
    dim: usize,
    scale: f32,
    params: &SearchParams,
) -> Result<(QueryMetrics, Vec<u32>)> {
    let visible = position + 1;
    let budget = params.budget_tokens(position);
    // Never score a wrong answer silently: check the method kept the rules.
    if method != "exact" && r.tokens.len() > budget {
        bail!(
            "{method} returned {} tokens, budget {budget}",
            r.tokens.len()
        );
    }
    let mut attended = vec![false; visible];
    for &t in &r.tokens {
        let t = t as usize;
        if t >= visible || params.is_static(t, position) || attended[t] {
            bail!("{method} returned token {t}, which is future, static or repeated");
        }
        attended[t] = true;
    }
    let statics = params.static_tokens(position);
    for &t in &statics {
        attended[t as usize] = true;
    }

    let logits: Vec<f32> = keys[..visible * dim]
        .chunks_exact(dim)
        .map(|k| scale * dot(k, q))
        .collect();
    let exact = ExactAttention::new(&logits, &values[..visible * dim], dim);

    // Output over the attended set, with the values the method read where it read them.
    let n_att = statics.len() + r.tokens.len();
    let mut sub_logits = Vec::with_capacity(n_att);
    let mut sub_values = Vec::with_capacity(n_att * dim);
    for &t in &statics {
        sub_logits.push(logits[t as usize]);
        sub_values.extend_from_slice(&values[t as usize * dim..(t as usize + 1) * dim]);
    }
    for (i, &t) in r.tokens.iter().enumerate() {
        sub_logits.push(scale * r.scores[i]);
        match &r.values {
            Some(v) => sub_values.extend_from_slice(&v[i * dim..(i + 1) * dim]),
            None => sub_values.extend_from_slice(&values[t as usize * dim..(t as usize + 1) * dim]),
        }
    }
    let exact_part = attend_logits(&sub_logits, &sub_values, dim);
    let engine_output = match &r.remainder {
        Some(rem) => {
            if rem.output.len() != dim || rem.lse.is_nan() || rem.lse == f32::INFINITY {
                bail!(
                    "{method} returned a remainder of {} dims with lse {}",
                    rem.output.len(),
                    rem.lse
                );
            }
            merge(&[
                exact_part.clone(),
                Attended {
                    output: rem.output.clone(),
                    lse: rem.lse,
                },
            ])
        }
        None => exact_part.clone(),
    };

    let s = &r.stats;
    let kv_bytes = (visible * dim * 2 * 2) as f64;
    // The whole lists strata's tiers moved to get the rows read are reported apart
    // (`list_bytes_fraction`).
    let bytes = s.bytes_read();
    let mut ids: Vec<u32> = (0..visible as u32)
        .filter(|&t| attended[t as usize])
        .collect();
    ids.sort_unstable();
    Ok((
        QueryMetrics {
            recall_10: recall_at_k(&exact.top_k(10), &attended),
            recall_100: recall_at_k(&exact.top_k(100), &attended),
            covered_mass: covered_mass(&exact.probs, &attended),
            output_error: output_error(&engine_output.output, &exact.output),
            output_error_exact_only: output_error(&exact_part.output, &exact.output),
            attended_fraction: r.tokens.len() as f64 / visible as f64,
            // Read or scored (DESIGN.md): a list read brings all its members' keys.
            scored_fraction: (s.centroids_scored + s.keys_scored.max(s.keys_read)) as f64
                / visible as f64,
            bytes_read_fraction: bytes as f64 / kv_bytes,
            list_bytes_fraction: s.list_bytes as f64 / kv_bytes,
            bytes_by_part: BytesByPart {
                centroids: s.centroid_bytes as f64 / kv_bytes,
                codes: s.code_bytes as f64 / kv_bytes,
                estimate: s.estimate_bytes as f64 / kv_bytes,
                keys: s.key_bytes as f64 / kv_bytes,
                values: s.value_bytes as f64 / kv_bytes,
            },
            ssd_bytes: s.ssd_bytes as f64,
            ssd_reads: s.ssd_reads as f64,
            lists_read: s.lists_read as f64,
            lists_from_ram: s.lists_from_ram as f64,
            search_us: s.search_ns as f64 / 1000.0,
        },
        ids,
    ))
}

/// Natural log of Σ exp(scale·q·k) over the static tokens of a query at `position`.
fn static_log_sum_exp(
    q: &[f32],
    position: usize,
    keys: &[f32],
    dim: usize,
    scale: f32,
    params: &SearchParams,
) -> f32 {
    let static_tokens = params.static_tokens(position);
    log_sum_exp(static_tokens.iter().map(|&t| {
        let key = &keys[t as usize * dim..(t as usize + 1) * dim];
        (scale * dot(key, q), 1.0)
    }))
}

fn print_table(reports: &[RunReport], dump: &KvDump) {
    println!(
        "\n{} ({} tokens), budget {:.1}% + {} sink + {} recent",
        dump.path.display(),
        dump.meta.tokens,
        reports.first().map(|r| r.budget * 100.0).unwrap_or(0.0),
        reports
            .first()
            .map(|r| r.search_params.sink_tokens)
            .unwrap_or(0),
        reports
            .first()
            .map(|r| r.search_params.recent_tokens)
            .unwrap_or(0),
    );
    println!(
        "{:<10} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>6} {:>8} {:>8}",
        "method",
        "R@10",
        "R@100",
        "mass",
        "err",
        "err-x",
        "att%",
        "scored%",
        "bytes%",
        "lists%",
        "ssdKB/q",
        "rd/q",
        "p50us",
        "p99us"
    );
    let mut rows: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for r in reports {
        let s = &r.summary;
        println!(
            "{:<10} {:>6.3} {:>6.3} {:>7.4} {:>7.4} {:>7.4} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>9.1} {:>6.1} {:>8.1} {:>8.1}",
            r.method,
            s.recall_10,
            s.recall_100,
            s.covered_mass,
            s.output_error,
            s.output_error_exact_only,
            s.attended_fraction * 100.0,
            s.scored_fraction * 100.0,
            s.bytes_read_fraction * 100.0,
            s.list_bytes_fraction * 100.0,
            s.ssd_bytes_per_query / 1024.0,
            s.ssd_reads_per_query,
            s.search_us_p50,
            s.search_us_p99
        );
        for l in &r.per_layer {
            rows.entry(l.model_layer).or_default().push(format!(
                "{}: R@100 {:.3} mass {:.3} err {:.3} (exact part {:.3})",
                r.method,
                l.summary.recall_100,
                l.summary.covered_mass,
                l.summary.output_error,
                l.summary.output_error_exact_only
            ));
        }
    }
    println!("per layer:");
    for (layer, cells) in rows {
        println!("  layer {layer:>2}  {}", cells.join(" | "));
    }
}
