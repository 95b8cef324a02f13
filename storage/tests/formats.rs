//! Footer, segment and durable-write behaviour on real files.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use strata_storage::durable::{atomic_write, fsync_dir, AtomicFile};
use strata_storage::footer::{self, check_whole, encode_footer, read_footer, FOOTER_LEN};
use strata_storage::reader::{ReaderKind, ReaderPreference};
use strata_storage::segment::{
    ListLocation, SegmentFile, SegmentWriter, SEGMENT_MAGIC, SEGMENT_VERSION,
};
use strata_storage::{StorageError, PAGE_SIZE};

const ALL_PREFS: [ReaderPreference; 4] = [
    ReaderPreference::Auto,
    ReaderPreference::Uring,
    ReaderPreference::Pread,
    ReaderPreference::Mmap,
];

/// Opens with every preference this machine supports (explicit io_uring may be unavailable).
fn open_all(path: &Path) -> Vec<SegmentFile> {
    ALL_PREFS
        .iter()
        .filter_map(|&p| match SegmentFile::open(path, p) {
            Ok(s) => Some(s),
            Err(e) if p == ReaderPreference::Uring => {
                println!("SKIP uring: {e}");
                None
            }
            Err(e) => panic!("{p}: {e}"),
        })
        .collect()
}

fn write_segment(path: &Path, blobs: &[Vec<u8>]) -> (Vec<ListLocation>, u64) {
    let mut w = SegmentWriter::create(path).unwrap();
    let locs: Vec<ListLocation> = blobs.iter().map(|b| w.append(b).unwrap()).collect();
    let len = w.finish().unwrap();
    (locs, len)
}

fn blob(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

fn sample_blobs() -> Vec<Vec<u8>> {
    vec![
        blob(1, 5000),
        blob(2, 1),
        blob(3, 4096),
        Vec::new(),
        blob(4, 12_345),
        blob(5, 4097),
    ]
}

fn check_locations(blobs: &[Vec<u8>], locs: &[ListLocation], file_len: u64) {
    let mut expect_offset = 0u64;
    for (b, l) in blobs.iter().zip(locs) {
        assert_eq!(l.offset, expect_offset, "lists are laid end to end");
        assert_eq!(l.offset % PAGE_SIZE as u64, 0);
        assert_eq!(l.len as usize, b.len());
        assert_eq!(l.padded_len as usize % PAGE_SIZE, 0);
        assert!(l.padded_len >= l.len && (l.padded_len - l.len) < PAGE_SIZE as u32);
        assert_eq!(l.crc32, footer::crc32(b));
        expect_offset += l.padded_len as u64;
    }
    assert_eq!(file_len, expect_offset + FOOTER_LEN as u64);
}

fn single_file_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// footer

#[test]
fn footer_round_trip_and_errors() {
    let p = Path::new("/x/file.strata");
    let magic = *b"STRTEST\x01";
    let payload = blob(9, 1000);
    let mut file = payload.clone();
    file.extend_from_slice(&encode_footer(magic, 4, &payload));
    assert_eq!(file.len(), payload.len() + FOOTER_LEN);
    assert_eq!(check_whole(p, &file, magic, 4).unwrap(), &payload[..]);
    let info = read_footer(
        p,
        &file[file.len() - FOOTER_LEN..],
        file.len() as u64,
        magic,
        4,
    )
    .unwrap();
    assert_eq!(info.payload_len, 1000);
    assert_eq!(info.crc32, footer::crc32(&payload));
    assert_eq!(info.version, 4);

    let err = check_whole(p, &file[..10], magic, 4).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }));
    assert!(
        err.to_string()
            .contains("truncated: 10 bytes, shorter than the 24-byte footer"),
        "{err}"
    );
    assert!(err.to_string().contains("/x/file.strata"));

    let err = check_whole(p, &file, *b"OTHER\0\0\x01", 4).unwrap_err();
    assert!(err.to_string().contains("bad magic"), "{err}");
    assert!(err.to_string().contains("not a OTHER file"), "{err}");

    match check_whole(p, &file, magic, 3) {
        Err(StorageError::Version {
            found, supported, ..
        }) => assert_eq!((found, supported), (4, 3)),
        other => panic!("expected Version, got {other:?}"),
    }

    let mut extended = payload.clone();
    extended.push(0);
    extended.extend_from_slice(&encode_footer(magic, 4, &payload));
    let err = check_whole(p, &extended, magic, 4).unwrap_err();
    assert!(err.to_string().contains("truncated or extended"), "{err}");

    let mut flipped = file.clone();
    flipped[500] ^= 0x40;
    let err = check_whole(p, &flipped, magic, 4).unwrap_err();
    assert!(
        err.to_string().contains("checksum mismatch: stored"),
        "{err}"
    );

    // Empty payload is legal.
    let only_footer = encode_footer(magic, 4, b"");
    assert!(check_whole(p, &only_footer, magic, 4).unwrap().is_empty());
    // A huge payload_len must not overflow.
    let mut lying = only_footer;
    lying[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(check_whole(p, &lying, magic, 4).is_err());
}

// ---------------------------------------------------------------------------------------------
// segments

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn segment_round_trip(blobs in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 0..10_000), 0..12)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg.strseg");
        let (locs, file_len) = write_segment(&path, &blobs);
        check_locations(&blobs, &locs, file_len);
        prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), file_len);
        let seg = SegmentFile::open(&path, ReaderPreference::Pread).unwrap();
        seg.verify().unwrap();
        prop_assert_eq!(seg.file_len(), file_len);
        let got = seg.read_lists(&locs).unwrap();
        prop_assert_eq!(got.len(), blobs.len());
        for (g, b) in got.iter().zip(&blobs) {
            prop_assert_eq!(g.as_slice(), &b[..]);
        }
        // Any subset, in any order.
        let rev: Vec<ListLocation> = locs.iter().rev().step_by(2).copied().collect();
        let got = seg.read_lists(&rev).unwrap();
        for (g, l) in got.iter().zip(&rev) {
            let i = locs.iter().position(|x| x == l).unwrap();
            prop_assert_eq!(g.as_slice(), &blobs[i][..]);
        }
    }
}

#[test]
fn segment_round_trip_every_reader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg.strseg");
    let blobs = sample_blobs();
    let (locs, file_len) = write_segment(&path, &blobs);
    check_locations(&blobs, &locs, file_len);
    for seg in open_all(&path) {
        println!("{} -> {}", path.display(), seg.reader_kind());
        assert_eq!(seg.path(), path);
        assert_eq!(seg.payload_len() + FOOTER_LEN as u64, file_len);
        seg.verify().unwrap();
        seg.prefetch(&locs);
        let got = seg.read_lists(&locs).unwrap();
        for (g, b) in got.iter().zip(&blobs) {
            assert_eq!(g.as_slice(), &b[..], "{}", seg.reader_kind());
        }
        let st = seg.stats();
        assert_eq!(st.reads, locs.len() as u64);
        assert_eq!(
            st.bytes,
            locs.iter().map(|l| l.padded_len as u64).sum::<u64>()
        );
        assert!(seg.read_lists(&[]).unwrap().is_empty());
    }
}

#[test]
fn empty_segment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.strseg");
    let (locs, len) = write_segment(&path, &[]);
    assert!(locs.is_empty());
    assert_eq!(len, FOOTER_LEN as u64);
    for seg in open_all(&path) {
        seg.verify().unwrap();
        assert_eq!(seg.payload_len(), 0);
    }
}

#[test]
fn truncated_or_extended_segment_rejected_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.strseg");
    let (_, file_len) = write_segment(&good, &sample_blobs());
    let bytes = std::fs::read(&good).unwrap();
    let cut = |n: u64| bytes[..(file_len - n) as usize].to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("one byte short", cut(1)),
        ("one page short", cut(PAGE_SIZE as u64)),
        ("footer cut away", cut(FOOTER_LEN as u64)),
        ("ten bytes left", bytes[..10].to_vec()),
        ("empty", Vec::new()),
        ("one byte extra", {
            let mut b = bytes.clone();
            b.push(0);
            b
        }),
        ("a page inserted", {
            let mut b = bytes.clone();
            b.splice(0..0, std::iter::repeat_n(0u8, PAGE_SIZE));
            b
        }),
    ];
    for (what, content) in cases {
        let path = dir.path().join("bad.strseg");
        std::fs::write(&path, &content).unwrap();
        for pref in ALL_PREFS {
            match SegmentFile::open(&path, pref) {
                Err(StorageError::Corrupt { path: p, problem }) => {
                    assert_eq!(p, path);
                    println!("{what}: {problem}");
                }
                Err(e) => panic!("{what}: expected Corrupt, got {e}"),
                Ok(_) => panic!("{what}: opened a damaged segment with {pref}"),
            }
        }
    }
    let err = SegmentFile::open(&dir.path().join("bad.strseg"), ReaderPreference::Pread);
    assert!(matches!(err, Err(StorageError::Corrupt { .. })));
    std::fs::write(dir.path().join("tiny.strseg"), [1, 2, 3]).unwrap();
    let err = SegmentFile::open(&dir.path().join("tiny.strseg"), ReaderPreference::Auto)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated: 3 bytes"), "{err}");
}

#[test]
fn flipped_byte_inside_a_list_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg.strseg");
    let blobs = sample_blobs();
    let (locs, _) = write_segment(&path, &blobs);
    let victim = locs[4]; // blob(4, 12_345): spans several pages
    let pos = victim.offset + 9000;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, pos).unwrap();
    f.write_all_at(&[byte[0] ^ 0x01], pos).unwrap();
    f.sync_all().unwrap();
    drop(f);

    for seg in open_all(&path) {
        let kind = seg.reader_kind();
        // Opening only checks the footer, so the damage shows up on read and verify.
        let err = seg.read_lists(&locs).unwrap_err();
        match &err {
            StorageError::Corrupt { path: p, problem } => {
                assert_eq!(p, &path);
                assert!(
                    problem.contains(&format!(
                        "posting list at offset {} fails its checksum",
                        victim.offset
                    )),
                    "{kind}: {problem}"
                );
            }
            e => panic!("{kind}: expected Corrupt, got {e}"),
        }
        // Undamaged lists still read fine.
        let others: Vec<ListLocation> = locs.iter().copied().filter(|l| *l != victim).collect();
        assert!(seg.read_lists(&others).is_ok(), "{kind}");
        let err = seg.verify().unwrap_err();
        assert!(
            matches!(&err, StorageError::Corrupt { problem, .. } if problem.contains("checksum mismatch")),
            "{kind}: {err}"
        );
    }
}

#[test]
fn flipped_padding_byte_fails_verify_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg.strseg");
    let blobs = sample_blobs();
    let (locs, _) = write_segment(&path, &blobs);
    let pos = locs[0].offset + locs[0].len as u64 + 10; // in list 0's padding
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xFF], pos).unwrap();
    drop(f);
    let seg = SegmentFile::open(&path, ReaderPreference::Pread).unwrap();
    assert!(seg.read_lists(&locs).is_ok());
    assert!(seg.verify().is_err());
}

#[test]
fn bad_magic_and_future_version_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg.strseg");
    let (_, file_len) = write_segment(&path, &sample_blobs());
    let footer_at = file_len - FOOTER_LEN as u64;

    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"NOTASEG!", footer_at + 16).unwrap();
    for pref in ALL_PREFS {
        let err = SegmentFile::open(&path, pref).unwrap_err();
        assert!(
            matches!(&err, StorageError::Corrupt { problem, .. } if problem.contains("bad magic")),
            "{err}"
        );
        assert!(err.to_string().contains("not a STRSEG file"), "{err}");
    }

    f.write_all_at(&SEGMENT_MAGIC, footer_at + 16).unwrap();
    f.write_all_at(&(SEGMENT_VERSION + 1).to_le_bytes(), footer_at + 12)
        .unwrap();
    drop(f);
    for pref in ALL_PREFS {
        match SegmentFile::open(&path, pref) {
            Err(StorageError::Version {
                path: p,
                found,
                supported,
                ..
            }) => {
                assert_eq!(p, path);
                assert_eq!(found, SEGMENT_VERSION + 1);
                assert_eq!(supported, SEGMENT_VERSION);
            }
            Err(e) => panic!("expected Version, got {e}"),
            Ok(_) => panic!("opened a future-version segment"),
        }
    }
}

#[test]
fn invalid_locations_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg.strseg");
    let (locs, _) = write_segment(&path, &sample_blobs());
    for seg in open_all(&path) {
        let mut l = locs[0];
        l.len = l.padded_len + 1;
        assert!(matches!(
            seg.read_lists(&[l]),
            Err(StorageError::InvalidRequest { .. })
        ));
        let mut l = locs[0];
        l.offset += 1;
        assert!(matches!(
            seg.read_lists(&[l]),
            Err(StorageError::InvalidRequest { .. })
        ));
        let mut l = locs[0];
        l.offset = seg.payload_len();
        assert!(seg.read_lists(&[l]).is_err());
    }
}

#[test]
fn unfinished_segment_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg.strseg");
    let mut w = SegmentWriter::create(&path).unwrap();
    w.append(&blob(1, 10_000)).unwrap();
    drop(w);
    assert!(single_file_in(dir.path()).is_empty());
}

#[test]
fn segment_reader_kind_on_this_machine() {
    // Informational: which reader Auto picks on the temp dir and on the target dir.
    let mut dirs = vec![tempfile::tempdir().unwrap()];
    if let Ok(d) = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")) {
        dirs.push(d);
    }
    for d in &dirs {
        let path = d.path().join("seg.strseg");
        write_segment(&path, &sample_blobs());
        let seg = SegmentFile::open(&path, ReaderPreference::Auto).unwrap();
        println!("Auto on {}: {}", d.path().display(), seg.reader_kind());
        assert_ne!(seg.reader_kind(), ReaderKind::Mmap);
    }
}

// ---------------------------------------------------------------------------------------------
// durable writes

#[test]
fn commit_produces_the_file_and_no_temp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.bin");
    let mut f = AtomicFile::create(&path).unwrap();
    f.write_all(b"hello ").unwrap();
    f.write_all(&[7u8; 3 << 20]).unwrap(); // larger than the write buffer
    assert_eq!(f.bytes_written(), 6 + (3 << 20));
    assert!(!path.exists(), "nothing at the final path before commit");
    f.commit().unwrap();
    let got = std::fs::read(&path).unwrap();
    assert_eq!(&got[..6], b"hello ");
    assert_eq!(got.len(), 6 + (3 << 20));
    assert_eq!(single_file_in(dir.path()), vec![path.clone()]);

    atomic_write(&path, b"replaced").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"replaced");
    assert_eq!(single_file_in(dir.path()), vec![path]);
    fsync_dir(dir.path()).unwrap();
}

#[test]
fn drop_without_commit_leaves_nothing_and_keeps_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.bin");
    let mut f = AtomicFile::create(&path).unwrap();
    f.write_all(&[1u8; 100_000]).unwrap();
    f.flush().unwrap();
    assert_eq!(
        single_file_in(dir.path()).len(),
        1,
        "the temp file exists meanwhile"
    );
    drop(f);
    assert!(single_file_in(dir.path()).is_empty());

    atomic_write(&path, b"old").unwrap();
    let mut f = AtomicFile::create(&path).unwrap();
    f.write_all(b"new content").unwrap();
    drop(f);
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    assert_eq!(single_file_in(dir.path()), vec![path]);
}

#[test]
fn concurrent_writers_get_distinct_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.bin");
    let a = AtomicFile::create(&path).unwrap();
    let b = AtomicFile::create(&path).unwrap();
    assert_eq!(single_file_in(dir.path()).len(), 2);
    drop((a, b));
    assert!(single_file_in(dir.path()).is_empty());
}

#[test]
fn missing_directory_is_an_io_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/out.bin");
    for res in [
        AtomicFile::create(&path).map(drop),
        atomic_write(&path, b"x"),
        SegmentWriter::create(&path).map(drop),
    ] {
        match res {
            Err(StorageError::Io {
                path: p, source, ..
            }) => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Io, got {other:?}"),
        }
    }
    assert!(fsync_dir(&dir.path().join("nope")).is_err());
}

/// A full disk must be an Io error naming the path, leaving nothing at the final path.
///
/// Runs against the tiny filesystem at STRATA_FULL_FS_DIR when set; otherwise re-runs itself in a
/// private mount namespace with a 64 KiB tmpfs (needs `unshare`, as root or with user
/// namespaces), and skips with a message where that is not possible.
#[test]
fn full_disk_is_an_io_error() {
    let Some(dir) = std::env::var_os("STRATA_FULL_FS_DIR") else {
        rerun_on_tiny_tmpfs("full_disk_is_an_io_error");
        return;
    };
    check_full_disk(Path::new(&dir));
}

/// Exit code of the wrapper script when it cannot mount the tmpfs.
const NO_MOUNT: i32 = 77;

fn rerun_on_tiny_tmpfs(test: &str) {
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "d=$(mktemp -d) || exit {NO_MOUNT}; \
         if ! mount -t tmpfs -o size=64k tmpfs \"$d\" 2>/dev/null; then rmdir \"$d\"; exit {NO_MOUNT}; fi; \
         STRATA_FULL_FS_DIR=\"$d\" \"$0\" {test} --exact --nocapture; rc=$?; \
         umount \"$d\"; rmdir \"$d\"; exit $rc"
    );
    for flags in ["-m", "-rm"] {
        let out = std::process::Command::new("unshare")
            .args([flags, "sh", "-c", &script])
            .arg(&exe)
            .output();
        let Ok(out) = out else {
            println!("SKIP {test}: unshare not available");
            return;
        };
        match out.status.code() {
            Some(0) => {
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(stdout.contains("1 passed"), "{stdout}");
                println!("{test}: ran on a 64 KiB tmpfs (unshare {flags})");
                return;
            }
            Some(NO_MOUNT) | Some(1) if out.stdout.is_empty() => continue,
            _ => panic!(
                "{test} failed on a full tmpfs:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    println!("SKIP {test}: cannot mount a tmpfs here; set STRATA_FULL_FS_DIR to a tiny filesystem");
}

fn check_full_disk(dir: &Path) {
    let path = dir.join("strata-enospc-test.bin");
    let res = atomic_write(&path, &vec![0xAB; 4 << 20]);
    match res {
        Err(StorageError::Io { path: ref p, .. }) => assert_eq!(p, &path),
        ref other => panic!("expected Io, got {other:?}"),
    }
    println!("{}", res.unwrap_err());
    assert!(!path.exists());

    // The segment writer surfaces the same error from append or finish, and leaves nothing.
    let seg_path = dir.join("strata-enospc-test.strseg");
    let mut w = SegmentWriter::create(&seg_path).unwrap();
    let big = vec![1u8; 1 << 20];
    let mut err = None;
    for _ in 0..256 {
        if let Err(e) = w.append(&big) {
            err = Some(e);
            break;
        }
    }
    let err = match err {
        Some(e) => {
            drop(w);
            e
        }
        None => w.finish().unwrap_err(),
    };
    println!("{err}");
    assert!(
        matches!(&err, StorageError::Io { path, .. } if path == &seg_path),
        "{err}"
    );
    assert!(!seg_path.exists());
    assert!(
        std::fs::read_dir(dir).unwrap().next().is_none(),
        "temp file left behind"
    );
}
