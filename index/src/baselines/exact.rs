//! Exact references: full attention over every visible key, and the oracle that attends the
//! exact top tokens within the budget.

use super::HeadRetriever;
use crate::params::SearchParams;
use crate::search::SearchStats;
use crate::IndexResult;

/// Proposes every visible key. With `full` it attends all of them (full attention, the budget
/// does not apply); without, the exact top `budget` (the oracle: the best any retrieval can do
/// within the budget).
pub struct Exact<'a> {
    pub keys: &'a [f32],
    pub dim: usize,
    pub full: bool,
}

impl HeadRetriever for Exact<'_> {
    fn keys(&self) -> (&[f32], usize) {
        (self.keys, self.dim)
    }

    fn propose(
        &self,
        _q: &[f32],
        position: usize,
        _budget: usize,
        _params: &SearchParams,
    ) -> IndexResult<(Vec<u32>, SearchStats)> {
        Ok(((0..=position as u32).collect(), SearchStats::default()))
    }

    fn keep(&self, budget: usize) -> usize {
        if self.full {
            usize::MAX
        } else {
            budget
        }
    }
}
