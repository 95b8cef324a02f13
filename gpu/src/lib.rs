//! strata-gpu: finds the CUDA driver at run time (dlopen of `libcuda.so.1`), so every binary
//! builds and runs on machines without CUDA. The HBM slot cache, the prefetcher and the
//! sparse-attention kernels will live here; today the crate answers "which GPUs are there".

mod driver;

pub use driver::{probe, GpuDevice, GpuError, GpuStatus};
