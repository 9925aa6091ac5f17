//! Per-key fetches of a `live` dataset: concurrent fetches of one key
//! coalesced into one, and an optional cache of the results.
//!
//! The cache keeps a fetched row, or the fact that there is none, for `ttl`,
//! and holds at most `max_entries` keys; when full, the oldest entries go
//! first. Failures are shared by the requests that waited for them but never
//! cached: the next request after a failure tries again.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::config::CacheConfig;

/// Coalesces and (optionally) caches fetches by key.
pub struct KeyCache<K, V, E> {
    cache: Option<Entries<K, V>>,
    inflight: Mutex<HashMap<K, Flight<V, E>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

type Flight<V, E> = Arc<OnceCell<Result<V, E>>>;

/// Counters of a cache, for `/readyz` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub max_entries: usize,
    pub ttl_ms: u64,
}

struct Entries<K, V> {
    ttl: Duration,
    max: usize,
    inner: Mutex<EntryMap<K, V>>,
}

struct EntryMap<K, V> {
    map: HashMap<K, (Instant, V)>,
    /// Keys in insertion order with their expiry; a key inserted again is
    /// listed again, and only the newest listing removes it.
    order: VecDeque<(K, Instant)>,
}

impl<K, V, E> KeyCache<K, V, E>
where
    K: Hash + Eq + Clone,
    V: Clone,
    E: Clone,
{
    /// Coalescing only (`None`), or coalescing and a cache.
    pub fn new(config: Option<&CacheConfig>) -> KeyCache<K, V, E> {
        KeyCache {
            cache: config.map(|c| Entries {
                ttl: Duration::from_millis(c.ttl_ms),
                max: c.max_entries,
                inner: Mutex::new(EntryMap {
                    map: HashMap::new(),
                    order: VecDeque::new(),
                }),
            }),
            inflight: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The cached value of `key`, or the result of `fetch`, shared with every
    /// concurrent caller for the same key (only one `fetch` runs).
    pub async fn get<F, Fut>(&self, key: K, fetch: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        if let Some(v) = self.cached(&key) {
            return Ok(v);
        }
        let flight = match self.inflight.lock() {
            Ok(mut m) => m.entry(key.clone()).or_default().clone(),
            Err(_) => Arc::new(OnceCell::new()),
        };
        let result = flight
            .get_or_init(|| async {
                let result = fetch().await;
                if let (Some(cache), Ok(v)) = (&self.cache, &result) {
                    cache.insert(key.clone(), v.clone());
                }
                result
            })
            .await
            .clone();
        if let Ok(mut m) = self.inflight.lock()
            && m.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight))
        {
            m.remove(&key);
        }
        result
    }

    /// The cached value of `key`, counted as a hit or a miss; always `None`
    /// without a cache.
    pub fn cached(&self, key: &K) -> Option<V> {
        let cache = self.cache.as_ref()?;
        let found = cache.get(key);
        let counter = match found {
            Some(_) => &self.hits,
            None => &self.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `value` for `key` (nothing without a cache): for callers that
    /// fetch several keys' values at once, outside [`KeyCache::get`].
    pub fn store(&self, key: K, value: V) {
        if let Some(cache) = &self.cache {
            cache.insert(key, value);
        }
    }

    /// Counters, when there is a cache.
    pub fn stats(&self) -> Option<CacheStats> {
        let cache = self.cache.as_ref()?;
        Some(CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: cache.inner.lock().map(|m| m.map.len()).unwrap_or(0),
            max_entries: cache.max,
            ttl_ms: cache.ttl.as_millis() as u64,
        })
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Entries<K, V> {
    fn get(&self, key: &K) -> Option<V> {
        let now = Instant::now();
        let m = self.inner.lock().ok()?;
        match m.map.get(key) {
            Some((expires, v)) if *expires > now => Some(v.clone()),
            _ => None,
        }
    }

    fn insert(&self, key: K, value: V) {
        let now = Instant::now();
        let expires = now + self.ttl;
        let Ok(mut m) = self.inner.lock() else {
            return;
        };
        m.order.push_back((key.clone(), expires));
        m.map.insert(key, (expires, value));
        // Drop expired entries (the order is by expiry: one ttl for all),
        // then the oldest ones while over the limit.
        while let Some((_, front)) = m.order.front() {
            let over = m.map.len() > self.max || m.order.len() > 2 * self.max + 16;
            if !over && *front > now {
                break;
            }
            let Some((k, t)) = m.order.pop_front() else {
                break;
            };
            if m.map.get(&k).is_some_and(|(e, _)| *e == t) {
                m.map.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn cache(ttl_ms: u64, max_entries: usize) -> KeyCache<u32, u32, String> {
        KeyCache::new(Some(&CacheConfig {
            ttl_ms,
            max_entries,
        }))
    }

    #[tokio::test]
    async fn hits_misses_and_the_entry_limit() {
        let c = cache(60_000, 3);
        for k in 0..5 {
            assert_eq!(c.get(k, || async move { Ok(k * 10) }).await, Ok(k * 10));
        }
        let stats = c.stats().expect("stats");
        assert_eq!((stats.hits, stats.misses, stats.entries), (0, 5, 3));
        // 0 and 1 were evicted (oldest first); 4 is still there.
        assert_eq!(c.get(4, || async { Ok(0) }).await, Ok(40));
        assert_eq!(c.get(0, || async { Ok(7) }).await, Ok(7));
        let stats = c.stats().expect("stats");
        assert_eq!((stats.hits, stats.misses, stats.entries), (1, 6, 3));
    }

    #[tokio::test]
    async fn entries_expire_and_errors_are_not_kept() {
        let c = cache(1, 10);
        assert_eq!(c.get(1, || async { Ok(1) }).await, Ok(1));
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(c.get(1, || async { Ok(2) }).await, Ok(2));
        let c = cache(60_000, 10);
        assert_eq!(
            c.get(1, || async { Err("down".to_string()) }).await,
            Err("down".into())
        );
        assert_eq!(c.get(1, || async { Ok(3) }).await, Ok(3));
    }

    #[tokio::test]
    async fn concurrent_fetches_of_one_key_run_once() {
        let c: Arc<KeyCache<u32, u32, String>> = Arc::new(KeyCache::new(None));
        let runs = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (c, runs) = (c.clone(), runs.clone());
                tokio::spawn(async move {
                    c.get(9, || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(99)
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.expect("task"), Ok(99));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(c.stats().is_none());
    }
}
