//! The RAM tier: a byte-budgeted LRU cache of posting lists, shared by every session.
//!
//! One mutex guards a hash map (key -> buffer, recency tick) and an ordered map (tick -> key). A
//! hit only stamps its entry's tick; the ordered map catches up lazily at eviction time (an entry
//! found under an old tick is re-queued under its current one), so hits are O(1), evictions
//! O(log n) amortised, and the order evicted is still exactly least recently used. Buffers are
//! `Arc`s: an evicted list stays alive for whoever is still reading it.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

thread_local! {
    /// Set while this thread works for the prefetcher: its lookups and insertions are counted as
    /// prefetch traffic, not as demand.
    static PREFETCHING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's cache traffic counted as prefetch: entries it inserts are marked,
/// and the first demand hit on a marked entry counts as a prefetch hit.
pub fn as_prefetch<T>(f: impl FnOnce() -> T) -> T {
    let before = PREFETCHING.with(|p| p.replace(true));
    let out = f();
    PREFETCHING.with(|p| p.set(before));
    out
}

fn prefetching() -> bool {
    PREFETCHING.with(|p| p.get())
}

use crate::aligned::AlignedBuf;

/// Identifies a cached posting list: which segment file (a caller-assigned id) and where in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub file: u32,
    pub offset: u64,
}

/// Counters since creation or the last `reset_stats`; `bytes` and `capacity` are current values.
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub insertions: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub capacity: u64,
    /// Entries inserted by prefetch (see [`as_prefetch`]).
    pub prefetch_insertions: u64,
    /// Demand hits on an entry that a prefetch brought in (its first demand use).
    pub prefetch_hits: u64,
}

struct Entry {
    buf: Arc<AlignedBuf>,
    /// When it was last used.
    tick: u64,
    /// Its key in `Inner::order`: `tick` or older.
    queued: u64,
    /// Inserted by a prefetch and not yet used by a demand lookup.
    prefetched: bool,
}

/// Hashes a [`CacheKey`] with one multiply: the keys are file offsets, not attacker-chosen, so
/// SipHash's protection buys nothing and cost a visible share of warm lookups.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(26) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Default)]
struct Inner {
    map: HashMap<CacheKey, Entry, std::hash::BuildHasherDefault<KeyHasher>>,
    /// Recency order, possibly stale: every entry appears once, under a tick no newer than its
    /// own.
    order: BTreeMap<u64, CacheKey>,
    next_tick: u64,
    bytes: u64,
    hits: u64,
    misses: u64,
    insertions: u64,
    evictions: u64,
    prefetch_insertions: u64,
    prefetch_hits: u64,
}

impl Inner {
    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    /// One lookup: a hit stamps the entry as just used; `demand` lookups (not the prefetcher's)
    /// are counted.
    fn lookup(&mut self, key: &CacheKey, demand: bool) -> Option<Arc<AlignedBuf>> {
        let tick = self.next_tick + 1;
        match self.map.get_mut(key) {
            Some(e) => {
                self.next_tick = tick;
                e.tick = tick;
                if demand {
                    self.hits += 1;
                    if e.prefetched {
                        e.prefetched = false;
                        self.prefetch_hits += 1;
                    }
                }
                Some(Arc::clone(&e.buf))
            }
            None => {
                if demand {
                    self.misses += 1;
                }
                None
            }
        }
    }

    fn remove(&mut self, key: &CacheKey) -> Option<Entry> {
        let e = self.map.remove(key)?;
        self.order.remove(&e.queued);
        self.bytes -= e.buf.len() as u64;
        Some(e)
    }
}

/// Thread-safe byte-budgeted LRU cache.
pub struct RamCache {
    capacity: u64,
    inner: Mutex<Inner>,
}

impl RamCache {
    pub fn new(capacity_bytes: u64) -> RamCache {
        RamCache {
            capacity: capacity_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A poisoned lock only means another thread panicked mid-operation; every operation leaves
    /// the maps consistent before it can panic, so carry on with the data.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks up `key`, counting a hit or miss; a hit becomes the most recently used entry.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<AlignedBuf>> {
        let demand = !prefetching();
        self.lock().lookup(key, demand)
    }

    /// [`RamCache::get`] for every key, under one lock: a search asks for hundreds of lists at
    /// once, and one lock round trip per list was a measurable share of a warm step.
    pub fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<Arc<AlignedBuf>>> {
        let demand = !prefetching();
        let mut g = self.lock();
        keys.iter().map(|key| g.lookup(key, demand)).collect()
    }

    /// Caches `buf` under `key` (replacing any previous entry), evicting least recently used
    /// entries until the budget holds. A buffer larger than the whole budget is not cached.
    pub fn insert(&self, key: CacheKey, buf: Arc<AlignedBuf>) {
        let size = buf.len() as u64;
        let mut g = self.lock();
        g.remove(&key);
        if size > self.capacity {
            return;
        }
        while g.bytes + size > self.capacity {
            let Some((_, victim)) = g.order.pop_first() else {
                break;
            };
            let Some(e) = g.map.get_mut(&victim) else {
                continue;
            };
            if e.queued != e.tick {
                // Used since it was queued: re-queue it where it belongs.
                e.queued = e.tick;
                let t = e.tick;
                g.order.insert(t, victim);
                continue;
            }
            if let Some(e) = g.map.remove(&victim) {
                g.bytes -= e.buf.len() as u64;
                g.evictions += 1;
            }
        }
        let tick = g.tick();
        let prefetched = prefetching();
        g.order.insert(tick, key);
        g.map.insert(
            key,
            Entry {
                buf,
                tick,
                queued: tick,
                prefetched,
            },
        );
        g.bytes += size;
        g.insertions += 1;
        if prefetched {
            g.prefetch_insertions += 1;
        }
    }

    /// Whether `key` is cached, without counting or refreshing it.
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.lock().map.contains_key(key)
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Budget in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Drops every entry (counters are kept; see `reset_stats`).
    pub fn clear(&self) {
        let mut g = self.lock();
        g.map.clear();
        g.order.clear();
        g.bytes = 0;
    }

    pub fn stats(&self) -> CacheStats {
        let g = self.lock();
        CacheStats {
            hits: g.hits,
            misses: g.misses,
            insertions: g.insertions,
            evictions: g.evictions,
            bytes: g.bytes,
            capacity: self.capacity,
            prefetch_insertions: g.prefetch_insertions,
            prefetch_hits: g.prefetch_hits,
        }
    }

    /// Zeroes the hit/miss/insertion/eviction counters (contents stay).
    pub fn reset_stats(&self) {
        let mut g = self.lock();
        g.hits = 0;
        g.misses = 0;
        g.insertions = 0;
        g.evictions = 0;
        g.prefetch_insertions = 0;
        g.prefetch_hits = 0;
    }
}

impl std::fmt::Debug for RamCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamCache")
            .field("stats", &self.stats())
            .finish()
    }
}
