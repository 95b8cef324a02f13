//! strata-engine: sessions that serve decoding steps over an index too large for GPU memory,
//! on the CPU (the HBM tier plugs in front of the same RAM tier next).
//!
//! * [`Engine`] owns the shared RAM tier, the budgets (admission control), the session folders
//!   and the prefetcher.
//! * A [`Session`] is one context: its model shape, its index (one per layer x KV head, reused
//!   by content hash), the static tokens (sinks and recent window) and the appended tail, which
//!   is folded into delta indexes in the background.
//! * [`attention`] computes `(o, lse)` over any token set, so partial attentions merge exactly.

pub mod attention;
pub mod config;
pub mod cpu;
mod engine;
pub mod error;
pub mod metrics;
mod sched;
mod session;

pub use config::EngineParams;
pub use engine::{Engine, SessionId};
pub use error::EngineError;
pub use session::{HeadOutput, SessionInfo, SessionSpec, StepOutput, StepTelemetry};
