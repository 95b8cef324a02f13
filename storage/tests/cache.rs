//! The RAM tier: LRU order, byte budget, oversize items, counters, sharing between threads.

use std::sync::Arc;

use strata_storage::aligned::AlignedBuf;
use strata_storage::cache::{CacheKey, RamCache};

fn key(file: u32, offset: u64) -> CacheKey {
    CacheKey { file, offset }
}

fn buf(len: usize, fill: u8) -> Arc<AlignedBuf> {
    Arc::new(AlignedBuf::from_slice(&vec![fill; len]))
}

#[test]
fn evicts_least_recently_used_first() {
    let c = RamCache::new(300);
    c.insert(key(0, 0), buf(100, 0));
    c.insert(key(0, 1), buf(100, 1));
    c.insert(key(0, 2), buf(100, 2));
    // Touch 0, so 1 is now the least recently used.
    assert_eq!(c.get(&key(0, 0)).unwrap()[0], 0);
    c.insert(key(0, 3), buf(100, 3));
    assert!(!c.contains(&key(0, 1)), "LRU entry evicted");
    assert!(c.contains(&key(0, 0)) && c.contains(&key(0, 2)) && c.contains(&key(0, 3)));
    // Next victim is 2, then 0.
    c.insert(key(0, 4), buf(100, 4));
    assert!(!c.contains(&key(0, 2)));
    c.insert(key(0, 5), buf(100, 5));
    assert!(!c.contains(&key(0, 0)));
    assert_eq!(c.stats().evictions, 3);
    assert_eq!(c.len(), 3);
}

#[test]
fn eviction_follows_a_reference_lru_through_many_touches() {
    // Equal-sized entries, a budget of 8: the cache must hold exactly the 8 most recently
    // inserted or hit keys after every operation, however often hits reorder them.
    let c = RamCache::new(8 * 64);
    let mut reference: Vec<u64> = Vec::new(); // least recently used first
    let mut x = 12345u64;
    for step in 0..2000u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let k = (x >> 33) % 20;
        if step % 3 == 0 {
            c.insert(key(9, k), buf(64, k as u8));
            reference.retain(|&r| r != k);
            reference.push(k);
            if reference.len() > 8 {
                reference.remove(0);
            }
        } else {
            let hit = c.get(&key(9, k)).is_some();
            assert_eq!(hit, reference.contains(&k), "step {step}: key {k}");
            if hit {
                reference.retain(|&r| r != k);
                reference.push(k);
            }
        }
        let many = c.get_many(&[]);
        assert!(many.is_empty());
        assert_eq!(c.len(), reference.len(), "step {step}");
    }
    // get_many answers like get, in order.
    let keys: Vec<_> = (0..20).map(|k| key(9, k)).collect();
    let got = c.get_many(&keys);
    for (k, g) in got.iter().enumerate() {
        assert_eq!(g.is_some(), reference.contains(&(k as u64)));
    }
}

#[test]
fn byte_budget_is_respected() {
    let c = RamCache::new(10_000);
    for i in 0..200u64 {
        c.insert(key(1, i), buf(100 + (i as usize * 37) % 3000, i as u8));
        let s = c.stats();
        assert!(s.bytes <= 10_000, "{s:?}");
        assert_eq!(s.capacity, 10_000);
    }
    // A big insert evicts as many small entries as it needs, in LRU order.
    let c = RamCache::new(1000);
    for i in 0..10 {
        c.insert(key(2, i), buf(100, 0));
    }
    c.insert(key(3, 0), buf(450, 0));
    assert_eq!(c.stats().bytes, 500 + 450);
    for i in 0..5 {
        assert!(!c.contains(&key(2, i)));
    }
    for i in 5..10 {
        assert!(c.contains(&key(2, i)));
    }
}

#[test]
fn oversize_item_is_not_cached() {
    let c = RamCache::new(1000);
    c.insert(key(0, 0), buf(600, 0));
    c.insert(key(0, 1), buf(1001, 1));
    assert!(!c.contains(&key(0, 1)));
    assert!(c.contains(&key(0, 0)), "an oversize insert evicts nothing");
    assert_eq!(c.stats().bytes, 600);
    assert_eq!(c.stats().evictions, 0);
    // Exactly the budget fits.
    c.insert(key(0, 2), buf(1000, 2));
    assert!(c.contains(&key(0, 2)));
    assert_eq!(c.stats().bytes, 1000);
    // A zero budget caches nothing of substance.
    let z = RamCache::new(0);
    z.insert(key(0, 0), buf(1, 0));
    assert!(z.get(&key(0, 0)).is_none());
}

#[test]
fn replacing_a_key_keeps_accounting_right() {
    let c = RamCache::new(1000);
    c.insert(key(0, 0), buf(400, 1));
    c.insert(key(0, 0), buf(300, 2));
    assert_eq!(c.len(), 1);
    assert_eq!(c.stats().bytes, 300);
    assert_eq!(c.get(&key(0, 0)).unwrap()[0], 2);
    // Replacing with an oversize buffer drops the stale entry rather than keeping old bytes.
    c.insert(key(0, 0), buf(2000, 3));
    assert!(c.get(&key(0, 0)).is_none());
    assert_eq!(c.stats().bytes, 0);
}

#[test]
fn stats_count_hits_misses_insertions_and_reset() {
    let c = RamCache::new(1 << 20);
    assert!(c.get(&key(0, 0)).is_none());
    c.insert(key(0, 0), buf(4096, 1));
    c.insert(key(1, 0), buf(4096, 2));
    assert_eq!(c.get(&key(0, 0)).unwrap().len(), 4096);
    assert_eq!(c.get(&key(1, 0)).unwrap()[0], 2);
    assert!(c.get(&key(2, 0)).is_none());
    let s = c.stats();
    assert_eq!((s.hits, s.misses, s.insertions, s.evictions), (2, 2, 2, 0));
    assert_eq!(s.bytes, 8192);
    assert_eq!(s.capacity, 1 << 20);

    c.reset_stats();
    let s = c.stats();
    assert_eq!((s.hits, s.misses, s.insertions, s.evictions), (0, 0, 0, 0));
    assert_eq!(s.bytes, 8192, "reset keeps the contents");

    c.clear();
    assert_eq!(c.stats().bytes, 0);
    assert!(c.is_empty());
    assert!(c.get(&key(0, 0)).is_none());
}

#[test]
fn evicted_buffer_stays_valid_for_holders() {
    let c = RamCache::new(100);
    c.insert(key(0, 0), buf(100, 9));
    let held = c.get(&key(0, 0)).unwrap();
    c.insert(key(0, 1), buf(100, 1));
    assert!(!c.contains(&key(0, 0)));
    assert!(held.iter().all(|&b| b == 9));
}

#[test]
fn shared_between_threads() {
    let c = RamCache::new(50 * 4096);
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let c = &c;
            s.spawn(move || {
                for i in 0..500u64 {
                    let k = key(t, i % 80);
                    match c.get(&k) {
                        Some(b) => assert_eq!(b[0], (i % 80) as u8),
                        None => c.insert(k, buf(4096, (i % 80) as u8)),
                    }
                }
            });
        }
    });
    let s = c.stats();
    assert!(s.bytes <= 50 * 4096);
    assert_eq!(s.hits + s.misses, 2000);
    assert_eq!(s.insertions, s.misses);
    assert_eq!(s.bytes, c.len() as u64 * 4096);
}

#[test]
fn prefetched_entries_count_their_first_demand_hit() {
    use strata_storage::cache::as_prefetch;
    let cache = RamCache::new(1 << 20);
    let key = CacheKey { file: 1, offset: 0 };
    let buf = std::sync::Arc::new(strata_storage::aligned::AlignedBuf::zeroed(4096));
    // A prefetch misses, reads and inserts: none of it is demand traffic.
    as_prefetch(|| {
        assert!(cache.get(&key).is_none());
        cache.insert(key, buf.clone());
    });
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.prefetch_insertions), (0, 0, 1));
    // The first demand hit is a prefetch hit; the second is an ordinary hit.
    assert!(cache.get(&key).is_some());
    assert!(cache.get(&key).is_some());
    let s = cache.stats();
    assert_eq!((s.hits, s.prefetch_hits), (2, 1));
}

#[test]
fn a_prefetch_that_loses_the_race_and_a_reset_count_no_prefetch_hits() {
    use strata_storage::cache::as_prefetch;
    let cache = RamCache::new(1 << 20);
    let buf = std::sync::Arc::new(strata_storage::aligned::AlignedBuf::zeroed(4096));
    // A demand read inserted the list first; the prefetch's insert of the same list is dropped.
    let raced = CacheKey { file: 1, offset: 0 };
    cache.insert(raced, buf.clone());
    as_prefetch(|| cache.insert(raced, buf.clone()));
    // Prefetched before the statistics were reset: not this period's prefetch.
    let earlier = CacheKey {
        file: 1,
        offset: 4096,
    };
    as_prefetch(|| cache.insert(earlier, buf.clone()));
    cache.reset_stats();
    assert!(cache.get(&raced).is_some());
    assert!(cache.get(&earlier).is_some());
    let s = cache.stats();
    assert_eq!((s.hits, s.prefetch_hits, s.prefetch_insertions), (2, 0, 0));
}
