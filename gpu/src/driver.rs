//! Minimal CUDA driver API access through dlopen: cuInit, cuDeviceGetCount, cuDeviceGet,
//! cuDeviceGetName, cuDeviceTotalMem_v2. All unsafe code of the crate is in this module.

use std::ffi::{c_char, c_int, c_void, CStr};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("CUDA driver call {call} failed with code {code}")]
    Driver { call: &'static str, code: c_int },
    #[error("CUDA driver library lacks symbol {0}")]
    Symbol(&'static str),
}

#[derive(Clone, Debug, PartialEq)]
pub struct GpuDevice {
    pub ordinal: usize,
    pub name: String,
    pub total_memory_bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum GpuStatus {
    /// No CUDA driver library on this machine (the reason says what was looked for).
    NoDriver {
        reason: String,
    },
    Devices(Vec<GpuDevice>),
}

type CuInit = unsafe extern "C" fn(u32) -> c_int;
type CuCount = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;

struct Lib(*mut c_void);

impl Drop for Lib {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful dlopen and is closed once.
        unsafe { libc::dlclose(self.0) };
    }
}

impl Lib {
    fn sym<T: Copy>(&self, name: &'static str) -> Result<T, GpuError> {
        let cname = std::ffi::CString::new(name).map_err(|_| GpuError::Symbol(name))?;
        // SAFETY: dlsym on a live handle with a NUL-terminated name; a null result is checked.
        let p = unsafe { libc::dlsym(self.0, cname.as_ptr()) };
        if p.is_null() {
            return Err(GpuError::Symbol(name));
        }
        // SAFETY: T is one of the function pointer types above, whose signatures match the CUDA
        // driver API declarations of these symbols; both are pointer-sized.
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
    }
}

fn check(call: &'static str, code: c_int) -> Result<(), GpuError> {
    if code == 0 {
        Ok(())
    } else {
        Err(GpuError::Driver { call, code })
    }
}

/// Lists the CUDA devices, or says why there are none. Never panics without CUDA.
pub fn probe() -> Result<GpuStatus, GpuError> {
    let name = c"libcuda.so.1";
    // SAFETY: dlopen with a valid NUL-terminated name; a null handle means "not present".
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Ok(GpuStatus::NoDriver {
            reason: "libcuda.so.1 not found (no NVIDIA driver on this machine)".into(),
        });
    }
    let lib = Lib(handle);
    let cu_init: CuInit = lib.sym("cuInit")?;
    let cu_count: CuCount = lib.sym("cuDeviceGetCount")?;
    let cu_get: CuGet = lib.sym("cuDeviceGet")?;
    let cu_name: CuName = lib.sym("cuDeviceGetName")?;
    let cu_mem: CuMem = lib.sym("cuDeviceTotalMem_v2")?;
    // SAFETY: driver entry points resolved above, called with valid out-pointers.
    check("cuInit", unsafe { cu_init(0) })?;
    let mut count: c_int = 0;
    // SAFETY: as above.
    check("cuDeviceGetCount", unsafe { cu_count(&mut count) })?;
    let mut devices = Vec::new();
    for ordinal in 0..count {
        let mut dev: c_int = 0;
        // SAFETY: as above; ordinal < count.
        check("cuDeviceGet", unsafe { cu_get(&mut dev, ordinal) })?;
        let mut buf = [0 as c_char; 256];
        // SAFETY: the buffer holds 256 bytes and the driver writes a NUL-terminated name into it.
        check("cuDeviceGetName", unsafe {
            cu_name(buf.as_mut_ptr(), 256, dev)
        })?;
        // SAFETY: the driver NUL-terminated the name within the buffer.
        let name = unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let mut mem = 0usize;
        // SAFETY: valid out-pointer, valid device handle.
        check("cuDeviceTotalMem_v2", unsafe { cu_mem(&mut mem, dev) })?;
        devices.push(GpuDevice {
            ordinal: ordinal as usize,
            name,
            total_memory_bytes: mem as u64,
        });
    }
    Ok(GpuStatus::Devices(devices))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_answers_with_or_without_cuda() {
        match probe() {
            Ok(GpuStatus::NoDriver { reason }) => {
                println!("skipping device checks: {reason}");
                assert!(reason.contains("libcuda"));
            }
            Ok(GpuStatus::Devices(devs)) => {
                for d in &devs {
                    assert!(!d.name.is_empty());
                    assert!(d.total_memory_bytes > 0);
                }
            }
            Err(e) => panic!("driver present but unusable: {e}"),
        }
    }
}
