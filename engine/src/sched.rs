//! Scheduling of the engine's background threads.

/// Niceness of a fold's thread: CFS still gives it about 1.5% of a busy core (so a fold
/// finishes while steps keep both cores busy, only slower), and steps barely notice it. Measured
/// at 128K: nice 10 raised the step p50 while folding from 7 to 11 ms, nice 19 left it at 7.4 ms.
pub const FOLD_NICE: i32 = 19;

/// Moves the calling thread to Linux's `SCHED_IDLE` class: it runs only on a core that nothing
/// else wants. The prefetcher uses it, so that on a machine with few cores its look-ahead
/// searches never delay the steps they are meant to help; when steps wait on the disk, or the
/// model computes between steps, the cores are idle and the prefetcher runs.
#[cfg(target_os = "linux")]
pub fn run_only_when_idle() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `sched_setscheduler` reads the `sched_param` passed by reference, which lives
    // for the whole call; pid 0 names the calling thread, so no other thread is affected.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere the thread keeps its priority.
#[cfg(not(target_os = "linux"))]
pub fn run_only_when_idle() -> std::io::Result<()> {
    Ok(())
}

/// Sets the calling thread's niceness (Linux schedules threads one by one, so only this thread
/// changes).
#[cfg(target_os = "linux")]
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: `gettid` and `setpriority` take plain integers and touch no memory of ours; the
    // id is this thread's own.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere the thread keeps its priority.
#[cfg(not(target_os = "linux"))]
pub fn set_thread_nice(_nice: i32) -> std::io::Result<()> {
    Ok(())
}
