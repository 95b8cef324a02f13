//! strata-engine: attention over the tokens a retrieval chose plus the static ones, with the
//! log-sum-exp a client needs to merge partial attentions, and the quality metrics of DESIGN.md.
//! Sessions, the decode step and tier placement build on these next.

pub mod attention;
pub mod metrics;
