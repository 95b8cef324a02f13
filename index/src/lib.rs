//! strata-index: balanced clustering of keys, boundary replication, posting lists on disk, the
//! in-RAM centroids and key codes, query-aware search, and the baselines it is measured against.

pub mod baselines;
pub mod build;
pub mod codes;
pub mod kmeans;
pub mod linalg;
pub mod manifest;
pub mod manifest_v1;
pub mod metric;
pub mod params;
pub mod routing;
pub mod rows;
pub mod search;
pub mod simd;

use std::path::PathBuf;

pub use build::{
    build_index, build_index_from, BuildInput, BuildProgress, BuildReport, HeadArrays,
};
pub use params::{BuildParams, SearchParams};
pub use search::{Index, Remainder, Retrieved, SearchPhases, SearchStats};

/// Errors of index build and search; each names the file, parameter or query it is about.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("parameter `{name}`: {problem}")]
    Param { name: &'static str, problem: String },
    #[error("index {path}: {problem}")]
    Open { path: PathBuf, problem: String },
    #[error(transparent)]
    Storage(#[from] strata_storage::StorageError),
    #[error(transparent)]
    Dump(#[from] strata_storage::kvdump::KvDumpError),
    #[error("cannot encode {what}: {problem}")]
    Encode { what: &'static str, problem: String },
    #[error("query (layer slot {layer_slot}, kv head {kv_head}, position {position}): {problem}")]
    Query {
        layer_slot: usize,
        kv_head: usize,
        position: usize,
        problem: String,
    },
    #[error("build into {path}: {problem}")]
    Build { path: PathBuf, problem: String },
    #[error("baseline {name}: {problem}")]
    Baseline { name: &'static str, problem: String },
}

pub type IndexResult<T> = Result<T, IndexError>;
