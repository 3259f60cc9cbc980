//! [`Metadata`]: the snapshotter's state in an embedded database
//! (`ROOT/metadata.redb`, redb), as containerd keeps its own in bbolt:
//! every snapshot by name with its kind, parent, labels, times, directory
//! id and, for naiad layers, what serves them. Each change is one
//! transaction, so a killed snapshotter restarts with every snapshot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::SnapshotterError;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

/// A snapshot's kind, as containerd's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Active,
    View,
    Committed,
}

impl From<Kind> for containerd_snapshots::Kind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        }
    }
}

/// What a snapshot's content is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// A directory of its own (`ROOT/snapshots/ID/fs`): an unpacked
    /// ordinary layer, or a container's writable layer.
    Local,
    /// A naiad chunk blob layer: nothing of its own (the image mount
    /// serves its files).
    NaiadBlob,
    /// The naiad bootstrap layer: the whole image, served by a naiad mount
    /// on `mountpoint` from `source` (`docker://HOST/REPO@DIGEST`).
    NaiadImage { source: String, mountpoint: PathBuf },
}

/// One snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Names its directory, `ROOT/snapshots/ID`.
    pub id: u64,
    pub kind: Kind,
    /// The parent's name; empty for none.
    pub parent: String,
    pub labels: HashMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub content: Content,
}

/// The database.
pub struct Metadata {
    db: Database,
    path: PathBuf,
}

fn decode(name: &str, bytes: &[u8]) -> Result<Record, SnapshotterError> {
    serde_json::from_slice(bytes).map_err(|e| SnapshotterError::Database(format!("snapshot {name:?}: undecodable record: {e}")))
}

fn encode(record: &Record) -> Vec<u8> {
    // A Record has no maps with non-string keys: encoding cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

impl Metadata {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, SnapshotterError> {
        let db = Database::create(path).map_err(|e| SnapshotterError::Database(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(Metadata { db, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, name: &str) -> Result<Option<Record>, SnapshotterError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let found = table.get(name)?;
        found.map(|v| decode(name, v.value())).transpose()
    }

    /// The record of `name`, or NotFound.
    pub fn require(&self, name: &str) -> Result<Record, SnapshotterError> {
        self.get(name)?.ok_or_else(|| SnapshotterError::NotFound(name.to_string()))
    }

    /// Every snapshot, by name.
    pub fn all(&self) -> Result<Vec<(String, Record)>, SnapshotterError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Adds a new snapshot `name` with a fresh id (the closure gets it):
    /// AlreadyExists if the name is taken; the parent, when named, must be
    /// a committed snapshot.
    pub fn create(&self, name: &str, make: impl FnOnce(u64) -> Record) -> Result<Record, SnapshotterError> {
        let tx = self.db.begin_write()?;
        let record = {
            let mut table = tx.open_table(SNAPSHOTS)?;
            if table.get(name)?.is_some() {
                return Err(SnapshotterError::AlreadyExists(name.to_string()));
            }
            let mut counters = tx.open_table(COUNTERS)?;
            let id = counters.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(1);
            counters.insert(NEXT_ID, id + 1)?;
            let record = make(id);
            if !record.parent.is_empty() {
                let parent = table.get(record.parent.as_str())?.map(|v| decode(&record.parent, v.value())).transpose()?;
                match parent {
                    None => return Err(SnapshotterError::NotFound(record.parent.clone())),
                    Some(p) if p.kind != Kind::Committed => {
                        return Err(SnapshotterError::InvalidArgument(format!("parent {:?} of {name:?} is not a committed snapshot", record.parent)))
                    }
                    Some(_) => {}
                }
            }
            table.insert(name, encode(&record).as_slice())?;
            record
        };
        tx.commit()?;
        Ok(record)
    }

    /// Replaces the record of an existing snapshot.
    pub fn put(&self, name: &str, record: &Record) -> Result<(), SnapshotterError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(SNAPSHOTS)?;
            if table.get(name)?.is_none() {
                return Err(SnapshotterError::NotFound(name.to_string()));
            }
            table.insert(name, encode(record).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Turns the active snapshot `key` into the committed snapshot `name`
    /// (same directory), in one transaction.
    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<Record, SnapshotterError> {
        let tx = self.db.begin_write()?;
        let record = {
            let mut table = tx.open_table(SNAPSHOTS)?;
            let active = table.get(key)?.map(|v| decode(key, v.value())).transpose()?.ok_or_else(|| SnapshotterError::NotFound(key.to_string()))?;
            if active.kind != Kind::Active {
                return Err(SnapshotterError::FailedPrecondition(format!("snapshot {key:?} is not active (a view or a committed snapshot cannot be committed)")));
            }
            if table.get(name)?.is_some() {
                return Err(SnapshotterError::AlreadyExists(name.to_string()));
            }
            let now = SystemTime::now();
            let mut all_labels = active.labels.clone();
            all_labels.extend(labels);
            let record = Record { kind: Kind::Committed, labels: all_labels, updated: now, created: now, ..active };
            table.remove(key)?;
            table.insert(name, encode(&record).as_slice())?;
            record
        };
        tx.commit()?;
        Ok(record)
    }

    /// Removes `name`; FailedPrecondition while another snapshot names it
    /// as parent.
    pub fn remove(&self, name: &str) -> Result<Record, SnapshotterError> {
        let tx = self.db.begin_write()?;
        let record = {
            let mut table = tx.open_table(SNAPSHOTS)?;
            let record = table.get(name)?.map(|v| decode(name, v.value())).transpose()?.ok_or_else(|| SnapshotterError::NotFound(name.to_string()))?;
            for entry in table.iter()? {
                let (k, v) = entry?;
                if decode(k.value(), v.value())?.parent == name {
                    return Err(SnapshotterError::FailedPrecondition(format!("snapshot {name:?} is the parent of {:?}; remove that first", k.value())));
                }
            }
            table.remove(name)?;
            record
        };
        tx.commit()?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, kind: Kind, parent: &str) -> Record {
        let now = SystemTime::now();
        Record { id, kind, parent: parent.into(), labels: HashMap::new(), created: now, updated: now, content: Content::Local }
    }

    #[test]
    fn snapshots_survive_reopening_and_keep_their_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        {
            let m = Metadata::open(&path).unwrap();
            let a = m.create("a-key", |id| record(id, Kind::Active, "")).unwrap();
            assert_eq!(a.id, 1);
            assert!(matches!(m.create("a-key", |id| record(id, Kind::Active, "")), Err(SnapshotterError::AlreadyExists(_))));
            // An active parent is refused; a missing one is not found.
            assert!(matches!(m.create("b", |id| record(id, Kind::Active, "a-key")), Err(SnapshotterError::InvalidArgument(_))));
            assert!(matches!(m.create("b", |id| record(id, Kind::Active, "nope")), Err(SnapshotterError::NotFound(_))));
            let c = m.commit("a", "a-key", HashMap::from([("l".to_string(), "v".to_string())])).unwrap();
            assert_eq!((c.id, c.kind), (1, Kind::Committed));
            assert!(m.get("a-key").unwrap().is_none());
            m.create("b", |id| record(id, Kind::Active, "a")).unwrap();
            assert!(matches!(m.remove("a"), Err(SnapshotterError::FailedPrecondition(_))));
        }
        let m = Metadata::open(&path).unwrap();
        let names: Vec<String> = m.all().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(m.require("a").unwrap().labels["l"], "v");
        assert_eq!(m.require("b").unwrap().id, 2, "failed creates take no id");
        m.remove("b").unwrap();
        m.remove("a").unwrap();
        assert!(m.all().unwrap().is_empty());
    }
}
