//! Every tunable of index build and search, named once, with its default, in one place.
//! `strata inspect` prints these tables; the CLI overrides them by name (`--set name=value`).

use serde::{Deserialize, Serialize};

use crate::IndexError;

/// Residual codes (`code_bits` 3) span each channel between its residuals' 0.5th and 99.5th
/// percentiles: the extremes of a few keys would otherwise stretch every step (a numpy
/// prototype, `tools/prototype/residual_codes.py`, chose it over 0 and 2).
pub const RESIDUAL_CLIP_PERCENTILE: f32 = 0.5;

/// The residual codes' range is fitted to at most this many residuals per head (evenly spread
/// over the lists): percentiles need no more, and the build then holds no copy of the keys.
pub const RESIDUAL_FIT_SAMPLE: usize = 65_536;

/// Fitting routing vectors (`routing`) scores every train query against every key of a head:
/// above this many (query, key) pairs the train queries are thinned evenly to fit. Every train
/// query of the shared dumps fits (Gemma-3: 4,096 × 16,384); using a quarter of them there
/// gave back a quarter of the fit's gain (numpy prototype), so the cap is set where the fit
/// costs a build about one core-second per such head on this 2-core machine.
pub const ROUTE_FIT_PAIRS: usize = 1 << 26;

/// A head gets fitted routing vectors only when at least this many train queries per dimension
/// remain after thinning (Gemma-3: 1,024 of its 4,096 queries, 4 per dimension, kept 75% of the
/// fit's gain in the prototype); otherwise its lists keep their key means.
pub const ROUTE_FIT_MIN_ROWS_PER_DIM: usize = 4;

/// Build-time parameters (stored in the index manifest so a search knows how it was built).
#[derive(
    Clone,
    Debug,
    PartialEq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct BuildParams {
    /// Mean number of keys per posting list (primary members; replicas come on top).
    pub list_size: u32,
    /// Lloyd iterations of the balanced k-means.
    pub kmeans_iters: u32,
    /// Keys sampled per centroid to train the k-means (the rest are only assigned).
    pub kmeans_sample_per_list: u32,
    /// Weight of the size penalty in the balanced assignment (SPANN): 0 gives plain k-means
    /// (lists stay bounded by `max_list_factor`). 0 by default: on the real dumps the penalty
    /// cost covered attention mass at the same bytes (docs/BENCHMARKS.md, sixth session).
    pub balance_penalty: f32,
    /// Hard cap on a list's primary members, as a multiple of `list_size`.
    pub max_list_factor: f32,
    /// Above this many lists, centroids are grouped under a second level (hierarchical search).
    pub hierarchy_threshold: u32,
    /// Lists per top-level group when the hierarchy is built.
    pub lists_per_group: u32,
    /// Most lists one key may be stored in (1 = no replication).
    pub replica_max: u32,
    /// A key is replicated into a nearby list only if its squared distance to that centroid is at
    /// most `(1 + replica_epsilon)` times the distance to its own centroid (SPANN closure rule).
    pub replica_epsilon: f32,
    /// Bits per dimension of the in-RAM key codes used for candidate scoring (1, 2, 3, 4 or 8).
    /// 3 (the default) means codes of each key's residual from its list's centroid, their range
    /// clipped at the `RESIDUAL_CLIP_PERCENTILE`-th percentiles (`codes::RESIDUAL_CODE_BITS`):
    /// on the real dumps as good as 4-bit key codes, with a quarter fewer code bytes (and RAM),
    /// for about 1.5× the scoring work per code.
    pub code_bits: u32,
    /// Query-aware clustering: when the source has at least `dim` prefill queries per KV head
    /// (a dump's `train_queries`), cluster keys under the metric `(k1-k2)ᵀ M (k1-k2)` with
    /// `M = E[q qᵀ]` over those queries, so that keys that score alike for real queries share a
    /// list. false: plain key distance.
    pub query_aware: bool,
    /// Ridge added to `M` as a fraction of its mean eigenvalue (`trace / dim`), so that
    /// directions no training query looks at still separate keys a little.
    pub query_metric_ridge: f32,
    /// Seed for every random choice of the build (results are reproducible).
    pub seed: u64,
}

impl Default for BuildParams {
    fn default() -> Self {
        BuildParams {
            list_size: 32,
            kmeans_iters: 8,
            kmeans_sample_per_list: 64,
            balance_penalty: 0.0,
            max_list_factor: 2.0,
            hierarchy_threshold: 512,
            lists_per_group: 32,
            replica_max: 2,
            replica_epsilon: 0.1,
            code_bits: 3,
            query_aware: true,
            query_metric_ridge: 1e-3,
            seed: 0x5eed_57a7a,
        }
    }
}

/// Search-time parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// A field missing from serialised parameters takes its value from `Default` below.
#[serde(default)]
pub struct SearchParams {
    /// Attended tokens beyond the static ones, as a fraction of visible keys (0, 1].
    pub budget: f32,
    /// Sink tokens at the start of the context, always attended.
    pub sink_tokens: u32,
    /// Most recent positions (p-63..=p for 64), always attended.
    pub recent_tokens: u32,
    /// Fraction of visible keys whose codes are scored: the lists with the best routing scores
    /// (centroid codes) are taken until their members reach this fraction.
    pub probe_fraction: f32,
    /// On a head with a second level (`hierarchy_threshold`), groups are expanded best first
    /// until their lists hold this many times the probe target: a group's score is a coarse
    /// proxy for its lists', so good lists sit in groups ranked below the probe's share.
    pub group_expand_factor: f32,
    /// Candidates kept from code scoring, as a multiple of the attended budget; their lists are
    /// read and they are re-ranked with exact scores (but see `code_trusted_fraction`).
    pub rerank_factor: f32,
    /// Share of the budget taken on code scores alone: these candidates' keys are not read and
    /// their code scores serve as their logits. They are the candidates the codes rank just
    /// below the best `code_trusted_from` of the budget: the best ones carry most of the
    /// attention weight and the last ones decide the cut, so both are scored exactly. 0
    /// re-ranks every kept candidate exactly.
    pub code_trusted_fraction: f32,
    /// Where the candidates taken on their codes start in the code ranking, as a share of the
    /// budget (see `code_trusted_fraction`).
    pub code_trusted_from: f32,
    /// Adaptive budget: when set (in (0, 1]), attend the exactly scored candidates in descending
    /// score only until the *estimated* covered mass (static tokens included) reaches this
    /// target, never more than `budget` allows. None: always attend the full budget.
    pub target_mass: Option<f32>,
    /// Return an estimate of attention over the visible, non-static tokens not attended exactly
    /// (RetroInfer's idea), from per-list centroids, sizes and value sums, for the caller to
    /// merge by log-sum-exp with the exact part.
    pub estimate_remainder: bool,
    /// Probed tokens not attended are estimated with the logit of their in-RAM key code (already
    /// scored) instead of their list's centroid. Values are always the list's mean value.
    pub remainder_code_logits: bool,
    /// Variance correction of a centroid-estimated logit: `+ ½·s²·|q|²·σ²` with the per-dimension
    /// variance `σ² = remainder_variance · radius² / dim` (radius: largest member distance from
    /// the centroid). 0 turns it off.
    pub remainder_variance: f32,
    /// Correction of a code-estimated logit for the quantisation noise of the codes:
    /// `− remainder_code_noise · ½·s²·Σ_d q_d²·step_d²/12` (1 = the full expected bias).
    pub remainder_code_noise: f32,
    /// Lists holding less than this share of the estimated remainder weight (smallest first) are
    /// not read for value sums; their weight stays in the estimate's log-sum-exp and takes the
    /// mean value of the lists that are read.
    pub remainder_list_epsilon: f32,
}

impl Default for SearchParams {
    fn default() -> Self {
        SearchParams {
            budget: 0.02,
            sink_tokens: 4,
            recent_tokens: 64,
            // Defaults meet issue #3's targets within 5% of the K+V bytes on six real dumps,
            // four of which chose them (docs/BENCHMARKS.md, seventh session).
            probe_fraction: 0.28,
            group_expand_factor: 2.0,
            rerank_factor: 1.15,
            code_trusted_fraction: 0.6,
            code_trusted_from: 0.2,
            target_mass: None,
            estimate_remainder: true,
            remainder_code_logits: true,
            remainder_variance: 0.0,
            remainder_code_noise: 0.0,
            remainder_list_epsilon: 0.8,
        }
    }
}

impl SearchParams {
    pub fn validate(&self) -> Result<(), IndexError> {
        if !(self.budget > 0.0 && self.budget <= 1.0) {
            return Err(IndexError::Param {
                name: "budget",
                problem: format!("{} is outside (0, 1]", self.budget),
            });
        }
        if !(self.probe_fraction > 0.0 && self.probe_fraction <= 1.0) {
            return Err(IndexError::Param {
                name: "probe_fraction",
                problem: format!("{} is outside (0, 1]", self.probe_fraction),
            });
        }
        if !(self.group_expand_factor.is_finite() && self.group_expand_factor >= 1.0) {
            return Err(IndexError::Param {
                name: "group_expand_factor",
                problem: format!("{} must be >= 1", self.group_expand_factor),
            });
        }
        if !(self.rerank_factor.is_finite() && self.rerank_factor >= 1.0) {
            return Err(IndexError::Param {
                name: "rerank_factor",
                problem: format!("{} must be >= 1", self.rerank_factor),
            });
        }
        if let Some(t) = self.target_mass {
            if !(t > 0.0 && t <= 1.0) {
                return Err(IndexError::Param {
                    name: "target_mass",
                    problem: format!("{t} is outside (0, 1]"),
                });
            }
        }
        let unit = |v: f32| v.is_finite() && (0.0..=1.0).contains(&v);
        for (name, v) in [
            ("code_trusted_fraction", self.code_trusted_fraction),
            ("code_trusted_from", self.code_trusted_from),
        ] {
            if !unit(v) {
                return Err(IndexError::Param {
                    name,
                    problem: format!("{v} is outside [0, 1]"),
                });
            }
        }
        if !(self.remainder_variance.is_finite() && self.remainder_variance >= 0.0) {
            return Err(IndexError::Param {
                name: "remainder_variance",
                problem: format!("{} must be finite and >= 0", self.remainder_variance),
            });
        }
        if !(self.remainder_code_noise.is_finite() && self.remainder_code_noise >= 0.0) {
            return Err(IndexError::Param {
                name: "remainder_code_noise",
                problem: format!("{} must be finite and >= 0", self.remainder_code_noise),
            });
        }
        if !unit(self.remainder_list_epsilon) || self.remainder_list_epsilon >= 1.0 {
            return Err(IndexError::Param {
                name: "remainder_list_epsilon",
                problem: format!("{} is outside [0, 1)", self.remainder_list_epsilon),
            });
        }
        Ok(())
    }

    /// Whether a search builds the remainder estimate (asked for, or needed by the adaptive
    /// budget).
    pub fn estimates(&self) -> bool {
        self.estimate_remainder || self.target_mass.is_some()
    }

    /// Most tokens beyond the static ones that a query at `position` may attend.
    pub fn budget_tokens(&self, position: usize) -> usize {
        ((self.budget as f64) * (position as f64 + 1.0)).floor() as usize
    }

    /// True when `token` is static (sink or recent window) for a query at `position`.
    pub fn is_static(&self, token: usize, position: usize) -> bool {
        token < self.sink_tokens as usize
            || (token <= position && token + (self.recent_tokens as usize) > position)
    }

    /// For a query at `position`: the end of the sinks and the start of the recent window, so
    /// that the searchable tokens are `sink_end..recent_start` (empty when they overlap).
    pub fn static_edges(&self, position: usize) -> (usize, usize) {
        let visible = position + 1;
        let sink_end = (self.sink_tokens as usize).min(visible);
        let recent_start = sink_end.max(visible.saturating_sub(self.recent_tokens as usize));
        (sink_end, recent_start)
    }

    /// The static tokens of a query at `position`, ascending.
    pub fn static_tokens(&self, position: usize) -> Vec<u32> {
        let (sink_end, recent_start) = self.static_edges(position);
        let mut out: Vec<u32> = (0..sink_end as u32).collect();
        out.extend((recent_start..=position).map(|t| t as u32));
        out
    }
}

impl BuildParams {
    pub fn validate(&self) -> Result<(), IndexError> {
        let bad = |name: &'static str, problem: String| Err(IndexError::Param { name, problem });
        if self.list_size < 2 {
            return bad("list_size", format!("{} must be >= 2", self.list_size));
        }
        if !crate::codes::CODE_BITS.contains(&self.code_bits) {
            return bad(
                "code_bits",
                format!(
                    "{} must be one of {:?}",
                    self.code_bits,
                    crate::codes::CODE_BITS
                ),
            );
        }
        if self.replica_max < 1 || self.replica_max > 8 {
            return bad(
                "replica_max",
                format!("{} must be in 1..=8", self.replica_max),
            );
        }
        if !self.max_list_factor.is_finite() || self.max_list_factor < 1.0 {
            return bad(
                "max_list_factor",
                format!("{} must be >= 1", self.max_list_factor),
            );
        }
        let non_negative = |v: f32| v.is_finite() && v >= 0.0;
        if !non_negative(self.balance_penalty) || !non_negative(self.replica_epsilon) {
            return bad(
                "balance_penalty/replica_epsilon",
                "must be finite and >= 0".to_string(),
            );
        }
        if !(self.query_metric_ridge.is_finite() && self.query_metric_ridge > 0.0) {
            return bad(
                "query_metric_ridge",
                format!("{} must be finite and > 0", self.query_metric_ridge),
            );
        }
        if self.lists_per_group < 2 {
            return bad(
                "lists_per_group",
                format!("{} must be >= 2", self.lists_per_group),
            );
        }
        Ok(())
    }
}

/// `(name, value)` rows of any serialisable parameter struct, sorted by name.
pub fn param_rows<T: Serialize>(params: &T) -> Vec<(String, String)> {
    match serde_json::to_value(params) {
        Ok(serde_json::Value::Object(map)) => {
            map.into_iter().map(|(k, v)| (k, v.to_string())).collect()
        }
        _ => Vec::new(),
    }
}

/// Applies the overrides whose names `params` has (see [`apply_overrides`]) and returns the
/// others, for the next parameter struct to claim. The last struct in such a chain should use
/// [`apply_overrides`], which rejects names nobody owns.
pub fn apply_owned_overrides<T: Serialize + serde::de::DeserializeOwned>(
    params: &T,
    overrides: &[String],
) -> Result<(T, Vec<String>), IndexError> {
    let names: Vec<String> = param_rows(params).into_iter().map(|(k, _)| k).collect();
    let (mine, rest): (Vec<String>, Vec<String>) = overrides
        .iter()
        .cloned()
        .partition(|o| names.iter().any(|n| n == override_name(o)));
    Ok((apply_overrides(params, &mine)?, rest))
}

/// The name an override `name=value` sets (the whole item when it has no `=`).
pub fn override_name(item: &str) -> &str {
    item.split_once('=').map_or(item, |(name, _)| name)
}

/// Applies `name=value` overrides to a parameter struct through its serde form, so that every
/// parameter is settable by the one name it has here.
pub fn apply_overrides<T: Serialize + serde::de::DeserializeOwned>(
    params: &T,
    overrides: &[String],
) -> Result<T, IndexError> {
    let mut value = serde_json::to_value(params).map_err(|e| IndexError::Param {
        name: "overrides",
        problem: e.to_string(),
    })?;
    for item in overrides {
        let map = value.as_object_mut().ok_or(IndexError::Param {
            name: "overrides",
            problem: "parameters are not a struct".into(),
        })?;
        let (name, raw) = item.split_once('=').ok_or_else(|| IndexError::Param {
            name: "overrides",
            problem: format!("`{item}` is not name=value"),
        })?;
        let slot = map.get_mut(name).ok_or_else(|| IndexError::Param {
            name: "overrides",
            problem: format!("unknown parameter `{name}`"),
        })?;
        let parsed: serde_json::Value =
            serde_json::from_str(raw).unwrap_or(serde_json::Value::String(raw.to_string()));
        *slot = parsed;
        // Checked one at a time, so that a bad value is reported with its name.
        serde_json::from_value::<T>(value.clone()).map_err(|e| IndexError::Param {
            name: "overrides",
            problem: format!("`{item}`: {e}"),
        })?;
    }
    serde_json::from_value(value).map_err(|e| IndexError::Param {
        name: "overrides",
        problem: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_name_what_they_refuse() {
        let p = apply_overrides(
            &SearchParams::default(),
            &["probe_fraction=0.1".into(), "target_mass=0.9".into()],
        )
        .unwrap();
        assert_eq!((p.probe_fraction, p.target_mass), (0.1, Some(0.9)));
        for (item, expect) in [
            ("nope=1", "unknown parameter `nope`"),
            ("probe_fraction", "not name=value"),
            ("sink_tokens=abc", "`sink_tokens=abc`"),
            ("estimate_remainder=yes", "`estimate_remainder=yes`"),
        ] {
            let e = apply_overrides(&SearchParams::default(), &[item.to_string()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect), "{item}: {e}");
        }
    }

    #[test]
    fn a_group_expansion_below_one_is_refused() {
        for bad in [0.5f32, f32::NAN, f32::INFINITY] {
            let p = SearchParams {
                group_expand_factor: bad,
                ..Default::default()
            };
            let e = p.validate().unwrap_err();
            assert!(
                matches!(
                    e,
                    IndexError::Param {
                        name: "group_expand_factor",
                        ..
                    }
                ),
                "{bad}: {e}"
            );
        }
        assert!(SearchParams {
            group_expand_factor: 1.0,
            ..Default::default()
        }
        .validate()
        .is_ok());
    }
}
