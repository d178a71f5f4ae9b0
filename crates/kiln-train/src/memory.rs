//! Memory figures of the host and of the process.

/// `MemTotal` and `MemAvailable` from /proc/meminfo, in bytes (Linux only).
pub fn host_memory() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// The cgroup v2 memory limit of this process, if one is set.
pub fn cgroup_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
    text.trim().parse().ok()
}

/// Bytes the cgroup v2 of this process holds now (`memory.current`).
pub fn cgroup_usage() -> Option<u64> {
    let text = std::fs::read_to_string("/sys/fs/cgroup/memory.current").ok()?;
    text.trim().parse().ok()
}

/// Installed RAM, from sysconf (every Unix).
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf has no side effects.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
}

/// Peak resident set size of this process so far, in bytes.
pub fn peak_rss() -> Option<u64> {
    // SAFETY: getrusage fills the struct we pass and has no other effect.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return None;
    }
    let raw = usage.ru_maxrss as u64;
    // Linux reports KiB, macOS bytes.
    if cfg!(target_os = "macos") {
        Some(raw)
    } else {
        Some(raw * 1024)
    }
}

/// Hands memory the allocator holds but no longer uses back to the OS (glibc's `malloc_trim`):
/// loading a model leaves large freed host buffers (file bytes, de-quantised copies) that would
/// otherwise stay in the process for the whole run.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages; no pointer is invalidated.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Keeps freed memory in the process instead of returning it to the OS after every large free
/// (glibc: no mmap'd allocations, a trim threshold of 2 GiB). A training step frees and
/// re-allocates the same large buffers many times; handing them back and faulting them in again
/// cost a recomputing step a third of its time on a 2-core VM, and buffers over glibc's largest
/// mmap threshold (32 MiB: a LoRA step's logits are 192 MiB) 10% of a LoRA step even so
/// (docs/PERFORMANCE.md). Peak RSS is unchanged; [`release_free_memory`] still returns what
/// loading left behind.
///
/// One arena for all threads: the step runs on a worker of the kernels' pool and the other
/// workers allocate too, and each glibc arena keeps its own high-water mark, so with one per
/// thread the peak RSS was the sum of several; a recomputing step of a 6-block model measured
/// 301 MiB instead of 206 MiB, and varied by 30% between identical runs (docs/PERFORMANCE.md,
/// "Per model family"). Throughput is unchanged: the step allocates few, large buffers.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before training allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Starts a new peak-RSS window: the kernel's high-water mark (VmHWM) is reset to the current
/// RSS (Linux: `5` to /proc/self/clear_refs). Returns false where that is not possible.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak RSS since the last [`reset_peak`] (VmHWM, Linux), else since the process started.
pub fn peak_rss_window() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok();
    let hwm = text.as_deref().and_then(|t| {
        let line = t.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    });
    hwm.or_else(peak_rss)
}

/// Current resident set size, in bytes (Linux only).
pub fn current_rss() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no side effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
