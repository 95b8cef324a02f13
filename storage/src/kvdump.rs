//! Reader and writer of kvdump/1 files: the KV cache of a real model run, dumped after a full
//! prefill (see `shared/data/README.md` for the layout).
//!
//! A kvdump/1 file is a safetensors file with these tensors
//!
//! | name | dtype | shape |
//! |---|---|---|
//! | `keys`, `values` | F16 (BF16, F32 accepted) | `[L, kv_heads, T, D]` |
//! | `queries` | F16 (BF16, F32 accepted) | `[L, q_heads, Q, D]` |
//! | `query_positions` | I64 | `[Q]` |
//! | `train_queries` (optional) | F16 (BF16, F32 accepted) | `[L, q_heads, S, D]` |
//! | `train_positions` (with `train_queries`) | I64 | `[S]` |
//! | `token_ids` | I64 | `[T]` |
//!
//! and string metadata (`format` = `kvdump/1`, `model`, `layers`, `softmax_scale`, ...).
//! [`KvDump::open`] validates all of it and converts the tensors to f32; every failure is a
//! [`KvDumpError`] that names the file and the offending tensor or metadata key.
//! [`write_kvdump`] writes the same layout (f16 tensors) and refuses to write anything
//! [`KvDump::open`] would reject.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use half::{bf16, f16, slice::HalfFloatSliceExt};
use safetensors::{Dtype, SafeTensors};

/// The value of the `format` metadata key of every kvdump/1 file.
pub const KVDUMP_FORMAT: &str = "kvdump/1";

/// The value the writer stores under the informational `causal` metadata key.
const CAUSAL_NOTE: &str = "query at position p attends to keys 0..=p";

const FLOAT_DTYPES: &str = "F16, BF16 or F32";
const INT_DTYPE: &str = "I64";

/// Why a kvdump file could not be read (or written). Every message names the file and the
/// tensor or metadata key at fault.
#[derive(Debug, thiserror::Error)]
pub enum KvDumpError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write: {problem}")]
    Write { path: PathBuf, problem: String },
    /// The bytes are not a (complete) safetensors file: truncated, bad header, bad offsets.
    #[error("{path}: not a safetensors file: {problem}")]
    NotSafetensors { path: PathBuf, problem: String },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: &'static str },
    #[error("{path}: tensor `{name}` has dtype {found}, expected {expected}")]
    Dtype {
        path: PathBuf,
        name: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected}")]
    Shape {
        path: PathBuf,
        name: &'static str,
        found: Vec<usize>,
        expected: String,
    },
    /// A metadata key is missing, unparseable or inconsistent with the others.
    #[error("{path}: metadata `{key}`: {problem}")]
    Metadata {
        path: PathBuf,
        key: String,
        problem: String,
    },
    /// A tensor's contents are invalid: NaN/Inf, positions out of range, data length.
    #[error("{path}: tensor `{name}`: {problem}")]
    Values {
        path: PathBuf,
        name: &'static str,
        problem: String,
    },
}

/// A dense row-major 4-d f32 tensor.
#[derive(Clone, PartialEq)]
pub struct Tensor4 {
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

impl fmt::Debug for Tensor4 {
    // The data is megabytes: print the shape and length only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor4")
            .field("shape", &self.shape)
            .field("data.len()", &self.data.len())
            .finish()
    }
}

impl Tensor4 {
    /// A tensor of the given shape filled with zeros.
    pub fn zeros(shape: [usize; 4]) -> Tensor4 {
        Tensor4 {
            shape,
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// The number of elements the shape calls for (`data.len()` of a consistent tensor).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The blocks at `[a, b]` for `b` in `bs`, contiguous in memory (for query tensors: every
    /// query head of one GQA group), row-major.
    ///
    /// Panics if `a >= shape[0]` or `bs` reaches past `shape[1]`.
    pub fn slice2_range(&self, a: usize, bs: std::ops::Range<usize>) -> &[f32] {
        let [s0, s1, s2, s3] = self.shape;
        assert!(
            a < s0 && bs.start <= bs.end && bs.end <= s1,
            "Tensor4::slice2_range({a}, {bs:?}) out of range for shape {:?}",
            self.shape
        );
        let len = s2 * s3;
        &self.data[(a * s1 + bs.start) * len..(a * s1 + bs.end) * len]
    }

    /// The `[shape[2], shape[3]]` block at `[a, b]` (for kv tensors: all positions of one layer
    /// and head), row-major.
    ///
    /// Panics if `a >= shape[0]` or `b >= shape[1]`.
    pub fn slice2(&self, a: usize, b: usize) -> &[f32] {
        self.slice2_range(a, b..b + 1)
    }

    /// The `shape[3]` floats at `[a, b, c]` (for kv tensors: one position's vector).
    ///
    /// Panics if any index is out of range.
    pub fn row(&self, a: usize, b: usize, c: usize) -> &[f32] {
        let [s0, s1, s2, s3] = self.shape;
        assert!(
            a < s0 && b < s1 && c < s2,
            "Tensor4::row({a}, {b}, {c}) out of range for shape {:?}",
            self.shape
        );
        let start = ((a * s1 + b) * s2 + c) * s3;
        &self.data[start..start + s3]
    }

    /// The multi-index of flat element `i`.
    fn unravel(&self, i: usize) -> [usize; 4] {
        let [_, s1, s2, s3] = self.shape;
        let d = i % s3.max(1);
        let rest = i / s3.max(1);
        let c = rest % s2.max(1);
        let rest = rest / s2.max(1);
        let b = rest % s1.max(1);
        [rest / s1.max(1), b, c, d]
    }
}

/// The metadata of a kvdump/1 file (stored as strings in the safetensors `__metadata__`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct KvDumpMeta {
    /// Always [`KVDUMP_FORMAT`].
    pub format: String,
    pub model: String,
    pub model_type: String,
    /// The model's layer index of each of the L layers in the file.
    pub layers: Vec<usize>,
    pub num_layers_in_model: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// One per layer: attention logits are `softmax_scale[l] * q.k`.
    pub softmax_scale: Vec<f32>,
    /// T, the number of prompt tokens (= key/value positions).
    pub tokens: usize,
    pub source_text: String,
    /// `[start, end)` token range of the needle sentence.
    pub needle_token_range: Option<(usize, usize)>,
    pub needle_text: Option<String>,
    /// What the model answered with full attention.
    pub greedy_answer: Option<String>,
    /// `"None"` in the file reads as `None`.
    pub rope_theta: Option<f64>,
}

/// A validated kvdump/1 file, tensors converted to f32.
pub struct KvDump {
    pub path: PathBuf,
    pub meta: KvDumpMeta,
    /// `[L, kv_heads, T, D]`
    pub keys: Tensor4,
    /// `[L, kv_heads, T, D]`
    pub values: Tensor4,
    /// `[L, q_heads, Q, D]`, not multiplied by the softmax scale.
    pub queries: Tensor4,
    /// `[Q]`, each `< T`.
    pub query_positions: Vec<usize>,
    /// `[L, q_heads, S, D]`; absent in files without training queries.
    pub train_queries: Option<Tensor4>,
    /// `[S]`, each `< T`; present exactly when `train_queries` is.
    pub train_positions: Option<Vec<usize>>,
    /// `[T]`
    pub token_ids: Vec<i64>,
}

impl fmt::Debug for KvDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvDump")
            .field("path", &self.path)
            .field("meta", &self.meta)
            .field("keys", &self.keys)
            .field("values", &self.values)
            .field("queries", &self.queries)
            .field("query_positions.len()", &self.query_positions.len())
            .field("train_queries", &self.train_queries)
            .field(
                "train_positions.len()",
                &self.train_positions.as_ref().map(Vec::len),
            )
            .field("token_ids.len()", &self.token_ids.len())
            .finish()
    }
}

impl KvDump {
    /// Reads and validates a kvdump/1 file (see the module docs); tensors are converted to f32.
    pub fn open(path: &Path) -> Result<KvDump, KvDumpError> {
        let bytes = std::fs::read(path).map_err(|source| KvDumpError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| KvDumpError::NotSafetensors {
            path: path.to_path_buf(),
            problem: e.to_string(),
        })?;
        // `read_metadata` again only to get at `__metadata__` (`SafeTensors` does not expose it);
        // it parses the header alone, not the data.
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| KvDumpError::NotSafetensors {
                path: path.to_path_buf(),
                problem: e.to_string(),
            })?;
        let empty = HashMap::new();
        let strings = header.metadata().as_ref().unwrap_or(&empty);
        let meta = parse_meta(path, strings)?;

        let keys = read_float(path, &st, "keys")?;
        let values = read_float(path, &st, "values")?;
        let queries = read_float(path, &st, "queries")?;
        let query_positions = read_positions(path, &st, "query_positions")?;
        let train = match (
            has_tensor(&st, "train_queries"),
            has_tensor(&st, "train_positions"),
        ) {
            (true, true) => Some((
                read_float(path, &st, "train_queries")?,
                read_positions(path, &st, "train_positions")?,
            )),
            (false, false) => None,
            (true, false) => return Err(missing(path, "train_positions")),
            (false, true) => return Err(missing(path, "train_queries")),
        };
        let token_ids = read_i64(path, &st, "token_ids")?;
        drop(st);
        drop(bytes);

        let dump = KvDump {
            path: path.to_path_buf(),
            meta,
            keys,
            values,
            queries,
            query_positions,
            train_positions: train.as_ref().map(|(_, p)| p.clone()),
            train_queries: train.map(|(t, _)| t),
            token_ids,
        };
        validate(
            path,
            &dump.meta,
            &dump.keys,
            &dump.values,
            &dump.queries,
            &dump.query_positions,
            dump.train_queries
                .as_ref()
                .zip(dump.train_positions.as_deref()),
            &dump.token_ids,
            false,
        )?;
        if let Some(train) = &dump.train_positions {
            let eval: HashSet<usize> = dump.query_positions.iter().copied().collect();
            let overlap = train.iter().filter(|p| eval.contains(p)).count();
            if overlap > 0 {
                log::warn!(
                    "{}: {overlap} of the train_positions are also query_positions",
                    path.display()
                );
            }
        }
        log::debug!(
            "{}: kvdump/1 {} layers {:?}, {} tokens, {}/{} heads x {}, {} queries, {} train queries",
            path.display(),
            dump.meta.model,
            dump.meta.layers,
            dump.meta.tokens,
            dump.meta.q_heads,
            dump.meta.kv_heads,
            dump.meta.head_dim,
            dump.query_positions.len(),
            dump.train_positions.as_ref().map_or(0, Vec::len),
        );
        Ok(dump)
    }

    /// L, the number of layers in the file (not in the model).
    pub fn num_layers(&self) -> usize {
        self.meta.layers.len()
    }

    /// Query heads per kv head (`q_heads / kv_heads`).
    pub fn group_size(&self) -> usize {
        self.meta.q_heads / self.meta.kv_heads
    }

    /// The kv head that query head `q_head` reads (GQA). Panics if `q_head >= q_heads`.
    pub fn kv_head_of(&self, q_head: usize) -> usize {
        assert!(
            q_head < self.meta.q_heads,
            "query head {q_head} out of range (q_heads = {})",
            self.meta.q_heads
        );
        q_head / self.group_size()
    }

    /// A stable 64-bit FNV-1a hash of the model name, the layer indices and the token ids: two
    /// dumps with the same hash hold the KV cache of the same model layers on the same prompt, so
    /// indexes built for one can be reused for the other. The algorithm is fixed (persisted).
    pub fn content_hash(&self) -> u64 {
        context_hash(&self.meta.model, &self.meta.layers, &self.token_ids)
    }
}

struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.write(&v.to_le_bytes());
    }
}

/// Writes a kvdump/1 file: f16 tensors, I64 positions and token ids, metadata as strings, the
/// layout of `shared/data/README.md`. The inputs are validated first (shapes against `meta`,
/// finite values that fit in f16, positions `< tokens`, ...) so the file always opens with
/// [`KvDump::open`]; errors name `path` and the offending field. The file is written to a
/// sibling temporary and renamed into place.
#[allow(clippy::too_many_arguments)]
pub fn write_kvdump(
    path: &Path,
    meta: &KvDumpMeta,
    keys: &Tensor4,
    values: &Tensor4,
    queries: &Tensor4,
    query_positions: &[usize],
    train: Option<(&Tensor4, &[usize])>,
    token_ids: &[i64],
) -> Result<(), KvDumpError> {
    validate_meta(path, meta)?;
    validate(
        path,
        meta,
        keys,
        values,
        queries,
        query_positions,
        train,
        token_ids,
        true,
    )?;

    let mut tensors: Vec<(&'static str, Vec<usize>, Dtype, Vec<u8>)> = vec![
        ("keys", keys.shape.to_vec(), Dtype::F16, f16_bytes(keys)),
        (
            "values",
            values.shape.to_vec(),
            Dtype::F16,
            f16_bytes(values),
        ),
        (
            "queries",
            queries.shape.to_vec(),
            Dtype::F16,
            f16_bytes(queries),
        ),
        (
            "query_positions",
            vec![query_positions.len()],
            Dtype::I64,
            usize_bytes(query_positions),
        ),
        (
            "token_ids",
            vec![token_ids.len()],
            Dtype::I64,
            token_ids.iter().flat_map(|t| t.to_le_bytes()).collect(),
        ),
    ];
    if let Some((tq, tp)) = train {
        tensors.push((
            "train_queries",
            tq.shape.to_vec(),
            Dtype::F16,
            f16_bytes(tq),
        ));
        tensors.push((
            "train_positions",
            vec![tp.len()],
            Dtype::I64,
            usize_bytes(tp),
        ));
    }
    let mut views = Vec::with_capacity(tensors.len());
    for (name, shape, dtype, bytes) in &tensors {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| write_error(path, format!("tensor `{name}`: {e}")))?;
        views.push((*name, view));
    }
    let buffer = safetensors::serialize(views, Some(meta_strings(meta)))
        .map_err(|e| write_error(path, format!("serializing: {e}")))?;

    // Durable and atomic (unique temp file, fsync, rename, folder fsync): a crash or a full
    // disk leaves either the old file or the complete new one at `path`.
    crate::durable::atomic_write(path, &buffer).map_err(|e| KvDumpError::Write {
        path: path.to_path_buf(),
        problem: e.to_string(),
    })
}

fn write_error(path: &Path, msg: String) -> KvDumpError {
    KvDumpError::Write {
        path: path.to_path_buf(),
        problem: msg,
    }
}

fn f16_bytes(t: &Tensor4) -> Vec<u8> {
    let mut halves = vec![f16::ZERO; t.data.len()];
    halves.convert_from_f32_slice(&t.data);
    halves
        .iter()
        .flat_map(|h| h.to_bits().to_le_bytes())
        .collect()
}

fn usize_bytes(v: &[usize]) -> Vec<u8> {
    // validate() checked every value is < tokens, which came from a Vec length: fits in i64.
    v.iter().flat_map(|&p| (p as i64).to_le_bytes()).collect()
}

/// `[a, b, c]` the way Python prints a list (and valid JSON).
fn json_list<T>(items: impl IntoIterator<Item = T>, f: impl Fn(T) -> String) -> String {
    let parts: Vec<String> = items.into_iter().map(f).collect();
    format!("[{}]", parts.join(", "))
}

fn meta_strings(meta: &KvDumpMeta) -> HashMap<String, String> {
    let mut m = HashMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_owned(), v);
    };
    put("format", meta.format.clone());
    put("model", meta.model.clone());
    put("model_type", meta.model_type.clone());
    put("layers", json_list(&meta.layers, |l| l.to_string()));
    put("num_layers_in_model", meta.num_layers_in_model.to_string());
    put("q_heads", meta.q_heads.to_string());
    put("kv_heads", meta.kv_heads.to_string());
    put("head_dim", meta.head_dim.to_string());
    // Written as the f64 value of each f32 so that reading it back (JSON -> f64 -> f32) is exact.
    put(
        "softmax_scale",
        json_list(&meta.softmax_scale, |&s| format!("{:?}", f64::from(s))),
    );
    put(
        "rope_theta",
        meta.rope_theta
            .map_or_else(|| "None".to_owned(), |t| format!("{t:?}")),
    );
    put("tokens", meta.tokens.to_string());
    put("source_text", meta.source_text.clone());
    if let Some((s, e)) = meta.needle_token_range {
        put("needle_token_range", format!("[{s}, {e}]"));
    }
    if let Some(t) = &meta.needle_text {
        put("needle_text", t.clone());
    }
    if let Some(a) = &meta.greedy_answer {
        put("greedy_answer", a.clone());
    }
    put("causal", CAUSAL_NOTE.to_owned());
    m
}

// ---------------------------------------------------------------------------------------------
// Reading

fn missing(path: &Path, name: &'static str) -> KvDumpError {
    KvDumpError::MissingTensor {
        path: path.to_path_buf(),
        name,
    }
}

fn meta_err(path: &Path, key: &str, problem: impl Into<String>) -> KvDumpError {
    KvDumpError::Metadata {
        path: path.to_path_buf(),
        key: key.to_owned(),
        problem: problem.into(),
    }
}

fn values_err(path: &Path, name: &'static str, problem: impl Into<String>) -> KvDumpError {
    KvDumpError::Values {
        path: path.to_path_buf(),
        name,
        problem: problem.into(),
    }
}

fn parse_meta(path: &Path, m: &HashMap<String, String>) -> Result<KvDumpMeta, KvDumpError> {
    let get = |key: &str| -> Result<&str, KvDumpError> {
        m.get(key).map(String::as_str).ok_or_else(|| {
            if m.is_empty() {
                meta_err(path, key, "missing (the file has no __metadata__)")
            } else {
                meta_err(path, key, "missing")
            }
        })
    };
    let int = |key: &str| -> Result<usize, KvDumpError> {
        let s = get(key)?;
        s.trim().parse::<usize>().map_err(|e| {
            meta_err(
                path,
                key,
                format!("{s:?} is not a non-negative integer: {e}"),
            )
        })
    };
    let json = |key: &str, s: &str, what: &str| -> Result<serde_json::Value, KvDumpError> {
        serde_json::from_str(s)
            .map_err(|e| meta_err(path, key, format!("{s:?} is not {what}: {e}")))
    };
    let optional = |key: &str| -> Option<&str> {
        m.get(key)
            .map(String::as_str)
            .filter(|s| !matches!(s.trim(), "None" | "null"))
    };

    let format = get("format")?;
    if format != KVDUMP_FORMAT {
        return Err(meta_err(
            path,
            "format",
            format!("is {format:?}, expected {KVDUMP_FORMAT:?}"),
        ));
    }

    let layers_s = get("layers")?;
    let layers: Vec<usize> = serde_json::from_value(json("layers", layers_s, "a JSON list")?)
        .map_err(|e| {
            meta_err(
                path,
                "layers",
                format!("{layers_s:?} is not a JSON list of layer indices: {e}"),
            )
        })?;

    let scale_s = get("softmax_scale")?;
    let scales: Vec<f64> = serde_json::from_value(json("softmax_scale", scale_s, "a JSON list")?)
        .map_err(|e| {
        meta_err(
            path,
            "softmax_scale",
            format!("{scale_s:?} is not a JSON list of numbers: {e}"),
        )
    })?;
    let softmax_scale: Vec<f32> = scales.iter().map(|&s| s as f32).collect();

    let needle_token_range = match optional("needle_token_range") {
        None => None,
        Some(s) => {
            let v: Vec<usize> =
                serde_json::from_value(json("needle_token_range", s, "a JSON list")?).map_err(
                    |e| {
                        meta_err(
                            path,
                            "needle_token_range",
                            format!("{s:?} is not a JSON [start, end) pair: {e}"),
                        )
                    },
                )?;
            match v[..] {
                [start, end] => Some((start, end)),
                _ => {
                    return Err(meta_err(
                        path,
                        "needle_token_range",
                        format!("{s:?} is not a JSON [start, end) pair"),
                    ))
                }
            }
        }
    };

    let rope_theta =
        match optional("rope_theta") {
            None => None,
            Some(s) => Some(s.trim().parse::<f64>().map_err(|e| {
                meta_err(path, "rope_theta", format!("{s:?} is not a number: {e}"))
            })?),
        };

    let meta = KvDumpMeta {
        format: format.to_owned(),
        model: get("model")?.to_owned(),
        model_type: get("model_type")?.to_owned(),
        layers,
        num_layers_in_model: int("num_layers_in_model")?,
        q_heads: int("q_heads")?,
        kv_heads: int("kv_heads")?,
        head_dim: int("head_dim")?,
        softmax_scale,
        tokens: int("tokens")?,
        source_text: get("source_text")?.to_owned(),
        needle_token_range,
        needle_text: m.get("needle_text").cloned(),
        greedy_answer: m.get("greedy_answer").cloned(),
        rope_theta,
    };
    validate_meta(path, &meta)?;
    Ok(meta)
}

/// The checks on metadata alone (shared by the reader and the writer).
fn validate_meta(path: &Path, meta: &KvDumpMeta) -> Result<(), KvDumpError> {
    if meta.format != KVDUMP_FORMAT {
        return Err(meta_err(
            path,
            "format",
            format!("is {:?}, expected {KVDUMP_FORMAT:?}", meta.format),
        ));
    }
    if meta.layers.is_empty() {
        return Err(meta_err(path, "layers", "is empty"));
    }
    let mut seen = HashSet::new();
    for &l in &meta.layers {
        if l >= meta.num_layers_in_model {
            return Err(meta_err(
                path,
                "layers",
                format!(
                    "layer {l} is out of range for num_layers_in_model = {}",
                    meta.num_layers_in_model
                ),
            ));
        }
        if !seen.insert(l) {
            return Err(meta_err(path, "layers", format!("layer {l} appears twice")));
        }
    }
    for (key, v) in [
        ("q_heads", meta.q_heads),
        ("kv_heads", meta.kv_heads),
        ("head_dim", meta.head_dim),
        ("tokens", meta.tokens),
    ] {
        if v == 0 {
            return Err(meta_err(path, key, "must be positive"));
        }
    }
    if meta.q_heads.checked_rem(meta.kv_heads) != Some(0) {
        return Err(meta_err(
            path,
            "q_heads",
            format!(
                "q_heads = {} is not a multiple of kv_heads = {}",
                meta.q_heads, meta.kv_heads
            ),
        ));
    }
    if meta.softmax_scale.len() != meta.layers.len() {
        return Err(meta_err(
            path,
            "softmax_scale",
            format!(
                "has {} entries, expected one per layer ({})",
                meta.softmax_scale.len(),
                meta.layers.len()
            ),
        ));
    }
    if let Some((i, s)) = meta
        .softmax_scale
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s > 0.0))
    {
        return Err(meta_err(
            path,
            "softmax_scale",
            format!("entry {i} = {s} is not a finite positive number"),
        ));
    }
    if let Some((start, end)) = meta.needle_token_range {
        if start > end || end > meta.tokens {
            return Err(meta_err(
                path,
                "needle_token_range",
                format!(
                    "[{start}, {end}) is not a token range within 0..{}",
                    meta.tokens
                ),
            ));
        }
    }
    if let Some(t) = meta.rope_theta {
        if !(t.is_finite() && t > 0.0) {
            return Err(meta_err(
                path,
                "rope_theta",
                format!("{t} is not a finite positive number"),
            ));
        }
    }
    Ok(())
}

fn has_tensor(st: &SafeTensors<'_>, name: &str) -> bool {
    st.tensor(name).is_ok()
}

fn get_view<'a>(
    path: &Path,
    st: &SafeTensors<'a>,
    name: &'static str,
) -> Result<safetensors::tensor::TensorView<'a>, KvDumpError> {
    st.tensor(name).map_err(|_| missing(path, name))
}

fn dtype_err(path: &Path, name: &'static str, found: Dtype, expected: &'static str) -> KvDumpError {
    KvDumpError::Dtype {
        path: path.to_path_buf(),
        name,
        found: format!("{found:?}"),
        expected,
    }
}

/// Reads a 4-d float tensor (F16, BF16 or F32) as f32.
fn read_float(
    path: &Path,
    st: &SafeTensors<'_>,
    name: &'static str,
) -> Result<Tensor4, KvDumpError> {
    let view = get_view(path, st, name)?;
    let dtype = view.dtype();
    if !matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
        return Err(dtype_err(path, name, dtype, FLOAT_DTYPES));
    }
    let shape: [usize; 4] = view.shape().try_into().map_err(|_| KvDumpError::Shape {
        path: path.to_path_buf(),
        name,
        found: view.shape().to_vec(),
        expected: "a 4-d shape".to_owned(),
    })?;
    let bytes = view.data();
    // bytemuck::pod_collect_to_vec copies into a properly aligned Vec whatever the alignment of
    // the tensor inside the file; the from_le calls are no-ops on little-endian machines.
    let data = match dtype {
        Dtype::F16 => {
            let mut halves: Vec<f16> = bytemuck::pod_collect_to_vec(bytes);
            if cfg!(target_endian = "big") {
                for h in &mut halves {
                    *h = f16::from_bits(u16::from_le(h.to_bits()));
                }
            }
            let mut out = vec![0.0f32; halves.len()];
            halves.convert_to_f32_slice(&mut out);
            out
        }
        Dtype::BF16 => {
            let mut halves: Vec<bf16> = bytemuck::pod_collect_to_vec(bytes);
            if cfg!(target_endian = "big") {
                for h in &mut halves {
                    *h = bf16::from_bits(u16::from_le(h.to_bits()));
                }
            }
            let mut out = vec![0.0f32; halves.len()];
            halves.convert_to_f32_slice(&mut out);
            out
        }
        _ => {
            let mut out: Vec<f32> = bytemuck::pod_collect_to_vec(bytes);
            if cfg!(target_endian = "big") {
                for x in &mut out {
                    *x = f32::from_bits(u32::from_le(x.to_bits()));
                }
            }
            out
        }
    };
    // safetensors checked that the byte length matches shape x dtype; keep the invariant explicit.
    let t = Tensor4 { shape, data };
    if t.data.len() != t.numel() {
        return Err(values_err(
            path,
            name,
            format!(
                "holds {} values, shape {:?} needs {}",
                t.data.len(),
                shape,
                t.numel()
            ),
        ));
    }
    Ok(t)
}

/// Reads a 1-d I64 tensor.
fn read_i64(
    path: &Path,
    st: &SafeTensors<'_>,
    name: &'static str,
) -> Result<Vec<i64>, KvDumpError> {
    let view = get_view(path, st, name)?;
    if view.dtype() != Dtype::I64 {
        return Err(dtype_err(path, name, view.dtype(), INT_DTYPE));
    }
    if view.shape().len() != 1 {
        return Err(KvDumpError::Shape {
            path: path.to_path_buf(),
            name,
            found: view.shape().to_vec(),
            expected: "a 1-d shape".to_owned(),
        });
    }
    let mut v: Vec<i64> = bytemuck::pod_collect_to_vec(view.data());
    if cfg!(target_endian = "big") {
        for x in &mut v {
            *x = i64::from_le(*x);
        }
    }
    Ok(v)
}

/// Reads a 1-d I64 tensor of positions; each must be non-negative (the upper bound, `tokens`, is
/// checked by `validate`).
fn read_positions(
    path: &Path,
    st: &SafeTensors<'_>,
    name: &'static str,
) -> Result<Vec<usize>, KvDumpError> {
    read_i64(path, st, name)?
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            usize::try_from(p)
                .map_err(|_| values_err(path, name, format!("position [{i}] = {p} is negative")))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Validation shared by the reader and the writer

fn shape_err(path: &Path, name: &'static str, found: &[usize], expected: String) -> KvDumpError {
    KvDumpError::Shape {
        path: path.to_path_buf(),
        name,
        found: found.to_vec(),
        expected,
    }
}

/// Checks shapes against `meta`, data lengths, finiteness (and, when `for_f16`, that every value
/// survives conversion to f16) and position ranges.
#[allow(clippy::too_many_arguments)]
fn validate(
    path: &Path,
    meta: &KvDumpMeta,
    keys: &Tensor4,
    values: &Tensor4,
    queries: &Tensor4,
    query_positions: &[usize],
    train: Option<(&Tensor4, &[usize])>,
    token_ids: &[i64],
    for_f16: bool,
) -> Result<(), KvDumpError> {
    let l = meta.layers.len();
    let (kv, qh, t, d) = (meta.kv_heads, meta.q_heads, meta.tokens, meta.head_dim);

    let kv_shape = [l, kv, t, d];
    for (name, x) in [("keys", keys), ("values", values)] {
        if x.shape != kv_shape {
            return Err(shape_err(
                path,
                name,
                &x.shape,
                format!("{kv_shape:?} = [len(layers), kv_heads, tokens, head_dim]"),
            ));
        }
    }
    let q_shape_ok = |x: &Tensor4| x.shape[0] == l && x.shape[1] == qh && x.shape[3] == d;
    if !q_shape_ok(queries) {
        return Err(shape_err(
            path,
            "queries",
            &queries.shape,
            format!("[{l}, {qh}, Q, {d}] = [len(layers), q_heads, Q, head_dim]"),
        ));
    }
    let q = queries.shape[2];
    if query_positions.len() != q {
        return Err(shape_err(
            path,
            "query_positions",
            &[query_positions.len()],
            format!("[{q}] (Q of `queries`)"),
        ));
    }
    if let Some((tq, tp)) = train {
        if !q_shape_ok(tq) {
            return Err(shape_err(
                path,
                "train_queries",
                &tq.shape,
                format!("[{l}, {qh}, S, {d}] = [len(layers), q_heads, S, head_dim]"),
            ));
        }
        let s = tq.shape[2];
        if tp.len() != s {
            return Err(shape_err(
                path,
                "train_positions",
                &[tp.len()],
                format!("[{s}] (S of `train_queries`)"),
            ));
        }
    }
    if token_ids.len() != t {
        return Err(shape_err(
            path,
            "token_ids",
            &[token_ids.len()],
            format!("[{t}] = [tokens]"),
        ));
    }

    let mut floats = vec![("keys", keys), ("values", values), ("queries", queries)];
    if let Some((tq, _)) = train {
        floats.push(("train_queries", tq));
    }
    for (name, x) in floats {
        check_floats(path, name, x, for_f16)?;
    }

    let mut positions = vec![("query_positions", query_positions)];
    if let Some((_, tp)) = train {
        positions.push(("train_positions", tp));
    }
    for (name, ps) in positions {
        if let Some((i, p)) = ps.iter().enumerate().find(|(_, p)| **p >= t) {
            return Err(values_err(
                path,
                name,
                format!("position [{i}] = {p} is out of range 0..{t} (tokens)"),
            ));
        }
    }
    Ok(())
}

fn check_floats(
    path: &Path,
    name: &'static str,
    x: &Tensor4,
    for_f16: bool,
) -> Result<(), KvDumpError> {
    if x.data.len() != x.numel() {
        return Err(values_err(
            path,
            name,
            format!(
                "holds {} values, shape {:?} needs {}",
                x.data.len(),
                x.shape,
                x.numel()
            ),
        ));
    }
    if let Some(i) = x.data.iter().position(|v| !v.is_finite()) {
        return Err(values_err(
            path,
            name,
            format!(
                "non-finite value {} at index {:?} (flat {i})",
                x.data[i],
                x.unravel(i)
            ),
        ));
    }
    if for_f16 {
        if let Some(i) = x.data.iter().position(|&v| f16::from_f32(v).is_infinite()) {
            return Err(values_err(
                path,
                name,
                format!(
                    "value {} at index {:?} (flat {i}) overflows f16",
                    x.data[i],
                    x.unravel(i)
                ),
            ));
        }
    }
    Ok(())
}

/// Content hash of a context: model, layer indices and token ids (64-bit FNV-1a). Two sessions
/// or dumps with the same hash hold the same keys and values, so one's index serves the other.
pub fn context_hash(model: &str, layers: &[usize], token_ids: &[i64]) -> u64 {
    let mut h = Fnv1a::new();
    h.write(KVDUMP_FORMAT.as_bytes());
    h.write_u64(model.len() as u64);
    h.write(model.as_bytes());
    h.write_u64(layers.len() as u64);
    for &l in layers {
        h.write_u64(l as u64);
    }
    h.write_u64(token_ids.len() as u64);
    for &t in token_ids {
        h.write(&t.to_le_bytes());
    }
    h.0
}
