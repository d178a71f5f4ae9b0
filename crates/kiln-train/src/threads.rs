//! Where the work runs on the CPU.

/// Runs `f` on a worker of a rayon pool as large as rayon's global one would be
/// (`RAYON_NUM_THREADS`, else one thread per core) and returns its result.
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
        .build();
    match pool {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}
