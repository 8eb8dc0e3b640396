//! Chunk compression. Every chunk is compressed independently so that chunks can be compressed
//! and decompressed on all cores, while the concatenation stays one standard zip entry:
//! zstd frames may be concatenated, and deflate chunks are flushed to a byte boundary.

use std::fmt;
use std::str::FromStr;

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};
use podmigrate_proto::v1::Compression as ProtoCompression;

/// Zip compression method numbers (APPNOTE 4.4.5).
const METHOD_STORED: u16 = 0;
const METHOD_DEFLATE: u16 = 8;
const METHOD_ZSTD: u16 = 93;

/// How entries are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Fast on every core, and the best ratio; read by podmigrate, libarchive (bsdtar) and
    /// Python 3.14's zipfile, but not by Info-ZIP's unzip.
    Zstd,
    /// Readable by every zip tool, Info-ZIP's unzip included; slower.
    Deflate,
    /// No compression.
    Stored,
}

impl Compression {
    pub fn default_level(self) -> i32 {
        match self {
            // zstd's fastest regular level: random pages cost almost nothing, text still shrinks
            // more than `zip -1`.
            Compression::Zstd => 1,
            Compression::Deflate => 1,
            Compression::Stored => 0,
        }
    }

    pub(crate) fn zip_method(self) -> u16 {
        match self {
            Compression::Zstd => METHOD_ZSTD,
            Compression::Deflate => METHOD_DEFLATE,
            Compression::Stored => METHOD_STORED,
        }
    }

    /// The zip "version needed to extract" for this method (APPNOTE 4.4.3.2).
    pub(crate) fn zip_version_needed(self) -> u16 {
        match self {
            Compression::Zstd => 63,
            Compression::Deflate => 20,
            Compression::Stored => 10,
        }
    }

    pub(crate) fn to_proto(self) -> ProtoCompression {
        match self {
            Compression::Zstd => ProtoCompression::Zstd,
            Compression::Deflate => ProtoCompression::Deflate,
            Compression::Stored => ProtoCompression::Stored,
        }
    }

    pub(crate) fn from_proto(value: i32) -> Option<Self> {
        match ProtoCompression::try_from(value).ok()? {
            ProtoCompression::Zstd => Some(Compression::Zstd),
            ProtoCompression::Deflate => Some(Compression::Deflate),
            ProtoCompression::Stored => Some(Compression::Stored),
            ProtoCompression::Unspecified => None,
        }
    }

    /// Valid levels for this method.
    pub fn level_range(self) -> std::ops::RangeInclusive<i32> {
        match self {
            Compression::Zstd => -7..=19,
            Compression::Deflate => 0..=9,
            Compression::Stored => 0..=0,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Zstd => "zstd",
            Compression::Deflate => "deflate",
            Compression::Stored => "none",
        })
    }
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "deflate" => Ok(Compression::Deflate),
            "none" | "stored" => Ok(Compression::Stored),
            other => Err(format!(
                "unknown compression {other:?} (expected zstd, deflate or none)"
            )),
        }
    }
}

/// A per-thread compressor; it keeps its context between chunks to avoid re-allocating it.
pub(crate) enum ChunkCompressor {
    Zstd(Box<zstd::bulk::Compressor<'static>>),
    Deflate(flate2::Compression),
    Stored,
}

impl ChunkCompressor {
    pub(crate) fn new(compression: Compression, level: i32) -> std::io::Result<Self> {
        Ok(match compression {
            Compression::Zstd => {
                ChunkCompressor::Zstd(Box::new(zstd::bulk::Compressor::new(level)?))
            }
            Compression::Deflate => {
                ChunkCompressor::Deflate(flate2::Compression::new(level as u32))
            }
            Compression::Stored => ChunkCompressor::Stored,
        })
    }

    /// Compresses one chunk into `out` (cleared first). `last` marks an entry's final chunk,
    /// which ends the deflate stream.
    pub(crate) fn compress_into(
        &mut self,
        data: &[u8],
        last: bool,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        out.clear();
        match self {
            ChunkCompressor::Zstd(compressor) => {
                out.reserve(zstd::zstd_safe::compress_bound(data.len()));
                compressor.compress_to_buffer(data, out)?;
            }
            ChunkCompressor::Deflate(level) => deflate_chunk(data, *level, last, out)?,
            ChunkCompressor::Stored => out.extend_from_slice(data),
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn compress(&mut self, data: &[u8], last: bool) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.compress_into(data, last, &mut out)?;
        Ok(out)
    }
}

/// Raw deflate of one chunk with a fresh window, so it decodes on its own. A non-final chunk ends
/// with a sync flush (byte-aligned, no final-block bit) so that chunks concatenate into one
/// valid deflate stream, as pigz does.
fn deflate_chunk(
    data: &[u8],
    level: flate2::Compression,
    last: bool,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut compress = Compress::new(level, false);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    out.reserve(data.len() + data.len() / 1000 + 64);
    loop {
        let consumed = compress.total_in() as usize;
        if out.len() == out.capacity() {
            out.reserve(64 * 1024);
        }
        let status = compress
            .compress_vec(&data[consumed..], out, flush)
            .map_err(std::io::Error::other)?;
        let all_in = compress.total_in() as usize == data.len();
        let done = match status {
            Status::StreamEnd => true,
            // A sync flush is complete once all input is in and the output was not filled.
            Status::Ok | Status::BufError => !last && all_in && out.len() < out.capacity(),
        };
        if done {
            return Ok(());
        }
    }
}

/// Decompresses one chunk into exactly `expected_len` bytes. Output beyond that is refused
/// without being produced, which is what stops a zip bomb.
pub(crate) fn decompress_chunk(
    compression: Compression,
    data: &[u8],
    expected_len: usize,
    last: bool,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    out.clear();
    match compression {
        Compression::Zstd => {
            // zstd writes no further than the buffer's capacity: at least one byte more than
            // declared, so overflow shows, and at most a recycled chunk buffer's size, so a
            // bomb cannot balloon memory.
            out.reserve_exact(expected_len + 1);
            let mut decompressor =
                zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?;
            decompressor
                .decompress_to_buffer(data, out)
                .map_err(|e| format!("zstd data is corrupt or larger than declared: {e}"))?;
        }
        Compression::Deflate => inflate_chunk(data, expected_len, last, out)?,
        Compression::Stored => out.extend_from_slice(data),
    }
    if out.len() != expected_len {
        return Err(format!(
            "chunk decompresses to {} bytes, but its declared size is {expected_len}",
            out.len()
        ));
    }
    Ok(())
}

fn inflate_chunk(
    data: &[u8],
    expected_len: usize,
    last: bool,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let mut decompress = Decompress::new(false);
    out.reserve(expected_len + 1);
    let status = decompress
        .decompress_vec(data, out, FlushDecompress::Sync)
        .map_err(|e| format!("deflate data is corrupt: {e}"))?;
    if out.len() > expected_len {
        return Err(format!(
            "deflate data is larger than its declared size of {expected_len} bytes"
        ));
    }
    if decompress.total_in() as usize != data.len() {
        return Err("deflate data has trailing bytes or is truncated".to_string());
    }
    let ended = status == Status::StreamEnd;
    if ended != last {
        return Err(if last {
            "deflate stream is truncated".to_string()
        } else {
            "deflate stream ends before its last chunk".to_string()
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decompress(c: Compression, data: &[u8], len: usize, last: bool) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        decompress_chunk(c, data, len, last, &mut out).map(|()| out)
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
            .collect()
    }

    #[test]
    fn every_codec_round_trips_chunks_and_empty_input() {
        for compression in [Compression::Zstd, Compression::Deflate, Compression::Stored] {
            let mut compressor =
                ChunkCompressor::new(compression, compression.default_level()).unwrap();
            for len in [0, 1, 100_000] {
                for last in [false, true] {
                    if len == 0 && !last {
                        continue;
                    }
                    let data = sample(len);
                    let packed = compressor.compress(&data, last).unwrap();
                    let unpacked = decompress(compression, &packed, len, last).unwrap();
                    assert_eq!(unpacked, data, "{compression} len {len} last {last}");
                }
            }
        }
    }

    #[test]
    fn concatenated_deflate_chunks_form_one_standard_stream() {
        let a = sample(70_000);
        let b = sample(30_000);
        let level = flate2::Compression::new(1);
        let mut stream = Vec::new();
        deflate_chunk(&a, level, false, &mut stream).unwrap();
        let mut tail = Vec::new();
        deflate_chunk(&b, level, true, &mut tail).unwrap();
        stream.extend(tail);
        let mut decoded = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::DeflateDecoder::new(&stream[..]),
            &mut decoded,
        )
        .unwrap();
        assert_eq!(decoded, [a, b].concat());
    }

    #[test]
    fn output_larger_than_declared_is_refused() {
        for compression in [Compression::Zstd, Compression::Deflate, Compression::Stored] {
            let mut compressor = ChunkCompressor::new(compression, 1).unwrap();
            let packed = compressor.compress(&vec![7u8; 10_000], true).unwrap();
            let err = decompress(compression, &packed, 9_999, true).unwrap_err();
            assert!(
                err.contains("larger than") || err.contains("declared size"),
                "{compression}: {err}"
            );
        }
    }
}
