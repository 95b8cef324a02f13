//! The RAM tier: a byte-budgeted LRU cache of posting lists, shared by every session.
//!
//! A read-write lock guards a hash map (key -> buffer, recency tick) and an ordered map (tick ->
//! key). A hit only stamps its entry's atomic tick under the read lock, so lookups from many
//! threads proceed together; the ordered map catches up lazily at eviction time, under the write
//! lock (an entry found under an old tick is re-queued under its current one). Hits are O(1),
//! evictions O(log n) amortised, and the order evicted is still exactly least recently used.
//! Buffers are `Arc`s: an evicted list stays alive for whoever is still reading it.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

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
    /// When it was last used (stamped by lookups under the read lock).
    tick: AtomicU64,
    /// Its key in `Inner::order`: `tick` or older.
    queued: u64,
    /// Inserted by a prefetch and not yet used by a demand lookup.
    prefetched: AtomicBool,
}

/// Hashes a [`CacheKey`] with one multiply per word: the keys are file offsets, not
/// attacker-chosen, so SipHash's protection buys nothing and cost a visible share of warm
/// lookups.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    /// Folds the high half into the low: a product's low bits depend only on its inputs' low
    /// bits, and lists start on page boundaries, so without the fold every list of a file had
    /// the same low 12 bits, which are where the table looks first (the 32,768 lists of eight
    /// files shared 128 home buckets and each lookup walked a long probe chain).
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
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

/// What changes only under the write lock: the entries, their order, the bytes and the
/// insertion-side counters.
#[derive(Default)]
struct Inner {
    map: HashMap<CacheKey, Entry, std::hash::BuildHasherDefault<KeyHasher>>,
    /// Recency order, possibly stale: every entry appears once, under a tick no newer than its
    /// own.
    order: BTreeMap<u64, CacheKey>,
    bytes: u64,
    insertions: u64,
    evictions: u64,
    prefetch_insertions: u64,
}

impl Inner {
    fn remove(&mut self, key: &CacheKey) -> Option<Entry> {
        let e = self.map.remove(key)?;
        self.order.remove(&e.queued);
        self.bytes -= e.buf.len() as u64;
        Some(e)
    }
}

/// Thread-safe byte-budgeted LRU cache. Lookups share a read lock (a hit stamps its entry's
/// atomic tick), so the sessions' searches never wait for one another; inserting, evicting and
/// clearing take the write lock.
pub struct RamCache {
    capacity: u64,
    inner: RwLock<Inner>,
    next_tick: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    prefetch_hits: AtomicU64,
}

impl RamCache {
    pub fn new(capacity_bytes: u64) -> RamCache {
        RamCache {
            capacity: capacity_bytes,
            inner: RwLock::new(Inner::default()),
            next_tick: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            prefetch_hits: AtomicU64::new(0),
        }
    }

    /// A poisoned lock only means another thread panicked mid-operation; every operation leaves
    /// the maps consistent before it can panic, so carry on with the data.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn tick(&self) -> u64 {
        self.next_tick.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Looks up `key`, counting a hit or miss; a hit becomes the most recently used entry.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<AlignedBuf>> {
        self.get_many(std::slice::from_ref(key)).pop().flatten()
    }

    /// [`RamCache::get`] for every key, under one read lock: a search asks for hundreds of
    /// lists at once.
    pub fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<Arc<AlignedBuf>>> {
        let demand = !prefetching();
        let g = self.read();
        let (mut hits, mut prefetch_hits) = (0, 0);
        // One atomic add reserves a tick per key (in key order), not one per hit.
        let first_tick = self
            .next_tick
            .fetch_add(keys.len() as u64, Ordering::Relaxed)
            + 1;
        // Every lookup first, with plain loads only: each is a cache miss or two (the map's
        // slot, the buffer's `Arc`), and an atomic read-modify-write between them (the `Arc`
        // clone's) would make each miss wait for the one before. Reading each buffer's length
        // brings in the line its reference counts share.
        let found: Vec<Option<&Entry>> = keys.iter().map(|key| g.map.get(key)).collect();
        std::hint::black_box(found.iter().flatten().map(|e| e.buf.len()).sum::<usize>());
        let out: Vec<_> = found
            .into_iter()
            .zip(first_tick..)
            .map(|(e, tick)| {
                let e = e?;
                e.tick.store(tick, Ordering::Relaxed);
                if demand {
                    hits += 1;
                    // Read first: a swap is a locked instruction, and the flag is rarely set.
                    if e.prefetched.load(Ordering::Relaxed)
                        && e.prefetched.swap(false, Ordering::Relaxed)
                    {
                        prefetch_hits += 1;
                    }
                }
                Some(Arc::clone(&e.buf))
            })
            .collect();
        if demand {
            self.hits.fetch_add(hits, Ordering::Relaxed);
            self.prefetch_hits
                .fetch_add(prefetch_hits, Ordering::Relaxed);
            self.misses
                .fetch_add(keys.len() as u64 - hits, Ordering::Relaxed);
        }
        out
    }

    /// Caches `buf` under `key` (replacing any previous entry), evicting least recently used
    /// entries until the budget holds. A buffer larger than the whole budget is not cached.
    pub fn insert(&self, key: CacheKey, buf: Arc<AlignedBuf>) {
        let size = buf.len() as u64;
        let prefetched = prefetching();
        let mut g = self.write();
        // A prefetch that lost the race to a demand read keeps the entry as it is: marking it
        // prefetched would count the next demand hit as the prefetch's.
        if prefetched && g.map.contains_key(&key) {
            return;
        }
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
            let used = e.tick.load(Ordering::Relaxed);
            if e.queued != used {
                // Used since it was queued: re-queue it where it belongs.
                e.queued = used;
                g.order.insert(used, victim);
                continue;
            }
            if let Some(e) = g.map.remove(&victim) {
                g.bytes -= e.buf.len() as u64;
                g.evictions += 1;
            }
        }
        let tick = self.tick();
        g.order.insert(tick, key);
        g.map.insert(
            key,
            Entry {
                buf,
                tick: AtomicU64::new(tick),
                queued: tick,
                prefetched: AtomicBool::new(prefetched),
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
        self.read().map.contains_key(key)
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.read().map.len()
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
        let mut g = self.write();
        g.map.clear();
        g.order.clear();
        g.bytes = 0;
    }

    pub fn stats(&self) -> CacheStats {
        let g = self.read();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            insertions: g.insertions,
            evictions: g.evictions,
            bytes: g.bytes,
            capacity: self.capacity,
            prefetch_insertions: g.prefetch_insertions,
            prefetch_hits: self.prefetch_hits.load(Ordering::Relaxed),
        }
    }

    /// Zeroes the hit/miss/insertion/eviction counters (contents stay).
    pub fn reset_stats(&self) {
        let mut g = self.write();
        self.hits.store(0, Ordering::Relaxed);
        self.misses.store(0, Ordering::Relaxed);
        self.prefetch_hits.store(0, Ordering::Relaxed);
        g.insertions = 0;
        g.evictions = 0;
        g.prefetch_insertions = 0;
        // Entries prefetched before the reset are not this period's prefetch insertions.
        for e in g.map.values() {
            e.prefetched.store(false, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for RamCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamCache")
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, BuildHasherDefault};

    #[test]
    fn page_aligned_offsets_spread_over_the_low_bits_of_the_hash() {
        let build = BuildHasherDefault::<KeyHasher>::default();
        let mut low = std::collections::HashSet::new();
        let keys = 8 * 4096u64;
        for file in 0..8u32 {
            for list in 0..4096u64 {
                let h = build.hash_one(CacheKey {
                    file,
                    offset: list * 3 * 4096,
                });
                low.insert(h & 0xffff);
            }
        }
        // Uniform hashing puts 32,768 keys in about 25,800 of 65,536 slots.
        assert!(
            low.len() as u64 > keys / 2,
            "{} distinct low-16-bit hashes for {keys} keys",
            low.len()
        );
    }
}
