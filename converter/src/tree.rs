//! The merged filesystem tree, metadata only, built by applying layer
//! entries in order with the semantics a container runtime gives them:
//!
//! - an entry replaces whatever was at its path, except that a directory
//!   over a directory only updates metadata and keeps the children;
//! - `.wh.NAME` removes NAME as lower layers left it; `.wh..wh..opq` empties
//!   its directory of everything lower layers put there;
//! - a hardlink names the same node as its target, which may come from a
//!   lower layer;
//! - missing parent directories are created (mode 0755, root-owned, mtime 0);
//! - symlinks met as intermediate path components are followed inside the
//!   tree, never outside its root.
//!
//! Whiteout and opaque decisions use the layer that last wrote each
//! directory entry, so an entry a layer writes is not hidden by that same
//! layer's whiteout of it or opaque marker above it, whatever their order in
//! the tar. (A layer that whites out a lower directory and also adds
//! children under it without re-creating the directory is contradictory;
//! the result then follows tar order.)

use std::collections::BTreeMap;

use naiad_format::bootstrap::MAX_DEPTH;

/// Index of a node in the tree's arena. The root is node 0.
pub type NodeId = usize;
pub const ROOT: NodeId = 0;

/// Ownership, permissions, time and xattrs of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A directory entry: the node it names and the layer that last wrote it.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub node: NodeId,
    pub layer: usize,
}

#[derive(Debug, Clone)]
pub enum NodeKind {
    Dir {
        children: BTreeMap<Vec<u8>, Entry>,
    },
    /// `pieces` say where the file's bytes are, in file order (chunk
    /// sequence numbers of the [`crate::chunk_sink::ChunkSink`]).
    File {
        size: u64,
        pieces: Vec<crate::chunk_sink::Piece>,
    },
    Symlink {
        target: Vec<u8>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub meta: Meta,
    pub kind: NodeKind,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }
}

/// How deep symlinks in parent paths are followed before giving up.
const MAX_SYMLINK_DEPTH: usize = 40;

/// The merged tree. Nodes that are unlinked stay in the arena unreferenced.
#[derive(Debug, Clone)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

/// Splits a tar path into its components, refusing absolute paths and `..`.
pub fn split_path(raw: &[u8]) -> Result<Vec<&[u8]>, String> {
    if raw.starts_with(b"/") {
        return Err("absolute path in a layer".into());
    }
    let mut parts = Vec::new();
    for p in raw.split(|&c| c == b'/') {
        match p {
            b"" | b"." => {}
            b".." => return Err("path escapes the root with '..'".into()),
            _ => {
                if p.len() > 255 {
                    return Err("a path component is longer than 255 bytes".into());
                }
                if p.contains(&0) {
                    return Err("a path component contains a NUL byte".into());
                }
                parts.push(p)
            }
        }
    }
    Ok(parts)
}

fn implicit_dir() -> Node {
    Node { meta: Meta { mode: 0o755, ..Meta::default() }, kind: NodeKind::Dir { children: BTreeMap::new() } }
}

impl Tree {
    pub fn new() -> Self {
        Tree { nodes: vec![implicit_dir()] }
    }

    fn children(&self, dir: NodeId) -> Option<&BTreeMap<Vec<u8>, Entry>> {
        match &self.nodes[dir].kind {
            NodeKind::Dir { children } => Some(children),
            _ => None,
        }
    }

    fn children_mut(&mut self, dir: NodeId) -> Option<&mut BTreeMap<Vec<u8>, Entry>> {
        match &mut self.nodes[dir].kind {
            NodeKind::Dir { children } => Some(children),
            _ => None,
        }
    }

    fn add_node(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Walks `parts` from `stack` (the directories from the root down to
    /// where the walk starts), following symlinks inside the tree. Missing
    /// directories are created when `create` is set (in layer `layer`);
    /// otherwise `None` is returned for a missing one.
    ///
    /// `links` counts the symlinks followed for the whole path, nested ones
    /// included; past [`MAX_SYMLINK_DEPTH`] the walk fails, as Linux's
    /// lookup does (ELOOP). That bounds the work of any path, however its
    /// links chain.
    fn walk(&mut self, mut stack: Vec<NodeId>, parts: &[&[u8]], create: Option<usize>, links: &mut usize) -> Result<Option<Vec<NodeId>>, String> {
        for part in parts {
            let dir = *stack.last().unwrap_or(&ROOT);
            let found = self.children(dir).and_then(|c| c.get(*part)).copied();
            let node = match found {
                Some(e) => e.node,
                None => match create {
                    Some(layer) => {
                        let id = self.add_node(implicit_dir());
                        if let Some(c) = self.children_mut(dir) {
                            c.insert(part.to_vec(), Entry { node: id, layer });
                        }
                        id
                    }
                    None => return Ok(None),
                },
            };
            match &self.nodes[node].kind {
                NodeKind::Dir { .. } => {
                    stack.push(node);
                    // The stack is the directory chain from the root: the
                    // format nests at most MAX_DEPTH levels, and deeper
                    // trees would only cost quadratic time to refuse later.
                    if stack.len() > MAX_DEPTH {
                        return Err(format!("directories nested deeper than {MAX_DEPTH} levels"));
                    }
                }
                NodeKind::Symlink { target } => {
                    *links += 1;
                    if *links > MAX_SYMLINK_DEPTH {
                        return Err("too many levels of symbolic links in a parent path".into());
                    }
                    let target = target.clone();
                    let start = if target.starts_with(b"/") { vec![ROOT] } else { stack.clone() };
                    let mut s = start;
                    // Resolve the target's components one by one; `..` goes up but never past the root.
                    let mut rest: Vec<&[u8]> = Vec::new();
                    for p in target.split(|&c| c == b'/') {
                        rest.push(p);
                    }
                    for p in rest {
                        match p {
                            b"" | b"." => {}
                            b".." => {
                                if s.len() > 1 {
                                    s.pop();
                                }
                            }
                            name => match self.walk(s.clone(), &[name], create, links)? {
                                Some(next) => s = next,
                                None => return Ok(None),
                            },
                        }
                    }
                    stack = s;
                }
                _ => return Err(format!("parent component {:?} is not a directory", String::from_utf8_lossy(part))),
            }
        }
        Ok(Some(stack))
    }

    /// The directory that holds `parts`' last component, creating missing
    /// parents in `layer`.
    fn parent_of(&mut self, parts: &[&[u8]], layer: usize) -> Result<NodeId, String> {
        let stack = self.walk(vec![ROOT], &parts[..parts.len() - 1], Some(layer), &mut 0)?;
        Ok(stack.and_then(|s| s.last().copied()).unwrap_or(ROOT))
    }

    /// Looks a path up without creating anything; the last component is
    /// not followed if it is a symlink.
    pub fn lookup(&mut self, parts: &[&[u8]]) -> Result<Option<NodeId>, String> {
        if parts.is_empty() {
            return Ok(Some(ROOT));
        }
        let Some(stack) = self.walk(vec![ROOT], &parts[..parts.len() - 1], None, &mut 0)? else { return Ok(None) };
        let dir = *stack.last().unwrap_or(&ROOT);
        Ok(self.children(dir).and_then(|c| c.get(parts[parts.len() - 1])).map(|e| e.node))
    }

    /// Applies a non-hardlink entry at `parts` written by `layer`.
    pub fn put(&mut self, parts: &[&[u8]], node: Node, layer: usize) -> Result<(), String> {
        if parts.is_empty() {
            // The root itself: only metadata, and only a directory may be it.
            if !node.is_dir() {
                return Err("the root can only be a directory".into());
            }
            self.nodes[ROOT].meta = node.meta;
            return Ok(());
        }
        let parent = self.parent_of(parts, layer)?;
        let name = parts[parts.len() - 1];
        let existing = self.children(parent).and_then(|c| c.get(name)).copied();
        if let Some(e) = existing {
            if node.is_dir() && self.nodes[e.node].is_dir() {
                self.nodes[e.node].meta = node.meta;
                if let Some(c) = self.children_mut(parent) {
                    c.insert(name.to_vec(), Entry { node: e.node, layer });
                }
                return Ok(());
            }
        }
        let id = self.add_node(node);
        if let Some(c) = self.children_mut(parent) {
            c.insert(name.to_vec(), Entry { node: id, layer });
        }
        Ok(())
    }

    /// Makes `parts` another name of the node at `target` (not a directory).
    pub fn hardlink(&mut self, parts: &[&[u8]], target: &[&[u8]], layer: usize) -> Result<(), String> {
        let node = self.lookup(target)?.ok_or("hardlink target does not exist")?;
        if self.nodes[node].is_dir() {
            return Err("hardlink target is a directory".into());
        }
        if parts.is_empty() {
            return Err("hardlink at the root".into());
        }
        let parent = self.parent_of(parts, layer)?;
        if let Some(c) = self.children_mut(parent) {
            c.insert(parts[parts.len() - 1].to_vec(), Entry { node, layer });
        }
        Ok(())
    }

    /// `.wh.NAME` in directory `dir_parts`: removes NAME if a lower layer wrote it.
    pub fn whiteout(&mut self, dir_parts: &[&[u8]], name: &[u8], layer: usize) -> Result<(), String> {
        let Some(dir) = self.lookup_dir(dir_parts)? else { return Ok(()) };
        if let Some(c) = self.children_mut(dir) {
            if c.get(name).is_some_and(|e| e.layer < layer) {
                c.remove(name);
            }
        }
        Ok(())
    }

    /// `.wh..wh..opq` in `dir_parts`: hides everything lower layers put there.
    pub fn opaque(&mut self, dir_parts: &[&[u8]], layer: usize) -> Result<(), String> {
        let dir = match self.lookup_dir(dir_parts)? {
            Some(d) => d,
            None => {
                let mut parts = dir_parts.to_vec();
                parts.push(b".");
                self.parent_of(&parts, layer)?
            }
        };
        self.prune_lower(dir, layer);
        Ok(())
    }

    fn lookup_dir(&mut self, parts: &[&[u8]]) -> Result<Option<NodeId>, String> {
        Ok(self.walk(vec![ROOT], parts, None, &mut 0)?.and_then(|s| s.last().copied()))
    }

    /// Iterative, with an explicit stack: a layer may nest directories
    /// as deep as it likes.
    fn prune_lower(&mut self, dir: NodeId, layer: usize) {
        let mut pending = vec![dir];
        while let Some(dir) = pending.pop() {
            let Some(children) = self.children_mut(dir) else { continue };
            children.retain(|_, e| e.layer >= layer);
            let subdirs: Vec<NodeId> = children.values().map(|e| e.node).collect();
            pending.extend(subdirs.into_iter().filter(|&c| self.nodes[c].is_dir()));
        }
    }
}

impl Tree {
    /// Every regular file with its absolute path (`/a/b`), depth-first in
    /// name order; a hardlinked file appears under each of its names.
    pub fn files(&self) -> Vec<(String, NodeId)> {
        let mut out = Vec::new();
        let mut stack = vec![(ROOT, String::new())];
        while let Some((dir, path)) = stack.pop() {
            let Some(children) = self.children(dir) else { continue };
            for (name, e) in children.iter().rev() {
                let p = format!("{path}/{}", String::from_utf8_lossy(name));
                match self.nodes[e.node].kind {
                    NodeKind::Dir { .. } => stack.push((e.node, p)),
                    NodeKind::File { .. } => out.push((p, e.node)),
                    _ => {}
                }
            }
        }
        out
    }
}
