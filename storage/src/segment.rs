//! Segment files: posting lists laid end to end, each starting on a 4 KiB boundary and
//! zero-padded to the next one, followed by the 24-byte footer.
//!
//! Each list carries its own crc32 (kept by the caller in its [`ListLocation`]), so a read checks
//! just the lists it fetched; the footer's crc covers the whole payload for offline `verify`.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::aligned::AlignedBuf;
use crate::durable::AtomicFile;
use crate::footer::{self, FooterInfo, FOOTER_LEN};
use crate::reader::{
    open_reader, ListReader, ReadRequest, ReadStats, ReaderKind, ReaderPreference,
};
use crate::{StorageError, StorageResult, PAGE_SIZE};

pub const SEGMENT_MAGIC: [u8; 8] = *b"STRSEG\0\x01";
pub const SEGMENT_VERSION: u32 = 1;

/// Where a posting list lives in its segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListLocation {
    /// Start of the list, a multiple of PAGE_SIZE.
    pub offset: u64,
    /// Length of the list itself.
    pub len: u32,
    /// `len` rounded up to a multiple of PAGE_SIZE: what a read fetches.
    pub padded_len: u32,
    /// crc32 of the `len` bytes of the list.
    pub crc32: u32,
}

static ZEROS: [u8; PAGE_SIZE] = [0u8; PAGE_SIZE];

/// Writes a segment file; it appears at its path only when [`SegmentWriter::finish`] succeeds.
#[derive(Debug)]
pub struct SegmentWriter {
    path: PathBuf,
    file: AtomicFile,
    offset: u64,
    /// crc of the whole payload, kept as we go so finish needs no second pass.
    hasher: crc32fast::Hasher,
}

impl SegmentWriter {
    pub fn create(path: &Path) -> StorageResult<Self> {
        Ok(SegmentWriter {
            path: path.to_path_buf(),
            file: AtomicFile::create(path)?,
            offset: 0,
            hasher: crc32fast::Hasher::new(),
        })
    }

    /// Bytes of payload written so far (the offset the next list will get).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Appends one list at the current (page-aligned) offset and pads it to the next page.
    pub fn append(&mut self, blob: &[u8]) -> StorageResult<ListLocation> {
        let too_big = || StorageError::InvalidRequest {
            path: self.path.clone(),
            problem: format!(
                "posting list of {} bytes exceeds the 4 GiB limit",
                blob.len()
            ),
        };
        let len = u32::try_from(blob.len()).map_err(|_| too_big())?;
        let padded = blob.len().div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let padded_len = u32::try_from(padded).map_err(|_| too_big())?;
        let pad = &ZEROS[..padded - blob.len()];
        self.file.write_bytes(blob)?;
        self.file.write_bytes(pad)?;
        self.hasher.update(blob);
        self.hasher.update(pad);
        let loc = ListLocation {
            offset: self.offset,
            len,
            padded_len,
            crc32: footer::crc32(blob),
        };
        self.offset += padded as u64;
        Ok(loc)
    }

    /// Writes the footer and commits the file atomically; returns the file length.
    pub fn finish(mut self) -> StorageResult<u64> {
        let crc = self.hasher.clone().finalize();
        let f = footer::encode_footer_parts(SEGMENT_MAGIC, SEGMENT_VERSION, self.offset, crc);
        self.file.write_bytes(&f)?;
        self.file.commit()?;
        Ok(self.offset + FOOTER_LEN as u64)
    }
}

/// An open segment file: reads posting lists in batches through a [`ListReader`].
pub struct SegmentFile {
    reader: Box<dyn ListReader>,
    path: PathBuf,
    footer: FooterInfo,
}

impl std::fmt::Debug for SegmentFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentFile")
            .field("path", &self.path)
            .field("reader", &self.reader.kind())
            .field("footer", &self.footer)
            .finish()
    }
}

impl SegmentFile {
    /// Opens a segment: checks the footer's magic, version and length (not the payload crc:
    /// segments can be large; see [`SegmentFile::verify`]), then opens the reader.
    pub fn open(path: &Path, pref: ReaderPreference) -> StorageResult<Self> {
        // The footer is read with a plain pread: it is neither page-aligned nor page-sized, so
        // it cannot go through an O_DIRECT reader.
        let file = File::open(path).map_err(|e| StorageError::io(path, "open", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| StorageError::io(path, "stat", e))?
            .len();
        let tail_len = file_len.min(FOOTER_LEN as u64);
        let mut tail = [0u8; FOOTER_LEN];
        let tail = &mut tail[..tail_len as usize];
        file.read_exact_at(tail, file_len - tail_len)
            .map_err(|e| StorageError::io(path, "read footer", e))?;
        let info = footer::read_footer(path, tail, file_len, SEGMENT_MAGIC, SEGMENT_VERSION)?;
        if info.payload_len % PAGE_SIZE as u64 != 0 {
            return Err(StorageError::corrupt(
                path,
                format!(
                    "payload of {} bytes is not a whole number of {PAGE_SIZE}-byte pages",
                    info.payload_len
                ),
            ));
        }
        drop(file);
        let reader = open_reader(path, pref)?;
        if reader.file_len() != file_len {
            return Err(StorageError::corrupt(
                path,
                format!(
                    "file changed while opening: {file_len} bytes, then {}",
                    reader.file_len()
                ),
            ));
        }
        Ok(SegmentFile {
            reader,
            path: path.to_path_buf(),
            footer: info,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The reader behind this segment (for callers batching raw page reads themselves).
    pub fn reader(&self) -> &dyn ListReader {
        self.reader.as_ref()
    }

    pub fn reader_kind(&self) -> ReaderKind {
        self.reader.kind()
    }

    pub fn stats(&self) -> ReadStats {
        self.reader.stats()
    }

    /// Bytes of posting lists (everything before the footer).
    pub fn payload_len(&self) -> u64 {
        self.footer.payload_len
    }

    pub fn file_len(&self) -> u64 {
        self.reader.file_len()
    }

    /// Streams the whole payload and checks it against the footer's crc.
    pub fn verify(&self) -> StorageResult<()> {
        let file = File::open(&self.path).map_err(|e| StorageError::io(&self.path, "open", e))?;
        let mut rest = file.take(self.footer.payload_len);
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut seen = 0u64;
        loop {
            let n = match rest.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StorageError::io(&self.path, "read", e)),
            };
            hasher.update(&buf[..n]);
            seen += n as u64;
        }
        if seen != self.footer.payload_len {
            return Err(StorageError::corrupt(
                &self.path,
                format!(
                    "truncated: read {seen} of {} payload bytes",
                    self.footer.payload_len
                ),
            ));
        }
        let computed = hasher.finalize();
        if computed != self.footer.crc32 {
            return Err(StorageError::corrupt(
                &self.path,
                format!(
                    "checksum mismatch: stored {:#010x}, computed {computed:#010x}",
                    self.footer.crc32
                ),
            ));
        }
        Ok(())
    }

    fn requests(&self, locs: &[ListLocation]) -> StorageResult<Vec<ReadRequest>> {
        locs.iter()
            .map(|l| {
                if l.len > l.padded_len {
                    return Err(StorageError::InvalidRequest {
                        path: self.path.clone(),
                        problem: format!(
                            "list at offset {}: length {} exceeds its padded length {}",
                            l.offset, l.len, l.padded_len
                        ),
                    });
                }
                Ok(ReadRequest {
                    offset: l.offset,
                    len: l.padded_len as usize,
                })
            })
            .collect()
    }

    /// Reads the lists in one batch and checks each one's crc; each buffer's `len()` is the
    /// list's unpadded length.
    pub fn read_lists(&self, locs: &[ListLocation]) -> StorageResult<Vec<AlignedBuf>> {
        let reqs = self.requests(locs)?;
        let mut bufs = self.reader.read_batch(&reqs)?;
        for (buf, loc) in bufs.iter_mut().zip(locs) {
            buf.truncate(loc.len as usize);
            let computed = footer::crc32(buf);
            if computed != loc.crc32 {
                return Err(StorageError::corrupt(
                    &self.path,
                    format!(
                        "posting list at offset {} fails its checksum (stored {:#010x}, \
                         computed {computed:#010x})",
                        loc.offset, loc.crc32
                    ),
                ));
            }
        }
        Ok(bufs)
    }

    /// Hints that these lists will be read soon (a no-op for O_DIRECT readers).
    pub fn prefetch(&self, locs: &[ListLocation]) {
        if let Ok(reqs) = self.requests(locs) {
            self.reader.prefetch(&reqs);
        }
    }
}
