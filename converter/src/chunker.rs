//! Cutting a file's byte stream into chunks: fixed-size, or content-defined
//! with FastCDC (boundaries follow content, so an insertion early in a file
//! does not shift every later chunk, and image versions dedup well).

use std::io::{self, Read};

use naiad_format::ChunkingParams;

/// How files are cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// Chunks of `size` bytes (a power of two, 4 KiB to 16 MiB); the last may be shorter.
    Fixed { size: u32 },
    /// FastCDC with these minimum, average and maximum sizes.
    ContentDefined { min: u32, avg: u32, max: u32 },
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking::ContentDefined { min: 16 << 10, avg: 64 << 10, max: 256 << 10 }
    }
}

impl Chunking {
    /// Checks the parameters are ones the format and FastCDC accept.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Chunking::Fixed { size } => {
                if !size.is_power_of_two() || !(4096..=16 << 20).contains(&size) {
                    return Err(format!("fixed chunk size {size} must be a power of two from 4 KiB to 16 MiB"));
                }
            }
            Chunking::ContentDefined { min, avg, max } => {
                use fastcdc::v2020::*;
                if !(MINIMUM_MIN as u32..=MINIMUM_MAX as u32).contains(&min)
                    || !(AVERAGE_MIN as u32..=AVERAGE_MAX as u32).contains(&avg)
                    || !(MAXIMUM_MIN as u32..=MAXIMUM_MAX as u32).contains(&max)
                    || min > avg
                    || avg > max
                {
                    return Err(format!(
                        "content-defined chunk sizes min={min} avg={avg} max={max} must satisfy min <= avg <= max, {MINIMUM_MIN} <= min <= {MINIMUM_MAX}, {AVERAGE_MIN} <= avg <= {AVERAGE_MAX}, {MAXIMUM_MIN} <= max <= {MAXIMUM_MAX}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The parameters as the bootstrap header records them.
    pub fn params(&self) -> ChunkingParams {
        match *self {
            Chunking::Fixed { size } => ChunkingParams::Fixed { size },
            Chunking::ContentDefined { min, avg, max } => ChunkingParams::ContentDefined { min, avg, max },
        }
    }

    /// Reads `reader` to its end, handing each chunk to `emit`. Returns the
    /// number of bytes read.
    pub fn split<R: Read, E>(&self, mut reader: R, mut emit: impl FnMut(Vec<u8>) -> Result<(), E>) -> Result<u64, SplitError<E>> {
        let mut total = 0u64;
        match *self {
            Chunking::Fixed { size } => loop {
                let mut buf = Vec::with_capacity(size as usize);
                let n = (&mut reader).take(size as u64).read_to_end(&mut buf).map_err(SplitError::Read)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                emit(buf).map_err(SplitError::Emit)?;
                if n < size as usize {
                    break;
                }
            },
            Chunking::ContentDefined { min, avg, max } => {
                for chunk in fastcdc::v2020::StreamCDC::new(reader, min as usize, avg as usize, max as usize) {
                    let chunk = chunk.map_err(|e| {
                        SplitError::Read(match e {
                            fastcdc::v2020::Error::IoError(io) => io,
                            other => io::Error::other(other.to_string()),
                        })
                    })?;
                    total += chunk.length as u64;
                    emit(chunk.data).map_err(SplitError::Emit)?;
                }
            }
        }
        Ok(total)
    }
}

/// A failure while splitting: reading the input, or handing a chunk on.
#[derive(Debug)]
pub enum SplitError<E> {
    Read(io::Error),
    Emit(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(c: Chunking, data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        c.split::<_, ()>(data, |v| {
            out.push(v);
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn fixed_chunks_cover_the_input() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let p = pieces(Chunking::Fixed { size: 4096 }, &data);
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), vec![4096, 4096, 1808]);
        assert_eq!(p.concat(), data);
        assert!(pieces(Chunking::Fixed { size: 4096 }, &[]).is_empty());
    }

    #[test]
    fn cdc_boundaries_survive_an_insertion() {
        let mut x = 1u64;
        let data: Vec<u8> = (0..400_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let c = Chunking::ContentDefined { min: 2048, avg: 8192, max: 32768 };
        let a = pieces(c, &data);
        let mut shifted = b"inserted bytes".to_vec();
        shifted.extend_from_slice(&data);
        let b = pieces(c, &shifted);
        assert_eq!(a.concat(), data);
        let common = a.iter().filter(|x| b.contains(x)).count();
        assert!(common + 2 >= a.len(), "only {common} of {} chunks survived", a.len());
        assert!(c.validate().is_ok());
        assert!(Chunking::Fixed { size: 1000 }.validate().is_err());
    }
}
