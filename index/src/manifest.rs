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
pub const INDEX_VERSION: u32 = 1;

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
    /// `lists × dim` centroids (means of the primary members).
    pub centroids: Vec<f32>,
    pub lists: Vec<ListLoc>,
    /// `lists × dim`: sum of the values of the primary members (for remainder estimation).
    pub value_sums: Vec<f32>,
    /// Largest key norm in each list.
    pub max_key_norm: Vec<f32>,
    /// Largest distance of a primary member from its centroid.
    pub radius: Vec<f32>,
    /// Second level (empty when the head has few lists): `groups × dim` centroids, the list ids
    /// ordered by group, and `groups + 1` offsets into that order.
    pub group_centroids: Vec<f32>,
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

/// The memory-mapped, validated manifest.
pub struct MappedManifest {
    path: PathBuf,
    mmap: Mmap,
    payload_len: usize,
}

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
        let payload = footer::check_whole(&path, &mmap, INDEX_MAGIC, INDEX_VERSION)?;
        let payload_len = payload.len();
        rkyv::access::<ArchivedManifest, rancor::Error>(payload).map_err(|e| IndexError::Open {
            path: path.clone(),
            problem: format!("manifest fails validation: {e}"),
        })?;
        Ok(MappedManifest {
            path,
            mmap,
            payload_len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self) -> &ArchivedManifest {
        // SAFETY: `open` validated exactly these bytes with bytecheck (`rkyv::access`), and the
        // map is read-only and lives as long as `self`.
        unsafe { rkyv::access_unchecked::<ArchivedManifest>(&self.mmap[..self.payload_len]) }
    }

    pub fn mapped_bytes(&self) -> usize {
        self.mmap.len()
    }
}
