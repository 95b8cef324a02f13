//! strata-storage: on-disk formats, the SSD read path, the RAM tier and durable writes.
//!
//! Everything that touches bytes on disk lives here: the file footer every strata file ends with
//! ([`footer`]), durable atomic writes ([`durable`]), 4 KiB-aligned segment files of posting lists
//! ([`segment`]), the list readers behind one trait (io_uring + O_DIRECT, pread, mmap: [`reader`]),
//! the byte-budgeted RAM cache in front of them ([`cache`]) and the kvdump/1 reader ([`kvdump`]).

pub mod aligned;
pub mod cache;
pub mod durable;
pub mod error;
pub mod footer;
pub mod kvdump;
pub mod reader;
pub mod segment;

pub use error::{StorageError, StorageResult};

/// Alignment of every posting list on disk and of every read buffer (O_DIRECT needs it).
pub const PAGE_SIZE: usize = 4096;
