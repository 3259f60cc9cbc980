//! [`InFlight`]: merges concurrent loads of the same key. The first caller
//! runs the load; callers arriving while it runs wait on a condition
//! variable and get a clone of its result. Nothing is remembered after the
//! load finishes, so a failed load is retried by the next caller (no
//! negative caching).
//!
//! Loads of several keys at once (one store request for many chunks) use
//! [`InFlight::claim_all`]: every key not already being loaded is
//! registered under one lock and returned as a [`Claim`], which the caller
//! completes with the key's value once it has it. Until then, [`InFlight::run`]
//! for that key waits, as for any other load.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

struct Slot<V> {
    result: Mutex<Option<V>>,
    done: Condvar,
}

/// A single-flight map from keys to the loads running for them.
pub struct InFlight<K, V> {
    slots: Mutex<HashMap<K, Arc<Slot<V>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes the slot and wakes the waiters even if the load panics; waiters
/// then get `on_abandon`'s value.
struct Finish<'a, K: Hash + Eq + Clone, V: Clone> {
    map: &'a InFlight<K, V>,
    key: K,
    slot: Arc<Slot<V>>,
    abandoned: Option<V>,
}

impl<K: Hash + Eq + Clone, V: Clone> Drop for Finish<'_, K, V> {
    fn drop(&mut self) {
        lock(&self.map.slots).remove(&self.key);
        let mut r = lock(&self.slot.result);
        if r.is_none() {
            *r = self.abandoned.take();
        }
        self.slot.done.notify_all();
    }
}

/// A load of one key registered by [`InFlight::claim_all`]. Readers of the
/// key wait until [`Claim::complete`]; dropping it uncompleted gives them
/// the `abandoned` value.
pub struct Claim<'a, K: Hash + Eq + Clone, V: Clone> {
    finish: Finish<'a, K, V>,
}

impl<K: Hash + Eq + Clone, V: Clone> Claim<'_, K, V> {
    pub fn key(&self) -> &K {
        &self.finish.key
    }

    /// Hands `value` to every waiter and ends the load.
    pub fn complete(self, value: V) {
        *lock(&self.finish.slot.result) = Some(value);
        // Dropping `finish` removes the slot and wakes the waiters.
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Default for InFlight<K, V> {
    fn default() -> Self {
        InFlight { slots: Mutex::new(HashMap::new()) }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> InFlight<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `load` for `key` unless a load for it is already running, in
    /// which case waits for that one. Returns the value and whether this
    /// call waited for another's load. `abandoned` is what waiters get if
    /// the load panics.
    pub fn run(&self, key: K, abandoned: V, load: impl FnOnce() -> V) -> (V, bool) {
        let (slot, leader) = {
            let mut slots = lock(&self.slots);
            match slots.get(&key) {
                Some(s) => (s.clone(), false),
                None => {
                    let s = Arc::new(Slot { result: Mutex::new(None), done: Condvar::new() });
                    slots.insert(key.clone(), s.clone());
                    (s, true)
                }
            }
        };
        if leader {
            let finish = Finish { map: self, key, slot: slot.clone(), abandoned: Some(abandoned) };
            let v = load();
            *lock(&slot.result) = Some(v.clone());
            drop(finish);
            return (v, false);
        }
        let mut r = lock(&slot.result);
        loop {
            if let Some(v) = r.as_ref() {
                return (v.clone(), true);
            }
            r = slot.done.wait(r).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Registers a load of every key of `keys` that is not being loaded
    /// already (under one lock, so the batch is seen whole), returning a
    /// [`Claim`] for each key this call now owns and `None` for the others,
    /// in the order given. `abandoned` gives what waiters get if a claim
    /// is dropped without being completed. A key given twice is claimed once.
    pub fn claim_all(&self, keys: &[K], abandoned: impl Fn(&K) -> V) -> Vec<Option<Claim<'_, K, V>>> {
        let mut slots = lock(&self.slots);
        keys.iter()
            .map(|key| {
                if slots.contains_key(key) {
                    return None;
                }
                let slot = Arc::new(Slot { result: Mutex::new(None), done: Condvar::new() });
                slots.insert(key.clone(), slot.clone());
                Some(Claim { finish: Finish { map: self, key: key.clone(), slot, abandoned: Some(abandoned(key)) } })
            })
            .collect()
    }

    /// Number of loads running now.
    pub fn len(&self) -> usize {
        lock(&self.slots).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn concurrent_callers_share_one_load() {
        let f: Arc<InFlight<u32, Result<u32, String>>> = Arc::new(InFlight::new());
        let loads = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (f, loads) = (f.clone(), loads.clone());
                std::thread::spawn(move || {
                    f.run(7, Err("abandoned".into()), || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(200));
                        Ok(42)
                    })
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|(v, _)| v == &Ok(42)));
        assert_eq!(results.iter().filter(|(_, waited)| *waited).count(), 7);
        assert!(f.is_empty());
    }

    #[test]
    fn failures_are_not_remembered() {
        let f: InFlight<u32, Result<u32, String>> = InFlight::new();
        assert_eq!(f.run(1, Err("x".into()), || Err("bad".into())).0, Err("bad".into()));
        assert_eq!(f.run(1, Err("x".into()), || Ok(1)).0, Ok(1));
    }

    #[test]
    fn claimed_batches_make_readers_wait() {
        let f: Arc<InFlight<u32, Result<u32, String>>> = Arc::new(InFlight::new());
        let loads = Arc::new(AtomicUsize::new(0));
        let claims = f.claim_all(&[1, 2, 2, 3], |k| Err(format!("abandoned {k}")));
        assert_eq!(claims.iter().filter(|c| c.is_some()).count(), 3);
        assert_eq!(f.len(), 3);
        // A second batch gets none of them.
        assert!(f.claim_all(&[1, 3], |_| Err("x".into())).iter().all(Option::is_none));
        let readers: Vec<_> = [1u32, 2, 3]
            .into_iter()
            .map(|k| {
                let (f, loads) = (f.clone(), loads.clone());
                std::thread::spawn(move || {
                    f.run(k, Err("abandoned".into()), || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        Ok(0)
                    })
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let mut claims = claims.into_iter().flatten();
        let c1 = claims.next().unwrap();
        assert_eq!(*c1.key(), 1);
        c1.complete(Ok(10));
        claims.next().unwrap().complete(Ok(20));
        drop(claims); // 3 abandoned
        let results: Vec<_> = readers.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results, vec![(Ok(10), true), (Ok(20), true), (Err("abandoned 3".into()), true)]);
        assert_eq!(loads.load(Ordering::SeqCst), 0);
        assert!(f.is_empty());
    }

    #[test]
    fn waiters_survive_a_panicking_load() {
        let f: Arc<InFlight<u32, Result<u32, String>>> = Arc::new(InFlight::new());
        let f2 = f.clone();
        let leader = std::thread::spawn(move || {
            f2.run(1, Err("abandoned".into()), || {
                std::thread::sleep(Duration::from_millis(200));
                panic!("load failed");
            })
        });
        std::thread::sleep(Duration::from_millis(50));
        let (v, waited) = f.run(1, Err("abandoned".into()), || Ok(5));
        assert!(leader.join().is_err());
        // Either it joined the doomed load or came after it.
        assert!(v == Err("abandoned".into()) && waited || v == Ok(5) && !waited);
        assert!(f.is_empty());
    }
}
