//! The fixed 24-byte footer every strata file ends with.
//!
//! Layout, little endian: `payload_len: u64`, `crc32(payload): u32`, `version: u32`, `magic: [u8; 8]`.
//! The footer sits at the end (not the start) so writers can stream the payload and only know its
//! length and checksum when they finish; readers find it at `file_len - FOOTER_LEN`.

use std::path::Path;

use crate::{StorageError, StorageResult};

/// Length of the footer in bytes.
pub const FOOTER_LEN: usize = 24;

/// What a footer says about the payload in front of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FooterInfo {
    pub payload_len: u64,
    pub crc32: u32,
    pub version: u32,
}

/// CRC-32 (IEEE) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Builds the footer for `payload`.
pub fn encode_footer(magic: [u8; 8], version: u32, payload: &[u8]) -> [u8; FOOTER_LEN] {
    encode_footer_parts(magic, version, payload.len() as u64, crc32(payload))
}

/// Builds a footer from a length and checksum computed elsewhere (streaming writers).
pub fn encode_footer_parts(
    magic: [u8; 8],
    version: u32,
    payload_len: u64,
    crc: u32,
) -> [u8; FOOTER_LEN] {
    let mut out = [0u8; FOOTER_LEN];
    out[0..8].copy_from_slice(&payload_len.to_le_bytes());
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out[12..16].copy_from_slice(&version.to_le_bytes());
    out[16..24].copy_from_slice(&magic);
    out
}

/// Shows a magic as text where printable, escaped otherwise, for error messages.
fn show_magic(magic: &[u8]) -> String {
    magic.escape_ascii().to_string()
}

/// Parses and checks a footer: `file_bytes_tail` holds the last `FOOTER_LEN` bytes of a file of
/// `file_len` bytes. Checks the magic, the version and that the payload length matches the file.
/// Does not check the payload checksum (the caller may not hold the payload).
pub fn read_footer(
    path: &Path,
    file_bytes_tail: &[u8],
    file_len: u64,
    magic: [u8; 8],
    supported_version: u32,
) -> StorageResult<FooterInfo> {
    read_footer_of_versions(
        path,
        file_bytes_tail,
        file_len,
        magic,
        supported_version..=supported_version,
    )
}

/// [`read_footer`] for a format that still reads the older versions in `supported`.
pub fn read_footer_of_versions(
    path: &Path,
    file_bytes_tail: &[u8],
    file_len: u64,
    magic: [u8; 8],
    supported: std::ops::RangeInclusive<u32>,
) -> StorageResult<FooterInfo> {
    if file_len < FOOTER_LEN as u64 || file_bytes_tail.len() < FOOTER_LEN {
        let n = file_len.min(file_bytes_tail.len() as u64);
        return Err(StorageError::corrupt(
            path,
            format!("truncated: {n} bytes, shorter than the {FOOTER_LEN}-byte footer"),
        ));
    }
    let tail = &file_bytes_tail[file_bytes_tail.len() - FOOTER_LEN..];
    let found_magic = &tail[16..24];
    if found_magic != magic {
        return Err(StorageError::corrupt(
            path,
            format!(
                "bad magic \"{}\" (expected \"{}\"): not a {} file",
                show_magic(found_magic),
                show_magic(&magic),
                describe_magic(&magic)
            ),
        ));
    }
    let payload_len = u64::from_le_bytes(tail[0..8].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(tail[8..12].try_into().expect("4 bytes"));
    let version = u32::from_le_bytes(tail[12..16].try_into().expect("4 bytes"));
    if !supported.contains(&version) {
        return Err(StorageError::Version {
            path: path.to_path_buf(),
            found: version,
            supported: *supported.end(),
            oldest: *supported.start(),
        });
    }
    if payload_len.checked_add(FOOTER_LEN as u64) != Some(file_len) {
        return Err(StorageError::corrupt(
            path,
            format!(
                "truncated or extended: footer says {payload_len} payload bytes + {FOOTER_LEN}-byte \
                 footer, file has {file_len} bytes"
            ),
        ));
    }
    Ok(FooterInfo {
        payload_len,
        crc32: crc,
        version,
    })
}

/// Checks a whole file held in memory (footer and payload checksum) and returns its payload.
pub fn check_whole<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: [u8; 8],
    supported_version: u32,
) -> StorageResult<&'a [u8]> {
    check_whole_of_versions(path, bytes, magic, supported_version..=supported_version)
        .map(|(payload, _)| payload)
}

/// [`check_whole`] for a format that still reads the older versions in `supported`; returns
/// the payload and the file's version.
pub fn check_whole_of_versions<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: [u8; 8],
    supported: std::ops::RangeInclusive<u32>,
) -> StorageResult<(&'a [u8], u32)> {
    let file_len = bytes.len() as u64;
    let tail_start = bytes.len().saturating_sub(FOOTER_LEN);
    let info = read_footer_of_versions(path, &bytes[tail_start..], file_len, magic, supported)?;
    let payload = &bytes[..info.payload_len as usize];
    let computed = crc32(payload);
    if computed != info.crc32 {
        return Err(StorageError::corrupt(
            path,
            format!(
                "checksum mismatch: stored {:#010x}, computed {computed:#010x}",
                info.crc32
            ),
        ));
    }
    Ok((payload, info.version))
}

/// A short name for the kind of file a magic belongs to: the printable prefix, e.g. "STRSEG".
fn describe_magic(magic: &[u8; 8]) -> String {
    let name: String = magic
        .iter()
        .take_while(|b| b.is_ascii_graphic())
        .map(|&b| b as char)
        .collect();
    if name.is_empty() {
        "strata".to_string()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: [u8; 8] = *b"TESTMAG\x01";

    #[test]
    fn round_trip() {
        let payload = b"hello footer".to_vec();
        let mut file = payload.clone();
        file.extend_from_slice(&encode_footer(MAGIC, 3, &payload));
        let p = Path::new("x");
        assert_eq!(check_whole(p, &file, MAGIC, 3).unwrap(), &payload[..]);
        let info = read_footer(
            p,
            &file[file.len() - FOOTER_LEN..],
            file.len() as u64,
            MAGIC,
            3,
        )
        .unwrap();
        assert_eq!(info.payload_len, payload.len() as u64);
        assert_eq!(info.crc32, crc32(&payload));
        assert_eq!(info.version, 3);
    }

    #[test]
    fn a_range_of_versions_reads_each_and_says_which() {
        let payload = b"older".to_vec();
        let p = Path::new("x");
        for version in 0..5u32 {
            let mut file = payload.clone();
            file.extend_from_slice(&encode_footer(MAGIC, version, &payload));
            match check_whole_of_versions(p, &file, MAGIC, 1..=3) {
                Ok((got, v)) => {
                    assert!((1..=3).contains(&version));
                    assert_eq!((got, v), (&payload[..], version));
                }
                Err(StorageError::Version {
                    found, supported, ..
                }) => {
                    assert!(version == 0 || version == 4);
                    assert_eq!((found, supported), (version, 3));
                    let e = check_whole_of_versions(p, &file, MAGIC, 1..=3).unwrap_err();
                    assert!(e.to_string().contains("reads versions 1 to 3"), "{e}");
                }
                Err(e) => panic!("version {version}: {e}"),
            }
        }
    }

    #[test]
    fn rejects_short_bad_magic_version_length_crc() {
        let p = Path::new("f.bin");
        let err = check_whole(p, &[0u8; 10], MAGIC, 1).unwrap_err();
        assert!(err.to_string().contains("truncated: 10 bytes"), "{err}");

        let mut file = b"abc".to_vec();
        file.extend_from_slice(&encode_footer(*b"OTHERMAG", 1, b"abc"));
        let err = check_whole(p, &file, MAGIC, 1).unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");
        assert!(err.to_string().contains("not a TESTMAG file"), "{err}");

        let mut file = b"abc".to_vec();
        file.extend_from_slice(&encode_footer(MAGIC, 2, b"abc"));
        assert!(matches!(
            check_whole(p, &file, MAGIC, 1),
            Err(StorageError::Version {
                found: 2,
                supported: 1,
                ..
            })
        ));

        let mut file = b"abcd".to_vec();
        file.extend_from_slice(&encode_footer(MAGIC, 1, b"abc"));
        let err = check_whole(p, &file, MAGIC, 1).unwrap_err();
        assert!(err.to_string().contains("truncated or extended"), "{err}");

        let mut file = b"abd".to_vec();
        file.extend_from_slice(&encode_footer(MAGIC, 1, b"abc"));
        let err = check_whole(p, &file, MAGIC, 1).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }
}
