//! [`TraceRecorder`]: `--record-trace FILE`, the files and byte ranges a
//! workload read, in first-access order, in the format `naiad convert
//! --prefetch-list` reads: one JSON object per line,
//!
//! ```text
//! {"path": "/usr/bin/python3.11", "offset": 0, "length": 131072}
//! ```
//!
//! Every FUSE read of a regular file is checked against the ranges already
//! recorded for that file; a read they do not fully cover is recorded
//! whole (clamped to the end of the file). Paths are absolute paths inside
//! the image, found from the bootstrap: an inode's `parent` directory and
//! the entry there naming it, up to the root (cached per inode). A hardlinked
//! file is recorded under the name the workload first looked it up by
//! ([`TraceRecorder::note_lookup`]), else under the first entry of its
//! parent naming it. A name that is not UTF-8 cannot be written as JSON and
//! is skipped.
//!
//! The file is rewritten (temporary file, then rename, so a reader always
//! sees a complete trace) every [`FLUSH_INTERVAL`] when something new was
//! recorded, and when the mount ends ([`TraceRecorder::finish`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use naiad_format::bootstrap::MAX_DEPTH;
use naiad_format::{Bootstrap, ROOT_INO};
use naiad_reader::NaiadImage;

use crate::counters::{inc, Counters};
use crate::error::{FuseError, IoContext};

/// How often new records are written out while the mount runs.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(2);

/// Byte ranges `[start, end)` of one file, sorted, disjoint, not touching.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    /// Whether `[start, end)` lies within the set.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let i = self.0.partition_point(|&(s, _)| s <= start);
        i > 0 && self.0[i - 1].1 >= end
    }

    /// Adds `[start, end)`, merging what it overlaps or touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let first = self.0.partition_point(|&(_, e)| e < start);
        let last = self.0.partition_point(|&(s, _)| s <= end);
        let (mut s, mut e) = (start, end);
        if first < last {
            s = s.min(self.0[first].0);
            e = e.max(self.0[last - 1].1);
        }
        self.0.splice(first..last, [(s, e)]);
    }
}

#[derive(Default)]
struct State {
    covered: HashMap<u32, RangeSet>,
    /// Absolute path of an inode; `None` when it has no usable name.
    paths: HashMap<u32, Option<String>>,
    /// Hardlinked files: (directory, name) of their first lookup.
    looked_up: HashMap<u32, (u32, Vec<u8>)>,
    /// The trace so far, one record per line.
    text: String,
    records: u64,
    /// Records written out by the last flush.
    flushed: u64,
}

/// Records the reads of one mount to a trace file.
pub struct TraceRecorder {
    path: PathBuf,
    image: Arc<NaiadImage>,
    counters: Arc<Counters>,
    state: Mutex<State>,
    /// Serializes writers so an older snapshot never replaces a newer one.
    write: Mutex<()>,
    flusher: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The absolute path of `ino` from the bootstrap, caching it and the
/// directories above it.
fn path_of(b: &Bootstrap, cache: &mut HashMap<u32, Option<String>>, ino: u32) -> Option<String> {
    if let Some(p) = cache.get(&ino) {
        return p.clone();
    }
    // Walk up to the root or to an ancestor whose path is known.
    let mut chain: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut cur = ino;
    let mut base = loop {
        if cur == ROOT_INO {
            break Some(String::new());
        }
        if let Some(p) = cache.get(&cur) {
            break p.clone();
        }
        if chain.len() > MAX_DEPTH {
            break None;
        }
        let Ok(rec) = b.inode(cur) else { break None };
        let Ok(entries) = b.dir_entries(rec.parent) else { break None };
        let Some(e) = entries.iter().find(|e| e.ino == cur) else { break None };
        chain.push((cur, e.name.to_vec()));
        cur = rec.parent;
    };
    for (i, name) in chain.into_iter().rev() {
        base = match (base, std::str::from_utf8(&name)) {
            (Some(parent), Ok(name)) => Some(format!("{parent}/{name}")),
            _ => None,
        };
        cache.insert(i, base.clone());
    }
    if ino == ROOT_INO {
        return Some("/".into());
    }
    cache.get(&ino).cloned().flatten()
}

/// One trace line, in the spelling the converter documents.
fn trace_line(path: &str, offset: u64, length: u64) -> String {
    let path = serde_json::to_string(path).unwrap_or_else(|_| "\"\"".into());
    format!("{{\"path\": {path}, \"offset\": {offset}, \"length\": {length}}}\n")
}

impl TraceRecorder {
    /// Starts recording to `path`: writes an empty trace there at once (so
    /// an unwritable path fails the mount) and starts the periodic flush.
    pub fn start(path: &Path, image: Arc<NaiadImage>, counters: Arc<Counters>) -> Result<Arc<Self>, FuseError> {
        let r = Arc::new(TraceRecorder { path: path.to_path_buf(), image, counters, state: Mutex::new(State::default()), write: Mutex::new(()), flusher: Mutex::new(None) });
        r.write_out(true)?;
        let (tx, rx) = mpsc::channel::<()>();
        let weak = Arc::downgrade(&r);
        let handle = std::thread::Builder::new()
            .name("naiad-trace".into())
            .spawn(move || {
                // Until `finish` closes the channel (or the recorder is gone).
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(FLUSH_INTERVAL) {
                    let Some(r) = weak.upgrade() else { break };
                    if let Err(e) = r.write_out(false) {
                        tracing::warn!("trace: {e}");
                    }
                }
            })
            .at(path)?;
        *lock(&r.flusher) = Some((tx, handle));
        Ok(r)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remembers that hardlinked file `ino` was looked up as `name` in
    /// directory `parent`, unless it was looked up before.
    pub fn note_lookup(&self, parent: u32, name: &[u8], ino: u32) {
        let mut st = lock(&self.state);
        if !st.paths.contains_key(&ino) {
            st.looked_up.entry(ino).or_insert_with(|| (parent, name.to_vec()));
        }
    }

    /// The path of `ino`: by its first lookup if it is a hardlinked file
    /// that was looked up, else from the bootstrap.
    fn path_of(&self, st: &mut State, ino: u32) -> Option<String> {
        if let Some(p) = st.paths.get(&ino) {
            return p.clone();
        }
        let b = &self.image.bootstrap;
        let path = match st.looked_up.remove(&ino) {
            Some((parent, name)) => match (path_of(b, &mut st.paths, parent), std::str::from_utf8(&name)) {
                (Some(dir), Ok(name)) => Some(format!("{}/{name}", dir.trim_end_matches('/'))),
                _ => None,
            },
            None => path_of(b, &mut st.paths, ino),
        };
        st.paths.insert(ino, path.clone());
        path
    }

    /// Records a read of `[offset, offset + length)` of regular file `ino`
    /// (already clamped to the file's size) unless earlier records of the
    /// file cover it.
    pub fn record(&self, ino: u32, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let end = offset.saturating_add(length);
        let mut st = lock(&self.state);
        let ranges = st.covered.entry(ino).or_default();
        if ranges.covers(offset, end) {
            return;
        }
        ranges.insert(offset, end);
        let Some(path) = self.path_of(&mut st, ino) else {
            tracing::debug!("trace: inode {ino} has no path that can be written (not UTF-8?); not recorded");
            return;
        };
        st.text.push_str(&trace_line(&path, offset, length));
        st.records += 1;
        inc(&self.counters.trace_records);
    }

    /// Number of records so far.
    pub fn records(&self) -> u64 {
        lock(&self.state).records
    }

    /// Writes the trace out if anything was recorded since the last write
    /// (or always with `force`).
    fn write_out(&self, force: bool) -> Result<(), FuseError> {
        let _w = lock(&self.write);
        let (text, records) = {
            let st = lock(&self.state);
            if !force && st.records == st.flushed {
                return Ok(());
            }
            (st.text.clone(), st.records)
        };
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "trace".into());
        let tmp = self.path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(FuseError::Io { path: self.path.clone(), source: e });
        }
        lock(&self.state).flushed = records;
        Ok(())
    }

    /// Writes out what was recorded now.
    pub fn flush(&self) -> Result<(), FuseError> {
        self.write_out(false)
    }

    /// Stops the periodic flush and writes the final trace.
    pub fn finish(&self) -> Result<(), FuseError> {
        if let Some((tx, handle)) = lock(&self.flusher).take() {
            drop(tx);
            let _ = handle.join();
        }
        self.write_out(false)
    }
}

impl Drop for TraceRecorder {
    fn drop(&mut self) {
        if let Some((tx, _)) = lock(&self.flusher).take() {
            // The thread only holds a weak reference; it exits on its own.
            drop(tx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_sets_merge_and_cover() {
        let mut r = RangeSet::default();
        r.insert(100, 200);
        assert!(r.covers(100, 200) && r.covers(150, 160));
        assert!(!r.covers(50, 150) && !r.covers(150, 250) && !r.covers(0, 10));
        r.insert(300, 400);
        r.insert(200, 250); // touches the first
        assert_eq!(r.0, vec![(100, 250), (300, 400)]);
        r.insert(240, 310); // bridges both
        assert_eq!(r.0, vec![(100, 400)]);
        r.insert(0, 10);
        r.insert(500, 600);
        assert_eq!(r.0, vec![(0, 10), (100, 400), (500, 600)]);
        assert!(r.covers(500, 600) && !r.covers(400, 500));
        r.insert(5, 5);
        assert_eq!(r.0.len(), 3);
    }

    #[test]
    fn lines_parse_as_json() {
        let l = trace_line("/usr/bin/py\"x", 4096, 100);
        assert_eq!(l, "{\"path\": \"/usr/bin/py\\\"x\", \"offset\": 4096, \"length\": 100}\n");
        let v: serde_json::Value = serde_json::from_str(l.trim()).unwrap();
        assert_eq!(v["path"], "/usr/bin/py\"x");
        assert_eq!(v["offset"], 4096);
    }
}
