//! [`ReadAhead`]: a reader whose source is read on a thread of its own, a
//! few blocks ahead of the consumer. Conversion reads a layer through it, so
//! reading the file, checking its digest and decompressing it run beside
//! the tar parsing and chunking instead of taking turns with them on one
//! core.

use std::io::{self, Read};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};

/// Bytes read from the source per block.
const BLOCK: usize = 1 << 20;
/// Blocks the thread may read ahead of the consumer (memory: this many
/// blocks, plus one in each hand).
const AHEAD: usize = 4;

pub struct ReadAhead {
    blocks: Receiver<io::Result<Vec<u8>>>,
    /// Blocks read out go back to the thread, to be filled again (no
    /// allocating and zeroing a block per block).
    spent: Sender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    /// Set once the source ended (EOF or an error, which is returned once
    /// and then again on every later read).
    done: Option<io::ErrorKind>,
}

impl ReadAhead {
    /// Starts reading `source` on a new thread. The thread stops at the
    /// source's end or error, or when the `ReadAhead` is dropped.
    pub fn spawn(mut source: Box<dyn Read + Send>) -> io::Result<Self> {
        let (tx, rx) = sync_channel(AHEAD);
        let (spent_tx, spent_rx) = channel::<Vec<u8>>();
        std::thread::Builder::new().name("naiad-layer-read".into()).spawn(move || loop {
            let mut block = spent_rx.try_recv().unwrap_or_default();
            block.resize(BLOCK, 0);
            let mut have = 0;
            let result = loop {
                match source.read(&mut block[have..]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        have += n;
                        if have == BLOCK {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            block.truncate(have);
            let last = have < BLOCK || result.is_err();
            if !block.is_empty() && tx.send(Ok(block)).is_err() {
                return;
            }
            if let Err(e) = result {
                let _ = tx.send(Err(e));
                return;
            }
            if last {
                let _ = tx.send(Ok(Vec::new()));
                return;
            }
        })?;
        Ok(ReadAhead { blocks: rx, spent: spent_tx, current: Vec::new(), pos: 0, done: None })
    }
}

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if let Some(kind) = self.done {
                return if kind == io::ErrorKind::UnexpectedEof { Ok(0) } else { Err(io::Error::new(kind, "the layer could not be read (reported before)")) };
            }
            match self.blocks.recv() {
                Ok(Ok(block)) if block.is_empty() => self.done = Some(io::ErrorKind::UnexpectedEof),
                Ok(Ok(block)) => {
                    let old = std::mem::replace(&mut self.current, block);
                    self.pos = 0;
                    // The thread may have ended: then the block is dropped.
                    let _ = self.spent.send(old);
                }
                Ok(Err(e)) => {
                    self.done = Some(e.kind());
                    return Err(e);
                }
                Err(_) => return Err(io::Error::other("the layer reader thread ended without finishing")),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that fails after `ok` bytes.
    struct Failing {
        ok: usize,
    }

    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "bad gzip"));
            }
            let n = buf.len().min(self.ok).min(1000);
            buf[..n].fill(7);
            self.ok -= n;
            Ok(n)
        }
    }

    #[test]
    fn reads_everything_in_order_then_eof() {
        let data: Vec<u8> = (0..3 * BLOCK + 12345).map(|i| (i % 251) as u8).collect();
        let mut r = ReadAhead::spawn(Box::new(io::Cursor::new(data.clone()))).unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(r.read(&mut [0u8; 10]).unwrap(), 0, "EOF stays EOF");
    }

    #[test]
    fn a_source_error_reaches_the_reader_after_the_good_bytes() {
        let mut r = ReadAhead::spawn(Box::new(Failing { ok: BLOCK + 5000 })).unwrap();
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(out.len(), BLOCK + 5000);
        assert!(r.read(&mut [0u8; 10]).is_err(), "the error is not forgotten");
    }

    #[test]
    fn dropping_the_reader_stops_the_thread() {
        // An endless source: the thread must notice the reader is gone.
        let r = ReadAhead::spawn(Box::new(io::repeat(1))).unwrap();
        drop(r);
    }
}
