//! Reads the key and value rows of given tokens of one (layer, KV head) back from an index
//! (through the RAM tier and the segment files), so that a reopened session can restore its
//! resident rows (sinks, the window's edge) without the original arrays.

use crate::linalg::f16_bytes_to_f32;
use crate::manifest::u32s;
use crate::search::{parse_list, Index, SearchStats};
use crate::{IndexError, IndexResult};

/// Keys and values (`tokens.len() × dim` each, in the order of `tokens`).
pub fn read_rows(
    index: &Index,
    layer_slot: usize,
    kv_head: usize,
    tokens: &[u32],
) -> IndexResult<(Vec<f32>, Vec<f32>)> {
    let head = index.head(layer_slot, kv_head)?;
    let dim = head.dim.to_native() as usize;
    let n = head.tokens.to_native() as usize;
    let starts = u32s(&head.primary_start);
    let members = u32s(&head.primary_tokens);
    // token -> (list, row) for the tokens asked for.
    let mut want: Vec<Option<(u32, u32)>> = vec![None; tokens.len()];
    let mut slot_of = std::collections::HashMap::new();
    for (i, &t) in tokens.iter().enumerate() {
        if t as usize >= n {
            return Err(IndexError::Query {
                layer_slot,
                kv_head,
                position: t as usize,
                problem: format!("token {t} is past the {n} indexed tokens"),
            });
        }
        slot_of.entry(t).or_insert_with(Vec::new).push(i);
    }
    let mut lists = Vec::new();
    for l in 0..starts.len().saturating_sub(1) {
        let (s, e) = (starts[l] as usize, starts[l + 1] as usize);
        if members[s..e].iter().any(|t| slot_of.contains_key(t)) {
            lists.push(l as u32);
        }
    }
    let mut stats = SearchStats::default();
    let bufs = index.fetch_lists(head, &lists, &mut stats)?;
    let mut keys = vec![0f32; tokens.len() * dim];
    let mut values = vec![0f32; tokens.len() * dim];
    let mut row = Vec::with_capacity(dim);
    for (buf, &l) in bufs.iter().zip(&lists) {
        let view = parse_list(buf, l, dim).map_err(|problem| IndexError::Open {
            path: index.dir().to_path_buf(),
            problem: format!("list {l}: {problem}"),
        })?;
        for r in 0..view.len() {
            if let Some(slots) = slot_of.get(&view.id(r)) {
                for &i in slots {
                    row.clear();
                    f16_bytes_to_f32(view.key_bytes(r), &mut row);
                    keys[i * dim..(i + 1) * dim].copy_from_slice(&row);
                    row.clear();
                    f16_bytes_to_f32(view.value_bytes(r), &mut row);
                    values[i * dim..(i + 1) * dim].copy_from_slice(&row);
                    want[i] = Some((l, r as u32));
                }
            }
        }
    }
    if let Some(i) = want.iter().position(|w| w.is_none()) {
        return Err(IndexError::Open {
            path: index.dir().to_path_buf(),
            problem: format!("token {} is in no posting list", tokens[i]),
        });
    }
    Ok((keys, values))
}
