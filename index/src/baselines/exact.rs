//! Exact references: full attention over every visible key, and the oracle that attends the
//! exact top tokens within the budget.

use std::time::Instant;

use super::{rerank, HeadRetriever};
use crate::params::SearchParams;
use crate::search::{Retrieved, SearchStats};
use crate::IndexResult;

/// Full attention: every visible key (the budget does not apply).
pub struct ExactAll<'a> {
    pub keys: &'a [f32],
    pub dim: usize,
}

/// The exact top `budget` tokens: the best any retrieval can do within the budget.
pub struct Oracle<'a> {
    pub keys: &'a [f32],
    pub dim: usize,
}

impl HeadRetriever for ExactAll<'_> {
    fn retrieve(
        &self,
        q: &[f32],
        position: usize,
        params: &SearchParams,
    ) -> IndexResult<Retrieved> {
        let t0 = Instant::now();
        let mut r = rerank(
            self.keys,
            self.dim,
            q,
            position,
            params,
            0..=position as u32,
            usize::MAX,
            SearchStats::default(),
        );
        r.stats.search_ns = t0.elapsed().as_nanos() as u64;
        Ok(r)
    }
}

impl HeadRetriever for Oracle<'_> {
    fn retrieve(
        &self,
        q: &[f32],
        position: usize,
        params: &SearchParams,
    ) -> IndexResult<Retrieved> {
        let t0 = Instant::now();
        let mut r = rerank(
            self.keys,
            self.dim,
            q,
            position,
            params,
            0..=position as u32,
            params.budget_tokens(position),
            SearchStats::default(),
        );
        r.stats.search_ns = t0.elapsed().as_nanos() as u64;
        Ok(r)
    }
}
