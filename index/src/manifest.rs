//! The index manifest: centroids, per-list statistics, list locations and key codes of every
//! (layer, KV head), archived with rkyv in one file (`index.strata`) that is memory-mapped and
//! validated (footer CRC, then bytecheck) once on open, then read in place without copying.

use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rkyv::rancor;
use strata_storage::footer;

use crate::params::BuildParams;
use crate::IndexError;

pub const INDEX_FILE: &str = "index.strata";
pub const INDEX_MAGIC: [u8; 8] = *b"STRIDX\0\x01";
/// Version 5: on heads clustered under the query metric (`metric_queries` > 0, and enough of
/// them: `routing::fit_stride`) the centroid codes hold routing vectors fitted to the train
/// queries (`routing`), not the lists' key means; same archive layout and search. Version 4: key
/// codes may also be 3-bit residual codes (`codes::RESIDUAL_CODE_BITS`), in the archive layout
/// of version 2. Version 3: centroids as 4-bit codes ([`CENTROID_CODE_BITS`]).
/// Version 2: centroids as 8-bit codes (v1: f32), per-list and per-group mean values as f16
/// (v1: f32 list sums), the query-aware metric recorded per head and in the build parameters.
/// Versions 2 to 4 open as they are, version 1 indexes are upgraded in memory (see
/// `manifest_v1`).
pub const INDEX_VERSION: u32 = 5;

/// Bytes before a posting list's ids: magic, list id, member count, dimension.
pub const LIST_HEADER_BYTES: usize = 16;
pub const LIST_MAGIC: u32 = u32::from_le_bytes(*b"LIST");

#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SourceInfo {
    pub dump_path: String,
    pub model: String,
    pub model_type: String,
    pub layers: Vec<u32>,
    pub q_heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub tokens: u32,
    pub softmax_scale: Vec<f32>,
    /// Hash of model + layers + token ids: a new session over the same context reuses this index.
    pub content_hash: u64,
}

#[derive(Clone, Copy, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ListLoc {
    pub offset: u64,
    pub len: u32,
    pub padded_len: u32,
    pub crc32: u32,
    /// Members stored (primary and replicas).
    pub members: u32,
}

#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct HeadManifest {
    pub layer_slot: u32,
    pub kv_head: u32,
    pub tokens: u32,
    pub dim: u32,
    /// Index into `Manifest::segments`.
    pub segment: u32,
    /// `lists` centroids (means of the primary members) as packed codes of the quantiser
    /// `centroid_lo`/`centroid_step`, [`CENTROID_CODE_BITS`] per dimension (8 in version 2):
    /// search only ranks lists by them, and the fewer bytes, the less centroid traffic every
    /// query has.
    pub centroid_codes: Vec<u8>,
    pub centroid_lo: Vec<f32>,
    pub centroid_step: Vec<f32>,
    pub lists: Vec<ListLoc>,
    /// `lists × dim`: mean value of the primary members (for remainder estimation), f16 bits.
    pub value_means: Vec<u16>,
    /// Largest key norm in each list.
    pub max_key_norm: Vec<f32>,
    /// Largest distance of a primary member from its list's key mean (not from the routing
    /// vector a version-5 index stores as the centroid).
    pub radius: Vec<f32>,
    /// Second level (empty when the head has few lists): `groups` centroids (codes of the same
    /// quantiser), the list ids ordered by group, and `groups + 1` offsets into that order.
    pub group_centroid_codes: Vec<u8>,
    /// `groups × dim` mean value of each group's primary members (f16 bits), so that the
    /// remainder estimate stands for a whole unexpanded group with one term. Empty when the
    /// head has no second level (or was upgraded from version 1).
    pub group_value_means: Vec<u16>,
    pub group_lists: Vec<u32>,
    pub group_start: Vec<u32>,
    /// Primary members of every list, list after list, and `lists + 1` offsets.
    pub primary_tokens: Vec<u32>,
    pub primary_start: Vec<u32>,
    /// Key codes in the order of `primary_tokens`, in blocks of `codes::CODE_BLOCK` keys per
    /// list (the last block of a list padded), and `lists + 1` block offsets.
    pub code_bits: u32,
    pub code_lo: Vec<f32>,
    pub code_step: Vec<f32>,
    pub codes: Vec<u8>,
    pub code_block_start: Vec<u32>,
    /// Extra copies stored by boundary replication.
    pub replicas: u64,
    /// Prefill queries the clustering metric was fitted to (`BuildParams::query_aware`); 0 when
    /// the keys were clustered by plain key distance.
    pub metric_queries: u32,
}

#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Manifest {
    pub build: BuildParams,
    pub source: SourceInfo,
    /// Segment file names, relative to the index folder.
    pub segments: Vec<String>,
    /// One per (layer slot, KV head), layer-major.
    pub heads: Vec<HeadManifest>,
    pub build_seconds: f64,
}

/// `&[f32_le]` from an archive as `&[f32]`; the archive is little-endian like this machine.
#[cfg(target_endian = "little")]
pub fn f32s(v: &rkyv::vec::ArchivedVec<rend::f32_le>) -> &[f32] {
    bytemuck::cast_slice(v.as_slice())
}

#[cfg(target_endian = "little")]
pub fn u16s(v: &rkyv::vec::ArchivedVec<rend::u16_le>) -> &[u16] {
    bytemuck::cast_slice(v.as_slice())
}

/// Bits of the centroid codes this version writes. Search only ranks lists by their
/// centroids: on the shared dumps 4-bit codes rank them as well as 8-bit ones (recall@100 and
/// covered mass within 0.001) and halve the centroid bytes every query reads.
pub const CENTROID_CODE_BITS: u32 = 4;

/// Bits of the centroid codes of a version-2 index.
const V2_CENTROID_CODE_BITS: u32 = 8;

/// The centroid codes of a head ([`CENTROID_CODE_BITS`] each): one quantiser fitted to the list
/// and group centroids together (`dim`-wide rows), and the codes of each.
pub fn encode_centroids(
    centroids: &[f32],
    group_centroids: &[f32],
    dim: usize,
) -> (crate::codes::ScalarQuantizer, Vec<u8>, Vec<u8>) {
    if dim == 0 {
        // A dimensionless head (only a damaged version-1 manifest has one): nothing to encode;
        // the head check refuses it with a named error.
        let sq = crate::codes::ScalarQuantizer::fit(&[], 0, CENTROID_CODE_BITS);
        return (sq, Vec::new(), Vec::new());
    }
    let all: Vec<f32> = centroids.iter().chain(group_centroids).copied().collect();
    let sq = crate::codes::ScalarQuantizer::fit(&all, dim, CENTROID_CODE_BITS);
    let encode = |rows: &[f32]| {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows.chunks_exact(dim) {
            sq.encode(r, &mut out);
        }
        out
    };
    let (c, g) = (encode(centroids), encode(group_centroids));
    (sq, c, g)
}

#[cfg(target_endian = "little")]
pub fn u32s(v: &rkyv::vec::ArchivedVec<rend::u32_le>) -> &[u32] {
    bytemuck::cast_slice(v.as_slice())
}

/// Serialises the manifest, ending the bytes with the strata footer.
pub fn encode(manifest: &Manifest) -> Result<Vec<u8>, IndexError> {
    let bytes = rkyv::to_bytes::<rancor::Error>(manifest).map_err(|e| IndexError::Encode {
        what: "manifest",
        problem: e.to_string(),
    })?;
    let mut out = bytes.to_vec();
    let foot = footer::encode_footer(INDEX_MAGIC, INDEX_VERSION, &out);
    out.extend_from_slice(&foot);
    Ok(out)
}

/// f32 values as f16 bits, as the manifest stores mean values.
pub fn to_f16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect()
}

/// Where the validated archive lives: the file's map, or (for an older version) the upgraded
/// archive in memory.
enum Backing {
    Mapped(Mmap),
    Upgraded(rkyv::util::AlignedVec),
}

/// The memory-mapped, validated manifest.
pub struct MappedManifest {
    path: PathBuf,
    backing: Backing,
    payload_len: usize,
    /// Bits of its centroid codes: those of the version it was written in.
    centroid_code_bits: u32,
    /// Key code widths its version knows.
    key_code_bits: &'static [u32],
    /// Whether its version fits routing vectors (since version 5).
    fitted_routes: bool,
}

/// Key code widths of versions 1 to 3 (no residual codes).
const V3_KEY_CODE_BITS: [u32; 4] = [1, 2, 4, 8];

impl MappedManifest {
    pub fn open(dir: &Path) -> Result<Self, IndexError> {
        let path = dir.join(INDEX_FILE);
        let file = std::fs::File::open(&path).map_err(|e| IndexError::Open {
            path: path.clone(),
            problem: format!("cannot open: {e}"),
        })?;
        // SAFETY: the index folder belongs to strata and its files are written once (temp file,
        // then rename) and never modified in place, so the mapped bytes do not change under us.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| IndexError::Open {
            path: path.clone(),
            problem: format!("cannot map: {e}"),
        })?;
        let invalid = |e: rancor::Error| IndexError::Open {
            path: path.clone(),
            problem: format!("manifest fails validation: {e}"),
        };
        let (payload, version) =
            footer::check_whole_of_versions(&path, &mmap, INDEX_MAGIC, 1..=INDEX_VERSION)?;
        // Versions 2 to 5 share one layout and differ in the centroid codes' bits (8 in
        // version 2), in the key codes they may hold (residual codes since version 4) and in
        // what the centroid codes hold (fitted routing vectors since version 5).
        let formats = match version {
            2 => Some((V2_CENTROID_CODE_BITS, &V3_KEY_CODE_BITS[..])),
            3 => Some((CENTROID_CODE_BITS, &V3_KEY_CODE_BITS[..])),
            4 | INDEX_VERSION => Some((CENTROID_CODE_BITS, &crate::codes::CODE_BITS[..])),
            _ => None,
        };
        if let Some((centroid_code_bits, key_code_bits)) = formats {
            let payload_len = payload.len();
            rkyv::access::<ArchivedManifest, rancor::Error>(payload).map_err(invalid)?;
            return Ok(MappedManifest {
                path,
                backing: Backing::Mapped(mmap),
                payload_len,
                centroid_code_bits,
                key_code_bits,
                fitted_routes: version >= 5,
            });
        }
        // Version 1: f32 centroids and value sums, no metric. A new version must decide what
        // happens to version 5 here first.
        const _: () = assert!(INDEX_VERSION == 5, "decide how version 5 manifests open");
        let upgraded = crate::manifest_v1::upgrade(payload).map_err(invalid)?;
        let bytes = rkyv::to_bytes::<rancor::Error>(&upgraded).map_err(invalid)?;
        rkyv::access::<ArchivedManifest, rancor::Error>(&bytes).map_err(invalid)?;
        log::info!(
            "{}: index format version {version}, upgraded in memory (rebuild to write version {INDEX_VERSION})",
            path.display()
        );
        Ok(MappedManifest {
            path,
            payload_len: bytes.len(),
            backing: Backing::Upgraded(bytes),
            centroid_code_bits: CENTROID_CODE_BITS,
            key_code_bits: &V3_KEY_CODE_BITS,
            fitted_routes: false,
        })
    }

    fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Mapped(m) => &m[..self.payload_len],
            Backing::Upgraded(v) => &v[..self.payload_len],
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bits of each centroid code (8 in version 2, 4 since version 3).
    pub fn centroid_code_bits(&self) -> u32 {
        self.centroid_code_bits
    }

    /// Key code widths the manifest's version may hold (residual codes since version 4).
    pub fn key_code_bits(&self) -> &'static [u32] {
        self.key_code_bits
    }

    /// Whether the centroid codes of heads clustered under the query metric hold routing
    /// vectors fitted to the train queries (version 5 on) rather than key means.
    pub fn fitted_routes(&self) -> bool {
        self.fitted_routes
    }

    pub fn get(&self) -> &ArchivedManifest {
        // SAFETY: `open` validated exactly these bytes with bytecheck (`rkyv::access`); the map
        // is read-only, the upgraded buffer is never written again, and both live as long as
        // `self`.
        unsafe { rkyv::access_unchecked::<ArchivedManifest>(self.bytes()) }
    }

    /// An owned copy (for tools and tests that rewrite a manifest).
    pub fn to_owned(&self) -> Result<Manifest, IndexError> {
        rkyv::deserialize::<Manifest, rancor::Error>(self.get()).map_err(|e| IndexError::Open {
            path: self.path.clone(),
            problem: format!("cannot copy the manifest: {e}"),
        })
    }

    /// Bytes the manifest holds in RAM (mapped or upgraded).
    pub fn mapped_bytes(&self) -> usize {
        match &self.backing {
            Backing::Mapped(m) => m.len(),
            Backing::Upgraded(v) => v.len(),
        }
    }
}
