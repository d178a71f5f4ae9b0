//! Where the work runs on the CPU.

/// Runs `f` on a worker of a rayon pool as large as rayon's global one would be
/// (`RAYON_NUM_THREADS`, else one thread per core) and returns its result. Every worker flushes
/// subnormal floats to zero ([`flush_subnormals`]).
///
/// Flex's kernels, gemm's and kiln's own split their loops with rayon. Started from a thread
/// outside the pool, every such loop is handed to the pool while the caller sleeps until it is
/// done: two context switches per operation, hundreds of operations per step, and on a machine
/// with as many workers as cores the caller competes with them. Started from a worker, the caller
/// takes its own share of the loop. A step of the from-scratch benchmark model spends about a
/// tenth of its time in the scheduler the first way (docs/PERFORMANCE.md).
///
/// Falls back to running `f` here if the pool can't be built.
pub fn run_on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("kiln-worker-{i}"))
        // The main thread's size: deep autodiff graphs recurse.
        .stack_size(8 << 20)
        .start_handler(|_| flush_subnormals())
        .build();
    match pool {
        Ok(pool) => pool.install(f),
        Err(_) => {
            flush_subnormals();
            f()
        }
    }
}

/// Threads the CPU kernels run on: the pool's ([`run_on_pool`] sizes it from `RAYON_NUM_THREADS`,
/// else one per core), not the machine's core count.
pub fn count() -> usize {
    rayon::current_num_threads()
}

/// Sets this thread's SSE/AVX control register to flush subnormal results to zero and to read
/// subnormal inputs as zero (FTZ and DAZ), as TensorFlow and XLA do on their CPU threads.
///
/// A training step's values underflow into subnormals (below 1.2e-38; attention probabilities far
/// below their row's largest are the likely source), and every multiplication that touches one
/// takes a microcode assist on Intel cores: on an Intel Xeon VM the from-scratch benchmark ran
/// at 3.4k-5.6k tokens/s instead of 13.7k, LoRA on SmolLM2 at 20 instead of 205
/// (docs/PERFORMANCE.md). AMD's cores pay little for them, which is why the
/// figures measured there never showed it. Only values below 1.2e-38 change, far under any
/// tolerance kiln checks against PyTorch; the result stays deterministic. Apple's cores (and
/// other architectures) keep IEEE behaviour: nothing to set.
pub fn flush_subnormals() {
    #[cfg(target_arch = "x86_64")]
    {
        const FLUSH_TO_ZERO: u32 = 1 << 15;
        const DENORMALS_ARE_ZERO: u32 = 1 << 6;
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr/ldmxcsr read and write this thread's MXCSR through a valid u32; only
        // the two flush bits change, no exception is unmasked.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
            csr |= FLUSH_TO_ZERO | DENORMALS_ARE_ZERO;
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly, preserves_flags));
        }
    }
}

/// CPU seconds the calling thread has used, where the system tells (Linux, macOS): the host's
/// own work in a step, apart from the device's threads (which, on a software Vulkan, also run
/// the "GPU").
pub fn thread_cpu_secs() -> Option<f64> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and has no other effect.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    (rc == 0).then_some(t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9)
}
