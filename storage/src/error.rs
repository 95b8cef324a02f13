use std::path::PathBuf;

/// Errors of the storage layer. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but its bytes are not what they should be (bad magic, checksum, length).
    #[error("{path}: corrupt: {problem}")]
    Corrupt { path: PathBuf, problem: String },
    /// The file was written by a format version this build cannot read.
    #[error("{path}: unsupported format version {found} (this build reads {})", versions(*.oldest, *.supported))]
    Version {
        path: PathBuf,
        found: u32,
        /// The newest version this build reads (and writes).
        supported: u32,
        /// The oldest version it still reads.
        oldest: u32,
    },
    /// A caller asked for something the file does not hold (offset past the end, misaligned read).
    #[error("{path}: invalid request: {problem}")]
    InvalidRequest { path: PathBuf, problem: String },
}

pub type StorageResult<T> = Result<T, StorageError>;

/// "3", or "versions 1 to 3".
fn versions(oldest: u32, newest: u32) -> String {
    if oldest >= newest {
        newest.to_string()
    } else {
        format!("versions {oldest} to {newest}")
    }
}

impl StorageError {
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        StorageError::Io {
            path: path.into(),
            op,
            source,
        }
    }
    pub fn corrupt(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        StorageError::Corrupt {
            path: path.into(),
            problem: problem.into(),
        }
    }
}
