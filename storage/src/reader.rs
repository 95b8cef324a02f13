//! The SSD read path: posting lists are read in batches through one [`ListReader`] trait, backed by
//! io_uring (O_DIRECT where the filesystem allows it, buffered otherwise), plain `pread`, or `mmap`.
//!
//! io_uring + O_DIRECT is the fast path: a decode step's whole batch of lists goes to the device in
//! one submission, bypassing the page cache (strata's RAM tier is its own cache). Where io_uring is
//! unavailable (old kernels, seccomp, containers) `pread` is the portable fallback; `mmap` exists for
//! comparison and for small files.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use io_uring::{opcode, types, IoUring};

use crate::aligned::AlignedBuf;
use crate::{StorageError, StorageResult, PAGE_SIZE};

/// Which backend a reader actually uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReaderKind {
    UringDirect,
    UringBuffered,
    Pread,
    Mmap,
}

impl ReaderKind {
    fn bit(self) -> u8 {
        match self {
            ReaderKind::UringDirect => 1,
            ReaderKind::UringBuffered => 2,
            ReaderKind::Pread => 4,
            ReaderKind::Mmap => 8,
        }
    }
}

impl fmt::Display for ReaderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReaderKind::UringDirect => "io_uring+O_DIRECT",
            ReaderKind::UringBuffered => "io_uring",
            ReaderKind::Pread => "pread",
            ReaderKind::Mmap => "mmap",
        })
    }
}

/// What the caller asks for; [`open_reader`] turns it into a [`ReaderKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReaderPreference {
    /// io_uring + O_DIRECT, falling back to buffered io_uring, then to pread.
    #[default]
    Auto,
    /// io_uring (O_DIRECT where possible); an error if io_uring is unavailable.
    Uring,
    Pread,
    Mmap,
}

impl FromStr for ReaderPreference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(ReaderPreference::Auto),
            "uring" | "io_uring" => Ok(ReaderPreference::Uring),
            "pread" => Ok(ReaderPreference::Pread),
            "mmap" => Ok(ReaderPreference::Mmap),
            _ => Err(format!(
                "unknown reader {s:?}: expected auto, uring, pread or mmap"
            )),
        }
    }
}

impl fmt::Display for ReaderPreference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReaderPreference::Auto => "auto",
            ReaderPreference::Uring => "uring",
            ReaderPreference::Pread => "pread",
            ReaderPreference::Mmap => "mmap",
        })
    }
}

/// One read: `offset` and `len` are multiples of [`PAGE_SIZE`].
#[derive(Clone, Copy, Debug)]
pub struct ReadRequest {
    pub offset: u64,
    pub len: usize,
}

/// Cumulative requests served and bytes returned by one reader.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadStats {
    pub reads: u64,
    pub bytes: u64,
}

/// A file of page-aligned posting lists, read in batches.
pub trait ListReader: Send + Sync {
    fn kind(&self) -> ReaderKind;
    fn path(&self) -> &Path;
    fn file_len(&self) -> u64;
    /// Reads every request (one batch: io_uring submits them together); returns one buffer per
    /// request, in order.
    fn read_batch(&self, reqs: &[ReadRequest]) -> StorageResult<Vec<AlignedBuf>>;
    /// Hint that these ranges will be read soon (posix_fadvise WILLNEED / madvise).
    fn prefetch(&self, _reqs: &[ReadRequest]) {}
    /// Cumulative reads and bytes served by this reader.
    fn stats(&self) -> ReadStats;
}

/// Queue depth of each reader's ring: a decode step's batch usually fits in one submission.
const RING_DEPTH: u32 = 256;
/// Largest single read op; longer requests are split (the op length is a u32).
const MAX_OP_LEN: usize = 1 << 30;

/// Kinds whose choice was already logged in this process.
static LOGGED_KINDS: AtomicU8 = AtomicU8::new(0);
/// Fallback reasons already logged (bit 0: io_uring setup, bit 1: O_DIRECT refused).
static LOGGED_FALLBACKS: AtomicU8 = AtomicU8::new(0);

fn log_choice(kind: ReaderKind, path: &Path) {
    if LOGGED_KINDS.fetch_or(kind.bit(), Ordering::Relaxed) & kind.bit() == 0 {
        log::info!("segment reader: {kind} ({})", path.display());
    }
}

/// Logs a fallback reason once per process: every segment of a run hits the same reason.
fn log_fallback_once(bit: u8, msg: impl FnOnce() -> String) {
    if LOGGED_FALLBACKS.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
        log::warn!("{}", msg());
    }
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    bytes: AtomicU64,
}

impl Counters {
    fn add(&self, reqs: &[ReadRequest]) {
        let bytes: u64 = reqs.iter().map(|r| r.len as u64).sum();
        self.reads.fetch_add(reqs.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    fn get(&self) -> ReadStats {
        ReadStats {
            reads: self.reads.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

fn invalid(path: &Path, problem: String) -> StorageError {
    StorageError::InvalidRequest {
        path: path.to_path_buf(),
        problem,
    }
}

/// Every request must be page-aligned and lie within the file.
fn validate(path: &Path, file_len: u64, reqs: &[ReadRequest]) -> StorageResult<()> {
    for r in reqs {
        if r.offset % PAGE_SIZE as u64 != 0 || r.len % PAGE_SIZE != 0 {
            return Err(invalid(
                path,
                format!(
                    "read of {} bytes at offset {} is not aligned to {PAGE_SIZE} bytes",
                    r.len, r.offset
                ),
            ));
        }
        let end = r.offset.checked_add(r.len as u64);
        if end.is_none_or(|e| e > file_len) {
            return Err(invalid(
                path,
                format!(
                    "read of {} bytes at offset {} goes past the end of the file ({file_len} bytes)",
                    r.len, r.offset
                ),
            ));
        }
    }
    Ok(())
}

fn unexpected_eof(path: &Path, offset: u64, file_len: u64) -> StorageError {
    StorageError::corrupt(
        path,
        format!(
            "unexpected end of file reading offset {offset}: the file is shorter than the \
             {file_len} bytes it had when opened"
        ),
    )
}

/// Reads every request with pread into fresh aligned buffers (the pread backend, and the
/// io_uring backend's fallback after its ring failed).
fn pread_batch(
    file: &File,
    path: &Path,
    file_len: u64,
    reqs: &[ReadRequest],
) -> StorageResult<Vec<AlignedBuf>> {
    let mut out = Vec::with_capacity(reqs.len());
    for r in reqs {
        let mut buf = AlignedBuf::zeroed(r.len);
        file.read_exact_at(buf.as_mut_slice(), r.offset)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    unexpected_eof(path, r.offset, file_len)
                } else {
                    StorageError::io(path, "pread", e)
                }
            })?;
        out.push(buf);
    }
    Ok(out)
}

/// posix_fadvise on every request; advice only, errors ignored.
fn fadvise(file: &File, reqs: &[ReadRequest], advice: libc::c_int) {
    for r in reqs {
        // SAFETY: posix_fadvise only reads its integer arguments; the fd is open for `file`'s
        // lifetime, and a bad range just yields an error code, which we ignore.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                r.offset as libc::off_t,
                r.len as libc::off_t,
                advice,
            );
        }
    }
}

fn open_plain(path: &Path) -> StorageResult<(File, u64)> {
    let file = File::open(path).map_err(|e| StorageError::io(path, "open", e))?;
    let len = file
        .metadata()
        .map_err(|e| StorageError::io(path, "stat", e))?
        .len();
    Ok((file, len))
}

// ---------------------------------------------------------------------------------------------
// pread

struct PreadReader {
    path: PathBuf,
    file: File,
    file_len: u64,
    stats: Counters,
}

impl ListReader for PreadReader {
    fn kind(&self) -> ReaderKind {
        ReaderKind::Pread
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn file_len(&self) -> u64 {
        self.file_len
    }
    fn read_batch(&self, reqs: &[ReadRequest]) -> StorageResult<Vec<AlignedBuf>> {
        validate(&self.path, self.file_len, reqs)?;
        let out = pread_batch(&self.file, &self.path, self.file_len, reqs)?;
        self.stats.add(reqs);
        Ok(out)
    }
    fn prefetch(&self, reqs: &[ReadRequest]) {
        fadvise(&self.file, reqs, libc::POSIX_FADV_WILLNEED);
    }
    fn stats(&self) -> ReadStats {
        self.stats.get()
    }
}

// ---------------------------------------------------------------------------------------------
// mmap

struct MmapReader {
    path: PathBuf,
    map: memmap2::Mmap,
    stats: Counters,
}

impl ListReader for MmapReader {
    fn kind(&self) -> ReaderKind {
        ReaderKind::Mmap
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn file_len(&self) -> u64 {
        self.map.len() as u64
    }
    fn read_batch(&self, reqs: &[ReadRequest]) -> StorageResult<Vec<AlignedBuf>> {
        validate(&self.path, self.file_len(), reqs)?;
        let out = reqs
            .iter()
            .map(|r| {
                let start = r.offset as usize;
                AlignedBuf::from_slice(&self.map[start..start + r.len])
            })
            .collect();
        self.stats.add(reqs);
        Ok(out)
    }
    fn prefetch(&self, reqs: &[ReadRequest]) {
        for r in reqs {
            let _ = self
                .map
                .advise_range(memmap2::Advice::WillNeed, r.offset as usize, r.len);
        }
    }
    fn stats(&self) -> ReadStats {
        self.stats.get()
    }
}

// ---------------------------------------------------------------------------------------------
// io_uring

struct UringReader {
    path: PathBuf,
    file: File,
    file_len: u64,
    direct: bool,
    /// `None` once the ring failed in a way that leaves reads in flight; the reader then serves
    /// batches with pread on the same file.
    ring: Mutex<Option<IoUring>>,
    stats: Counters,
}

/// How a batch on the ring failed.
enum RingFailure {
    /// Every op completed; the buffers may be freed and the ring reused.
    Clean(StorageError),
    /// The kernel may still write into the buffers: leak them and retire the ring.
    Broken(StorageError),
}

impl UringReader {
    fn run_ring(
        &self,
        ring: &mut IoUring,
        reqs: &[ReadRequest],
        bufs: &mut [AlignedBuf],
    ) -> Result<(), RingFailure> {
        let fd = types::Fd(self.file.as_raw_fd());
        // Base pointers taken once: after this the buffers are only touched by the kernel until
        // every op has completed.
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        let mut done = vec![0usize; reqs.len()];
        let mut pending: VecDeque<usize> = (0..reqs.len()).filter(|&i| reqs[i].len > 0).collect();
        let depth = ring.params().sq_entries() as usize;
        let mut in_flight = 0usize;
        let mut first_err: Option<StorageError> = None;
        let mut busy_retries = 0u32;

        loop {
            if first_err.is_none() {
                let mut sq = ring.submission();
                while in_flight < depth {
                    let Some(i) = pending.pop_front() else { break };
                    let r = reqs[i];
                    let chunk = (r.len - done[i]).min(MAX_OP_LEN) as u32;
                    // In bounds: done[i] < r.len <= the buffer's length.
                    let dst = ptrs[i].wrapping_add(done[i]);
                    let entry = opcode::Read::new(fd, dst, chunk)
                        .offset(r.offset + done[i] as u64)
                        .build()
                        .user_data(i as u64);
                    // SAFETY: dst points at `chunk` writable bytes of bufs[i], which outlives the
                    // op: we return only after every pushed op completed, or leak the buffers
                    // (RingFailure::Broken). At most one op per buffer is in flight, and the fd
                    // stays open for self's lifetime.
                    if unsafe { sq.push(&entry) }.is_err() {
                        pending.push_front(i);
                        break;
                    }
                    in_flight += 1;
                }
            }
            if in_flight == 0 {
                break;
            }
            let want = if pending.is_empty() || first_err.is_some() {
                in_flight
            } else {
                1
            };
            if let Err(e) = ring.submit_and_wait(want) {
                let retry = matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                );
                busy_retries += 1;
                if !retry || busy_retries > 10_000 {
                    return Err(RingFailure::Broken(StorageError::io(
                        &self.path,
                        "io_uring submit",
                        e,
                    )));
                }
                if e.raw_os_error() != Some(libc::EINTR) {
                    std::thread::yield_now();
                }
            }
            for cqe in ring.completion() {
                let i = cqe.user_data() as usize;
                if i >= reqs.len() {
                    continue; // not ours; cannot happen as each batch drains its ops
                }
                in_flight -= 1;
                let res = cqe.result();
                let r = reqs[i];
                if res < 0 {
                    let errno = -res;
                    if errno == libc::EINTR || errno == libc::EAGAIN {
                        pending.push_back(i);
                    } else if first_err.is_none() {
                        first_err = Some(StorageError::io(
                            &self.path,
                            "io_uring read",
                            std::io::Error::from_raw_os_error(errno),
                        ));
                    }
                } else if res == 0 {
                    if first_err.is_none() {
                        first_err = Some(unexpected_eof(
                            &self.path,
                            r.offset + done[i] as u64,
                            self.file_len,
                        ));
                    }
                } else {
                    // Short reads (signals, page-cache misses on buffered reads) resume where
                    // they stopped.
                    done[i] += res as usize;
                    if done[i] < r.len {
                        pending.push_back(i);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(RingFailure::Clean(e)),
            None => Ok(()),
        }
    }
}

impl ListReader for UringReader {
    fn kind(&self) -> ReaderKind {
        if self.direct {
            ReaderKind::UringDirect
        } else {
            ReaderKind::UringBuffered
        }
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn file_len(&self) -> u64 {
        self.file_len
    }
    fn read_batch(&self, reqs: &[ReadRequest]) -> StorageResult<Vec<AlignedBuf>> {
        validate(&self.path, self.file_len, reqs)?;
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut guard = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ring) = guard.as_mut() else {
            drop(guard);
            let out = pread_batch(&self.file, &self.path, self.file_len, reqs)?;
            self.stats.add(reqs);
            return Ok(out);
        };
        let mut bufs: Vec<AlignedBuf> = reqs.iter().map(|r| AlignedBuf::zeroed(r.len)).collect();
        match self.run_ring(ring, reqs, &mut bufs) {
            Ok(()) => {
                self.stats.add(reqs);
                Ok(bufs)
            }
            Err(RingFailure::Clean(e)) => Err(e),
            Err(RingFailure::Broken(e)) => {
                // Reads may still land in these buffers: never free them.
                std::mem::forget(bufs);
                *guard = None;
                log::warn!(
                    "{}: io_uring failed ({e}); this reader continues with pread",
                    self.path.display()
                );
                Err(e)
            }
        }
    }
    fn prefetch(&self, reqs: &[ReadRequest]) {
        // O_DIRECT reads bypass the page cache, so warming it would only waste memory.
        if !self.direct {
            fadvise(&self.file, reqs, libc::POSIX_FADV_WILLNEED);
        }
    }
    fn stats(&self) -> ReadStats {
        self.stats.get()
    }
}

/// Checks that this process may create an io_uring ring (kernel support, seccomp, sysctl).
pub fn probe_uring() -> std::io::Result<()> {
    IoUring::new(2).map(drop)
}

/// Wraps an open file in an io_uring reader; the error is the ring setup failure.
fn uring_reader(
    path: &Path,
    file: File,
    direct: bool,
) -> StorageResult<std::io::Result<UringReader>> {
    let file_len = file
        .metadata()
        .map_err(|e| StorageError::io(path, "stat", e))?
        .len();
    Ok(IoUring::new(RING_DEPTH).map(|ring| UringReader {
        path: path.to_path_buf(),
        file,
        file_len,
        direct,
        ring: Mutex::new(Some(ring)),
        stats: Counters::default(),
    }))
}

fn open_direct(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Some filesystems accept O_DIRECT at open but fail the reads: probe the first page.
fn direct_reads_work(file: &File) -> bool {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    len < PAGE_SIZE as u64 || {
        let mut probe = AlignedBuf::zeroed(PAGE_SIZE);
        file.read_exact_at(probe.as_mut_slice(), 0).is_ok()
    }
}

/// Opens `path` for io_uring: O_DIRECT if the filesystem takes it, buffered otherwise. Errors
/// other than "O_DIRECT not supported" (missing file, permissions) are returned as they are.
fn open_uring(path: &Path) -> StorageResult<std::io::Result<UringReader>> {
    let direct_file = match open_direct(path) {
        Ok(f) if direct_reads_work(&f) => Some(f),
        Ok(_) => {
            log_fallback_once(2, || {
                format!(
                    "{}: O_DIRECT reads fail on this filesystem; io_uring reads go through \
                     the page cache",
                    path.display()
                )
            });
            None
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            log_fallback_once(2, || {
                format!(
                    "{}: the filesystem refuses O_DIRECT; io_uring reads go through the page cache",
                    path.display()
                )
            });
            None
        }
        Err(e) => return Err(StorageError::io(path, "open (O_DIRECT)", e)),
    };
    match direct_file {
        Some(f) => uring_reader(path, f, true),
        None => uring_reader(path, open_plain(path)?.0, false),
    }
}

/// Opens exactly the backend `kind`, with no fallback (for benchmarks and tests that compare
/// backends); an error if this machine or filesystem cannot provide it.
pub fn open_reader_kind(path: &Path, kind: ReaderKind) -> StorageResult<Box<dyn ListReader>> {
    let reader: Box<dyn ListReader> = match kind {
        ReaderKind::UringDirect => {
            let f = open_direct(path).map_err(|e| StorageError::io(path, "open (O_DIRECT)", e))?;
            if !direct_reads_work(&f) {
                return Err(StorageError::io(
                    path,
                    "read (O_DIRECT)",
                    std::io::Error::from_raw_os_error(libc::EINVAL),
                ));
            }
            let r = uring_reader(path, f, true)?
                .map_err(|e| StorageError::io(path, "io_uring setup", e))?;
            Box::new(r)
        }
        ReaderKind::UringBuffered => {
            let r = uring_reader(path, open_plain(path)?.0, false)?
                .map_err(|e| StorageError::io(path, "io_uring setup", e))?;
            Box::new(r)
        }
        ReaderKind::Pread => open_pread(path)?,
        ReaderKind::Mmap => open_mmap(path)?,
    };
    log_choice(reader.kind(), path);
    Ok(reader)
}

/// Opens a reader for `path` following `pref` (see [`ReaderPreference`]).
pub fn open_reader(path: &Path, pref: ReaderPreference) -> StorageResult<Box<dyn ListReader>> {
    let reader: Box<dyn ListReader> = match pref {
        ReaderPreference::Auto | ReaderPreference::Uring => match open_uring(path)? {
            Ok(r) => Box::new(r),
            Err(e) if pref == ReaderPreference::Uring => {
                return Err(StorageError::io(path, "io_uring setup", e));
            }
            Err(e) => {
                log_fallback_once(1, || {
                    format!("io_uring unavailable ({e}); segment reads fall back to pread")
                });
                open_pread(path)?
            }
        },
        ReaderPreference::Pread => open_pread(path)?,
        ReaderPreference::Mmap => open_mmap(path)?,
    };
    log_choice(reader.kind(), path);
    Ok(reader)
}

fn open_mmap(path: &Path) -> StorageResult<Box<dyn ListReader>> {
    let (file, _) = open_plain(path)?;
    // SAFETY: strata files are written once (atomic rename) and never modified in place, so the
    // mapping's bytes do not change under us. Truncating the file from outside would be a
    // SIGBUS, as for any mmap user.
    let map =
        unsafe { memmap2::Mmap::map(&file) }.map_err(|e| StorageError::io(path, "mmap", e))?;
    Ok(Box::new(MmapReader {
        path: path.to_path_buf(),
        map,
        stats: Counters::default(),
    }))
}

fn open_pread(path: &Path) -> StorageResult<Box<dyn ListReader>> {
    let (file, file_len) = open_plain(path)?;
    Ok(Box::new(PreadReader {
        path: path.to_path_buf(),
        file,
        file_len,
        stats: Counters::default(),
    }))
}

/// Best effort: evicts `path` from the page cache so the next reads come from the device
/// (cold-cache measurements). Dirty pages are not dropped, so the file is synced first.
pub fn drop_page_cache(path: &Path) {
    let Ok(file) = File::open(path) else { return };
    let _ = file.sync_data();
    fadvise(
        &file,
        &[ReadRequest { offset: 0, len: 0 }],
        libc::POSIX_FADV_DONTNEED,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (s, p) in [
            ("auto", ReaderPreference::Auto),
            ("uring", ReaderPreference::Uring),
            ("pread", ReaderPreference::Pread),
            ("mmap", ReaderPreference::Mmap),
        ] {
            assert_eq!(s.parse::<ReaderPreference>().unwrap(), p);
            assert_eq!(p.to_string(), s);
        }
        assert!("nvme".parse::<ReaderPreference>().is_err());
        assert_eq!(ReaderKind::UringDirect.to_string(), "io_uring+O_DIRECT");
        assert_eq!(ReaderKind::UringBuffered.to_string(), "io_uring");
        assert_eq!(ReaderKind::Pread.to_string(), "pread");
        assert_eq!(ReaderKind::Mmap.to_string(), "mmap");
    }
}
