//! The processes of a data-parallel run: one, or the N that `mpirun -np N kiln train` starts.
//!
//! Burn 0.22 has no collective for kiln's backends (its all-reduce is NCCL's, CUDA only), so the
//! ranks talk through MPI (the `mpi` cargo feature, on the `mpi` crate): Open MPI and MPICH run on
//! macOS and Linux, over loopback, Thunderbolt bridges or Ethernet, and `mpirun` already does the
//! launching, the host files and the killing of a job whose rank died.
//!
//! What crosses between ranks is small and on the host: each step's trainable gradients with its
//! loss (a LoRA's are a few MB), a few counters, and at the start the run's fingerprint and the
//! checkpoint a resumed run starts from.
//!
//! Gradients are summed by gathering every rank's and adding them in rank order on each rank
//! (not by `MPI_Allreduce`, whose order of additions is the library's): every rank gets the same
//! bits, and with one micro-batch a rank they are the single process's bits, which adds its
//! micro-batches in that same order.

use crate::TrainError;
use kiln_config::Config;
#[cfg(feature = "mpi")]
use std::sync::{Arc, Mutex};

/// Environment variables a launcher sets to the number of processes it started: Open MPI's,
/// MPICH's and Intel MPI's (Hydra), PMIx's.
const SIZE_VARIABLES: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];

/// Values a gather moves at once: bounds the memory of the gathered copies (size × this many
/// floats) when a full fine-tune sums hundreds of millions of gradients. `KILN_GATHER_VALUES`
/// sets another (the tests make it small, so that tensors split and group across gathers).
pub fn gather_chunk() -> usize {
    static CHUNK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CHUNK.get_or_init(|| {
        std::env::var("KILN_GATHER_VALUES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or(16 << 20)
    })
}

/// This process's place among the ranks of the run (cheap to clone: one shared MPI handle).
#[derive(Clone)]
pub struct Ranks {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<Arc<Mpi>>,
}

impl Default for Ranks {
    fn default() -> Self {
        Self::single()
    }
}

impl std::fmt::Debug for Ranks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rank {} of {} ({} of {} on this machine)",
            self.rank,
            self.size(),
            self.local_rank,
            self.local_size()
        )
    }
}

/// What one step's ranks agree on beside the gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCounts {
    /// Token positions computed, over every rank.
    pub tokens: usize,
    /// The signal some rank received (the largest number, if several did), so that every rank
    /// stops after the same step.
    pub signal: Option<i32>,
}

/// How much one step's collectives moved and how long they took (rank 0's view).
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    /// Gradient bytes this rank received from the others.
    pub bytes: u64,
    /// Seconds spent inside the collectives (waiting for the slowest rank included).
    pub secs: f64,
}

impl Traffic {
    pub fn add(&mut self, other: Traffic) {
        self.bytes += other.bytes;
        self.secs += other.secs;
    }
}

impl Ranks {
    /// The single process of a run not started by `mpirun`.
    pub fn single() -> Self {
        Self {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    /// The processes this one was started among: MPI's world when a launcher started several,
    /// else the single process. Call once, before the thread pool starts (it sets the threads a
    /// rank may use) and keep the value until the process ends: the last clone dropped ends MPI.
    pub fn join() -> Result<Self, TrainError> {
        let launched = SIZE_VARIABLES
            .iter()
            .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
            .unwrap_or(1);
        if launched <= 1 {
            return Ok(Self::single());
        }
        Self::join_mpi(launched)
    }

    #[cfg(not(feature = "mpi"))]
    fn join_mpi(launched: usize) -> Result<Self, TrainError> {
        Err(TrainError::Other(format!(
            "started as one of {launched} processes (by mpirun), but this kiln was built \
             without MPI, so each would train the whole run alone; build it with `cargo build \
             --features mpi` (README: Several processes and machines)"
        )))
    }

    #[cfg(feature = "mpi")]
    fn join_mpi(launched: usize) -> Result<Self, TrainError> {
        let mpi = Mpi::initialize()?;
        let (rank, size, local_rank, local_size) = mpi.places();
        if size != launched {
            return Err(TrainError::Other(format!(
                "the launcher started {launched} processes but MPI's world holds {size}: is this \
                 kiln linked against the MPI that mpirun belongs to?"
            )));
        }
        let ranks = Self {
            rank,
            size,
            local_rank,
            local_size,
            mpi: Some(Arc::new(mpi)),
        };
        ranks.share_cores();
        Ok(ranks)
    }

    /// Ranks on one machine divide its cores for the CPU kernels, unless `RAYON_NUM_THREADS`
    /// says otherwise (or `mpirun` bound each to fewer cores, which the thread pool sees).
    #[cfg(feature = "mpi")]
    fn share_cores(&self) {
        if self.local_size <= 1 || std::env::var_os("RAYON_NUM_THREADS").is_some() {
            return;
        }
        // SAFETY: sysconf has no preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        let allowed = std::thread::available_parallelism().map_or(online, |n| n.get());
        let share = (online / self.local_size).clamp(1, allowed);
        // SAFETY: called from `join`, before the thread pool or any other thread starts.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", share.to_string()) };
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// This rank's place among the ranks on its machine (which GPU it takes).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// The ranks on this machine (they share its cores).
    pub fn local_size(&self) -> usize {
        self.local_size
    }

    /// Rank 0 prints, writes TensorBoard and writes checkpoints.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    pub fn is_distributed(&self) -> bool {
        self.size() > 1
    }

    /// Every rank's `mine`, in rank order.
    pub fn gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            return mpi.gather_bytes(mine);
        }
        vec![mine.to_vec()]
    }

    /// Rank 0's `data` on every rank (`data` is read on rank 0 only).
    pub fn broadcast_bytes(&self, data: Vec<u8>) -> Vec<u8> {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            return mpi.broadcast_bytes(data);
        }
        data
    }

    /// Replaces `values` on every rank with the sum of every rank's `values`, added in rank order
    /// (`((r0 + r1) + r2) + …`), so every rank holds the same bits. Every rank passes the same
    /// length. Returns what it moved.
    pub fn sum_in_rank_order(&self, values: &mut [f32]) -> Traffic {
        let started = std::time::Instant::now();
        let mut bytes = 0u64;
        for chunk in values.chunks_mut(gather_chunk()) {
            let all = self.gather_f32(chunk);
            // What came from the other ranks (in a ring, as much again went out).
            bytes += ((all.len() - chunk.len()) * 4) as u64;
            sum_ranks_into(chunk, &all);
        }
        Traffic {
            bytes,
            secs: started.elapsed().as_secs_f64(),
        }
    }

    /// Every rank's `mine` (all of one length), end to end in rank order.
    fn gather_f32(&self, mine: &[f32]) -> Vec<f32> {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            return mpi.gather_f32(mine);
        }
        mine.to_vec()
    }

    /// Sums the tokens and takes the largest signal over every rank.
    pub fn agree_counts(&self, mine: StepCounts) -> StepCounts {
        let words = [mine.tokens as u64, mine.signal.unwrap_or(0).max(0) as u64];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let all = self.gather_bytes(&bytes);
        let word = |b: &[u8], i: usize| {
            b.get(i * 8..i * 8 + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0)
        };
        let tokens = all.iter().map(|b| word(b, 0)).sum::<u64>() as usize;
        let signal = all.iter().map(|b| word(b, 1)).max().unwrap_or(0) as i32;
        StepCounts {
            tokens,
            signal: (signal > 0).then_some(signal),
        }
    }

    /// Ends every rank's process at once (MPI_Abort), for an error only this rank has seen: the
    /// others may be waiting for it inside a collective, where ending MPI normally would hang.
    pub fn abort(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            mpi.abort(code);
        }
        let _ = code;
    }
}

/// Open MPI's mpirun answers a Ctrl-C by sending the ranks SIGTERM and killing them
/// `odls_base_sigkill_timeout` seconds later (1 by default, too short to finish a step and save
/// one): a line saying how to leave them time, unless the timeout seen here is long enough.
pub fn interrupt_hint() -> Option<String> {
    std::env::var_os("OMPI_COMM_WORLD_SIZE")?;
    let timeout = std::env::var("OMPI_MCA_odls_base_sigkill_timeout")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    (timeout < 30).then(|| {
        format!(
            "ranks: a Ctrl-C on mpirun leaves them {timeout} s before it kills them, maybe too \
             little to checkpoint: `kill -USR1` mpirun instead (it checkpoints and stops), or \
             start mpirun with OMPI_MCA_odls_base_sigkill_timeout=60 in its environment"
        )
    })
}

/// What every rank must share with rank 0 to train one run.
#[derive(serde::Serialize, serde::Deserialize)]
struct RunIdentity {
    kiln_version: String,
    config: Config,
    data_fingerprint: u32,
    step: usize,
}

/// Checks that every rank has rank 0's kiln version, config (as its plan resolved it), data and
/// starting step. Every rank sees every rank's identity, so a difference stops them all with the
/// same message, naming the rank and what differs.
pub fn check_same_run(
    ranks: &Ranks,
    config: &Config,
    data_fingerprint: u32,
    step: usize,
) -> Result<(), TrainError> {
    let mine = RunIdentity {
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        config: config.clone(),
        data_fingerprint,
        step,
    };
    let bytes = serde_json::to_vec(&mine).unwrap_or_default();
    let all: Vec<Option<RunIdentity>> = ranks
        .gather_bytes(&bytes)
        .iter()
        .map(|b| serde_json::from_slice(b).ok())
        .collect();
    let Some(Some(root)) = all.first() else {
        return Err(TrainError::Ranks("rank 0 sent no run identity".into()));
    };
    let mut problems = Vec::new();
    for (rank, other) in all.iter().enumerate().skip(1) {
        let Some(other) = other else {
            problems.push(format!("rank {rank} sent no run identity"));
            continue;
        };
        let mut differs = Vec::new();
        if other.kiln_version != root.kiln_version {
            differs.push(format!(
                "kiln {} there, {} on rank 0",
                other.kiln_version, root.kiln_version
            ));
        }
        for (field, at_root, there) in kiln_config::diff::differences(&root.config, &other.config) {
            differs.push(format!("{field} is {there} there, {at_root} on rank 0"));
        }
        if other.data_fingerprint != root.data_fingerprint {
            differs.push(format!(
                "its data differ (tokens checksum {:08x} there, {:08x} on rank 0): are the \
                 files the same on every machine?",
                other.data_fingerprint, root.data_fingerprint
            ));
        }
        if other.step != root.step {
            differs.push(format!(
                "it starts at step {} and rank 0 at step {}",
                other.step, root.step
            ));
        }
        if !differs.is_empty() {
            problems.push(format!("rank {rank}: {}", differs.join("; ")));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(TrainError::Ranks(format!(
            "the ranks are not running the same run, so none starts: {}",
            problems.join(". ")
        )))
    }
}

/// Adds `ranks` (every rank's chunk, end to end, in rank order) into `out`, rank by rank.
fn sum_ranks_into(out: &mut [f32], ranks: &[f32]) {
    let n = out.len();
    if n == 0 {
        return;
    }
    let mut parts = ranks.chunks_exact(n);
    if let Some(first) = parts.next() {
        out.copy_from_slice(first);
    }
    for part in parts {
        for (o, v) in out.iter_mut().zip(part) {
            *o += v;
        }
    }
}

/// The MPI world, initialized for calls from one thread at a time (the trainer runs on a worker
/// of the thread pool, not on the thread that initialized MPI).
#[cfg(feature = "mpi")]
struct Mpi {
    universe: Mutex<mpi::environment::Universe>,
}

#[cfg(feature = "mpi")]
impl Mpi {
    fn initialize() -> Result<Self, TrainError> {
        use mpi::Threading;
        let (universe, provided) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| TrainError::Other("MPI was initialized twice".into()))?;
        if provided < Threading::Serialized {
            return Err(TrainError::Other(format!(
                "the MPI library offers {provided:?} threading; kiln needs calls from a thread \
                 other than the one that initialized it (MPI_THREAD_SERIALIZED)"
            )));
        }
        Ok(Self {
            universe: Mutex::new(universe),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mpi::topology::SimpleCommunicator) -> R) -> R {
        let universe = self.universe.lock().unwrap_or_else(|p| p.into_inner());
        f(&universe.world())
    }

    /// (rank, size, rank on this machine, ranks on this machine).
    fn places(&self) -> (usize, usize, usize, usize) {
        use mpi::traits::Communicator;
        self.with(|world| {
            let local = world.split_shared(world.rank());
            (
                world.rank() as usize,
                world.size() as usize,
                local.rank() as usize,
                local.size() as usize,
            )
        })
    }

    fn gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        use mpi::datatype::PartitionMut;
        use mpi::traits::{Communicator, CommunicatorCollectives};
        self.with(|world| {
            let size = world.size() as usize;
            let mut lengths = vec![0u64; size];
            world.all_gather_into(&(mine.len() as u64), &mut lengths[..]);
            let counts: Vec<mpi::Count> = lengths.iter().map(|&l| l as mpi::Count).collect();
            let displs: Vec<mpi::Count> = counts
                .iter()
                .scan(0, |at, &c| {
                    let d = *at;
                    *at += c;
                    Some(d)
                })
                .collect();
            let mut all = vec![0u8; lengths.iter().sum::<u64>() as usize];
            {
                let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
                world.all_gather_varcount_into(mine, &mut partition);
            }
            let mut out = Vec::with_capacity(size);
            let mut at = 0;
            for &l in &lengths {
                out.push(all[at..at + l as usize].to_vec());
                at += l as usize;
            }
            out
        })
    }

    fn gather_f32(&self, mine: &[f32]) -> Vec<f32> {
        use mpi::traits::{Communicator, CommunicatorCollectives};
        self.with(|world| {
            let mut all = vec![0f32; mine.len() * world.size() as usize];
            world.all_gather_into(mine, &mut all[..]);
            all
        })
    }

    fn broadcast_bytes(&self, data: Vec<u8>) -> Vec<u8> {
        use mpi::traits::{Communicator, Root};
        self.with(|world| {
            let root = world.process_at_rank(0);
            let mut len = data.len() as u64;
            root.broadcast_into(&mut len);
            let mut buf = if world.rank() == 0 {
                data
            } else {
                vec![0u8; len as usize]
            };
            // MPI counts are 32-bit: a checkpoint of a full fine-tune goes in pieces.
            for piece in buf.chunks_mut(1 << 30) {
                root.broadcast_into(piece);
            }
            buf
        })
    }

    fn abort(&self, code: i32) {
        use mpi::traits::Communicator;
        self.with(|world| world.abort(code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_added_in_rank_order() {
        // Three ranks' chunks of two values: the sum is ((r0 + r1) + r2) in f32.
        let ranks = [1e8f32, 1.0, -1e8, 1.0, 1.0, 1.0];
        let mut out = [0f32; 2];
        sum_ranks_into(&mut out, &ranks);
        assert_eq!(out[0], (1e8f32 + -1e8) + 1.0);
        assert_eq!(out[1], (1.0f32 + 1.0) + 1.0);
        let single = Ranks::single();
        assert!(single.is_root() && !single.is_distributed());
        let counts = single.agree_counts(StepCounts {
            tokens: 7,
            signal: Some(2),
        });
        assert_eq!(counts.tokens, 7);
        assert_eq!(counts.signal, Some(2));
        let mut alone = [1.5f32, -2.0];
        let traffic = single.sum_in_rank_order(&mut alone);
        assert_eq!((alone, traffic.bytes), ([1.5, -2.0], 0));
    }
}
