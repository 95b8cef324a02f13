//! Atomic durable writes: write a temp file next to the target, fsync it, rename it over the
//! target, fsync the folder. A reader sees either the old file or the whole new one, never a torn
//! one, and after `commit` returns the new file survives a crash.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{StorageError, StorageResult};

/// Distinguishes temp files of concurrent writers in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Big enough that segment appends turn into few syscalls.
const WRITE_BUFFER: usize = 1 << 20;

/// A file being written; it appears at its final path only on [`AtomicFile::commit`].
/// Dropping it without committing removes the temp file.
#[derive(Debug)]
pub struct AtomicFile {
    final_path: PathBuf,
    temp_path: PathBuf,
    /// `None` only after commit or while dropping.
    writer: Option<BufWriter<File>>,
    written: u64,
    /// Set once a write failed: the buffered state is then unknown, so commit must refuse.
    failed: Option<std::io::ErrorKind>,
}

/// The folder a path lives in; a bare file name lives in ".".
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

impl AtomicFile {
    /// Starts writing `final_path` through a temp file `.{file_name}.tmp-{pid}-{counter}` in the
    /// same folder (same filesystem, so the final rename is atomic).
    pub fn create(final_path: &Path) -> StorageResult<AtomicFile> {
        let file_name = final_path
            .file_name()
            .ok_or_else(|| StorageError::InvalidRequest {
                path: final_path.to_path_buf(),
                problem: "atomic write target has no file name".into(),
            })?;
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(file_name);
        temp_name.push(format!(".tmp-{}-{n}", std::process::id()));
        let temp_path = parent_dir(final_path).join(temp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
            .map_err(|e| StorageError::io(final_path, "create temp file", e))?;
        Ok(AtomicFile {
            final_path: final_path.to_path_buf(),
            temp_path,
            writer: Some(BufWriter::with_capacity(WRITE_BUFFER, file)),
            written: 0,
            failed: None,
        })
    }

    /// The path the file will have once committed.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Bytes accepted so far (buffered or written).
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Like `write_all`, with the error mapped to a [`StorageError`] naming the final path.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> StorageResult<()> {
        self.write_all(bytes)
            .map_err(|e| StorageError::io(&self.final_path, "write", e))
    }

    /// Flushes, fsyncs, renames over the final path and fsyncs the folder.
    pub fn commit(mut self) -> StorageResult<()> {
        let path = self.final_path.clone();
        if let Some(kind) = self.failed {
            // Drop removes the temp file.
            return Err(StorageError::io(
                &path,
                "commit after a failed write",
                std::io::Error::from(kind),
            ));
        }
        let writer = self.writer.take().expect("writer present until commit");
        let file = match writer.into_inner() {
            Ok(f) => f,
            Err(e) => {
                let err = e.into_error();
                let _ = std::fs::remove_file(&self.temp_path);
                return Err(StorageError::io(&path, "flush", err));
            }
        };
        if let Err(e) = file.sync_all() {
            let _ = std::fs::remove_file(&self.temp_path);
            return Err(StorageError::io(&path, "fsync", e));
        }
        drop(file);
        if let Err(e) = std::fs::rename(&self.temp_path, &path) {
            let _ = std::fs::remove_file(&self.temp_path);
            return Err(StorageError::io(&path, "rename temp file into place", e));
        }
        // Named after the file, not the folder: the caller asked for the file.
        File::open(parent_dir(&path))
            .and_then(|d| d.sync_all())
            .map_err(|e| StorageError::io(&path, "fsync parent folder", e))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(w) = self.writer.as_mut() else {
            return Err(std::io::Error::other("atomic file already committed"));
        };
        match w.write(buf) {
            Ok(n) => {
                self.written += n as u64;
                Ok(n)
            }
            Err(e) => {
                self.failed = Some(e.kind());
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let Some(w) = self.writer.as_mut() else {
            return Ok(());
        };
        w.flush().inspect_err(|e| self.failed = Some(e.kind()))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            // into_parts drops the buffered bytes instead of flushing them: nothing of an
            // abandoned file should reach the disk.
            let (file, _unflushed) = w.into_parts();
            drop(file);
            let _ = std::fs::remove_file(&self.temp_path);
        }
    }
}

/// Writes `bytes` to `path` atomically and durably.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> StorageResult<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_bytes(bytes)?;
    f.commit()
}

/// fsyncs a folder so that a rename or create inside it is durable.
pub fn fsync_dir(dir: &Path) -> StorageResult<()> {
    let d = File::open(dir).map_err(|e| StorageError::io(dir, "open folder for fsync", e))?;
    d.sync_all()
        .map_err(|e| StorageError::io(dir, "fsync folder", e))
}
