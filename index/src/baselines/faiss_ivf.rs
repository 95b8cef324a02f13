//! FAISS IVF-Flat with inner product (the `faiss` crate, statically linked; cargo feature
//! `faiss`). nlist and the scanned-key target match the plain IVF baseline.

use std::sync::Mutex;

use faiss::index::flat::FlatIndexImpl;
use faiss::index::ivf_flat::IVFFlatIndexImpl;
use faiss::Index;

use super::{neighbours_wanted, BaselineParams, HeadRetriever};
use crate::params::SearchParams;
use crate::search::SearchStats;
use crate::{IndexError, IndexResult};

pub struct FaissIvfFlat<'a> {
    keys: &'a [f32],
    dim: usize,
    index: Mutex<IVFFlatIndexImpl>,
    nlist: usize,
    scan_factor: f32,
}

fn ferr(e: faiss::error::Error) -> IndexError {
    IndexError::Baseline {
        name: "ivf-faiss",
        problem: e.to_string(),
    }
}

impl<'a> FaissIvfFlat<'a> {
    pub fn build(keys: &'a [f32], dim: usize, p: &BaselineParams) -> IndexResult<Self> {
        let n = keys.len() / dim;
        let nlist = n.div_ceil(p.ivf_list_size.max(1) as usize).max(1);
        let quantizer = FlatIndexImpl::new_ip(dim as u32).map_err(ferr)?;
        let mut index =
            IVFFlatIndexImpl::new_ip(quantizer, dim as u32, nlist as u32).map_err(ferr)?;
        index.train(keys).map_err(ferr)?;
        index.add(keys).map_err(ferr)?;
        Ok(FaissIvfFlat {
            keys,
            dim,
            index: Mutex::new(index),
            nlist,
            scan_factor: p.ivf_scan_factor,
        })
    }
}

impl HeadRetriever for FaissIvfFlat<'_> {
    fn keys(&self) -> (&[f32], usize) {
        (self.keys, self.dim)
    }

    fn propose(
        &self,
        q: &[f32],
        position: usize,
        budget: usize,
        params: &SearchParams,
    ) -> IndexResult<(Vec<u32>, SearchStats)> {
        let n = self.keys.len() / self.dim;
        let avg = n as f64 / self.nlist as f64;
        let nprobe = ((self.scan_factor as f64 * budget as f64) / avg)
            .ceil()
            .clamp(1.0, self.nlist as f64) as u32;
        let want = neighbours_wanted(n, position, budget, params);
        let res = {
            let mut index = self.index.lock().map_err(|_| IndexError::Baseline {
                name: "ivf-faiss",
                problem: "index lock poisoned".into(),
            })?;
            index.set_nprobe(nprobe);
            index.search(q, want.min(n)).map_err(ferr)?
        };
        let stats = SearchStats {
            centroids_scored: self.nlist as u64,
            lists_read: nprobe as u64,
            // FAISS scans whole probed lists, more than it returns.
            keys_scored: (nprobe as f64 * avg).round() as u64,
            ..Default::default()
        };
        let toks = res
            .labels
            .iter()
            .filter_map(|l| l.get())
            .map(|t| t as u32)
            .collect();
        Ok((toks, stats))
    }
}
