//! [`ReadPool`]: threads that answer the FUSE reads which must wait for
//! chunks from the store.
//!
//! A FUSE worker that waited for the network itself would hold back every
//! request queued behind it: with all workers waiting on a slow registry,
//! `stat` and `ls` on the mount would hang too. So a read whose chunks are
//! not all cached is handed here with its reply (fuser's reply objects may
//! be answered from any thread), and the worker goes back to the kernel at
//! once. Reads served from the caches stay on the worker: no hand-off cost.
//! How long a read may wait is bounded by the registry client's deadlines.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads running read jobs in arrival order.
pub struct ReadPool {
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ReadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadPool").field("threads", &self.threads.len()).finish()
    }
}

impl ReadPool {
    /// Starts `threads` threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            handles.push(std::thread::Builder::new().name(format!("naiad-read-{i}")).spawn(move || loop {
                let job = match rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            })?);
        }
        Ok(ReadPool { queue: Mutex::new(Some(tx)), threads: handles })
    }

    /// Runs `job` on a pool thread; on this thread if the pool has stopped.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        let rejected = match self.queue.lock().ok().as_ref().and_then(|q| q.as_ref()) {
            Some(tx) => tx.send(job).err().map(|e| e.0),
            None => Some(job),
        };
        if let Some(job) = rejected {
            job();
        }
    }
}

impl Drop for ReadPool {
    fn drop(&mut self) {
        if let Ok(mut q) = self.queue.lock() {
            q.take();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn a_blocked_job_does_not_hold_the_others() {
        let pool = ReadPool::new(2).unwrap();
        let (release, blocked) = mpsc::channel::<()>();
        pool.submit(move || {
            let _ = blocked.recv_timeout(Duration::from_secs(10));
        });
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        for _ in 0..10 {
            let (done, tx) = (done.clone(), tx.clone());
            pool.submit(move || {
                done.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(());
            });
        }
        for _ in 0..10 {
            rx.recv_timeout(Duration::from_secs(5)).expect("a job behind a blocked one did not run");
        }
        assert_eq!(done.load(Ordering::SeqCst), 10);
        let _ = release.send(());
        drop(pool);
    }
}
