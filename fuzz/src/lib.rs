//! The bodies of naiad's fuzz targets, one function each, so that the
//! targets (src/bin) stay one line and a crashing input can be replayed in
//! a plain test.

use naiad_format::{decode_chunk, Bootstrap, ChunkRecord};

/// Recomputes the bootstrap checksum over `data` (bytes 24..56 zeroed,
/// blake3), as a writer would, so that mutations reach the table checks.
fn reseal(data: &mut [u8]) {
    if data.len() >= 56 {
        data[24..56].fill(0);
        let sum = *blake3::hash(data).as_bytes();
        data[24..56].copy_from_slice(&sum);
    }
}

pub fn bootstrap(data: &[u8]) {
    let mut data = data.to_vec();
    reseal(&mut data);
    let Ok(b) = Bootstrap::from_bytes(data) else { return };
    if b.validate().is_err() {
        return;
    }
    let mut paths = Vec::new();
    let _ = b.walk(|path, ino, _| -> Result<(), naiad_format::FormatError> {
        if paths.len() < 64 {
            paths.push((path.to_vec(), ino));
        }
        let _ = b.xattrs(ino);
        Ok(())
    });
    for (path, ino) in paths {
        let _ = b.resolve_path(&path);
        let _ = b.inode(ino);
        let _ = b.dir_entries(ino);
        let _ = b.symlink_target(ino);
        let _ = b.file_chunks(ino);
        let _ = b.file_chunks_in_range(ino, 0, u64::MAX / 2);
        let _ = b.file_chunks_in_range(ino, 4095, 3);
    }
    let _ = b.prefetch();
    let _ = b.blobs();
}

pub fn chunk(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    // The first byte picks raw (the sizes agree) or zstd (a size from the input).
    let stored = &data[8..];
    let size = if data[0] & 1 == 0 { stored.len() as u32 } else { u32::from_le_bytes([data[1], data[2], data[3], 0]) };
    let digest = *blake3::hash(stored).as_bytes();
    let rec = ChunkRecord { digest, compressed_offset: 0, blob_index: 0, compressed_size: stored.len() as u32, uncompressed_size: size };
    let _ = decode_chunk(stored, &rec);
}

/// Splits a fuzz input into layers at this marker.
pub const LAYER_SEPARATOR: &[u8] = b"NAIAD-LAYER-SEPARATOR";

/// Writes `layers` (tar streams, plain or compressed) as an OCI image
/// layout at `dir`, tag `latest`.
pub fn write_layout(dir: &std::path::Path, layers: &[&[u8]]) -> std::io::Result<()> {
    use sha2::{Digest, Sha256};
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |data: &[u8]| -> std::io::Result<String> {
        let hex = hex::encode(Sha256::digest(data));
        std::fs::write(blobs.join(&hex), data)?;
        Ok(format!("sha256:{hex}"))
    };
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let d = put(l)?;
        diff_ids.push(d.clone());
        descriptors.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": l.len()}));
    }
    let config = serde_json::to_vec(&serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}, "config": {}}))?;
    let config_digest = put(&config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descriptors,
    }))?;
    let manifest_digest = put(&manifest)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)
}

/// The whole layer merge: the input's layers (split at
/// [`LAYER_SEPARATOR`]) as an image, converted to a naiad image, which is
/// then opened and validated. Scratch space is a tmpfs when there is one.
pub fn layer(data: &[u8]) {
    let mut layers: Vec<&[u8]> = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(LAYER_SEPARATOR.len()).position(|w| w == LAYER_SEPARATOR) {
        layers.push(&rest[..i]);
        rest = &rest[i + LAYER_SEPARATOR.len()..];
        if layers.len() == 4 {
            break;
        }
    }
    layers.push(rest);
    let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
    let Ok(tmp) = tempfile::Builder::new().prefix("naiad-fuzz-").tempdir_in(base) else { return };
    let src = tmp.path().join("src");
    if write_layout(&src, &layers).is_err() {
        return;
    }
    let parse = |s: &str| naiad_registry::ImageRef::parse(s).ok();
    let (Some(from), Some(to)) = (parse(&format!("oci:{}:latest", src.display())), parse(&format!("oci:{}:naiad", tmp.path().join("dst").display()))) else { return };
    let opts = naiad_converter::ConvertOptions::default();
    if naiad_converter::convert(&from, &to, &opts).is_ok() {
        if let Ok(image) = naiad_reader::NaiadImage::open(&to) {
            let _ = image.bootstrap.validate();
        }
    }
}

/// Manifests, indexes, image configs and token answers: every JSON the
/// registry client parses from the network.
pub fn json(data: &[u8]) {
    if let Ok(m) = serde_json::from_slice::<naiad_registry::manifest::Manifest>(data) {
        for l in &m.layers {
            let _ = naiad_registry::Digest::parse(&l.digest);
        }
    }
    if let Ok(i) = serde_json::from_slice::<naiad_registry::manifest::Index>(data) {
        let _ = naiad_registry::Platform::host().select(&i.manifests);
    }
    let _ = naiad_registry::authenticator::parse_token_answer(data);
}

pub fn auth(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = naiad_registry::auth_challenge::AuthChallenge::parse(s);
    }
}

pub fn reference(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = naiad_registry::DockerReference::parse(s);
        let _ = naiad_registry::ImageRef::parse(s);
    }
}
