//! Opening one source layer as a tar stream: the media type must be a tar
//! layer, and the compression (none, gzip, zstd) is taken from the bytes'
//! magic number, which is what runtimes do too.

use std::io::{BufRead, BufReader, Read};

use naiad_registry::manifest::TAR_LAYER_MEDIA_TYPES;
use naiad_registry::LayerBlob;

use crate::error::{ConvertError, Result};

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Refuses layers that are not tar layers.
pub fn check_media_type(layer: &LayerBlob) -> Result<()> {
    if TAR_LAYER_MEDIA_TYPES.contains(&layer.media_type.as_str()) {
        Ok(())
    } else {
        Err(ConvertError::Layer {
            layer: layer.digest.to_string(),
            reason: format!("unsupported layer media type {:?} (expected a tar, tar+gzip or tar+zstd layer)", layer.media_type),
        })
    }
}

/// Wraps `raw` in the decompressor its first bytes call for.
pub fn decompress(raw: Box<dyn Read + Send>, digest: &str) -> Result<(Compression, Box<dyn Read + Send>)> {
    let mut buffered = BufReader::with_capacity(256 << 10, raw);
    let head = buffered.fill_buf().map_err(|e| ConvertError::Layer { layer: digest.to_string(), reason: format!("cannot read: {e}") })?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        (Compression::Gzip, Box::new(flate2::read::MultiGzDecoder::new(buffered)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let d = zstd::stream::read::Decoder::with_buffer(buffered).map_err(|e| ConvertError::Layer { layer: digest.to_string(), reason: format!("zstd: {e}") })?;
        (Compression::Zstd, Box::new(d))
    } else {
        (Compression::None, Box::new(buffered))
    })
}
