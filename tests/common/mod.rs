//! Shared support for naiad's integration tests (`mod common;` in a file under
//! `tests/`).
//!
//! This module owns:
//! - the cached Debian fixture image ([`debian_image`], built by
//!   `scripts/build-debian-image.sh` under [`fixtures_dir`]);
//! - reference unpacking with umoci ([`umoci_unpack`]);
//! - tree comparison by lstat, contents, xattrs and hardlink groups
//!   ([`compare_trees`], [`CompareOptions`]);
//! - the `naiad` binary under test ([`naiad`]);
//! - a small, deterministic, generated OCI image that covers every tar/layer
//!   corner case naiad must handle ([`generated_image`], [`generate_image`]).
//!
//! It uses only std and the root package's dev-dependencies, plus the external
//! tools that `scripts/install-test-deps.sh` installs (umoci, GNU tar, flock).
//! Helpers panic with a clear message on failure: they are for tests.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------
// Fixtures directory and the Debian image
// ---------------------------------------------------------------------------

/// Directory where test fixtures are cached: `$NAIAD_FIXTURES`, or
/// `/tmp/naiad-fixtures` when unset or empty.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("NAIAD_FIXTURES") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from("/tmp/naiad-fixtures"),
    }
}

/// Paths of the cached Debian bookworm + python3 fixture image.
#[derive(Clone, Debug)]
pub struct DebianImage {
    /// OCI image layout (gzip layers), tag `latest`, 4 layers: debootstrap
    /// rootfs; whiteouts + added file + chmod; replaced dir + hardlinks +
    /// symlinks + user xattr; an opaque directory (`.wh..wh..opq`).
    pub layout: PathBuf,
    /// The same image with zstd layers (made by `skopeo copy`), tag `latest`.
    /// umoci 0.4.7 cannot unpack it; its config (diff_ids) is identical.
    pub layout_zstd: PathBuf,
    /// `umoci raw unpack` of `layout:latest`, the expected filesystem tree.
    pub reference_rootfs: PathBuf,
}

/// Remembers the outcome (success or failure message) of the first
/// `debian_image()` call in this process.
static DEBIAN_IMAGE: Mutex<Option<Result<DebianImage, String>>> = Mutex::new(None);

/// Path of the repository root (the root package's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Returns the cached Debian fixture image, building it first (about two
/// minutes, needs root and the Debian mirror) with
/// `scripts/build-debian-image.sh` if `$NAIAD_FIXTURES/debian-python/COMPLETE`
/// is missing. The build runs at most once per process (other threads wait)
/// and under `flock` on `$NAIAD_FIXTURES/.debian-python.lock` across
/// processes. Panics with the script's output if the build fails.
pub fn debian_image() -> DebianImage {
    let mut guard = DEBIAN_IMAGE.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(build_debian_image());
    }
    match guard.as_ref() {
        Some(Ok(img)) => img.clone(),
        Some(Err(msg)) => panic!("{msg}"),
        None => unreachable!(),
    }
}

fn build_debian_image() -> Result<DebianImage, String> {
    let fixtures = fixtures_dir();
    let base = fixtures.join("debian-python");
    let img = DebianImage { layout: base.join("layout"), layout_zstd: base.join("layout-zstd"), reference_rootfs: base.join("rootfs-ref") };
    if base.join("COMPLETE").is_file() {
        return Ok(img);
    }
    fs::create_dir_all(&fixtures).map_err(|e| format!("cannot create fixtures dir {}: {e}", fixtures.display()))?;
    let script = repo_root().join("scripts/build-debian-image.sh");
    let lock = fixtures.join(".debian-python.lock");
    eprintln!("naiad tests: building the Debian fixture image under {} (a few minutes)...", base.display());
    let out = Command::new("flock")
        .arg(&lock)
        .arg("bash")
        .arg(&script)
        .env("NAIAD_FIXTURES", &fixtures)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `flock {} bash {}`: {e}", lock.display(), script.display()))?;
    if !out.status.success() || !base.join("COMPLETE").is_file() {
        return Err(format!(
            "building the Debian fixture image failed ({}):\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
            out.status,
            tail_lines(&out.stdout, 40),
            tail_lines(&out.stderr, 40)
        ));
    }
    eprintln!("naiad tests: Debian fixture image ready");
    Ok(img)
}

fn tail_lines(bytes: &[u8], n: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// True when the test process runs as root (owner of `/proc/self`).
pub fn running_as_root() -> bool {
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Says why a test cannot run here and returns false, so the test skips.
/// Under CI (`CI` set) it fails instead: the test command installs
/// everything the tests need, so a skip there would hide a broken setup.
pub fn cannot_run(reason: &str) -> bool {
    assert!(std::env::var_os("CI").is_none(), "this test must run under CI, but {reason}");
    eprintln!("skipping: {reason}");
    false
}

// ---------------------------------------------------------------------------
// umoci and the naiad binary
// ---------------------------------------------------------------------------

/// Unpacks `layout:tag` into `dest` with `umoci raw unpack` (as root, so
/// ownership, devices and xattrs are kept). `dest` is created; if it exists it
/// must be empty. Panics with umoci's stderr on failure.
pub fn umoci_unpack(layout: &Path, tag: &str, dest: &Path) {
    let layout_s = layout.to_str().expect("layout path must be UTF-8");
    assert!(!layout_s.contains(':'), "umoci cannot take a layout path containing ':' ({layout_s})");
    if let Ok(mut rd) = fs::read_dir(dest) {
        assert!(rd.next().is_none(), "umoci_unpack: destination {} exists and is not empty", dest.display());
    }
    let out = Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{layout_s}:{tag}"))
        .arg(dest)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run umoci (install it: scripts/install-test-deps.sh): {e}"));
    if !out.status.success() {
        panic!(
            "umoci raw unpack --image {layout_s}:{tag} {} failed ({}):\n{}{}",
            dest.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A `Command` for the `naiad` binary built by cargo for this test run
/// (`CARGO_BIN_EXE_naiad`).
pub fn naiad() -> Command {
    Command::new(env!("CARGO_BIN_EXE_naiad"))
}

// ---------------------------------------------------------------------------
// Tree comparison
// ---------------------------------------------------------------------------

/// What [`compare_trees`] compares. `Default` is strict except that directory
/// mtimes are skipped (unpackers touch them) and the root's own metadata is
/// not compared.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// Compare mtimes (seconds and nanoseconds).
    pub mtime: bool,
    /// Do not compare the mtime of directories.
    pub skip_dir_mtime: bool,
    /// Relative paths (a leading `/` is ignored) whose mtime is not compared,
    /// e.g. implicit parent directories, whose mtime the unpacker chooses.
    pub skip_mtime_paths: Vec<PathBuf>,
    /// Relative paths whose mode, uid and gid are not compared (they are still
    /// required to exist with the same file type), e.g. implicit parents.
    pub skip_owner_mode_paths: Vec<PathBuf>,
    /// xattr names starting with any of these prefixes are ignored in both
    /// trees (e.g. `"security."`).
    pub ignore_xattr_prefixes: Vec<String>,
    /// Compare xattrs at all.
    pub xattrs: bool,
    /// Compare the partition of non-directories into hardlink groups, and
    /// `nlink` of non-directories whose groups agree.
    pub hardlinks: bool,
    /// Also compare the metadata (mode, owner, mtime, xattrs) of the two
    /// roots themselves.
    pub compare_root: bool,
    /// At most this many differences are listed, then a count of the rest.
    pub max_reported: usize,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            mtime: true,
            skip_dir_mtime: true,
            skip_mtime_paths: Vec::new(),
            skip_owner_mode_paths: Vec::new(),
            ignore_xattr_prefixes: Vec::new(),
            xattrs: true,
            hardlinks: true,
            compare_root: false,
            max_reported: 50,
        }
    }
}

struct Node {
    md: fs::Metadata,
}

struct Tree {
    root: PathBuf,
    nodes: BTreeMap<PathBuf, Node>,
    errors: Vec<String>,
}

fn walk_tree(root: &Path, label: &str) -> Tree {
    let mut tree = Tree { root: root.to_path_buf(), nodes: BTreeMap::new(), errors: Vec::new() };
    match fs::symlink_metadata(root) {
        Ok(md) => {
            let is_dir = md.is_dir();
            tree.nodes.insert(PathBuf::new(), Node { md });
            if !is_dir {
                tree.errors.push(format!("{label} root {} is not a directory", root.display()));
                return tree;
            }
        }
        Err(e) => {
            tree.errors.push(format!("{label} root {}: {e}", root.display()));
            return tree;
        }
    }
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let rd = match fs::read_dir(&abs) {
            Ok(rd) => rd,
            Err(e) => {
                tree.errors.push(format!("{label}: cannot read directory {}: {e}", show(&rel)));
                continue;
            }
        };
        for ent in rd {
            let ent = match ent {
                Ok(ent) => ent,
                Err(e) => {
                    tree.errors.push(format!("{label}: error listing {}: {e}", show(&rel)));
                    continue;
                }
            };
            let child = rel.join(ent.file_name());
            match fs::symlink_metadata(root.join(&child)) {
                Ok(md) => {
                    if md.is_dir() {
                        stack.push(child.clone());
                    }
                    tree.nodes.insert(child, Node { md });
                }
                Err(e) => tree.errors.push(format!("{label}: cannot lstat {}: {e}", show(&child))),
            }
        }
    }
    tree
}

fn show(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.display().to_string()
    }
}

fn normalize_rel(p: &Path) -> PathBuf {
    p.components().filter(|c| matches!(c, Component::Normal(_))).collect()
}

fn type_name(ft: &fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_file() {
        "regular file"
    } else if ft.is_char_device() {
        "char device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else {
        "unknown"
    }
}

/// Streaming SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn read_xattrs(path: &Path, ignore: &[String]) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let mut map = BTreeMap::new();
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(95) || e.kind() == io::ErrorKind::Unsupported => {
            return Ok(map); // EOPNOTSUPP: no xattrs here
        }
        Err(e) => return Err(e),
    };
    for name in names {
        let name_s = name.to_string_lossy().into_owned();
        if ignore.iter().any(|p| name_s.starts_with(p.as_str())) {
            continue;
        }
        let value = xattr::get(path, &name)?.unwrap_or_default();
        map.insert(name_s, value);
    }
    Ok(map)
}

fn show_bytes(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) if !s.chars().any(|c| c.is_control()) => format!("{s:?}"),
        _ => format!("0x{}", hex::encode(v)),
    }
}

/// Compares two directory trees by lstat (never following symlinks) and
/// returns human-readable differences; empty means equal.
///
/// Compared: the set of relative paths (a missing/extra directory is reported
/// once with the count of entries below it); file type; permission bits
/// including setuid/setgid/sticky (`mode & 0o7777`); uid; gid; mtime seconds
/// and nanoseconds (see [`CompareOptions`]); regular file size and SHA-256;
/// symlink targets; `rdev` of char/block devices; xattrs (sorted maps);
/// hardlink groups (the partition of non-directories by `(dev, ino)` must be
/// the same in both trees) and `nlink` of non-directories. Unreadable
/// entries are reported as differences, not panics.
pub fn compare_trees(expected: &Path, actual: &Path, opts: &CompareOptions) -> Vec<String> {
    let exp = walk_tree(expected, "expected");
    let act = walk_tree(actual, "actual");
    let mut diffs: Vec<String> = Vec::new();
    diffs.extend(exp.errors.iter().cloned());
    diffs.extend(act.errors.iter().cloned());

    let skip_mtime: BTreeSet<PathBuf> = opts.skip_mtime_paths.iter().map(|p| normalize_rel(p)).collect();
    let skip_owner_mode: BTreeSet<PathBuf> = opts.skip_owner_mode_paths.iter().map(|p| normalize_rel(p)).collect();

    // Paths only on one side: report the topmost only, with a count below it.
    report_one_sided(&exp, &act, "missing in actual", &mut diffs);
    report_one_sided(&act, &exp, "extra in actual (not in expected)", &mut diffs);

    let mut common_same_type: Vec<PathBuf> = Vec::new();
    for (rel, en) in &exp.nodes {
        let Some(an) = act.nodes.get(rel) else { continue };
        let is_root = rel.as_os_str().is_empty();
        let p = show(rel);
        let eft = en.md.file_type();
        let aft = an.md.file_type();
        if type_name(&eft) != type_name(&aft) {
            diffs.push(format!("{p}: type expected {}, actual {}", type_name(&eft), type_name(&aft)));
            continue;
        }
        if !eft.is_dir() {
            common_same_type.push(rel.clone());
        }
        if is_root && !opts.compare_root {
            continue;
        }
        if !skip_owner_mode.contains(rel) {
            let (em, am) = (en.md.mode() & 0o7777, an.md.mode() & 0o7777);
            if em != am {
                diffs.push(format!("{p}: mode expected {em:#o}, actual {am:#o}"));
            }
            if en.md.uid() != an.md.uid() {
                diffs.push(format!("{p}: uid expected {}, actual {}", en.md.uid(), an.md.uid()));
            }
            if en.md.gid() != an.md.gid() {
                diffs.push(format!("{p}: gid expected {}, actual {}", en.md.gid(), an.md.gid()));
            }
        }
        let check_mtime = opts.mtime && !(eft.is_dir() && opts.skip_dir_mtime) && !skip_mtime.contains(rel);
        if check_mtime {
            let e = (en.md.mtime(), en.md.mtime_nsec());
            let a = (an.md.mtime(), an.md.mtime_nsec());
            if e != a {
                diffs.push(format!("{p}: mtime expected {}.{:09}, actual {}.{:09}", e.0, e.1, a.0, a.1));
            }
        }
        let (ea, aa) = (exp.root.join(rel), act.root.join(rel));
        if eft.is_file() {
            if en.md.len() != an.md.len() {
                diffs.push(format!("{p}: size expected {}, actual {}", en.md.len(), an.md.len()));
            } else {
                match (sha256_file(&ea), sha256_file(&aa)) {
                    (Ok(eh), Ok(ah)) if eh != ah => diffs.push(format!("{p}: contents differ (sha256 expected {eh}, actual {ah})")),
                    (Ok(_), Ok(_)) => {}
                    (Err(e), _) => diffs.push(format!("{p}: cannot read expected file: {e}")),
                    (_, Err(e)) => diffs.push(format!("{p}: cannot read actual file: {e}")),
                }
            }
        } else if eft.is_symlink() {
            match (fs::read_link(&ea), fs::read_link(&aa)) {
                (Ok(et), Ok(at)) if et != at => diffs.push(format!("{p}: symlink target expected {:?}, actual {:?}", et, at)),
                (Ok(_), Ok(_)) => {}
                (Err(e), _) => diffs.push(format!("{p}: cannot readlink expected: {e}")),
                (_, Err(e)) => diffs.push(format!("{p}: cannot readlink actual: {e}")),
            }
        } else if eft.is_char_device() || eft.is_block_device() {
            let (er, ar) = (en.md.rdev(), an.md.rdev());
            if er != ar {
                diffs.push(format!("{p}: device expected {}:{}, actual {}:{}", major(er), minor(er), major(ar), minor(ar)));
            }
        }
        if opts.xattrs {
            match (read_xattrs(&ea, &opts.ignore_xattr_prefixes), read_xattrs(&aa, &opts.ignore_xattr_prefixes)) {
                (Ok(ex), Ok(ax)) => {
                    for (k, v) in &ex {
                        match ax.get(k) {
                            None => diffs.push(format!("{p}: xattr {k} missing in actual")),
                            Some(av) if av != v => diffs.push(format!("{p}: xattr {k} expected {}, actual {}", show_bytes(v), show_bytes(av))),
                            Some(_) => {}
                        }
                    }
                    for k in ax.keys().filter(|k| !ex.contains_key(*k)) {
                        diffs.push(format!("{p}: extra xattr {k} in actual"));
                    }
                }
                (Err(e), _) => diffs.push(format!("{p}: cannot list expected xattrs: {e}")),
                (_, Err(e)) => diffs.push(format!("{p}: cannot list actual xattrs: {e}")),
            }
        }
    }

    if opts.hardlinks {
        compare_hardlinks(&exp, &act, &common_same_type, &mut diffs);
    }

    if diffs.len() > opts.max_reported {
        let total = diffs.len();
        diffs.truncate(opts.max_reported);
        diffs.push(format!("... and {} more differences ({total} in all)", total - opts.max_reported));
    }
    diffs
}

fn report_one_sided(from: &Tree, other: &Tree, what: &str, diffs: &mut Vec<String>) {
    let only: Vec<&PathBuf> = from.nodes.keys().filter(|p| !other.nodes.contains_key(*p)).collect();
    let only_set: BTreeSet<&PathBuf> = only.iter().copied().collect();
    for p in &only {
        let parent_also = p.parent().map(|q| only_set.contains(&q.to_path_buf())).unwrap_or(false);
        if parent_also {
            continue;
        }
        let below = only.iter().filter(|q| q.starts_with(p) && *q != p).count();
        let kind = type_name(&from.nodes[*p].md.file_type());
        if below > 0 {
            diffs.push(format!("{}: {what} ({kind}, and {below} entries below it)", show(p)));
        } else {
            diffs.push(format!("{}: {what} ({kind})", show(p)));
        }
    }
}

fn hardlink_groups(tree: &Tree, paths: &BTreeSet<&PathBuf>) -> BTreeMap<PathBuf, Vec<PathBuf>> {
    let mut by_ino: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for p in paths {
        let md = &tree.nodes[*p].md;
        by_ino.entry((md.dev(), md.ino())).or_default().push((*p).clone());
    }
    let mut group_of = BTreeMap::new();
    for (_, mut g) in by_ino {
        g.sort();
        for p in &g {
            group_of.insert(p.clone(), g.clone());
        }
    }
    group_of
}

fn compare_hardlinks(exp: &Tree, act: &Tree, common: &[PathBuf], diffs: &mut Vec<String>) {
    let set: BTreeSet<&PathBuf> = common.iter().collect();
    let eg = hardlink_groups(exp, &set);
    let ag = hardlink_groups(act, &set);
    let bad: BTreeSet<&PathBuf> = common.iter().filter(|p| eg[*p] != ag[*p]).collect();
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    for p in &bad {
        if seen.contains(*p) {
            continue;
        }
        // Connected component of paths whose groups disagree.
        let mut comp: BTreeSet<PathBuf> = BTreeSet::new();
        let mut todo = vec![(*p).clone()];
        while let Some(q) = todo.pop() {
            if !comp.insert(q.clone()) {
                continue;
            }
            for r in eg[&q].iter().chain(ag[&q].iter()) {
                if !comp.contains(r) {
                    todo.push(r.clone());
                }
            }
        }
        let fmt_groups = |groups: &BTreeMap<PathBuf, Vec<PathBuf>>| {
            let gs: BTreeSet<Vec<String>> = comp.iter().map(|q| groups[q].iter().map(|x| show(x)).collect()).collect();
            gs.iter().map(|g| format!("[{}]", g.join(", "))).collect::<Vec<_>>().join(" ")
        };
        diffs.push(format!("hardlink groups differ: expected {}; actual {}", fmt_groups(&eg), fmt_groups(&ag)));
        seen.extend(comp);
    }
    for p in common {
        if bad.contains(p) {
            continue;
        }
        let (en, an) = (exp.nodes[p].md.nlink(), act.nodes[p].md.nlink());
        if en != an {
            diffs.push(format!("{}: nlink expected {en}, actual {an}", show(p)));
        }
    }
}

/// Major number of a Linux `dev_t` (glibc encoding).
pub fn major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

/// Minor number of a Linux `dev_t` (glibc encoding).
pub fn minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

// ---------------------------------------------------------------------------
// Generated OCI image
// ---------------------------------------------------------------------------

/// Layer compression of a generated image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar`
    None,
    /// `application/vnd.oci.image.layer.v1.tar+gzip` (flate2, default level)
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd` (zstd level 3). umoci
    /// 0.4.7 cannot unpack these.
    Zstd,
}

impl Compression {
    /// OCI media type of a layer with this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// Short lowercase name: `none`, `gzip`, `zstd`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// One layer of a generated image.
#[derive(Clone, Debug)]
pub struct GeneratedLayer {
    /// What the layer is for.
    pub description: &'static str,
    /// `sha256:...` of the blob as stored (compressed).
    pub digest: String,
    /// `sha256:...` of the uncompressed tar (the config's diff_id).
    pub diff_id: String,
    /// OCI media type.
    pub media_type: &'static str,
    /// Blob size in bytes.
    pub size: u64,
    /// Uncompressed tar size in bytes.
    pub uncompressed_size: u64,
}

/// A generated OCI image layout and what is in it.
#[derive(Clone, Debug)]
pub struct GeneratedImage {
    /// The OCI image layout directory (`dir/generated-<compression>`).
    pub layout: PathBuf,
    /// `dir/generated-<compression>-reference`: the same image (same
    /// compression, but uncompressed for zstd) except that layer 3 holds the
    /// sparse files as plain regular entries. It unpacks to the same tree;
    /// use it for the umoci reference unpack, since umoci 0.4.7 fails on GNU
    /// sparse entries ("unknown typeflag 'S'") and on zstd layers.
    pub reference_layout: PathBuf,
    /// Its only tag (`latest`).
    pub tag: &'static str,
    /// Layer compression.
    pub compression: Compression,
    /// `sha256:...` of the manifest.
    pub manifest_digest: String,
    /// `sha256:...` of the config.
    pub config_digest: String,
    /// Layers, bottom first.
    pub layers: Vec<GeneratedLayer>,
}

/// Tag of the generated image.
pub const GENERATED_TAG: &str = "latest";

/// Chunk size the generated image's file sizes are designed around (1 MiB).
pub const GENERATED_CHUNK: usize = 1 << 20;

/// Directories of the generated image that no tar entry creates (their
/// children's entries come without parent entries). Their mode, owner and
/// mtime are chosen by the unpacker (umoci 0.4.7: see the doc of
/// [`generate_image`]); compare with [`generated_compare_options`].
pub const GENERATED_IMPLICIT_DIRS: &[&str] = &["implicit", "implicit/b", "implicit/b/c"];

/// Paths of the generated image whose expected result is notable, for tests
/// that check single cases (all relative to the image root, final state).
pub mod gen_paths {
    /// 3 MiB + 12345 bytes: larger than a chunk, not a multiple of it.
    pub const BIG: &str = "data/big.bin";
    /// Same content as BIG, added in layer 4 (cross-layer dedup).
    pub const BIG_COPY: &str = "data/big-copy.bin";
    /// Hardlink to BIG in the same layer.
    pub const BIG_HARDLINK: &str = "data/big-hardlink";
    /// Exactly one chunk (1 MiB).
    pub const EXACT_CHUNK: &str = "data/exact-1m.bin";
    /// Two identical 1.5 MiB files (not hardlinks); their first MiB equals
    /// BIG's second MiB.
    pub const DUP1: &str = "data/dup1.bin";
    /// See DUP1.
    pub const DUP2: &str = "data/dup2.bin";
    /// Empty file (mode 0600, 1000:1000 after layer 2's metadata-only change).
    pub const EMPTY: &str = "etc/empty";
    /// Hardlink group within layer 1 (after layer 2 whites out
    /// `data/hl-link2`): these two remain, nlink 2.
    pub const HL_GROUP: [&str; 2] = ["data/hl-link1", "data/hl-orig"];
    /// Layer 2 hardlink `upper-hardlink` -> layer 1 `lower/target.txt`.
    pub const LOWER_HL_GROUP: [&str; 2] = ["lower/target.txt", "upper-hardlink"];
    /// Layer 4 hardlink `late-hardlink` -> `replace/dir-to-file` (layer 2).
    pub const LATE_HL_GROUP: [&str; 2] = ["late-hardlink", "replace/dir-to-file"];
    /// Regular file with mtime 1700000000.123456789 (PAX).
    pub const PRECISE_MTIME: &str = "etc/precise-mtime";
    /// File with xattrs user.naiad="test", user.binary=00 01 fe ff,
    /// user.second="2".
    pub const XATTR_FILE: &str = "etc/xattrs";
    /// Directory with xattr user.dir="yes".
    pub const XATTR_DIR: &str = "xattr-dir";
    /// Opaque dir: layer 1 had old-a, old-sub/old-b; layer 2 has the dir,
    /// new-before (before the `.wh..wh..opq` entry), the opaque marker,
    /// new-after, new-sub/x; layer 4 whites out new-after.
    pub const OPAQUE_DIR: &str = "opaque";
    /// 8 MiB sparse file (GNU tar old-GNU sparse), one 'x' at 4 MiB.
    pub const SPARSE_SIMPLE: &str = "sparse/simple";
    /// Sparse file with 6 data segments (extended sparse headers), ending in
    /// a hole.
    pub const SPARSE_MANY: &str = "sparse/many";
    /// Char device 1:3.
    pub const CHAR_DEV: &str = "dev/null";
    /// Block device 7:0.
    pub const BLOCK_DEV: &str = "dev/loop0";
    /// Fifo.
    pub const FIFO: &str = "dev/fifo";
}

/// Options for comparing two unpacks of the generated image: default options
/// plus skipping mtime, mode and owner of [`GENERATED_IMPLICIT_DIRS`].
pub fn generated_compare_options() -> CompareOptions {
    let implicit: Vec<PathBuf> = GENERATED_IMPLICIT_DIRS.iter().map(PathBuf::from).collect();
    CompareOptions { skip_mtime_paths: implicit.clone(), skip_owner_mode_paths: implicit, ..CompareOptions::default() }
}

/// Writes the generated image (see [`generate_image`]) to
/// `dir/generated-<none|gzip|zstd>` and returns that layout path (the
/// umoci-compatible twin is at `dir/generated-<compression>-reference`).
pub fn generated_image(dir: &Path, compression: Compression) -> PathBuf {
    generate_image(dir, compression).layout
}

/// Writes a small deterministic OCI image layout (same bytes every time for
/// a given compression) to `dir/generated-<none|gzip|zstd>` (replacing it),
/// plus its umoci-compatible twin `dir/generated-<compression>-reference` (see
/// [`GeneratedImage::reference_layout`]),
/// with tag `latest`, config Cmd `["/bin/sh"]`, Env, WorkingDir `/`, and
/// four layers that together cover:
///
/// 1. base: regular files (empty; 1 MiB exactly; 3 MiB + 12345 bytes; two
///    identical 1.5 MiB files sharing a MiB with the big one), directories,
///    relative/absolute/dangling symlinks, hardlinks within the layer, char
///    device 1:3, block device 7:0, fifo, setuid/setgid files, sticky and
///    setgid dirs, uids/gids 0, 1000, 65534, PAX mtimes with nanoseconds (file,
///    dir with a child, symlink), PAX `SCHILY.xattr.user.*` xattrs (file, dir,
///    binary value), GNU long names (dir, file) and long link targets
///    (symlink, hardlink), PAX `path` and `linkpath` records, and entries whose
///    parents are missing from the tar (`implicit/b/c/file.txt`: see
///    [`GENERATED_IMPLICIT_DIRS`]; umoci 0.4.7 creates such parents as root
///    0755 with the current time as mtime, so tests must not rely on their
///    mtime).
/// 2. changes: `.wh.` of a lower file, of a lower dir with children and of one
///    member of a lower hardlink group; whiteout + recreate of a file in the
///    same layer; an opaque dir (`.wh..wh..opq`) with entries both before and
///    after the marker; a hardlink to a lower-layer file; file -> dir and
///    dir (with children) -> file; a metadata-only change of a lower file.
/// 3. sparse: made by GNU tar (`--sparse --format=gnu`): old-GNU sparse files,
///    one with > 4 segments (extended sparse headers).
/// 4. late: entries without parent dir entries (the parents exist in lower
///    layers); a copy of the big file (cross-layer dedup); a hardlink to a file
///    from layer 2; a whiteout inside the opaque dir of a file added by layer
///    2; symlink -> file, file -> symlink, dir (with children) -> symlink.
///
/// Needs GNU `tar` on PATH (layer 3). See [`gen_paths`] for notable paths.
pub fn generate_image(dir: &Path, compression: Compression) -> GeneratedImage {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let base = layer_base();
    let changes = layer_changes();
    let late = layer_late();
    let (sparse, desparsed) = layer_sparse(dir);

    let layout = dir.join(format!("generated-{}", compression.name()));
    let (manifest_digest, config_digest, layers) = write_layout(
        &layout,
        vec![(LAYER_DESCRIPTIONS[0], base.clone()), (LAYER_DESCRIPTIONS[1], changes.clone()), (LAYER_DESCRIPTIONS[2], sparse), (LAYER_DESCRIPTIONS[3], late.clone())],
        compression,
    );
    let reference_layout = dir.join(format!("generated-{}-reference", compression.name()));
    // umoci cannot read zstd either: the reference of a zstd image is plain.
    let reference_compression = match compression {
        Compression::Zstd => Compression::None,
        c => c,
    };
    write_layout(
        &reference_layout,
        vec![
            (LAYER_DESCRIPTIONS[0], base),
            (LAYER_DESCRIPTIONS[1], changes),
            ("sparse (reference): the same files as plain regular entries", desparsed),
            (LAYER_DESCRIPTIONS[3], late),
        ],
        reference_compression,
    );

    GeneratedImage { layout, reference_layout, tag: GENERATED_TAG, compression, manifest_digest, config_digest, layers }
}

const LAYER_DESCRIPTIONS: [&str; 4] = [
    "base: files, dirs, links, devices, modes, owners, mtimes, xattrs, long names",
    "changes: whiteouts, opaque dir, lower hardlink, type changes",
    "sparse: GNU tar old-GNU sparse files",
    "late: parentless entries, dedup copy, more type changes",
];

/// Writes an OCI image layout at `layout` (replacing it) from layer tars;
/// returns (manifest digest, config digest, layers).
pub fn write_layout(layout: &Path, tars: Vec<(&'static str, Vec<u8>)>, compression: Compression) -> (String, String, Vec<GeneratedLayer>) {
    if layout.exists() {
        fs::remove_dir_all(layout).unwrap_or_else(|e| panic!("cannot remove old {}: {e}", layout.display()));
    }
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap_or_else(|e| panic!("cannot create {}: {e}", blobs.display()));

    let mut layers = Vec::new();
    for (description, tar) in tars {
        let diff_id = format!("sha256:{}", sha256_hex(&tar));
        let blob = compress(&tar, compression);
        let digest = write_blob(&blobs, &blob);
        layers.push(GeneratedLayer { description, digest, diff_id, media_type: compression.media_type(), size: blob.len() as u64, uncompressed_size: tar.len() as u64 });
    }

    let created = "2023-11-14T22:13:20Z";
    let config = serde_json::json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Cmd": ["/bin/sh"],
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "NAIAD_GENERATED=1"
            ],
            "WorkingDir": "/"
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()
        },
        "history": layers.iter().map(|l| serde_json::json!({
            "created": created,
            "created_by": l.description
        })).collect::<Vec<_>>()
    });
    let config_bytes = serde_json::to_vec(&config).expect("serialize config");
    let config_digest = write_blob(&blobs, &config_bytes);

    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_bytes.len()
        },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type,
            "digest": l.digest,
            "size": l.size
        })).collect::<Vec<_>>()
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("serialize manifest");
    let manifest_digest = write_blob(&blobs, &manifest_bytes);

    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "annotations": { "org.opencontainers.image.ref.name": GENERATED_TAG }
        }]
    });
    write_file(&layout.join("index.json"), &serde_json::to_vec(&index).expect("serialize index"));
    write_file(&layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#);
    (manifest_digest, config_digest, layers)
}

/// An image of `count` small files (dirs of 1000 files, `d0000/f000`, each
/// a few bytes) as one gzip layer at `dir/layout` (tag `latest`); returns
/// the layout and the layer's tar (for a reference tree: `tar -x`).
pub fn many_files_image(dir: &Path, count: usize) -> (PathBuf, Vec<u8>) {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for i in 0..count {
        if i % 1000 == 0 {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            b.append_data(&mut h, format!("d{:04}/", i / 1000), &[][..]).expect("tar dir");
        }
        let body = format!("file {i}\n");
        let mut h = header(tar::EntryType::Regular, 0o644, body.len() as u64);
        b.append_data(&mut h, format!("d{:04}/f{:03}", i / 1000, i % 1000), body.as_bytes()).expect("tar file");
    }
    let tar = b.into_inner().expect("tar");
    let layout = dir.join("layout");
    write_layout(&layout, vec![("many small files", tar.clone())], Compression::Gzip);
    (layout, tar)
}

/// SHA-256 of `data` as lowercase hex (no `sha256:` prefix).
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn write_file(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn write_blob(blobs: &Path, data: &[u8]) -> String {
    let hex = sha256_hex(data);
    write_file(&blobs.join(&hex), data);
    format!("sha256:{hex}")
}

fn compress(tar: &[u8], c: Compression) -> Vec<u8> {
    match c {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            // GzEncoder writes mtime 0 and no file name: deterministic.
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(tar).expect("gzip");
            enc.finish().expect("gzip finish")
        }
        Compression::Zstd => zstd::encode_all(tar, 3).expect("zstd"),
    }
}

/// splitmix64: a tiny deterministic pseudo-random generator.
pub struct Prng(pub u64);

impl Prng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `n` random bytes (incompressible).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }

    /// `n` bytes of random lowercase "words" (compressible).
    fn text(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            let r = self.next_u64();
            for i in 0..8 {
                let b = ((r >> (i * 8)) & 0xff) as u8;
                v.push(if b.is_multiple_of(7) { b' ' } else { b'a' + b % 26 });
            }
        }
        v.truncate(n);
        v
    }
}

/// The contents shared by the data files of layers 1 and 4.
struct DataSet {
    big: Vec<u8>,
    dup: Vec<u8>,
    exact: Vec<u8>,
}

fn data_set() -> DataSet {
    let mut rng = Prng(0x6e61_6961_6421);
    let shared = rng.bytes(GENERATED_CHUNK); // appears in big and dup
    let mut big = rng.bytes(GENERATED_CHUNK);
    big.extend_from_slice(&shared);
    big.extend_from_slice(&rng.text(GENERATED_CHUNK + 12345));
    let mut dup = shared.clone();
    dup.extend_from_slice(&rng.text(GENERATED_CHUNK / 2));
    let exact = rng.bytes(GENERATED_CHUNK);
    DataSet { big, dup, exact }
}

const BASE_MTIME: u64 = 1_700_000_000;

#[derive(Clone)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    /// PAX `mtime` record, e.g. "1700000000.123456789".
    pax_mtime: Option<&'static str>,
    /// xattrs as PAX `SCHILY.xattr.NAME` records.
    xattrs: Vec<(&'static str, Vec<u8>)>,
}

fn m(mode: u32) -> Meta {
    Meta { mode, uid: 0, gid: 0, mtime: BASE_MTIME, pax_mtime: None, xattrs: Vec::new() }
}

impl Meta {
    fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    fn mtime(mut self, t: u64) -> Self {
        self.mtime = t;
        self
    }
    fn pax_mtime(mut self, t: &'static str) -> Self {
        self.pax_mtime = Some(t);
        self.mtime = t.split('.').next().and_then(|s| s.parse().ok()).expect("pax mtime");
        self
    }
    fn xattr(mut self, name: &'static str, value: &[u8]) -> Self {
        self.xattrs.push((name, value.to_vec()));
        self
    }
}

/// Builds one layer tar in memory with GNU-format headers.
struct LayerTar {
    b: tar::Builder<Vec<u8>>,
}

impl LayerTar {
    fn new() -> Self {
        LayerTar { b: tar::Builder::new(Vec::new()) }
    }

    fn finish(self) -> Vec<u8> {
        self.b.into_inner().expect("finish tar")
    }

    fn header(&mut self, kind: tar::EntryType, meta: &Meta, size: u64, extra_pax: &[(&str, &[u8])]) -> tar::Header {
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(t) = meta.pax_mtime {
            pax.push(("mtime".into(), t.as_bytes().to_vec()));
        }
        for (k, v) in &meta.xattrs {
            pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
        }
        for (k, v) in extra_pax {
            pax.push((k.to_string(), v.to_vec()));
        }
        if !pax.is_empty() {
            self.b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).expect("append pax");
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(meta.mode);
        h.set_uid(meta.uid);
        h.set_gid(meta.gid);
        h.set_mtime(meta.mtime);
        h.set_size(size);
        h
    }

    fn dir(&mut self, path: &str, meta: Meta) {
        let mut h = self.header(tar::EntryType::Directory, &meta, 0, &[]);
        let p = format!("{}/", path.trim_end_matches('/'));
        self.b.append_data(&mut h, p, io::empty()).expect("append dir");
    }

    fn file(&mut self, path: &str, meta: Meta, data: &[u8]) {
        let mut h = self.header(tar::EntryType::Regular, &meta, data.len() as u64, &[]);
        self.b.append_data(&mut h, path, data).expect("append file");
    }

    fn symlink(&mut self, path: &str, target: &str, meta: Meta) {
        let mut h = self.header(tar::EntryType::Symlink, &meta, 0, &[]);
        self.b.append_link(&mut h, path, target).expect("append symlink");
    }

    fn hardlink(&mut self, path: &str, target: &str, meta: Meta) {
        let mut h = self.header(tar::EntryType::Link, &meta, 0, &[]);
        self.b.append_link(&mut h, path, target).expect("append hardlink");
    }

    fn device(&mut self, path: &str, kind: tar::EntryType, major: u32, minor: u32, meta: Meta) {
        let mut h = self.header(kind, &meta, 0, &[]);
        h.set_device_major(major).expect("dev major");
        h.set_device_minor(minor).expect("dev minor");
        self.b.append_data(&mut h, path, io::empty()).expect("append device");
    }

    fn fifo(&mut self, path: &str, meta: Meta) {
        let mut h = self.header(tar::EntryType::Fifo, &meta, 0, &[]);
        self.b.append_data(&mut h, path, io::empty()).expect("append fifo");
    }

    /// An OCI whiteout entry (`.wh.NAME` or `.wh..wh..opq`): empty regular file.
    fn whiteout(&mut self, path: &str) {
        self.file(path, m(0o644), b"");
    }

    /// Entry whose full path is only in a PAX `path` record; the header's name
    /// field holds the first 99 bytes.
    fn pax_path_file(&mut self, path: &str, meta: Meta, data: &[u8]) {
        let mut h = self.header(tar::EntryType::Regular, &meta, data.len() as u64, &[("path", path.as_bytes())]);
        set_raw_name(&mut h, &path.as_bytes()[..99]);
        h.set_cksum();
        self.b.append(&h, data).expect("append pax-path file");
    }

    /// Symlink whose target is only in a PAX `linkpath` record.
    fn pax_linkpath_symlink(&mut self, path: &str, target: &str, meta: Meta) {
        let mut h = self.header(tar::EntryType::Symlink, &meta, 0, &[("linkpath", target.as_bytes())]);
        set_raw_name(&mut h, path.as_bytes());
        let t = target.as_bytes();
        let field = &mut h.as_old_mut().linkname;
        let n = t.len().min(field.len() - 1);
        field[..n].copy_from_slice(&t[..n]);
        h.set_cksum();
        self.b.append(&h, io::empty()).expect("append pax-linkpath symlink");
    }
}

fn set_raw_name(h: &mut tar::Header, name: &[u8]) {
    let field = &mut h.as_old_mut().name;
    assert!(name.len() < field.len(), "raw name too long");
    field.fill(0);
    field[..name.len()].copy_from_slice(name);
}

fn long_dir() -> String {
    format!("long/{}", "d".repeat(120))
}

fn long_file() -> String {
    format!("{}/{}", long_dir(), "f".repeat(60))
}

fn layer_base() -> Vec<u8> {
    use tar::EntryType as T;
    let d = data_set();
    let mut l = LayerTar::new();

    l.dir("bin", m(0o755));
    l.file("bin/sh", m(0o755), b"#!/bin/sh\necho naiad generated image\n");
    l.symlink("bin/sh-rel", "sh", m(0o777));
    l.file("bin/suid", m(0o4755), b"setuid\n");
    l.file("bin/sgid", m(0o2755).owner(0, 50), b"setgid\n");
    l.file("bin/suid-sgid", m(0o6711), b"both\n");

    l.dir("etc", m(0o755));
    l.file("etc/passwd", m(0o644), b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/false\n");
    l.file("etc/group", m(0o644), b"root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n");
    l.file("etc/empty", m(0o644), b"");
    l.file("etc/precise-mtime", m(0o644).pax_mtime("1700000000.123456789"), b"nanoseconds\n");
    l.symlink("etc/abs-link", "/etc/passwd", m(0o777));
    l.symlink("etc/dangling", "/does/not/exist", m(0o777));
    l.symlink("etc/precise-symlink", "passwd", m(0o777).pax_mtime("1700000300.5"));
    l.file("etc/xattrs", m(0o644).xattr("user.naiad", b"test").xattr("user.binary", &[0x00, 0x01, 0xfe, 0xff]).xattr("user.second", b"2"), b"file with xattrs\n");
    l.dir("xattr-dir", m(0o755).xattr("user.dir", b"yes"));
    l.file("xattr-dir/plain", m(0o644), b"no xattrs here\n");

    l.dir("tmp", m(0o1777));
    l.dir("shared", m(0o2775).owner(0, 100));
    l.file("shared/file", m(0o664).owner(1000, 100), b"group shared\n");
    l.dir("home", m(0o755));
    l.dir("home/user", m(0o700).owner(1000, 1000));
    l.file("home/user/notes.txt", m(0o600).owner(1000, 1000), b"user notes\n");
    l.dir("home/nobody", m(0o755).owner(65534, 65534));
    l.file("home/nobody/file", m(0o640).owner(65534, 65534), b"nobody's\n");

    l.dir("dev", m(0o755));
    l.device("dev/null", T::Char, 1, 3, m(0o666));
    l.device("dev/loop0", T::Block, 7, 0, m(0o660).owner(0, 6));
    l.fifo("dev/fifo", m(0o640).owner(1000, 1000));

    l.dir("data", m(0o755));
    l.file("data/big.bin", m(0o644), &d.big);
    l.hardlink("data/big-hardlink", "data/big.bin", m(0o644));
    l.file("data/dup1.bin", m(0o644), &d.dup);
    l.file("data/dup2.bin", m(0o644), &d.dup);
    l.file("data/exact-1m.bin", m(0o644), &d.exact);
    l.file("data/small.txt", m(0o644), b"small, version 1\n");
    l.file("data/hl-orig", m(0o640).owner(1000, 1000), b"hardlink group\n");
    l.hardlink("data/hl-link1", "data/hl-orig", m(0o640).owner(1000, 1000));
    l.hardlink("data/hl-link2", "data/hl-orig", m(0o640).owner(1000, 1000));

    l.dir("lower", m(0o755));
    l.file("lower/target.txt", m(0o644).owner(1000, 1000), b"hardlinked from an upper layer\n");
    l.file("lower/target2.bin", m(0o644), b"becomes a symlink in layer 4\n");

    l.dir("gone-dir", m(0o755));
    l.file("gone-dir/a", m(0o644), b"a\n");
    l.dir("gone-dir/sub", m(0o755));
    l.file("gone-dir/sub/b", m(0o644), b"b\n");
    l.file("gone-file", m(0o644), b"whited out in layer 2\n");

    l.dir("opaque", m(0o755));
    l.file("opaque/old-a", m(0o644), b"old a\n");
    l.dir("opaque/old-sub", m(0o755));
    l.file("opaque/old-sub/old-b", m(0o644), b"old b\n");

    l.dir("replace", m(0o755));
    l.file("replace/file-to-dir", m(0o644), b"becomes a directory\n");
    l.dir("replace/dir-to-file", m(0o755));
    l.file("replace/dir-to-file/child", m(0o644), b"child\n");
    l.dir("replace/dir-to-file/sub", m(0o755));
    l.file("replace/dir-to-file/sub/grandchild", m(0o644), b"grandchild\n");
    l.dir("replace/dir-to-symlink", m(0o755));
    l.file("replace/dir-to-symlink/child", m(0o644), b"child\n");

    l.dir("precise-dir", m(0o750).pax_mtime("1700000100.987654321"));
    l.file("precise-dir/child", m(0o644).pax_mtime("1700000200.000000001"), b"child\n");

    l.dir("long", m(0o755));
    l.dir(&long_dir(), m(0o755)); // GNU long name (dir)
    l.file(&long_file(), m(0o644), b"long name file\n"); // GNU long name (file)
    let rel_target = format!("{}/{}", "d".repeat(120), "f".repeat(60));
    l.symlink("long/symlink-long-target", &rel_target, m(0o777)); // GNU long link
    l.hardlink("long/hardlink-long-target", &long_file(), m(0o644)); // GNU long link
    let pax_path = format!("long/{}", "p".repeat(150));
    l.pax_path_file(&pax_path, m(0o644), b"pax path file\n");
    let abs_long_target = format!("/{}", long_file());
    l.pax_linkpath_symlink("long/pax-linkpath", &abs_long_target, m(0o777));

    // Parents implicit/, implicit/b/, implicit/b/c/ have no entries.
    l.file("implicit/b/c/file.txt", m(0o644), b"parents are implicit\n");

    l.finish()
}

fn layer_changes() -> Vec<u8> {
    let mut l = LayerTar::new();
    let t = BASE_MTIME + 1000;

    // Whiteouts of a lower file, a lower dir with children, a lower file.
    l.dir("etc", m(0o755).mtime(t));
    l.whiteout("etc/.wh.group");
    l.whiteout(".wh.gone-dir");
    l.whiteout(".wh.gone-file");
    // Whiteout + recreate in the same layer (whiteout first).
    l.whiteout("etc/.wh.passwd");
    l.file("etc/passwd", m(0o644).mtime(t), b"root:x:0:0:root:/root:/bin/sh\n");
    // Metadata-only change of a lower file.
    l.file("etc/empty", m(0o600).owner(1000, 1000).mtime(t), b"");

    // Opaque directory: entries before and after the marker survive.
    l.dir("opaque", m(0o755).mtime(t));
    l.file("opaque/new-before", m(0o644).mtime(t), b"added before the opaque marker\n");
    l.whiteout("opaque/.wh..wh..opq");
    l.file("opaque/new-after", m(0o644).mtime(t), b"added after the opaque marker\n");
    l.dir("opaque/new-sub", m(0o755).mtime(t));
    l.file("opaque/new-sub/x", m(0o644).mtime(t), b"x\n");

    // Hardlink to a file of a lower layer; whiteout of a lower hardlink member.
    l.hardlink("upper-hardlink", "lower/target.txt", m(0o644).owner(1000, 1000));
    l.dir("data", m(0o755));
    l.whiteout("data/.wh.hl-link2");
    l.file("data/small.txt", m(0o644).mtime(t), b"small, version 2 (layer 2)\n");

    // file -> dir, dir with children -> file.
    l.dir("replace", m(0o755).mtime(t));
    l.dir("replace/file-to-dir", m(0o755).mtime(t));
    l.file("replace/file-to-dir/child", m(0o644).mtime(t), b"child of a former file\n");
    l.file("replace/dir-to-file", m(0o644).mtime(t), b"was a directory\n");

    l.finish()
}

/// Layer 3: two sparse files archived by GNU tar (old-GNU sparse format), and
/// the same files archived by GNU tar without `--sparse` (for the reference
/// layout: umoci 0.4.7 rejects typeflag 'S').
fn layer_sparse(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let work = dir.join(".naiad-sparse-work");
    if work.exists() {
        fs::remove_dir_all(&work).unwrap_or_else(|e| panic!("cannot remove {}: {e}", work.display()));
    }
    let sdir = work.join("sparse");
    fs::create_dir_all(&sdir).unwrap_or_else(|e| panic!("cannot create {}: {e}", sdir.display()));

    // Equivalent of: truncate -s 8M simple; printf x | dd of=simple bs=1 seek=4M conv=notrunc
    write_sparse(&sdir.join("simple"), 8 << 20, &[(4 << 20, b"x".to_vec())]);
    // Six data segments (> 4, so GNU tar needs an extended sparse header),
    // ending in a hole.
    let mut rng = Prng(0x5350_4152_5345);
    let segments: Vec<(u64, Vec<u8>)> = vec![
        (0, rng.bytes(4096)),
        (1 << 20, rng.bytes(10_000)),
        ((2 << 20) + 512, rng.bytes(512)),
        (3 << 20, rng.bytes(GENERATED_CHUNK + 1000)),
        (5 << 20, rng.text(700)),
        (6 << 20, rng.bytes(2048)),
    ];
    write_sparse(&sdir.join("many"), (7 << 20) + 123, &segments);
    for (p, mode) in [(&sdir, 0o755), (&sdir.join("simple"), 0o644), (&sdir.join("many"), 0o640)] {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
    }

    let sparse = gnu_tar(&work, true);
    let plain = gnu_tar(&work, false);
    let _ = fs::remove_dir_all(&work);
    (sparse, plain)
}

/// `tar -C work -cf - sparse` with deterministic options.
fn gnu_tar(work: &Path, sparse: bool) -> Vec<u8> {
    let mut cmd = Command::new("tar");
    if sparse {
        cmd.args(["--sparse", "--hole-detection=raw"]);
    }
    cmd.args(["--format=gnu", "--numeric-owner", "--owner=0", "--group=0", "--mtime=@1700000000", "--sort=name", "-C"]).arg(work).args(["-cf", "-", "sparse"]);
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run GNU tar (scripts/install-test-deps.sh): {e}"));
    if !out.status.success() {
        panic!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    out.stdout
}

fn write_sparse(path: &Path, len: u64, segments: &[(u64, Vec<u8>)]) {
    use std::io::{Seek, SeekFrom};
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(len).expect("truncate sparse file");
    for (off, data) in segments {
        f.seek(SeekFrom::Start(*off)).expect("seek");
        f.write_all(data).expect("write sparse segment");
    }
}

fn layer_late() -> Vec<u8> {
    let d = data_set();
    let mut l = LayerTar::new();
    let t = BASE_MTIME + 2000;
    // No parent directory entries in this layer: data/, opaque/, replace/,
    // bin/, lower/ all come from lower layers.
    l.file("data/big-copy.bin", m(0o644).mtime(t), &d.big);
    l.hardlink("late-hardlink", "replace/dir-to-file", m(0o644));
    l.whiteout("opaque/.wh.new-after");
    l.file("bin/sh-rel", m(0o755).mtime(t), b"#!/bin/sh\necho was a symlink\n");
    l.symlink("lower/target2.bin", "target.txt", m(0o777).mtime(t));
    l.symlink("replace/dir-to-symlink", "../bin", m(0o777).mtime(t));
    l.finish()
}

/// Reads `files` whole with `readers` threads (file `i` by thread
/// `i % readers`, in a 1 MiB buffer); returns the bytes read. The
/// benchmarks' "read every file".
pub fn read_files(files: &[PathBuf], readers: usize) -> u64 {
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..readers)
            .map(|r| {
                s.spawn(move || {
                    let mut total = 0u64;
                    let mut buf = vec![0u8; 1 << 20];
                    for f in files.iter().skip(r).step_by(readers) {
                        let mut f = fs::File::open(f).unwrap_or_else(|e| panic!("open {}: {e}", f.display()));
                        loop {
                            let n = f.read(&mut buf).expect("read");
                            if n == 0 {
                                break;
                            }
                            total += n as u64;
                        }
                    }
                    total
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("reader")).sum()
    })
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The regular files under `root` (symlinks not followed), as (path
/// relative to `root`, size), in no particular order.
pub fn regular_files(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())).flatten() {
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let len = e.metadata().expect("metadata").len();
                out.push((e.path().strip_prefix(root).expect("under root").to_path_buf(), len));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Two versions of a tree (chunk dictionaries)
// ---------------------------------------------------------------------------

/// Files of a tree: (path, contents).
pub type Files = Vec<(String, Vec<u8>)>;

/// Version 1 and 2 of a tree: 300 small files and one of 1 MiB; version 2
/// changes 2 small files, adds one, and edits the large one in its middle.
pub fn two_versions() -> (Files, Files) {
    let mut x = 0x2545F4914F6CDD1Du64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut v1: Files = (0..300).map(|i| (format!("app/m{i:03}.py"), format!("# module {i}\n").repeat(40 + i % 60).into_bytes())).collect();
    v1.push(("app/big.bin".into(), noise(1 << 20)));
    let mut v2 = v1.clone();
    v2[10].1.extend_from_slice(b"# changed\n");
    v2[200].1 = b"rewritten\n".to_vec();
    v2.push(("app/new.py".into(), b"print('new')\n".to_vec()));
    let big = &mut v2[300].1;
    big[500_000..500_100].copy_from_slice(&[0u8; 100]);
    (v1, v2)
}

/// An OCI layout at `dir` (tag `latest`) with one gzip layer holding
/// `files` (mode 0644, owner 0, mtime 0; directories implicit).
pub fn files_layout(dir: &Path, files: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, path, data.as_slice()).expect("tar entry");
    }
    write_layout(dir, vec![("files", b.into_inner().expect("tar"))], Compression::Gzip);
}
