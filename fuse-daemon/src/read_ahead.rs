//! [`ReadAhead`]: per-file sequential read-ahead, as the kernel's page
//! cache does it, one level down: the kernel's own readahead reads at most
//! one FUSE request ahead (1 MiB), so a file read straight through would
//! otherwise wait for one store round trip per MiB.
//!
//! Each file's reads are watched: a read that starts where the file's
//! last one ended continues a stream (within [`SLACK`] either way: the
//! kernel's readahead requests may arrive out of order). The second
//! continuation starts read-ahead with a window of [`BASE_WINDOW`],
//! doubling with every further one up to the mount's maximum (default
//! [`MAX_WINDOW`]); the next window is asked for while the reader still
//! consumes the current one. A read anywhere else ends the stream (the
//! read-ahead it issued is not cancelled, but no more is asked for), so
//! random access never reads more than it asks for. A file that the
//! image's prefetch table (a recorded startup) covers is not read ahead:
//! the recording knows which of its bytes are needed. Which chunks a window
//! needs, and with how many requests, is the chunk cache's business.
//!
//! Programs and shared libraries are not read in streams: the dynamic
//! loader maps them and the process faults their pages in, all over the
//! file, one round trip each. [`is_program`] names such files by what a
//! lookup or readdirplus shows (an executable mode, or a `.so` name). When
//! one's first bytes (its ELF headers) are read from the store, the
//! filesystem loads what the loader faults on next ([`first_read_loads`]:
//! its end first, then the whole of a small one or the tail of a large
//! one). Of a large one ([`loads_by_window`]) it loads each
//! [`MAPPED_WINDOW`] in the background at the first fault in it
//! ([`MappedWindows`]), so the faults wait for a few
//! large requests instead of hundreds of small ones, and the parts of a
//! large library that are never touched are not fetched (loading such
//! files whole measured slower: a 30 MB data library of which 0.6 MB is
//! read held up every other read on the link).
//!
//! Small files are read in bursts by directory: an interpreter importing a
//! package reads one module after another from the same directory, each a
//! round trip of its own. At the first small file of a directory read from
//! the store, the filesystem loads the directory's other small files in
//! the background, in few large requests (once per directory:
//! [`DirectoryLoads`]), unless they are more than
//! [`DIRECTORY_LOAD_MAX`] stored bytes (then it is not a package but a
//! store of unrelated files, such as a library directory). At a Python
//! package's compiled `__init__` the bytecode directories of its
//! subpackages come along ([`is_package_init`]).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;

/// Window of the first read-ahead.
pub const BASE_WINDOW: u64 = 512 << 10;
/// Default largest window (`--read-ahead-max`): at 100 Mbit/s and 20 ms RTT about 3 bandwidth-delay
/// products, large enough that one request per window costs little.
pub const MAX_WINDOW: u64 = 8 << 20;
/// Smallest program [`loads_by_window`] picks: a smaller one is loaded whole
/// at its first read ([`first_read_loads`]). (Loading smaller ones by window
/// at their first fault measured slower: their windows held up the reads of
/// others on the link.)
pub const MAPPED_FILE_MIN: u64 = 1 << 20;
/// Largest file [`loads_by_window`] picks.
pub const MAPPED_FILE_MAX: u64 = 512 << 20;
/// The unit in which [`loads_by_window`] files are loaded.
pub const MAPPED_WINDOW: u64 = 2 << 20;

/// Whether a regular file named `name` with `mode` and `size` is a
/// program or shared library the filesystem loads ahead of its faults: an
/// executable (any `x` bit) or a shared library (`*.so`, `*.so.N...`) of
/// at most [`MAPPED_FILE_MAX`] bytes.
pub fn is_program(name: &[u8], mode: u32, size: u64) -> bool {
    let shared_object = name.ends_with(b".so") || name.windows(4).any(|w| w == b".so.");
    size <= MAPPED_FILE_MAX && (mode & 0o111 != 0 || shared_object)
}

/// Whether a [`is_program`] file of `size` bytes is loaded by
/// [`MAPPED_WINDOW`]s: one of at least [`MAPPED_FILE_MIN`] bytes.
pub fn loads_by_window(size: u64) -> bool {
    size >= MAPPED_FILE_MIN
}

/// What a larger program loads at its first read ([`first_read_loads`]):
/// its last bytes, where the linker puts the writable segment (dynamic
/// section, GOT, data to relocate).
pub const PROGRAM_TAIL: u64 = 512 << 10;
/// The end of a program that [`first_read_loads`] asks for first, in a
/// request of its own: what the loader faults on first, right after the
/// headers.
pub const PROGRAM_END: u64 = 128 << 10;

/// The parts of a [`is_program`] file of `size` bytes loaded in the
/// background, each by a request of its own, when its first bytes (the ELF
/// headers the kernel or the dynamic loader reads first) are read from the
/// store: its last [`PROGRAM_END`] bytes, then the rest of the file below
/// [`MAPPED_FILE_MIN`] or the rest of its last [`PROGRAM_TAIL`] bytes.
/// Right after the headers the loader maps the file and relocates it,
/// faulting on its writable segment at the end of the file: asked for
/// with the headers, in a small request that is not behind the rest,
/// that fault does not cost a round trip of its own.
pub fn first_read_loads(size: u64) -> Vec<(u64, u64)> {
    let end = size.saturating_sub(PROGRAM_END);
    let rest = if size < MAPPED_FILE_MIN { 0 } else { size.saturating_sub(PROGRAM_TAIL) };
    [(end, size), (rest, end)].into_iter().filter(|(from, to)| from < to).collect()
}

/// Windows of mapped files remembered by [`MappedWindows`].
const WINDOWS: usize = 65536;

/// Which [`MAPPED_WINDOW`]s of which files have been started, so each is
/// loaded once.
pub struct MappedWindows {
    started: Mutex<LruCache<(u32, u64), ()>>,
}

impl Default for MappedWindows {
    fn default() -> Self {
        MappedWindows { started: Mutex::new(LruCache::new(NonZeroUsize::new(WINDOWS).unwrap_or(NonZeroUsize::MIN))) }
    }
}

impl MappedWindows {
    /// The windows (file ranges, within `size`) that the read of
    /// `[offset, end)` of inode `ino` falls in and that were not started
    /// yet; they count as started from now on.
    pub fn start(&self, ino: u32, offset: u64, end: u64, size: u64) -> Vec<(u64, u64)> {
        let Ok(mut started) = self.started.lock() else { return Vec::new() };
        let last = end.max(offset + 1).min(size.max(1)) - 1;
        (offset / MAPPED_WINDOW..=last / MAPPED_WINDOW)
            .filter(|k| started.put((ino, *k), ()).is_none())
            .map(|k| (k * MAPPED_WINDOW, ((k + 1) * MAPPED_WINDOW).min(size)))
            .filter(|(from, to)| from < to)
            .collect()
    }

    /// The window starting at `from` could not be loaded; the next read in
    /// it tries again.
    pub fn forget(&self, ino: u32, from: u64) {
        if let Ok(mut started) = self.started.lock() {
            started.pop(&(ino, from / MAPPED_WINDOW));
        }
    }
}

/// Largest file that counts as a small file for [`DirectoryLoads`].
pub const SMALL_FILE_MAX: u64 = 1 << 20;
/// Largest directory (stored bytes of its small files not cached yet)
/// loaded by a [`DirectoryLoads`] burst.
pub const DIRECTORY_LOAD_MAX: u64 = 4 << 20;
/// Most entries of a directory scanned for a [`DirectoryLoads`] burst
/// (on the FUSE worker); a larger directory is not loaded.
pub const DIRECTORY_SCAN_MAX: u64 = 2048;
/// Directories remembered by [`DirectoryLoads`].
const DIRECTORIES: usize = 4096;

/// Python's bytecode directory: `P/__pycache__` holds the compiled
/// modules of package `P`.
pub const BYTECODE_DIR: &[u8] = b"__pycache__";

/// Whether `name` is the compiled `__init__` of a package
/// (`__init__.cpython-311.pyc`): importing the package, the interpreter
/// goes on to import its subpackages, each a directory of its own. At the
/// first cold read of one, the filesystem loads the bytecode directories
/// of the package's subpackages along with its own ([`loads_with_package`]),
/// rather than one round trip later per subpackage.
pub fn is_package_init(name: &[u8]) -> bool {
    name.starts_with(b"__init__.") && name.ends_with(b".pyc")
}

/// Whether a subpackage named `name` is loaded with its package
/// ([`is_package_init`]): not the test suites a package ships
/// (`tests`, `test`), which importing it does not run.
pub fn loads_with_package(name: &[u8]) -> bool {
    name != b"tests" && name != b"test"
}

/// Which directories have had their small files of each kind loaded, so
/// each is loaded once, at the first of them read from the store. The
/// kinds are programs and libraries ([`is_program`]) and other files: a
/// directory's load takes the files of the kind of the read that starts
/// it. A process that reads one data file of a directory of modules
/// (glibc's `gconv-modules.cache` beside about 2 MB of `gconv` modules)
/// seldom loads the modules, and one that loads a library of a package
/// (numpy's `random`) usually loads the others beside it.
pub struct DirectoryLoads {
    started: Mutex<LruCache<(u32, bool), ()>>,
}

impl Default for DirectoryLoads {
    fn default() -> Self {
        DirectoryLoads { started: Mutex::new(LruCache::new(NonZeroUsize::new(DIRECTORIES).unwrap_or(NonZeroUsize::MIN))) }
    }
}

impl DirectoryLoads {
    /// Notes that a small file of directory `dir` (a program or library if
    /// `programs`) is being read from the store; true when the load of the
    /// directory's files of that kind should start now (once per directory
    /// and kind, unless [`DirectoryLoads::forget`] is called).
    pub fn observe_cold_read(&self, dir: u32, programs: bool) -> bool {
        let Ok(mut started) = self.started.lock() else { return false };
        started.put((dir, programs), ()).is_none()
    }

    /// The load of `dir`'s files of that kind could not start; the next
    /// cold read tries again.
    pub fn forget(&self, dir: u32, programs: bool) {
        if let Ok(mut started) = self.started.lock() {
            started.pop(&(dir, programs));
        }
    }
}

/// How far a read may start from where the last one ended and still count
/// as sequential.
pub const SLACK: u64 = 1 << 20;
/// Files whose streams are remembered.
const STREAMS: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Stream {
    /// Where the last read ended.
    next: u64,
    /// Sequential reads in a row so far.
    run: u32,
    window: u64,
    /// File offset up to which read-ahead has been asked for.
    ahead_end: u64,
}

/// The read-ahead state of every file being read.
pub struct ReadAhead {
    streams: Mutex<LruCache<u32, Stream>>,
    /// Largest window; 0: no read-ahead.
    max_window: u64,
}

impl Default for ReadAhead {
    fn default() -> Self {
        Self::new(MAX_WINDOW)
    }
}

impl ReadAhead {
    /// Read-ahead with windows of at most `max_window` bytes (0: none).
    pub fn new(max_window: u64) -> Self {
        ReadAhead { streams: Mutex::new(LruCache::new(NonZeroUsize::new(STREAMS).unwrap_or(NonZeroUsize::MIN))), max_window }
    }

    /// The largest window.
    pub fn max_window(&self) -> u64 {
        self.max_window
    }

    /// Notes a read of `[offset, end)` of inode `ino` (of `size` bytes);
    /// returns the file range to read ahead now, if any.
    pub fn observe(&self, ino: u32, offset: u64, end: u64, size: u64) -> Option<(u64, u64)> {
        if self.max_window == 0 {
            return None;
        }
        let Ok(mut streams) = self.streams.lock() else { return None };
        let sequential = streams.get(&ino).filter(|s| end + SLACK >= s.next && offset <= s.next + SLACK).copied();
        let Some(mut s) = sequential else {
            streams.put(ino, Stream { next: end, run: 0, window: 0, ahead_end: end });
            return None;
        };
        s.run += 1;
        s.next = s.next.max(end);
        if s.run >= 2 {
            s.window = if s.window == 0 { BASE_WINDOW.min(self.max_window) } else { (s.window * 2).min(self.max_window) };
        }
        let mut range = None;
        // Ask for the next window once the reader is into the last half
        // of what was asked for.
        if s.window > 0 && s.ahead_end.saturating_sub(s.next) < s.window / 2 && s.ahead_end < size {
            let from = s.ahead_end.max(s.next);
            let to = (from + s.window).min(size);
            if to > from {
                s.ahead_end = to;
                range = Some((from, to));
            }
        }
        streams.put(ino, s);
        range
    }
}

/// The read-ahead loads running in the background, at most a fixed
/// number at once; the daemon waits for them before it flushes its disk
/// cache at exit, so what they fetched is kept.
#[derive(Clone)]
pub struct BackgroundLoads {
    inner: Arc<(Mutex<usize>, Condvar)>,
    limit: usize,
    /// Set at exit: no load starts, and running ones end after the
    /// request they are in.
    stopping: Arc<AtomicBool>,
}

/// One running load; it ends when this is dropped.
pub struct LoadSlot(Arc<(Mutex<usize>, Condvar)>);

impl BackgroundLoads {
    /// At most `limit` loads at once.
    pub fn new(limit: usize) -> Self {
        BackgroundLoads { inner: Arc::new((Mutex::new(0), Condvar::new())), limit, stopping: Arc::new(AtomicBool::new(false)) }
    }

    /// Ends the loads: none starts from now on, and a running one stops
    /// before its next request ([`BackgroundLoads::stopping`]).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Whether a running load should stop (checked before each request).
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// A slot for one more load, or `None` if `limit` are running (or the
    /// loads are stopping).
    pub fn try_start(&self) -> Option<LoadSlot> {
        let mut running = self.inner.0.lock().unwrap_or_else(|p| p.into_inner());
        if *running >= self.limit || self.stopping() {
            return None;
        }
        *running += 1;
        Some(LoadSlot(self.inner.clone()))
    }

    /// Waits until no load runs, for at most `timeout`; whether none does.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, idle) = &*self.inner;
        let mut running = lock.lock().unwrap_or_else(|p| p.into_inner());
        while *running > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { return false };
            running = idle.wait_timeout(running, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }
}

impl Drop for LoadSlot {
    fn drop(&mut self) {
        let (lock, idle) = &*self.0;
        let mut running = lock.lock().unwrap_or_else(|p| p.into_inner());
        *running = running.saturating_sub(1);
        idle.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn stopped_loads_start_no_more_and_tell_running_ones() {
        let loads = BackgroundLoads::new(2);
        let running = loads.try_start().expect("a slot");
        assert!(!loads.stopping());
        let clone = loads.clone();
        clone.stop();
        assert!(loads.stopping(), "a clone shares the stop");
        assert!(loads.try_start().is_none());
        assert!(!loads.wait_idle(Duration::from_millis(10)));
        drop(running);
        assert!(loads.wait_idle(Duration::from_millis(10)));
    }

    #[test]
    fn programs_and_libraries_are_known_by_mode_or_name_and_large_ones_load_by_window() {
        assert!(is_program(b"libnode.so.108", 0o100644, 80 * MIB));
        assert!(is_program(b"_multiarray_umath.cpython-311-x86_64-linux-gnu.so", 0o100644, 7 * MIB));
        assert!(is_program(b"python3.11", 0o100755, 7 * MIB));
        assert!(is_program(b"libc.so.6", 0o100755, 900 << 10));
        // Too large, or neither program nor library.
        assert!(!is_program(b"libhuge.so", 0o100644, 600 * MIB));
        assert!(!is_program(b"data.sqlite", 0o100644, 50 * MIB));
        assert!(!is_program(b"notes.solution", 0o100644, 5 * MIB));
        assert!(loads_by_window(7 * MIB));
        assert!(!loads_by_window(900 << 10), "a small library is loaded whole at its first read");
    }

    #[test]
    fn a_programs_first_read_loads_its_end_first_then_the_rest_or_its_tail() {
        let k = 1 << 10;
        assert_eq!(first_read_loads(100 * k), vec![(0, 100 * k)], "a small one: whole, in one request");
        assert_eq!(first_read_loads(300 * k), vec![(172 * k, 300 * k), (0, 172 * k)], "below a MiB: the end, then the rest");
        assert_eq!(first_read_loads(MIB), vec![(MIB - PROGRAM_END, MIB), (MIB - PROGRAM_TAIL, MIB - PROGRAM_END)], "from a MiB: the end, then the tail");
        assert_eq!(first_read_loads(7 * MIB), vec![(7 * MIB - PROGRAM_END, 7 * MIB), (7 * MIB - PROGRAM_TAIL, 7 * MIB - PROGRAM_END)]);
        assert_eq!(first_read_loads(0), vec![]);
    }

    #[test]
    fn a_packages_compiled_init_brings_its_subpackages_but_not_their_tests() {
        assert!(is_package_init(b"__init__.cpython-311.pyc"));
        assert!(is_package_init(b"__init__.cpython-312.opt-1.pyc"));
        assert!(!is_package_init(b"__init__.py"));
        assert!(!is_package_init(b"version.cpython-311.pyc"));
        assert!(loads_with_package(b"core"));
        assert!(!loads_with_package(b"tests"));
        assert!(!loads_with_package(b"test"));
    }

    #[test]
    fn mapped_files_load_each_window_touched_once() {
        let w = MappedWindows::default();
        let size = 5 * MIB;
        assert_eq!(w.start(3, 4096, 8192, size), vec![(0, 2 * MIB)], "the window of the first fault");
        assert_eq!(w.start(3, 100, 200, size), vec![], "a window is loaded once");
        assert_eq!(w.start(3, 2 * MIB - 10, 2 * MIB + 10, size), vec![(2 * MIB, 4 * MIB)], "a read across a boundary: the new window only");
        assert_eq!(w.start(3, 5 * MIB - 1, 5 * MIB, size), vec![(4 * MIB, 5 * MIB)], "the last window ends with the file");
        assert_eq!(w.start(4, 0, 1, size), vec![(0, 2 * MIB)], "per file");
        w.forget(3, 2 * MIB + 5);
        assert_eq!(w.start(3, 3 * MIB, 3 * MIB + 1, size), vec![(2 * MIB, 4 * MIB)], "a window that could not load is tried again");
    }

    #[test]
    fn a_directory_is_loaded_once_unless_its_load_could_not_start() {
        let loads = DirectoryLoads::default();
        assert!(loads.observe_cold_read(10, false), "the first cold read starts it");
        assert!(!loads.observe_cold_read(10, false), "once per directory");
        assert!(loads.observe_cold_read(10, true), "and kind");
        assert!(loads.observe_cold_read(11, false), "another directory counts on its own");
        loads.forget(11, false);
        assert!(loads.observe_cold_read(11, false), "a load that could not start is tried again");
        assert!(!loads.observe_cold_read(10, false));
    }

    #[test]
    fn sequential_reads_grow_the_window_up_to_its_cap() {
        let ra = ReadAhead::default();
        let size = 1 << 30;
        let mut asked = Vec::new();
        let mut pos = 0;
        for _ in 0..64 {
            if let Some(r) = ra.observe(7, pos, pos + MIB, size) {
                asked.push(r);
            }
            pos += MIB;
        }
        // Nothing for the first read and the first continuation.
        assert_eq!(asked[0].0, 3 * MIB, "starts with the third read, after it: {asked:?}");
        let windows: Vec<u64> = asked.iter().map(|(a, b)| b - a).collect();
        assert_eq!(windows[0], BASE_WINDOW);
        assert!(windows.windows(2).all(|w| w[1] >= w[0]), "windows only grow: {windows:?}");
        assert_eq!(*windows.last().unwrap(), MAX_WINDOW);
        // Contiguous, never asked twice.
        assert!(asked.windows(2).all(|w| w[1].0 >= w[0].1), "{asked:?}");
        // Always ahead of the reader.
        assert!(asked.last().unwrap().1 > pos);
    }

    #[test]
    fn random_reads_ask_for_nothing_and_end_a_stream() {
        let ra = ReadAhead::default();
        let size = 256 * MIB;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (size / 4096)) * 4096;
            assert_eq!(ra.observe(1, off, off + 4096, size), None, "a random 4 KiB read at {off}");
        }
        // A stream that jumps away stops asking.
        for i in 0..8 {
            ra.observe(2, i * MIB, (i + 1) * MIB, size);
        }
        assert_eq!(ra.observe(2, 200 * MIB, 201 * MIB, size), None);
        assert_eq!(ra.observe(2, 201 * MIB, 202 * MIB, size), None, "one continuation is not a stream yet");
        // Off.
        let off = ReadAhead::new(0);
        assert!((0..8).all(|i| off.observe(4, i * MIB, (i + 1) * MIB, size).is_none()));
    }

    #[test]
    fn reads_slightly_out_of_order_stay_one_stream_and_stop_at_the_end() {
        let ra = ReadAhead::default();
        let size = 6 * MIB;
        assert_eq!(ra.observe(3, 0, MIB, size), None);
        // The kernel's next two requests, the second first.
        assert_eq!(ra.observe(3, 2 * MIB, 3 * MIB, size), None);
        let r = ra.observe(3, MIB, 2 * MIB, size).expect("the late one continues the stream");
        assert_eq!(r, (3 * MIB, 3 * MIB + BASE_WINDOW));
        let mut asked_to = r.1;
        for i in 3..6 {
            if let Some((from, to)) = ra.observe(3, i * MIB, (i + 1) * MIB, size) {
                assert!(from >= asked_to, "never asked twice");
                assert!(to <= size);
                asked_to = to;
            }
        }
        assert_eq!(asked_to, size, "read ahead to the end");
        assert_eq!(ra.observe(3, 5 * MIB, 6 * MIB, size), None, "nothing past the end");
    }

    #[test]
    fn background_loads_are_bounded_and_waited_for() {
        let loads = BackgroundLoads::new(2);
        let a = loads.try_start().expect("first");
        let b = loads.try_start().expect("second");
        assert!(loads.try_start().is_none(), "a third is refused");
        assert!(!loads.wait_idle(Duration::from_millis(20)), "two are running");
        drop(a);
        let c = loads.try_start().expect("a slot came free");
        let done = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop((b, c));
        });
        assert!(loads.wait_idle(Duration::from_secs(10)), "idle once both end");
        done.join().expect("thread");
    }
}
