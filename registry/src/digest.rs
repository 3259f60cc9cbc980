//! sha256 content digests (`sha256:<64 hex>`), and readers/writers that
//! compute them while bytes stream through.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use crate::error::{RegistryError, Result};

/// A validated `sha256:<hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `s`, accepting only sha256 with 64 lower-case hex digits
    /// (so a digest is always safe to use as a file name).
    pub fn parse(s: &str) -> Result<Self> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| RegistryError::BadDigest(s.to_string()))?;
        if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
            return Err(RegistryError::BadDigest(s.to_string()));
        }
        Ok(Digest(s.to_string()))
    }

    pub fn from_sha256(bytes: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex::encode(bytes)))
    }

    pub fn of(data: &[u8]) -> Self {
        Self::from_sha256(&Sha256::digest(data))
    }

    /// The hex part, without `sha256:`.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The raw 32 bytes.
    pub fn bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        // parse() guarantees 64 hex digits.
        if let Ok(v) = hex::decode(self.hex()) {
            out.copy_from_slice(&v);
        }
        out
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Default)]
struct HashState {
    hasher: Sha256,
    bytes: u64,
}

/// A reader that hashes what passes through it. [`DigestCheck`] (shared, so
/// it stays usable after the reader has been moved into a decompressor)
/// compares the result with the expected digest.
pub struct DigestReader<R> {
    inner: R,
    state: Arc<Mutex<HashState>>,
}

/// The verdict side of a [`DigestReader`].
#[derive(Clone)]
pub struct DigestCheck {
    expected: Digest,
    state: Arc<Mutex<HashState>>,
}

impl<R: Read> DigestReader<R> {
    pub fn new(inner: R, expected: Digest) -> (Self, DigestCheck) {
        let state = Arc::new(Mutex::new(HashState::default()));
        (DigestReader { inner, state: state.clone() }, DigestCheck { expected, state })
    }
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut s = self.state.lock().map_err(|_| io::Error::other("digest state poisoned"))?;
        s.hasher.update(&buf[..n]);
        s.bytes += n as u64;
        Ok(n)
    }
}

impl DigestCheck {
    /// Feeds bytes that were read around the reader (the rest of a blob).
    pub fn update(&self, data: &[u8]) {
        if let Ok(mut s) = self.state.lock() {
            s.hasher.update(data);
            s.bytes += data.len() as u64;
        }
    }

    /// Bytes hashed so far.
    pub fn bytes(&self) -> u64 {
        self.state.lock().map(|s| s.bytes).unwrap_or(0)
    }

    /// Compares everything hashed so far with the expected digest.
    pub fn verify(&self) -> Result<()> {
        let s = self.state.lock().map_err(|_| RegistryError::BadDigest("digest state poisoned".into()))?;
        let actual = Digest::from_sha256(&s.hasher.clone().finalize());
        if actual != self.expected {
            return Err(RegistryError::DigestMismatch { digest: self.expected.to_string(), actual: actual.to_string() });
        }
        Ok(())
    }
}

/// A writer that hashes and counts what it writes.
pub struct DigestWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> DigestWriter<W> {
    pub fn new(inner: W) -> Self {
        DigestWriter { inner, hasher: Sha256::new(), bytes: 0 }
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    /// The digest of everything written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        (Digest::from_sha256(&self.hasher.finalize()), self.bytes, self.inner)
    }
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
