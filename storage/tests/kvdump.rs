//! Tests of the kvdump/1 reader and writer: the real dumps in `shared/data`, write -> open round
//! trips, and one test per validation failure (each asserts the error variant and that the
//! message names the file and the field).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use strata_storage::kvdump::{
    write_kvdump, KvDump, KvDumpError, KvDumpMeta, Tensor4, KVDUMP_FORMAT,
};

// ---------------------------------------------------------------------------------------------
// Fixtures

/// The contents of a kvdump in memory, before writing.
#[derive(Clone, Debug)]
struct Fixture {
    meta: KvDumpMeta,
    keys: Tensor4,
    values: Tensor4,
    queries: Tensor4,
    query_positions: Vec<usize>,
    train: Option<(Tensor4, Vec<usize>)>,
    token_ids: Vec<i64>,
}

/// Values that f16 represents exactly (multiples of 1/8 in [-8, 8)).
fn exact(i: usize, salt: usize) -> f32 {
    ((i * 31 + salt * 7) % 128) as f32 / 8.0 - 8.0
}

fn filled(shape: [usize; 4], salt: usize) -> Tensor4 {
    let mut t = Tensor4::zeros(shape);
    for (i, x) in t.data.iter_mut().enumerate() {
        *x = exact(i, salt);
    }
    t
}

/// A valid dump: 2 layers, 4 query heads over 2 kv heads, 16 tokens, head dim 8, 3 queries,
/// 5 training queries.
fn fixture() -> Fixture {
    let (l, kv, qh, t, d, q, s) = (2, 2, 4, 16, 8, 3, 5);
    Fixture {
        meta: KvDumpMeta {
            format: KVDUMP_FORMAT.to_owned(),
            model: "tiny-model.gguf".to_owned(),
            model_type: "llama".to_owned(),
            layers: vec![1, 3],
            num_layers_in_model: 4,
            q_heads: qh,
            kv_heads: kv,
            head_dim: d,
            softmax_scale: vec![0.125, 0.353_553_38],
            tokens: t,
            source_text: "jargon.txt.gz".to_owned(),
            needle_token_range: Some((4, 9)),
            needle_text: Some("The secret passphrase is 'purple-otter-4721'.".to_owned()),
            greedy_answer: Some("purple-otter-4721".to_owned()),
            rope_theta: None,
        },
        keys: filled([l, kv, t, d], 1),
        values: filled([l, kv, t, d], 2),
        queries: filled([l, qh, q, d], 3),
        query_positions: vec![13, 14, 15],
        train: Some((filled([l, qh, s, d], 4), vec![2, 5, 7, 9, 11])),
        token_ids: (0..t as i64).map(|i| 1000 + 17 * i).collect(),
    }
}

impl Fixture {
    fn write(&self, path: &Path) -> Result<(), KvDumpError> {
        write_kvdump(
            path,
            &self.meta,
            &self.keys,
            &self.values,
            &self.queries,
            &self.query_positions,
            self.train.as_ref().map(|(t, p)| (t, p.as_slice())),
            &self.token_ids,
        )
    }
}

/// A safetensors file taken apart, to inject faults the writer refuses to produce.
struct Raw {
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
}

impl Raw {
    fn of(f: &Fixture, dir: &Path) -> Raw {
        let path = dir.join("valid-source.safetensors");
        f.write(&path).expect("write the valid fixture");
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, v)| (name, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect();
        Raw {
            tensors,
            meta: header.metadata().clone().unwrap_or_default(),
        }
    }

    fn set_f32(&mut self, name: &str, shape: Vec<usize>, data: &[f32]) {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors
            .insert(name.to_owned(), (Dtype::F32, shape, bytes));
    }

    fn set_i64(&mut self, name: &str, data: &[i64]) {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors
            .insert(name.to_owned(), (Dtype::I64, vec![data.len()], bytes));
    }

    fn write(&self, path: &Path) {
        let views: Vec<(String, TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(name, (dtype, shape, bytes))| {
                (
                    name.clone(),
                    TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        let buf = safetensors::serialize(views, Some(self.meta.clone())).unwrap();
        std::fs::write(path, buf).unwrap();
    }
}

/// Writes `raw` to `<dir>/<name>` and opens it, expecting failure.
fn open_err(raw: &Raw, dir: &Path, name: &str) -> (PathBuf, KvDumpError) {
    let path = dir.join(name);
    raw.write(&path);
    let err = KvDump::open(&path).expect_err("a faulty file must not open");
    (path, err)
}

/// The message names the file and the field.
fn assert_names(err: &KvDumpError, path: &Path, field: &str) {
    let msg = err.to_string();
    let file = path.file_name().unwrap().to_str().unwrap();
    assert!(msg.contains(file), "message {msg:?} does not name {file}");
    assert!(
        msg.contains(field),
        "message {msg:?} does not name the field {field}"
    );
}

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The real dumps

/// f32 -> f64, to compare with the exact values numpy printed.
fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

fn real(name: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(name);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipping: {} is not there", path.display());
        None
    }
}

#[test]
fn real_smollm2_dump_opens() {
    let Some(path) = real("smollm2-jargon-8k.safetensors") else {
        return;
    };
    let d = KvDump::open(&path).unwrap();
    let m = &d.meta;
    assert_eq!(m.format, "kvdump/1");
    assert_eq!(m.model, "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(m.model_type, "llama");
    assert_eq!(m.layers, vec![3, 8, 15, 22, 29]);
    assert_eq!(m.num_layers_in_model, 30);
    assert_eq!((m.q_heads, m.kv_heads, m.head_dim), (9, 3, 64));
    assert_eq!(m.softmax_scale, vec![0.125; 5]);
    assert_eq!(m.tokens, 8192);
    assert_eq!(m.source_text, "jargon.txt.gz");
    assert_eq!(m.needle_token_range, Some((3012, 3035)));
    assert!(m
        .needle_text
        .as_deref()
        .unwrap()
        .contains("purple-otter-4721"));
    assert!(m.greedy_answer.is_some());
    assert_eq!(m.rope_theta, None);

    assert_eq!(d.num_layers(), 5);
    assert_eq!(d.group_size(), 3);
    assert_eq!(
        (d.kv_head_of(0), d.kv_head_of(5), d.kv_head_of(8)),
        (0, 1, 2)
    );
    assert_eq!(d.keys.shape, [5, 3, 8192, 64]);
    assert_eq!(d.values.shape, [5, 3, 8192, 64]);
    assert_eq!(d.queries.shape, [5, 9, 256, 64]);
    assert_eq!(d.query_positions.len(), 256);
    assert_eq!(d.query_positions[0], 7936);
    assert_eq!(d.query_positions[255], 8191);
    let tq = d.train_queries.as_ref().unwrap();
    assert_eq!(tq.shape, [5, 9, 1024, 64]);
    let tp = d.train_positions.as_ref().unwrap();
    assert_eq!(tp.len(), 1024);
    assert_eq!(&tp[..3], &[65, 79, 90]);
    assert_eq!(d.token_ids.len(), 8192);
    assert_eq!(&d.token_ids[..5], &[314, 4529, 690, 338, 39799]);

    // Spot values (read with numpy; exact f16 values): layout and f16 decoding.
    assert_eq!(
        wide(&d.keys.row(1, 0, 5)[..3]),
        [-1.5595703125, -1.7548828125, 1.634765625]
    );
    assert_eq!(
        wide(&d.keys.row(4, 2, 8191)[61..]),
        [1.00390625, -0.56689453125, 0.51025390625]
    );
    assert_eq!(
        wide(&d.values.row(1, 0, 5)[..3]),
        [-0.5322265625, -1.091796875, 3.267578125]
    );
    assert_eq!(
        wide(&d.queries.row(4, 8, 255)[61..]),
        [-10.0, 0.351806640625, -4.03515625]
    );
    assert_eq!(
        wide(&d.train_queries.as_ref().unwrap().row(1, 0, 5)[..3]),
        [-0.2435302734375, 0.37646484375, -0.1309814453125]
    );
    assert_eq!(d.keys.slice2(1, 0)[5 * 64], d.keys.row(1, 0, 5)[0]);
    assert_ne!(d.content_hash(), 0);
}

#[test]
fn real_gemma3_dump_opens() {
    let Some(path) = real("gemma3-jargon-16k.safetensors") else {
        return;
    };
    let d = KvDump::open(&path).unwrap();
    let m = &d.meta;
    assert_eq!(m.model_type, "gemma3_text");
    assert_eq!(m.layers, vec![5, 11, 17]);
    assert_eq!(m.num_layers_in_model, 18);
    assert_eq!((m.q_heads, m.kv_heads, m.head_dim), (4, 1, 256));
    assert_eq!(m.softmax_scale, vec![0.0625; 3]);
    assert_eq!(m.tokens, 16384);
    assert_eq!(m.needle_token_range, Some((6045, 6067)));
    assert_eq!(d.group_size(), 4);
    assert_eq!(d.kv_head_of(3), 0);
    assert_eq!(d.keys.shape, [3, 1, 16384, 256]);
    assert_eq!(d.values.shape, [3, 1, 16384, 256]);
    assert_eq!(d.queries.shape, [3, 4, 256, 256]);
    assert_eq!(d.train_queries.as_ref().unwrap().shape, [3, 4, 1024, 256]);
    assert_eq!(d.query_positions[0], 16128);
    assert_eq!(
        wide(&d.keys.row(1, 0, 5)[..3]),
        [0.783203125, 0.2171630859375, 2.09375]
    );
    assert_eq!(
        wide(&d.values.row(2, 0, 16383)[253..]),
        [0.6123046875, 0.478759765625, -0.3798828125]
    );
    assert_eq!(&d.token_ids[..3], &[24948, 7906, 2311]);
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn round_trip_fixture() {
    let dir = dir();
    let path = dir.path().join("rt.safetensors");
    let f = fixture();
    f.write(&path).unwrap();
    let d = KvDump::open(&path).unwrap();
    assert_eq!(d.path, path);
    assert_eq!(d.meta, f.meta);
    assert_eq!(d.keys, f.keys);
    assert_eq!(d.values, f.values);
    assert_eq!(d.queries, f.queries);
    assert_eq!(d.query_positions, f.query_positions);
    let (tq, tp) = f.train.as_ref().unwrap();
    assert_eq!(d.train_queries.as_ref(), Some(tq));
    assert_eq!(d.train_positions.as_ref(), Some(tp));
    assert_eq!(d.token_ids, f.token_ids);
    assert_eq!(d.num_layers(), 2);
    assert_eq!(d.group_size(), 2);
    assert_eq!(
        (
            d.kv_head_of(0),
            d.kv_head_of(1),
            d.kv_head_of(2),
            d.kv_head_of(3)
        ),
        (0, 0, 1, 1)
    );

    // The file holds exactly the README layout: f16 tensors, I64 positions, string metadata.
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for name in ["keys", "values", "queries", "train_queries"] {
        assert_eq!(st.tensor(name).unwrap().dtype(), Dtype::F16, "{name}");
    }
    for name in ["query_positions", "train_positions", "token_ids"] {
        assert_eq!(st.tensor(name).unwrap().dtype(), Dtype::I64, "{name}");
    }
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().as_ref().unwrap();
    assert_eq!(meta["format"], "kvdump/1");
    assert_eq!(meta["layers"], "[1, 3]");
    assert_eq!(meta["q_heads"], "4");
    assert_eq!(meta["needle_token_range"], "[4, 9]");
    assert_eq!(meta["rope_theta"], "None");
    assert!(meta.contains_key("causal"));
}

#[test]
fn round_trip_without_training_queries_and_optionals() {
    let dir = dir();
    let path = dir.path().join("no-train.safetensors");
    let mut f = fixture();
    f.train = None;
    f.meta.needle_token_range = None;
    f.meta.needle_text = None;
    f.meta.greedy_answer = None;
    f.meta.rope_theta = Some(10000.0);
    f.write(&path).unwrap();
    let d = KvDump::open(&path).unwrap();
    assert_eq!(d.meta, f.meta);
    assert!(d.train_queries.is_none());
    assert!(d.train_positions.is_none());
}

#[test]
fn bf16_and_f32_tensors_are_accepted() {
    let dir = dir();
    let f = fixture();
    let mut raw = Raw::of(&f, dir.path());
    // keys as F32, values as BF16 (the fixture's values are exact in bf16 too).
    raw.set_f32("keys", f.keys.shape.to_vec(), &f.keys.data);
    let bf: Vec<u8> = f
        .values
        .data
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    raw.tensors.insert(
        "values".to_owned(),
        (Dtype::BF16, f.values.shape.to_vec(), bf),
    );
    let path = dir.path().join("mixed.safetensors");
    raw.write(&path);
    let d = KvDump::open(&path).unwrap();
    assert_eq!(d.keys, f.keys);
    assert_eq!(d.values, f.values);
}

#[test]
fn python_style_metadata_is_read() {
    // What a Python dumper writes: str() of ints and floats, json.dumps lists.
    let dir = dir();
    let mut raw = Raw::of(&fixture(), dir.path());
    raw.meta
        .insert("softmax_scale".to_owned(), "[0.125, 0.0625]".to_owned());
    raw.meta
        .insert("rope_theta".to_owned(), "10000.0".to_owned());
    raw.meta.insert("layers".to_owned(), "[1,3]".to_owned());
    let path = dir.path().join("py.safetensors");
    raw.write(&path);
    let d = KvDump::open(&path).unwrap();
    assert_eq!(d.meta.softmax_scale, vec![0.125, 0.0625]);
    assert_eq!(d.meta.rope_theta, Some(10000.0));
    assert_eq!(d.meta.layers, vec![1, 3]);
}

fn arb_fixture() -> impl Strategy<Value = Fixture> {
    (1usize..=3, 1usize..=3, 1usize..=3, 1usize..=12, 1usize..=6)
        .prop_flat_map(|(l, kv, group, t, d)| {
            let qh = kv * group;
            let floats = |n: usize| prop::collection::vec(-2048i16..2048, n);
            (
                Just((l, kv, qh, t, d)),
                floats(l * kv * t * d),
                floats(l * kv * t * d),
                (1usize..=4).prop_flat_map(move |q| {
                    (floats(l * qh * q * d), prop::collection::vec(0..t, q))
                }),
                prop::option::of((0usize..=4).prop_flat_map(move |s| {
                    (floats(l * qh * s * d), prop::collection::vec(0..t, s))
                })),
                prop::collection::vec(any::<i64>(), t),
                prop::collection::vec(1e-4f32..100.0, l),
                (
                    "[a-zA-Z0-9 ._-]{0,16}",
                    prop::option::of(".{0,24}"),
                    prop::option::of(".{0,24}"),
                    prop::option::of(1.0f64..1e7),
                    prop::option::of((0..=t, 0..=t)),
                ),
            )
        })
        .prop_map(
            |((l, kv, qh, t, d), k, v, (qd, qp), train, ids, scales, strings)| {
                let (model, needle, answer, theta, range) = strings;
                let tensor = |shape: [usize; 4], raw: Vec<i16>| Tensor4 {
                    shape,
                    // k/64 with |k| <= 2048: exact in f16.
                    data: raw.into_iter().map(|x| f32::from(x) / 64.0).collect(),
                };
                let q = qp.len();
                Fixture {
                    meta: KvDumpMeta {
                        format: KVDUMP_FORMAT.to_owned(),
                        model,
                        model_type: "llama".to_owned(),
                        layers: (0..l).map(|i| 2 * i + 1).collect(),
                        num_layers_in_model: 2 * l + 1,
                        q_heads: qh,
                        kv_heads: kv,
                        head_dim: d,
                        softmax_scale: scales,
                        tokens: t,
                        source_text: "src.txt".to_owned(),
                        needle_token_range: range.map(|(a, b)| (a.min(b), a.max(b))),
                        needle_text: needle,
                        greedy_answer: answer,
                        rope_theta: theta,
                    },
                    keys: tensor([l, kv, t, d], k),
                    values: tensor([l, kv, t, d], v),
                    queries: tensor([l, qh, q, d], qd),
                    query_positions: qp,
                    train: train.map(|(td, tp)| (tensor([l, qh, tp.len(), d], td), tp)),
                    token_ids: ids,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn round_trip_random_shapes(f in arb_fixture()) {
        let dir = dir();
        let path = dir.path().join("prop.safetensors");
        f.write(&path).unwrap();
        let d = KvDump::open(&path).unwrap();
        prop_assert_eq!(&d.meta, &f.meta);
        prop_assert_eq!(&d.keys.shape, &f.keys.shape);
        prop_assert_eq!(&d.keys.data, &f.keys.data);
        prop_assert_eq!(&d.values.data, &f.values.data);
        prop_assert_eq!(&d.queries.shape, &f.queries.shape);
        prop_assert_eq!(&d.queries.data, &f.queries.data);
        prop_assert_eq!(&d.query_positions, &f.query_positions);
        prop_assert_eq!(d.train_queries.as_ref(), f.train.as_ref().map(|(t, _)| t));
        prop_assert_eq!(d.train_positions.as_ref(), f.train.as_ref().map(|(_, p)| p));
        prop_assert_eq!(&d.token_ids, &f.token_ids);
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers of the API

#[test]
fn tensor4_indexing() {
    let mut t = Tensor4::zeros([2, 3, 4, 5]);
    for (i, x) in t.data.iter_mut().enumerate() {
        *x = i as f32;
    }
    assert_eq!(t.slice2(1, 2).len(), 20);
    assert_eq!(t.slice2(1, 2)[0], ((3 + 2) * 20) as f32);
    assert_eq!(t.row(1, 2, 3), &[115.0, 116.0, 117.0, 118.0, 119.0]);
    assert_eq!(t.row(0, 0, 0)[0], 0.0);
    assert_eq!(t.numel(), 120);
}

#[test]
fn content_hash_is_stable_and_depends_on_model_layers_and_tokens() {
    let dir = dir();
    let open = |f: &Fixture, name: &str| {
        let path = dir.path().join(name);
        f.write(&path).unwrap();
        KvDump::open(&path).unwrap()
    };
    let f = fixture();
    let h = open(&f, "a.safetensors").content_hash();
    // Persisted in index files: must never change across builds.
    assert_eq!(h, 0x70dd_5731_b8df_eb36, "content_hash changed: {h:#x}");

    // Tensor contents and other metadata do not enter it.
    let mut same = f.clone();
    same.keys.data[0] = 1.5;
    same.meta.greedy_answer = None;
    assert_eq!(open(&same, "b.safetensors").content_hash(), h);

    let mut other = f.clone();
    other.token_ids[7] += 1;
    assert_ne!(open(&other, "c.safetensors").content_hash(), h);
    let mut other = f.clone();
    other.meta.layers = vec![1, 2];
    assert_ne!(open(&other, "d.safetensors").content_hash(), h);
    let mut other = f;
    other.meta.model.push('x');
    assert_ne!(open(&other, "e.safetensors").content_hash(), h);
}

// ---------------------------------------------------------------------------------------------
// Faults

#[test]
fn unreadable_file() {
    let dir = dir();
    let path = dir.path().join("does-not-exist.safetensors");
    let err = KvDump::open(&path).unwrap_err();
    assert!(matches!(err, KvDumpError::Io { .. }), "{err:?}");
    assert_names(&err, &path, "cannot read");
}

#[test]
fn truncated_file() {
    let dir = dir();
    let path = dir.path().join("truncated.safetensors");
    fixture().write(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for cut in [bytes.len() - 1, bytes.len() / 2, 100, 7, 0] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = KvDump::open(&path).unwrap_err();
        assert!(
            matches!(err, KvDumpError::NotSafetensors { .. }),
            "cut at {cut}: {err:?}"
        );
        assert_names(&err, &path, "not a safetensors file");
    }
    std::fs::write(&path, b"this is a text file, not safetensors at all").unwrap();
    let err = KvDump::open(&path).unwrap_err();
    assert!(matches!(err, KvDumpError::NotSafetensors { .. }), "{err:?}");
}

#[test]
fn wrong_dtype() {
    let dir = dir();
    let f = fixture();
    let mut raw = Raw::of(&f, dir.path());
    let as_ints: Vec<i64> = (0..f.keys.numel() as i64).collect();
    raw.tensors.insert(
        "keys".to_owned(),
        (
            Dtype::I64,
            f.keys.shape.to_vec(),
            as_ints.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
    );
    let (path, err) = open_err(&raw, dir.path(), "keys-i64.safetensors");
    match &err {
        KvDumpError::Dtype { name, found, .. } => {
            assert_eq!(*name, "keys");
            assert_eq!(found, "I64");
        }
        _ => panic!("expected Dtype, got {err:?}"),
    }
    assert_names(&err, &path, "keys");

    // Positions as floats.
    let mut raw = Raw::of(&f, dir.path());
    raw.set_f32("query_positions", vec![3], &[13.0, 14.0, 15.0]);
    let (path, err) = open_err(&raw, dir.path(), "pos-f32.safetensors");
    assert!(
        matches!(
            err,
            KvDumpError::Dtype {
                name: "query_positions",
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, &path, "query_positions");
}

#[test]
fn values_shape_differs_from_keys() {
    let dir = dir();
    let f = fixture();
    let mut raw = Raw::of(&f, dir.path());
    let [l, kv, t, d] = f.values.shape;
    raw.set_f32(
        "values",
        vec![l, kv, t - 1, d],
        &vec![0.5; l * kv * (t - 1) * d],
    );
    let (path, err) = open_err(&raw, dir.path(), "values-short.safetensors");
    match &err {
        KvDumpError::Shape { name, found, .. } => {
            assert_eq!(*name, "values");
            assert_eq!(found, &vec![l, kv, t - 1, d]);
        }
        _ => panic!("expected Shape, got {err:?}"),
    }
    assert_names(&err, &path, "values");
}

#[test]
fn queries_wrong_head_dim() {
    let dir = dir();
    let f = fixture();
    let mut raw = Raw::of(&f, dir.path());
    let [l, qh, q, d] = f.queries.shape;
    raw.set_f32(
        "queries",
        vec![l, qh, q, d + 1],
        &vec![0.5; l * qh * q * (d + 1)],
    );
    let (path, err) = open_err(&raw, dir.path(), "queries-dim.safetensors");
    assert!(
        matches!(
            err,
            KvDumpError::Shape {
                name: "queries",
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, &path, "queries");
    assert!(err.to_string().contains("head_dim"), "{err}");
}

#[test]
fn other_shape_mismatches() {
    let dir = dir();
    let f = fixture();

    // 3-d keys.
    let mut raw = Raw::of(&f, dir.path());
    let [l, kv, t, d] = f.keys.shape;
    raw.set_f32("keys", vec![l * kv, t, d], &f.keys.data);
    let (path, err) = open_err(&raw, dir.path(), "keys-3d.safetensors");
    assert!(
        matches!(err, KvDumpError::Shape { name: "keys", .. }),
        "{err:?}"
    );
    assert_names(&err, &path, "keys");

    // Fewer query positions than queries.
    let mut raw = Raw::of(&f, dir.path());
    raw.set_i64("query_positions", &[14, 15]);
    let (path, err) = open_err(&raw, dir.path(), "qpos-short.safetensors");
    assert!(
        matches!(
            err,
            KvDumpError::Shape {
                name: "query_positions",
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, &path, "query_positions");

    // token_ids not [tokens].
    let mut raw = Raw::of(&f, dir.path());
    raw.set_i64("token_ids", &[1, 2, 3]);
    let (path, err) = open_err(&raw, dir.path(), "ids-short.safetensors");
    assert!(
        matches!(
            err,
            KvDumpError::Shape {
                name: "token_ids",
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, &path, "token_ids");

    // `tokens` metadata disagrees with the tensors.
    let mut raw = Raw::of(&f, dir.path());
    raw.meta.insert("tokens".to_owned(), "17".to_owned());
    let (path, err) = open_err(&raw, dir.path(), "tokens-meta.safetensors");
    assert!(
        matches!(err, KvDumpError::Shape { name: "keys", .. }),
        "{err:?}"
    );
    assert_names(&err, &path, "keys");
}

#[test]
fn missing_tensor() {
    let dir = dir();
    let f = fixture();
    for name in ["keys", "values", "queries", "query_positions", "token_ids"] {
        let mut raw = Raw::of(&f, dir.path());
        raw.tensors.remove(name);
        let (path, err) = open_err(&raw, dir.path(), &format!("no-{name}.safetensors"));
        match &err {
            KvDumpError::MissingTensor { name: n, .. } => assert_eq!(*n, name),
            _ => panic!("expected MissingTensor for {name}, got {err:?}"),
        }
        assert_names(&err, &path, name);
    }

    // One of the training pair without the other.
    for (present, absent) in [
        ("train_queries", "train_positions"),
        ("train_positions", "train_queries"),
    ] {
        let mut raw = Raw::of(&f, dir.path());
        raw.tensors.remove(absent);
        assert!(raw.tensors.contains_key(present));
        let (path, err) = open_err(&raw, dir.path(), &format!("only-{present}.safetensors"));
        match &err {
            KvDumpError::MissingTensor { name, .. } => assert_eq!(*name, absent),
            _ => panic!("expected MissingTensor, got {err:?}"),
        }
        assert_names(&err, &path, absent);
    }

    // Neither: fine.
    let mut raw = Raw::of(&f, dir.path());
    raw.tensors.remove("train_queries");
    raw.tensors.remove("train_positions");
    let path = dir.path().join("no-train.safetensors");
    raw.write(&path);
    let d = KvDump::open(&path).unwrap();
    assert!(d.train_queries.is_none() && d.train_positions.is_none());
}

#[test]
fn bad_metadata_json() {
    let dir = dir();
    let mut raw = Raw::of(&fixture(), dir.path());
    raw.meta.insert("layers".to_owned(), "[5,".to_owned());
    let (path, err) = open_err(&raw, dir.path(), "layers-json.safetensors");
    match &err {
        KvDumpError::Metadata { key, .. } => assert_eq!(key, "layers"),
        _ => panic!("expected Metadata, got {err:?}"),
    }
    assert_names(&err, &path, "layers");
}

/// Sets metadata `key` to `value` and expects a Metadata error about `expect_key`.
fn meta_fault(key: &str, value: Option<&str>, expect_key: &str) {
    let dir = dir();
    let mut raw = Raw::of(&fixture(), dir.path());
    match value {
        Some(v) => raw.meta.insert(key.to_owned(), v.to_owned()),
        None => raw.meta.remove(key),
    };
    let (path, err) = open_err(&raw, dir.path(), &format!("meta-{key}.safetensors"));
    match &err {
        KvDumpError::Metadata { key: k, .. } => {
            assert_eq!(k, expect_key, "{key} = {value:?}: {err}")
        }
        _ => panic!("{key} = {value:?}: expected Metadata, got {err:?}"),
    }
    assert_names(&err, &path, expect_key);
}

#[test]
fn wrong_format_string() {
    meta_fault("format", Some("kvdump/2"), "format");
    meta_fault("format", None, "format");
}

#[test]
fn other_metadata_faults() {
    meta_fault("layers", Some("[1, \"x\"]"), "layers");
    meta_fault("layers", Some("[1, 9]"), "layers"); // >= num_layers_in_model
    meta_fault("layers", Some("[3, 3]"), "layers");
    meta_fault("layers", None, "layers");
    meta_fault("q_heads", Some("four"), "q_heads");
    meta_fault("q_heads", Some("3"), "q_heads"); // not a multiple of kv_heads = 2
    meta_fault("kv_heads", Some("0"), "kv_heads");
    meta_fault("head_dim", Some("-8"), "head_dim");
    meta_fault("tokens", None, "tokens");
    meta_fault("softmax_scale", Some("[0.125]"), "softmax_scale");
    meta_fault("softmax_scale", Some("[0.125, -1.0]"), "softmax_scale");
    meta_fault("softmax_scale", Some("[0.125, 0]"), "softmax_scale");
    meta_fault("softmax_scale", Some("0.125"), "softmax_scale");
    meta_fault("needle_token_range", Some("[4]"), "needle_token_range");
    meta_fault("needle_token_range", Some("[9, 4]"), "needle_token_range");
    meta_fault("needle_token_range", Some("[4, 17]"), "needle_token_range");
    meta_fault("rope_theta", Some("ten thousand"), "rope_theta");
    meta_fault("model", None, "model");
}

#[test]
fn no_metadata_at_all() {
    let dir = dir();
    let mut raw = Raw::of(&fixture(), dir.path());
    raw.meta.clear();
    let path = dir.path().join("bare.safetensors");
    let views: Vec<(String, TensorView<'_>)> = raw
        .tensors
        .iter()
        .map(|(n, (dt, s, b))| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let err = KvDump::open(&path).unwrap_err();
    assert!(
        matches!(&err, KvDumpError::Metadata { key, .. } if key == "format"),
        "{err:?}"
    );
    assert_names(&err, &path, "format");
}

#[test]
fn nan_in_keys() {
    let dir = dir();
    let f = fixture();
    let mut raw = Raw::of(&f, dir.path());
    let mut data = f.keys.data.clone();
    let [_, kv, t, d] = f.keys.shape;
    let bad = ((kv + 1) * t + 2) * d + 3; // [1, 1, 2, 3]
    data[bad] = f32::NAN;
    data[bad + 5] = f32::INFINITY;
    raw.set_f32("keys", f.keys.shape.to_vec(), &data);
    let (path, err) = open_err(&raw, dir.path(), "keys-nan.safetensors");
    assert!(
        matches!(err, KvDumpError::Values { name: "keys", .. }),
        "{err:?}"
    );
    assert_names(&err, &path, "keys");
    let msg = err.to_string();
    assert!(msg.contains("[1, 1, 2, 3]"), "{msg}");
    assert!(msg.contains("NaN"), "{msg}");

    // Inf in f16 values.
    let mut raw = Raw::of(&f, dir.path());
    let (dtype, shape, mut bytes) = raw.tensors["values"].clone();
    assert_eq!(dtype, Dtype::F16);
    bytes[0..2].copy_from_slice(&half::f16::INFINITY.to_bits().to_le_bytes());
    raw.tensors
        .insert("values".to_owned(), (dtype, shape, bytes));
    let (path, err) = open_err(&raw, dir.path(), "values-inf.safetensors");
    assert!(
        matches!(err, KvDumpError::Values { name: "values", .. }),
        "{err:?}"
    );
    assert_names(&err, &path, "values");
    assert!(err.to_string().contains("[0, 0, 0, 0]"), "{err}");
}

#[test]
fn position_out_of_range() {
    let dir = dir();
    let f = fixture();
    let mut raw = Raw::of(&f, dir.path());
    raw.set_i64("query_positions", &[13, 16, 15]); // tokens = 16
    let (path, err) = open_err(&raw, dir.path(), "qpos-range.safetensors");
    assert!(
        matches!(
            err,
            KvDumpError::Values {
                name: "query_positions",
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, &path, "query_positions");
    assert!(err.to_string().contains("16"), "{err}");

    let mut raw = Raw::of(&f, dir.path());
    raw.set_i64("train_positions", &[2, 5, -7, 9, 11]);
    let (path, err) = open_err(&raw, dir.path(), "tpos-negative.safetensors");
    assert!(
        matches!(
            err,
            KvDumpError::Values {
                name: "train_positions",
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, &path, "train_positions");
}

#[test]
fn writer_refuses_what_the_reader_rejects() {
    let dir = dir();
    let path = dir.path().join("never-written.safetensors");

    let mut f = fixture();
    f.keys.data[4] = f32::NAN;
    let err = f.write(&path).unwrap_err();
    assert!(
        matches!(err, KvDumpError::Values { name: "keys", .. }),
        "{err:?}"
    );
    assert_names(&err, &path, "keys");

    let mut f = fixture();
    f.queries.data[0] = 1e6; // finite in f32, inf in f16
    let err = f.write(&path).unwrap_err();
    assert!(
        matches!(
            err,
            KvDumpError::Values {
                name: "queries",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("f16"), "{err}");

    let mut f = fixture();
    f.values = Tensor4::zeros([2, 2, 15, 8]);
    let err = f.write(&path).unwrap_err();
    assert!(
        matches!(err, KvDumpError::Shape { name: "values", .. }),
        "{err:?}"
    );

    let mut f = fixture();
    f.keys.data.pop(); // data shorter than its shape
    let err = f.write(&path).unwrap_err();
    assert!(
        matches!(err, KvDumpError::Values { name: "keys", .. }),
        "{err:?}"
    );

    let mut f = fixture();
    f.query_positions[1] = 16;
    let err = f.write(&path).unwrap_err();
    assert!(
        matches!(
            err,
            KvDumpError::Values {
                name: "query_positions",
                ..
            }
        ),
        "{err:?}"
    );

    let mut f = fixture();
    f.meta.softmax_scale.push(1.0);
    let err = f.write(&path).unwrap_err();
    assert!(
        matches!(&err, KvDumpError::Metadata { key, .. } if key == "softmax_scale"),
        "{err:?}"
    );

    let mut f = fixture();
    f.meta.format = "kvdump/0".to_owned();
    let err = f.write(&path).unwrap_err();
    assert!(
        matches!(&err, KvDumpError::Metadata { key, .. } if key == "format"),
        "{err:?}"
    );

    assert!(!path.exists());
    // No temporaries left behind either.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
