//! Index format version 1, frozen: the manifest layout written before version 2, kept so that
//! such indexes still open. Version 1 stored centroids as f32 and had no query-aware metric;
//! `upgrade` converts its archive into the current `Manifest` in memory.

use rkyv::rancor;

use crate::manifest::{encode_centroids, to_f16_bits, HeadManifest, ListLoc, Manifest, SourceInfo};
use crate::params::BuildParams;

#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct BuildParamsV1 {
    pub list_size: u32,
    pub kmeans_iters: u32,
    pub kmeans_sample_per_list: u32,
    pub balance_penalty: f32,
    pub max_list_factor: f32,
    pub hierarchy_threshold: u32,
    pub lists_per_group: u32,
    pub replica_max: u32,
    pub replica_epsilon: f32,
    pub code_bits: u32,
    pub seed: u64,
}

#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct HeadManifestV1 {
    pub layer_slot: u32,
    pub kv_head: u32,
    pub tokens: u32,
    pub dim: u32,
    pub segment: u32,
    pub centroids: Vec<f32>,
    pub lists: Vec<ListLoc>,
    pub value_sums: Vec<f32>,
    pub max_key_norm: Vec<f32>,
    pub radius: Vec<f32>,
    pub group_centroids: Vec<f32>,
    pub group_lists: Vec<u32>,
    pub group_start: Vec<u32>,
    pub primary_tokens: Vec<u32>,
    pub primary_start: Vec<u32>,
    pub code_bits: u32,
    pub code_lo: Vec<f32>,
    pub code_step: Vec<f32>,
    pub codes: Vec<u8>,
    pub code_block_start: Vec<u32>,
    pub replicas: u64,
}

#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ManifestV1 {
    pub build: BuildParamsV1,
    pub source: SourceInfo,
    pub segments: Vec<String>,
    pub heads: Vec<HeadManifestV1>,
    pub build_seconds: f64,
}

/// Validates a version-1 payload and converts it to the current manifest.
pub fn upgrade(payload: &[u8]) -> Result<Manifest, rancor::Error> {
    let archived = rkyv::access::<ArchivedManifestV1, rancor::Error>(payload)?;
    let old: ManifestV1 = rkyv::deserialize::<ManifestV1, rancor::Error>(archived)?;
    let b = old.build;
    Ok(Manifest {
        build: BuildParams {
            list_size: b.list_size,
            kmeans_iters: b.kmeans_iters,
            kmeans_sample_per_list: b.kmeans_sample_per_list,
            balance_penalty: b.balance_penalty,
            max_list_factor: b.max_list_factor,
            hierarchy_threshold: b.hierarchy_threshold,
            lists_per_group: b.lists_per_group,
            replica_max: b.replica_max,
            replica_epsilon: b.replica_epsilon,
            code_bits: b.code_bits,
            query_aware: false,
            seed: b.seed,
            ..BuildParams::default()
        },
        source: old.source,
        segments: old.segments,
        heads: old
            .heads
            .into_iter()
            .map(|h| {
                let (csq, centroid_codes, group_centroid_codes) =
                    encode_centroids(&h.centroids, &h.group_centroids, h.dim as usize);
                HeadManifest {
                    layer_slot: h.layer_slot,
                    kv_head: h.kv_head,
                    tokens: h.tokens,
                    dim: h.dim,
                    segment: h.segment,
                    centroid_codes,
                    centroid_lo: csq.lo,
                    centroid_step: csq.step,
                    lists: h.lists,
                    value_means: {
                        let starts = &h.primary_start;
                        let dim = h.dim as usize;
                        let means: Vec<f32> = h
                            .value_sums
                            .chunks_exact(dim.max(1))
                            .enumerate()
                            .flat_map(|(l, s)| {
                                let n = match (starts.get(l), starts.get(l + 1)) {
                                    (Some(a), Some(b)) => b.saturating_sub(*a).max(1),
                                    _ => 1,
                                } as f32;
                                s.iter().map(move |v| v / n)
                            })
                            .collect();
                        to_f16_bits(&means)
                    },
                    max_key_norm: h.max_key_norm,
                    radius: h.radius,
                    group_centroid_codes,
                    group_value_means: Vec::new(),
                    group_lists: h.group_lists,
                    group_start: h.group_start,
                    primary_tokens: h.primary_tokens,
                    primary_start: h.primary_start,
                    code_bits: h.code_bits,
                    code_lo: h.code_lo,
                    code_step: h.code_step,
                    codes: h.codes,
                    code_block_start: h.code_block_start,
                    replicas: h.replicas,
                    metric_queries: 0,
                }
            })
            .collect(),
        build_seconds: old.build_seconds,
    })
}
