use std::path::PathBuf;

/// Errors of the engine. Each names the session, layer or file it is about.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown session {0} (never created, or dropped)")]
    UnknownSession(u64),
    #[error("session {id} is failed and serves no more steps: {reason}")]
    SessionFailed { id: u64, reason: String },
    /// The caller sent something that does not fit the session (shape, NaN, layer).
    #[error("session {id}: {problem}")]
    BadInput { id: u64, problem: String },
    #[error("invalid session spec: {0}")]
    Spec(String),
    #[error("admission refused: {0}")]
    Admission(String),
    #[error("session folder {path}: {problem}")]
    Folder { path: PathBuf, problem: String },
    #[error(transparent)]
    Index(#[from] strata_index::IndexError),
    #[error(transparent)]
    Storage(#[from] strata_storage::StorageError),
}

pub type EngineResult<T> = Result<T, EngineError>;
