//! A streaming zip writer for entries whose data arrives already compressed, chunk by chunk.
//!
//! The `zip` crate reads our archives, but its writer cannot take pre-compressed data without
//! holding a whole entry in memory (`add_prepared_file`), and a checkpoint's page image is
//! gigabytes. This writer streams each entry, then patches its local header in place with the
//! CRC and sizes (no data descriptors, which some readers handle poorly), and writes ZIP64
//! records wherever a size, offset or count needs them.

use std::fs::File;
use std::io::{self, BufWriter, Seek, Write};
use std::os::unix::fs::FileExt;

use super::codec::Compression;

const LOCAL_HEADER_SIG: u32 = 0x0403_4b50;
const CENTRAL_HEADER_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EXTRA_ID: u16 = 0x0001;
/// General-purpose flag bit 11: names are UTF-8.
const FLAG_UTF8: u16 = 1 << 11;
/// "Version made by": Unix (3) and spec 6.3.
const VERSION_MADE_BY: u16 = (3 << 8) | 63;
const ZIP64_VERSION_NEEDED: u16 = 45;
/// Entries this large get a ZIP64 local header up front, leaving room for compression overhead
/// below the 4 GiB limit of a plain header.
const ZIP64_ENTRY_THRESHOLD: u64 = 0xF000_0000;
const U32_MAX: u64 = u32::MAX as u64;

/// What the central directory needs to know about a finished entry.
struct CentralRecord {
    name: Vec<u8>,
    method: u16,
    version_needed: u16,
    dos_time: u16,
    dos_date: u16,
    crc32: u32,
    compressed_size: u64,
    uncompressed_size: u64,
    local_header_offset: u64,
    external_attributes: u32,
}

/// An entry being written: where its header is, so it can be patched when it ends.
pub(crate) struct OpenEntry {
    record: CentralRecord,
    local_zip64: bool,
    data_start: u64,
}

pub(crate) struct ZipStreamWriter {
    out: BufWriter<File>,
    offset: u64,
    records: Vec<CentralRecord>,
}

/// Unix permission bits plus file type, in the high half of the external attributes; the MS-DOS
/// directory bit in the low half for readers that look only there.
fn external_attributes(mode: u32, is_dir: bool) -> u32 {
    let file_type = if is_dir { 0o040000 } else { 0o100000 };
    ((file_type | (mode & 0o777)) << 16) | if is_dir { 0x10 } else { 0 }
}

/// MS-DOS date and time (local-time-free: we write UTC). Dates before 1980 clamp to 1980.
fn dos_date_time(unix_seconds: i64) -> (u16, u16) {
    let dt = time::OffsetDateTime::from_unix_timestamp(unix_seconds)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    if dt.year() < 1980 {
        return (0, (1 << 5) | 1);
    }
    let year = (dt.year().min(2107) - 1980) as u16;
    let date = (year << 9) | ((dt.month() as u16) << 5) | dt.day() as u16;
    let time = ((dt.hour() as u16) << 11) | ((dt.minute() as u16) << 5) | (dt.second() as u16 / 2);
    (time, date)
}

impl ZipStreamWriter {
    pub(crate) fn new(file: File) -> Self {
        ZipStreamWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            offset: 0,
            records: Vec::new(),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Writes an entry's local header. `size_hint` is the expected uncompressed size, which
    /// decides whether the header carries ZIP64 fields.
    pub(crate) fn begin_entry(
        &mut self,
        name: &str,
        is_dir: bool,
        compression: Compression,
        mode: u32,
        mtime_seconds: i64,
        size_hint: u64,
    ) -> io::Result<OpenEntry> {
        let mut name = name.as_bytes().to_vec();
        let compression = if is_dir {
            name.push(b'/');
            Compression::Stored
        } else {
            compression
        };
        let local_zip64 = size_hint >= ZIP64_ENTRY_THRESHOLD;
        let (dos_time, dos_date) = dos_date_time(mtime_seconds);
        let version_needed = if local_zip64 {
            ZIP64_VERSION_NEEDED.max(compression.zip_version_needed())
        } else {
            compression.zip_version_needed()
        };
        let record = CentralRecord {
            name,
            method: compression.zip_method(),
            version_needed,
            dos_time,
            dos_date,
            crc32: 0,
            compressed_size: 0,
            uncompressed_size: 0,
            local_header_offset: self.offset,
            external_attributes: external_attributes(mode, is_dir),
        };
        let extra_len: u16 = if local_zip64 { 20 } else { 0 };
        let sizes = if local_zip64 { u32::MAX } else { 0 };
        let mut header = Vec::with_capacity(30 + record.name.len() + extra_len as usize);
        header.extend_from_slice(&LOCAL_HEADER_SIG.to_le_bytes());
        header.extend_from_slice(&record.version_needed.to_le_bytes());
        header.extend_from_slice(&FLAG_UTF8.to_le_bytes());
        header.extend_from_slice(&record.method.to_le_bytes());
        header.extend_from_slice(&dos_time.to_le_bytes());
        header.extend_from_slice(&dos_date.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes()); // crc-32, patched at the end
        header.extend_from_slice(&sizes.to_le_bytes()); // compressed size, patched
        header.extend_from_slice(&sizes.to_le_bytes()); // uncompressed size, patched
        header.extend_from_slice(&(record.name.len() as u16).to_le_bytes());
        header.extend_from_slice(&extra_len.to_le_bytes());
        header.extend_from_slice(&record.name);
        if local_zip64 {
            header.extend_from_slice(&ZIP64_EXTRA_ID.to_le_bytes());
            header.extend_from_slice(&16u16.to_le_bytes());
            header.extend_from_slice(&[0u8; 16]); // sizes, patched
        }
        self.put(&header)?;
        Ok(OpenEntry {
            record,
            local_zip64,
            data_start: self.offset,
        })
    }

    pub(crate) fn write_data(&mut self, data: &[u8]) -> io::Result<()> {
        self.put(data)
    }

    /// Ends an entry: patches its local header with the final CRC and sizes.
    pub(crate) fn end_entry(
        &mut self,
        mut entry: OpenEntry,
        crc32: u32,
        uncompressed_size: u64,
    ) -> io::Result<()> {
        let compressed_size = self.offset - entry.data_start;
        if !entry.local_zip64 && (compressed_size >= U32_MAX || uncompressed_size >= U32_MAX) {
            return Err(io::Error::other(format!(
                "entry {} grew past 4 GiB while it was being packed",
                String::from_utf8_lossy(&entry.record.name)
            )));
        }
        entry.record.crc32 = crc32;
        entry.record.compressed_size = compressed_size;
        entry.record.uncompressed_size = uncompressed_size;

        self.out.flush()?;
        let file = self.out.get_ref();
        let header = entry.record.local_header_offset;
        file.write_all_at(&crc32.to_le_bytes(), header + 14)?;
        if entry.local_zip64 {
            let extra = header + 30 + entry.record.name.len() as u64 + 4;
            let mut sizes = [0u8; 16];
            sizes[..8].copy_from_slice(&uncompressed_size.to_le_bytes());
            sizes[8..].copy_from_slice(&compressed_size.to_le_bytes());
            file.write_all_at(&sizes, extra)?;
        } else {
            let mut sizes = [0u8; 8];
            sizes[..4].copy_from_slice(&(compressed_size as u32).to_le_bytes());
            sizes[4..].copy_from_slice(&(uncompressed_size as u32).to_le_bytes());
            file.write_all_at(&sizes, header + 18)?;
        }
        self.records.push(entry.record);
        Ok(())
    }

    /// Writes the central directory and end records, flushes, and returns the file.
    pub(crate) fn finish(mut self, comment: &str) -> io::Result<File> {
        let cd_start = self.offset;
        let records = std::mem::take(&mut self.records);
        for record in &records {
            self.write_central_header(record)?;
        }
        let cd_size = self.offset - cd_start;
        let count = records.len() as u64;
        let needs_zip64 = count >= 0xFFFF || cd_start >= U32_MAX || cd_size >= U32_MAX;
        if needs_zip64 {
            let zip64_eocd_offset = self.offset;
            let mut rec = Vec::with_capacity(56 + 20);
            rec.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
            rec.extend_from_slice(&44u64.to_le_bytes());
            rec.extend_from_slice(&VERSION_MADE_BY.to_le_bytes());
            rec.extend_from_slice(&ZIP64_VERSION_NEEDED.to_le_bytes());
            rec.extend_from_slice(&0u32.to_le_bytes()); // this disk
            rec.extend_from_slice(&0u32.to_le_bytes()); // disk with the central directory
            rec.extend_from_slice(&count.to_le_bytes());
            rec.extend_from_slice(&count.to_le_bytes());
            rec.extend_from_slice(&cd_size.to_le_bytes());
            rec.extend_from_slice(&cd_start.to_le_bytes());
            rec.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
            rec.extend_from_slice(&0u32.to_le_bytes());
            rec.extend_from_slice(&zip64_eocd_offset.to_le_bytes());
            rec.extend_from_slice(&1u32.to_le_bytes()); // total disks
            self.put(&rec)?;
        }
        let comment = comment.as_bytes();
        let mut eocd = Vec::with_capacity(22 + comment.len());
        eocd.extend_from_slice(&EOCD_SIG.to_le_bytes());
        eocd.extend_from_slice(&0u16.to_le_bytes());
        eocd.extend_from_slice(&0u16.to_le_bytes());
        let count16 = count.min(0xFFFF) as u16;
        eocd.extend_from_slice(&count16.to_le_bytes());
        eocd.extend_from_slice(&count16.to_le_bytes());
        eocd.extend_from_slice(&(cd_size.min(U32_MAX) as u32).to_le_bytes());
        eocd.extend_from_slice(&(cd_start.min(U32_MAX) as u32).to_le_bytes());
        eocd.extend_from_slice(&(comment.len() as u16).to_le_bytes());
        eocd.extend_from_slice(comment);
        self.put(&eocd)?;
        self.out.flush()?;
        let mut file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.seek(io::SeekFrom::End(0))?;
        Ok(file)
    }

    fn write_central_header(&mut self, r: &CentralRecord) -> io::Result<()> {
        // ZIP64 extra: only the fields that overflow, in this order (APPNOTE 4.5.3).
        let mut zip64 = Vec::new();
        let uncompressed = if r.uncompressed_size >= U32_MAX {
            zip64.extend_from_slice(&r.uncompressed_size.to_le_bytes());
            u32::MAX
        } else {
            r.uncompressed_size as u32
        };
        let compressed = if r.compressed_size >= U32_MAX {
            zip64.extend_from_slice(&r.compressed_size.to_le_bytes());
            u32::MAX
        } else {
            r.compressed_size as u32
        };
        let offset = if r.local_header_offset >= U32_MAX {
            zip64.extend_from_slice(&r.local_header_offset.to_le_bytes());
            u32::MAX
        } else {
            r.local_header_offset as u32
        };
        let version_needed = if zip64.is_empty() {
            r.version_needed
        } else {
            r.version_needed.max(ZIP64_VERSION_NEEDED)
        };
        let extra_len = if zip64.is_empty() { 0 } else { 4 + zip64.len() };
        let mut h = Vec::with_capacity(46 + r.name.len() + extra_len);
        h.extend_from_slice(&CENTRAL_HEADER_SIG.to_le_bytes());
        h.extend_from_slice(&VERSION_MADE_BY.to_le_bytes());
        h.extend_from_slice(&version_needed.to_le_bytes());
        h.extend_from_slice(&FLAG_UTF8.to_le_bytes());
        h.extend_from_slice(&r.method.to_le_bytes());
        h.extend_from_slice(&r.dos_time.to_le_bytes());
        h.extend_from_slice(&r.dos_date.to_le_bytes());
        h.extend_from_slice(&r.crc32.to_le_bytes());
        h.extend_from_slice(&compressed.to_le_bytes());
        h.extend_from_slice(&uncompressed.to_le_bytes());
        h.extend_from_slice(&(r.name.len() as u16).to_le_bytes());
        h.extend_from_slice(&(extra_len as u16).to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes()); // comment length
        h.extend_from_slice(&0u16.to_le_bytes()); // disk number start
        h.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        h.extend_from_slice(&r.external_attributes.to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        h.extend_from_slice(&r.name);
        if !zip64.is_empty() {
            h.extend_from_slice(&ZIP64_EXTRA_ID.to_le_bytes());
            h.extend_from_slice(&(zip64.len() as u16).to_le_bytes());
            h.extend_from_slice(&zip64);
        }
        self.put(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn dos_time_encodes_utc_and_clamps_before_1980() {
        // 2026-11-21 07:43:14 UTC
        let (time, date) = dos_date_time(1_795_246_994);
        assert_eq!(date >> 9, 2026 - 1980);
        assert_eq!((date >> 5) & 0xF, 11);
        assert_eq!(date & 0x1F, 21);
        assert_eq!(time >> 11, 7);
        assert_eq!((time >> 5) & 0x3F, 43);
        assert_eq!(dos_date_time(0), (0, (1 << 5) | 1));
    }

    #[test]
    fn the_zip_crate_reads_what_we_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.zip");
        let mut writer = ZipStreamWriter::new(File::create(&path).unwrap());
        let d = writer
            .begin_entry("sub", true, Compression::Zstd, 0o755, 1_700_000_000, 0)
            .unwrap();
        writer.end_entry(d, 0, 0).unwrap();
        let payload = b"hello, share".repeat(1000);
        let mut compressor =
            super::super::codec::ChunkCompressor::new(Compression::Zstd, 1).unwrap();
        let e = writer
            .begin_entry(
                "sub/a.img",
                false,
                Compression::Zstd,
                0o600,
                1_700_000_000,
                12_000,
            )
            .unwrap();
        writer
            .write_data(&compressor.compress(&payload[..5000], false).unwrap())
            .unwrap();
        writer
            .write_data(&compressor.compress(&payload[5000..], true).unwrap())
            .unwrap();
        writer
            .end_entry(e, crc32fast::hash(&payload), payload.len() as u64)
            .unwrap();
        writer.finish("test").unwrap();

        let mut archive = zip::ZipArchive::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(archive.len(), 2);
        assert!(archive.by_index(0).unwrap().is_dir());
        let mut file = archive.by_name("sub/a.img").unwrap();
        assert_eq!(file.unix_mode(), Some(0o100600));
        let mut content = Vec::new();
        file.read_to_end(&mut content).unwrap();
        assert_eq!(content, payload);
    }
}
