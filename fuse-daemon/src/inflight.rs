//! [`InFlight`]: merges concurrent loads of the same key. The first caller
//! runs the load; callers arriving while it runs wait on a condition
//! variable and get a clone of its result. Nothing is remembered after the
//! load finishes, so a failed load is retried by the next caller (no
//! negative caching).

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
