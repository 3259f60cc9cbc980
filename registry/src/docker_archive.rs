//! The tarball `docker save` writes: `manifest.json` naming the config and
//! the layer files, all inside one tar. naiad indexes the tar once and then
//! reads each member in place, without unpacking it.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{IoContext, RegistryError, Result};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ArchiveManifestEntry {
    pub config: String,
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    pub layers: Vec<String>,
}

/// A `docker save` tarball with the position of each member.
#[derive(Debug)]
pub struct DockerArchive {
    pub path: PathBuf,
    members: HashMap<String, (u64, u64)>,
}

impl DockerArchive {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).at(path)?;
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        let bad = |reason: String| RegistryError::BadImage { reference: format!("docker-archive:{}", path.display()), reason };
        for entry in archive.entries_with_seek().map_err(|e| bad(format!("not a tar archive: {e}")))? {
            let entry = entry.map_err(|e| bad(format!("corrupt tar archive: {e}")))?;
            let name = entry.path().map_err(|e| bad(format!("bad member name: {e}")))?.to_string_lossy().trim_start_matches("./").to_string();
            members.insert(name, (entry.raw_file_position(), entry.size()));
        }
        Ok(DockerArchive { path: path.to_path_buf(), members })
    }

    /// Position and size of the member called `name`.
    pub fn member(&self, name: &str) -> Result<(u64, u64)> {
        self.members
            .get(name.trim_start_matches("./"))
            .copied()
            .ok_or_else(|| RegistryError::BadImage { reference: format!("docker-archive:{}", self.path.display()), reason: format!("member {name:?} is missing from the archive") })
    }

    /// Reads a member of at most `max` bytes.
    pub fn read_member(&self, name: &str, max: u64) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let (pos, size) = self.member(name)?;
        if size > max {
            return Err(RegistryError::BadImage { reference: format!("docker-archive:{}", self.path.display()), reason: format!("{name} is larger than {max} bytes") });
        }
        let mut f = File::open(&self.path).at(&self.path)?;
        f.seek(SeekFrom::Start(pos)).at(&self.path)?;
        let mut data = vec![0u8; size as usize];
        f.read_exact(&mut data).at(&self.path)?;
        Ok(data)
    }

    /// The archive's manifest.json entries.
    pub fn manifest(&self) -> Result<Vec<ArchiveManifestEntry>> {
        let data = self.read_member("manifest.json", crate::layout::MAX_JSON_SIZE)?;
        serde_json::from_slice(&data).map_err(|source| RegistryError::Json { what: format!("{}: manifest.json", self.path.display()), source })
    }
}
