//! One conformance suite, run against every reader backend: whatever `open_reader` returns must
//! behave identically (bytes, validation, errors, stats).

use std::path::{Path, PathBuf};

use strata_storage::reader::{
    drop_page_cache, open_reader, open_reader_kind, probe_uring, ListReader, ReadRequest,
    ReaderKind, ReaderPreference,
};
use strata_storage::{StorageError, StorageResult, PAGE_SIZE};

/// Small deterministic generator so failures reproduce.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Whole pages plus a 24-byte tail, like a segment followed by its footer.
const PAGES: usize = 37;

fn write_test_file(dir: &Path, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut rng = SplitMix(seed);
    let data = rng.bytes(PAGES * PAGE_SIZE + 24);
    let path = dir.join(format!("data-{seed}.bin"));
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// `None` when io_uring cannot be used in this environment (printed, so a skip is visible).
fn uring_unavailable() -> Option<String> {
    match probe_uring() {
        Ok(()) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// How a test opens its reader: through a preference (with fallbacks) or an exact backend.
#[derive(Clone, Copy, Debug)]
enum Open {
    Pref(ReaderPreference),
    Exact(ReaderKind),
}

impl Open {
    fn open(self, path: &Path) -> StorageResult<Box<dyn ListReader>> {
        match self {
            Open::Pref(p) => open_reader(path, p),
            Open::Exact(k) => open_reader_kind(path, k),
        }
    }
}

fn expect_kind(how: Open, kind: ReaderKind) {
    let pref = match how {
        Open::Exact(k) => {
            assert_eq!(k, kind);
            return;
        }
        Open::Pref(p) => p,
    };
    let ok = match pref {
        ReaderPreference::Pread => kind == ReaderKind::Pread,
        ReaderPreference::Mmap => kind == ReaderKind::Mmap,
        ReaderPreference::Uring => {
            matches!(kind, ReaderKind::UringDirect | ReaderKind::UringBuffered)
        }
        ReaderPreference::Auto => {
            if uring_unavailable().is_some() {
                kind == ReaderKind::Pread
            } else {
                matches!(kind, ReaderKind::UringDirect | ReaderKind::UringBuffered)
            }
        }
    };
    assert!(ok, "preference {pref} gave reader {kind}");
}

fn check_batch(reader: &dyn ListReader, data: &[u8], reqs: &[ReadRequest]) {
    let bufs = reader
        .read_batch(reqs)
        .unwrap_or_else(|e| panic!("{}: {reqs:?}: {e}", reader.kind()));
    assert_eq!(bufs.len(), reqs.len());
    for (buf, r) in bufs.iter().zip(reqs) {
        assert_eq!(buf.len(), r.len);
        if r.len > 0 {
            assert_eq!(
                buf.as_ptr() as usize % PAGE_SIZE,
                0,
                "buffer not page-aligned"
            );
        }
        let start = r.offset as usize;
        assert!(
            buf.as_slice() == &data[start..start + r.len],
            "{}: wrong bytes for {r:?}",
            reader.kind()
        );
    }
}

fn random_batch(rng: &mut SplitMix, max_reqs: u64) -> Vec<ReadRequest> {
    let n = rng.below(max_reqs + 1) as usize;
    (0..n)
        .map(|_| {
            let page = rng.below(PAGES as u64);
            let max_pages = (PAGES as u64 - page).min(8);
            // Occasionally zero pages: an empty list is a legal request.
            let pages = rng.below(max_pages + 1);
            ReadRequest {
                offset: page * PAGE_SIZE as u64,
                len: pages as usize * PAGE_SIZE,
            }
        })
        .collect()
}

fn assert_invalid(reader: &dyn ListReader, reqs: &[ReadRequest], what: &str) {
    match reader.read_batch(reqs) {
        Err(StorageError::InvalidRequest { path, problem }) => {
            assert_eq!(path, reader.path(), "{what}");
            assert!(!problem.is_empty());
        }
        Err(e) => panic!(
            "{}: {what}: expected InvalidRequest, got {e}",
            reader.kind()
        ),
        Ok(_) => panic!("{}: {what}: expected an error", reader.kind()),
    }
}

fn conformance(how: Open, dir: &Path) {
    let (path, data) = write_test_file(dir, 7);
    let reader = how.open(&path).unwrap();
    let kind = reader.kind();
    println!("{how:?} on {} -> {kind}", dir.display());
    expect_kind(how, kind);
    assert_eq!(reader.path(), path);
    assert_eq!(reader.file_len(), data.len() as u64);
    assert_eq!(reader.stats().reads, 0);
    assert_eq!(reader.stats().bytes, 0);

    let mut reads = 0u64;
    let mut bytes = 0u64;
    let mut served = |reqs: &[ReadRequest]| {
        reads += reqs.len() as u64;
        bytes += reqs.iter().map(|r| r.len as u64).sum::<u64>();
        (reads, bytes)
    };

    // Empty batch.
    assert!(reader.read_batch(&[]).unwrap().is_empty());
    assert_eq!(reader.stats().reads, 0);

    // Random batches: unordered, overlapping, duplicated, some empty requests.
    let mut rng = SplitMix(99);
    for _ in 0..60 {
        let reqs = random_batch(&mut rng, 40);
        reader.prefetch(&reqs);
        check_batch(reader.as_ref(), &data, &reqs);
        let (r, b) = served(&reqs);
        assert_eq!(reader.stats().reads, r);
        assert_eq!(reader.stats().bytes, b);
    }

    // More requests than the io_uring queue depth, so the batch is submitted in several rounds.
    let big: Vec<ReadRequest> = (0..700)
        .map(|i| ReadRequest {
            offset: ((i * 13) % PAGES) as u64 * PAGE_SIZE as u64,
            len: PAGE_SIZE,
        })
        .collect();
    check_batch(reader.as_ref(), &data, &big);
    served(&big);

    // The whole aligned part of the file in one request, and the very last full page.
    let whole = [
        ReadRequest {
            offset: 0,
            len: PAGES * PAGE_SIZE,
        },
        ReadRequest {
            offset: ((PAGES - 1) * PAGE_SIZE) as u64,
            len: PAGE_SIZE,
        },
    ];
    check_batch(reader.as_ref(), &data, &whole);
    let (r, b) = served(&whole);

    // Invalid requests fail as a whole, name the file and count nothing.
    let good = ReadRequest {
        offset: 0,
        len: PAGE_SIZE,
    };
    let cases: [(&str, ReadRequest); 5] = [
        (
            "misaligned offset",
            ReadRequest {
                offset: 100,
                len: PAGE_SIZE,
            },
        ),
        (
            "misaligned length",
            ReadRequest {
                offset: 0,
                len: 100,
            },
        ),
        (
            "into the unaligned tail past the last page",
            ReadRequest {
                offset: (PAGES * PAGE_SIZE) as u64,
                len: PAGE_SIZE,
            },
        ),
        (
            "far past the end",
            ReadRequest {
                offset: 1 << 40,
                len: PAGE_SIZE,
            },
        ),
        (
            "offset + len overflows",
            ReadRequest {
                offset: u64::MAX - (PAGE_SIZE as u64 - 1),
                len: 2 * PAGE_SIZE,
            },
        ),
    ];
    for (what, bad) in cases {
        assert_invalid(reader.as_ref(), &[bad], what);
        assert_invalid(reader.as_ref(), &[good, bad, good], what);
    }
    assert_eq!(reader.stats().reads, r);
    assert_eq!(reader.stats().bytes, b);

    // Shared between threads: concurrent batches all get their own bytes.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let reader = reader.as_ref();
            let data = &data;
            s.spawn(move || {
                let mut rng = SplitMix(1000 + t);
                for _ in 0..20 {
                    check_batch(reader, data, &random_batch(&mut rng, 16));
                }
            });
        }
    });
    assert!(reader.stats().reads >= r);

    // Still fine after the page cache was dropped (cold reads).
    drop_page_cache(&path);
    check_batch(reader.as_ref(), &data, &whole);
}

/// A file that shrinks after open: reads past the new end are errors, never panics or zeros.
fn shrunk_file(how: Open, dir: &Path) {
    let (path, data) = write_test_file(dir, 11);
    let reader = how.open(&path).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len((4 * PAGE_SIZE) as u64).unwrap();
    drop(f);
    let ok = [ReadRequest {
        offset: 0,
        len: 4 * PAGE_SIZE,
    }];
    check_batch(reader.as_ref(), &data, &ok);
    let gone = [ReadRequest {
        offset: (10 * PAGE_SIZE) as u64,
        len: PAGE_SIZE,
    }];
    let err = reader.read_batch(&gone).unwrap_err();
    println!("{}: read past shrunk end: {err}", reader.kind());
    assert!(
        matches!(
            err,
            StorageError::Corrupt { .. } | StorageError::InvalidRequest { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&path.display().to_string()));
    assert!(
        err.to_string().contains(&(10 * PAGE_SIZE).to_string()),
        "{err}"
    );
    // The reader keeps working for what is still there.
    check_batch(reader.as_ref(), &data, &ok);
}

fn uring_or_skip(test: &str) -> bool {
    if let Some(reason) = uring_unavailable() {
        println!("SKIP {test}: io_uring unavailable here: {reason}");
        return false;
    }
    true
}

#[test]
fn conformance_auto() {
    let dir = tempfile::tempdir().unwrap();
    conformance(Open::Pref(ReaderPreference::Auto), dir.path());
}

#[test]
fn conformance_uring() {
    if !uring_or_skip("conformance_uring") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    conformance(Open::Pref(ReaderPreference::Uring), dir.path());
    shrunk_file(Open::Pref(ReaderPreference::Uring), dir.path());
}

/// Buffered io_uring, forced (Auto only picks it where O_DIRECT is refused).
#[test]
fn conformance_uring_buffered() {
    if !uring_or_skip("conformance_uring_buffered") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    conformance(Open::Exact(ReaderKind::UringBuffered), dir.path());
    shrunk_file(Open::Exact(ReaderKind::UringBuffered), dir.path());
}

/// io_uring + O_DIRECT, forced: skipped where the temp filesystem refuses O_DIRECT.
#[test]
fn conformance_uring_direct() {
    if !uring_or_skip("conformance_uring_direct") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (probe, _) = write_test_file(dir.path(), 1);
    if let Err(e) = open_reader_kind(&probe, ReaderKind::UringDirect) {
        println!("SKIP conformance_uring_direct: {e}");
        return;
    }
    conformance(Open::Exact(ReaderKind::UringDirect), dir.path());
    shrunk_file(Open::Exact(ReaderKind::UringDirect), dir.path());
}

/// tmpfs may refuse O_DIRECT, which exercises the buffered io_uring fallback.
#[test]
fn conformance_uring_tmpfs() {
    if !uring_or_skip("conformance_uring_tmpfs") {
        return;
    }
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        println!("SKIP conformance_uring_tmpfs: no /dev/shm");
        return;
    }
    let Ok(dir) = tempfile::tempdir_in(shm) else {
        println!("SKIP conformance_uring_tmpfs: /dev/shm not writable");
        return;
    };
    conformance(Open::Pref(ReaderPreference::Uring), dir.path());
    conformance(Open::Pref(ReaderPreference::Auto), dir.path());
    shrunk_file(Open::Pref(ReaderPreference::Uring), dir.path());
}

#[test]
fn conformance_pread() {
    let dir = tempfile::tempdir().unwrap();
    conformance(Open::Pref(ReaderPreference::Pread), dir.path());
    conformance(Open::Exact(ReaderKind::Pread), dir.path());
    shrunk_file(Open::Pref(ReaderPreference::Pread), dir.path());
}

#[test]
fn conformance_mmap() {
    let dir = tempfile::tempdir().unwrap();
    conformance(Open::Pref(ReaderPreference::Mmap), dir.path());
    conformance(Open::Exact(ReaderKind::Mmap), dir.path());
    // No shrunk-file check: truncating a mapped file is a SIGBUS by design of mmap.
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.bin");
    for pref in [
        ReaderPreference::Auto,
        ReaderPreference::Uring,
        ReaderPreference::Pread,
        ReaderPreference::Mmap,
    ] {
        match open_reader(&path, pref) {
            Err(StorageError::Io { path: p, .. }) => assert_eq!(p, path),
            Err(e) => panic!("{pref}: expected Io, got {e}"),
            Ok(r) => panic!("{pref}: opened a missing file as {}", r.kind()),
        }
    }
}

#[test]
fn empty_file_opens_and_rejects_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.bin");
    std::fs::write(&path, b"").unwrap();
    for pref in [
        ReaderPreference::Auto,
        ReaderPreference::Pread,
        ReaderPreference::Mmap,
    ] {
        let r = open_reader(&path, pref).unwrap();
        assert_eq!(r.file_len(), 0);
        assert!(r.read_batch(&[]).unwrap().is_empty());
        assert_invalid(
            r.as_ref(),
            &[ReadRequest {
                offset: 0,
                len: PAGE_SIZE,
            }],
            "read from an empty file",
        );
    }
}
