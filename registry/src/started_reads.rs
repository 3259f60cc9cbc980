//! [`StartedReads`]: range reads of registry blobs started before anyone
//! asked for their bytes, and later reads served from them.
//!
//! A caller that knows early which bytes it will want (naiad's reader: an
//! image's startup set, named in the manifest, while the bootstrap that
//! lists its chunks is still on its way) starts a read of them
//! ([`crate::RegistryBlobStore::start_read`]). The bytes collect here as
//! they arrive. A later read of a range that lies within a started read
//! waits for that read's bytes instead of sending a request of its own, and
//! sees them arrive as a read of its own would. A started read is forgotten
//! once reads have taken each of its bytes, or when the owner says so
//! ([`StartedReads::forget`]); a failed one is forgotten at once, and the
//! reads waiting for it send their own requests.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::digest::Digest;

/// A byte range of a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRange {
    pub digest: Digest,
    pub offset: u64,
    pub len: u64,
}

impl BlobRange {
    fn contains(&self, digest: &Digest, offset: u64, len: u64) -> bool {
        &self.digest == digest && offset >= self.offset && offset.checked_add(len).is_some_and(|end| end <= self.offset + self.len)
    }
}

/// What has arrived of one started read.
#[derive(Default)]
struct Progress {
    /// The range's bytes so far, from its start.
    data: Vec<u8>,
    /// Set when the read has ended: `Ok` with all its bytes, or why not.
    ended: Option<Result<(), String>>,
    /// The parts reads have taken, as sorted, disjoint `[start, end)`
    /// offsets into the range.
    taken: Vec<(u64, u64)>,
}

/// Adds `[start, end)` to the sorted, disjoint intervals `taken`.
fn add_interval(taken: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let (mut start, mut end) = (start, end);
    taken.retain(|&(a, b)| {
        let touches = a <= end && start <= b;
        if touches {
            start = start.min(a);
            end = end.max(b);
        }
        !touches
    });
    let at = taken.partition_point(|&(a, _)| a < start);
    taken.insert(at, (start, end));
}

/// One read started ahead.
pub(crate) struct StartedRead {
    range: BlobRange,
    progress: Mutex<Progress>,
    grew: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl StartedRead {
    /// The read's bytes have grown to `prefix` (all of them, from the start).
    pub(crate) fn arrived(&self, prefix: &[u8]) {
        let mut p = lock(&self.progress);
        if prefix.len() > p.data.len() {
            let have = p.data.len();
            p.data.extend_from_slice(&prefix[have..]);
            self.grew.notify_all();
        }
    }

    /// The read has ended, with all its bytes or with an error.
    pub(crate) fn ended(&self, outcome: Result<(), String>) {
        let mut p = lock(&self.progress);
        if let Err(e) = &outcome {
            p.data = Vec::new();
            tracing::debug!("started read of {} bytes {}+{} failed: {e}", self.range.digest, self.range.offset, self.range.len);
        }
        p.ended = Some(outcome);
        self.grew.notify_all();
    }

    /// Notes that a read took `[offset, offset + len)`; true once every
    /// byte of this read has been taken.
    fn taken(&self, offset: u64, len: u64) -> bool {
        let mut p = lock(&self.progress);
        let start = offset - self.range.offset;
        add_interval(&mut p.taken, start, start + len);
        p.taken == [(0, self.range.len)]
    }

    /// Serves `[offset, offset + len)` (within this read) from its bytes,
    /// handing `arrived` the growing prefix as a read of its own would.
    /// `None` if this read failed before the range was in.
    fn serve(&self, offset: u64, len: u64, arrived: &mut dyn FnMut(&[u8])) -> Option<Vec<u8>> {
        let from = (offset - self.range.offset) as usize;
        let len = len as usize;
        let mut out = Vec::with_capacity(len);
        loop {
            {
                let mut p = lock(&self.progress);
                loop {
                    let available = p.data.len().saturating_sub(from).min(len);
                    if available > out.len() {
                        out.extend_from_slice(&p.data[from + out.len()..from + available]);
                        break;
                    }
                    match &p.ended {
                        Some(Err(_)) => return None,
                        // Cannot happen: an ended read has all its bytes.
                        Some(Ok(())) if available < len => return None,
                        _ => {}
                    }
                    p = self.grew.wait(p).unwrap_or_else(|e| e.into_inner());
                }
            }
            // Outside the lock: `arrived` may take its time (decoding).
            arrived(&out);
            if out.len() == len {
                return Some(out);
            }
        }
    }
}

/// The started reads of one store.
#[derive(Default)]
pub struct StartedReads {
    reads: Mutex<Vec<Arc<StartedRead>>>,
}

impl StartedReads {
    /// Registers a read of `range` about to start; the caller feeds it.
    pub(crate) fn add(&self, range: BlobRange) -> Arc<StartedRead> {
        let read = Arc::new(StartedRead { range, progress: Mutex::default(), grew: Condvar::new() });
        lock(&self.reads).push(read.clone());
        read
    }

    /// Drops `read` from the list (reads being served from it go on).
    pub(crate) fn remove(&self, read: &Arc<StartedRead>) {
        lock(&self.reads).retain(|r| !Arc::ptr_eq(r, read));
    }

    /// Serves a read of `[offset, offset + len)` of `digest` from a
    /// started read holding it, if there is one (`None`: there is not, or
    /// it failed; the caller reads on its own).
    pub(crate) fn serve(&self, digest: &Digest, offset: u64, len: u64, arrived: &mut dyn FnMut(&[u8])) -> Option<Vec<u8>> {
        let read = lock(&self.reads).iter().find(|r| r.range.contains(digest, offset, len)).cloned()?;
        let served = read.serve(offset, len, arrived);
        if served.is_none() || read.taken(offset, len) {
            self.remove(&read);
        }
        served
    }

    /// Forgets every started read (its bytes are freed once the reads
    /// being served from it end).
    pub fn forget(&self) {
        lock(&self.reads).clear();
    }

    /// How many started reads are kept.
    pub fn len(&self) -> usize {
        lock(&self.reads).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(len: u64) -> BlobRange {
        BlobRange { digest: Digest::of(b"blob"), offset: 100, len }
    }

    #[test]
    fn a_read_within_a_started_one_gets_its_bytes_as_they_arrive() {
        let started = StartedReads::default();
        let read = started.add(range(10));
        let body: Vec<u8> = (0..10).collect();
        std::thread::scope(|s| {
            let served = s.spawn(|| {
                let mut seen = Vec::new();
                let data = started.serve(&Digest::of(b"blob"), 102, 5, &mut |prefix| seen.push(prefix.to_vec()));
                (data, seen)
            });
            for n in [1, 4, 10] {
                std::thread::sleep(std::time::Duration::from_millis(20));
                read.arrived(&body[..n]);
            }
            read.ended(Ok(()));
            let (data, seen) = served.join().unwrap();
            assert_eq!(data.as_deref(), Some(&body[2..7]));
            assert!(seen.len() >= 2, "handed over while arriving: {seen:?}");
            assert!(seen.iter().all(|p| p[..] == body[2..2 + p.len()]), "always a prefix of the range: {seen:?}");
        });
        assert_eq!(started.len(), 1, "kept until reads have taken all of it");
        let tail = started.serve(&Digest::of(b"blob"), 105, 5, &mut |_| {});
        assert_eq!(tail.as_deref(), Some(&body[5..]));
        assert_eq!(started.len(), 1, "its first two bytes were not taken yet");
        let head = started.serve(&Digest::of(b"blob"), 100, 3, &mut |_| {});
        assert_eq!(head.as_deref(), Some(&body[..3]));
        assert!(started.is_empty(), "forgotten once each of its bytes was taken");
    }

    #[test]
    fn taken_parts_merge_into_disjoint_intervals() {
        let mut t = Vec::new();
        for (a, b) in [(10, 20), (30, 40), (0, 5), (20, 30), (5, 10)] {
            add_interval(&mut t, a, b);
        }
        assert_eq!(t, [(0, 40)]);
        let mut t = Vec::new();
        for (a, b) in [(30, 40), (0, 5), (12, 15)] {
            add_interval(&mut t, a, b);
        }
        assert_eq!(t, [(0, 5), (12, 15), (30, 40)]);
    }

    #[test]
    fn ranges_outside_any_started_read_are_not_served() {
        let started = StartedReads::default();
        let read = started.add(range(10));
        read.arrived(&[7; 10]);
        read.ended(Ok(()));
        assert!(started.serve(&Digest::of(b"blob"), 95, 10, &mut |_| {}).is_none(), "starts before it");
        assert!(started.serve(&Digest::of(b"blob"), 105, 10, &mut |_| {}).is_none(), "ends after it");
        assert!(started.serve(&Digest::of(b"other"), 100, 10, &mut |_| {}).is_none(), "another blob");
        assert_eq!(started.len(), 1);
        started.forget();
        assert!(started.serve(&Digest::of(b"blob"), 100, 10, &mut |_| {}).is_none(), "forgotten");
    }

    #[test]
    fn a_failed_started_read_sends_its_readers_to_their_own_requests() {
        let started = StartedReads::default();
        let read = started.add(range(10));
        std::thread::scope(|s| {
            let served = s.spawn(|| started.serve(&Digest::of(b"blob"), 100, 10, &mut |_| {}));
            read.arrived(&[1; 4]);
            std::thread::sleep(std::time::Duration::from_millis(20));
            read.ended(Err("connection reset".into()));
            assert!(served.join().unwrap().is_none());
        });
        assert!(started.is_empty(), "a failed read is forgotten");
    }
}
