//! The prefetch list given to `naiad convert --prefetch-list FILE`: which
//! bytes of which files a workload reads at startup, and in what order.
//!
//! The file holds one item per line:
//! - a trace record, as `naiad mount --record-trace` writes them:
//!   `{"path": "/usr/bin/python3.11", "offset": 0, "length": 131072}`
//!   (only that range of the file is wanted);
//! - or a path or glob (`/etc/*.conf`, `/usr/lib/**/*.so`): whole files.
//!
//! Blank lines and lines starting with `#` are ignored. Order matters: it is
//! the order the daemon fetches in.

use std::path::Path;

use globset::{GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};

use crate::error::{ConvertError, Result};

/// The page size wanted ranges are widened to: what the kernel reads at least.
const PAGE: u64 = 4096;

/// One access recorded by `--record-trace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// Absolute path inside the image.
    pub path: String,
    pub offset: u64,
    pub length: u64,
}

/// A parsed prefetch list.
#[derive(Debug, Default)]
pub struct PrefetchList {
    /// Items in list order.
    items: Vec<Item>,
}

#[derive(Debug)]
enum Item {
    Range(TraceRecord),
    Glob(GlobMatcher),
}

/// The part of one file a prefetch list wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    Whole,
    Range { offset: u64, length: u64 },
}

fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    format!("/{}", parts.join("/"))
}

impl PrefetchList {
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut items = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: String| ConvertError::Invalid(format!("{origin}:{}: {why}", n + 1));
            if line.starts_with('{') {
                let mut r: TraceRecord = serde_json::from_str(line).map_err(|e| bad(format!("not a trace record: {e}")))?;
                r.path = normalize(&r.path);
                items.push(Item::Range(r));
            } else {
                let glob = GlobBuilder::new(&normalize(line)).literal_separator(true).build().map_err(|e| bad(format!("bad path or glob: {e}")))?;
                items.push(Item::Glob(glob.compile_matcher()));
            }
        }
        Ok(PrefetchList { items })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConvertError::Io { path: path.to_path_buf(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether any part of the file at `path` (absolute, normalized) is wanted.
    pub fn wants_file(&self, path: &str) -> bool {
        self.items.iter().any(|i| match i {
            Item::Range(r) => r.path == path,
            Item::Glob(g) => g.is_match(path),
        })
    }

    /// Which bytes of `[start, end)` of `path` are wanted: sorted, disjoint
    /// ranges, each widened to whole 4 KiB pages of the file (clamped to
    /// `[start, end)`); all of it when a glob matches the path.
    pub fn wanted_within(&self, path: &str, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut ranges = Vec::new();
        for i in &self.items {
            match i {
                Item::Glob(g) if g.is_match(path) => return vec![(start, end)],
                Item::Range(r) if r.path == path => {
                    let (s, e) = (r.offset.max(start), r.offset.saturating_add(r.length).min(end));
                    if s < e {
                        ranges.push(((s / PAGE * PAGE).max(start), e.div_ceil(PAGE).saturating_mul(PAGE).min(end)));
                    }
                }
                _ => {}
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    }

    /// What is wanted, in list order; globs are expanded by `matching`
    /// (which lists the image's files matching a glob, in tree order).
    pub fn in_order(&self, mut matching: impl FnMut(&GlobMatcher) -> Vec<String>) -> Vec<(String, Wanted)> {
        let mut out = Vec::new();
        for i in &self.items {
            match i {
                Item::Range(r) => out.push((r.path.clone(), Wanted::Range { offset: r.offset, length: r.length })),
                Item::Glob(g) => out.extend(matching(g).into_iter().map(|p| (p, Wanted::Whole))),
            }
        }
        out
    }
}

/// The prefetch table: indexes of the chunks the list wants, in list order,
/// each once. Paths the image does not have are skipped.
pub fn prefetch_table(list: &PrefetchList, tree: &mut crate::tree::Tree, sink: &crate::chunk_sink::ChunkSink) -> Vec<u32> {
    use crate::tree::{split_path, NodeKind};
    let files = tree.files();
    let order = list.in_order(|g| files.iter().filter(|(p, _)| g.is_match(p)).map(|(p, _)| p.clone()).collect());
    let mut seen = std::collections::HashSet::new();
    let mut table = Vec::new();
    for (path, wanted) in order {
        let Ok(parts) = split_path(path.trim_start_matches('/').as_bytes()) else { continue };
        let Ok(Some(node)) = tree.lookup(&parts) else { continue };
        let NodeKind::File { pieces, .. } = &tree.nodes[node].kind else { continue };
        let mut offset = 0u64;
        for p in pieces {
            let Some(index) = sink.chunk_index(p.seq) else { continue };
            let len = p.len as u64;
            let hit = match wanted {
                Wanted::Whole => true,
                Wanted::Range { offset: o, length } => offset < o + length && o < offset + len,
            };
            if hit && seen.insert(index) {
                table.push(index);
            }
            offset += len;
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_traces_paths_and_globs() {
        let l = PrefetchList::parse("# startup\n{\"path\": \"usr/bin/python3\", \"offset\": 4096, \"length\": 100}\n/etc/*.conf\n\n/usr/lib/**/*.so\n", "list").unwrap();
        assert!(l.wants_file("/usr/bin/python3"));
        assert_eq!(l.wanted_within("/usr/bin/python3", 4000, 4200), vec![(4096, 4200)]);
        assert!(l.wanted_within("/usr/bin/python3", 0, 4096).is_empty());
        assert!(l.wants_file("/etc/ld.so.conf"));
        assert!(!l.wants_file("/etc/x/y.conf"));
        assert!(l.wants_file("/usr/lib/x86_64-linux-gnu/libc.so"));
        assert!(!l.wants_file("/usr/bin/env"));
        let order = l.in_order(|_| vec!["/m".into()]);
        assert_eq!(order[0], ("/usr/bin/python3".into(), Wanted::Range { offset: 4096, length: 100 }));
        assert_eq!(order.len(), 3);
        assert!(PrefetchList::parse("{bad json", "x").unwrap_err().to_string().contains("x:1"));
    }

    #[test]
    fn wanted_bytes_within_a_chunk_are_merged_pages() {
        let l = PrefetchList::parse(
            "{\"path\": \"/lib/a.so\", \"offset\": 8192, \"length\": 4096}\n{\"path\": \"/lib/a.so\", \"offset\": 100, \"length\": 10}\n{\"path\": \"/lib/a.so\", \"offset\": 12288, \"length\": 100}\n{\"path\": \"/lib/b.so\", \"offset\": 0, \"length\": 1}\n/lib/*.py\n",
            "list",
        )
        .unwrap();
        // Pages 0 and 2..4 of the chunk [0, 65536); the 100 bytes at 12288 widen to their page.
        assert_eq!(l.wanted_within("/lib/a.so", 0, 65536), vec![(0, 4096), (8192, 16384)]);
        // Clamped to the chunk asked about; nothing of a chunk no range touches.
        assert_eq!(l.wanted_within("/lib/a.so", 10000, 13000), vec![(10000, 13000)]);
        assert_eq!(l.wanted_within("/lib/a.so", 16384, 65536), vec![]);
        assert_eq!(l.wanted_within("/lib/c.so", 0, 65536), vec![]);
        // A glob wants the whole chunk.
        assert_eq!(l.wanted_within("/lib/x.py", 4096, 70000), vec![(4096, 70000)]);
    }
}
