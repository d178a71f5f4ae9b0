#!/usr/bin/env bash
# Where a CPU training step spends its time: `kiln bench` under perf (call graphs from DWARF, one
# thread so every sample keeps its caller), summed into phases (data, forward, backward,
# optimizer) and into kinds of work (matmul, exp, other element-wise, copies, allocation).
# Not a test: it prints figures for docs/PERFORMANCE.md. Needs perf (Debian: linux-perf).
#
#   bench/profile.sh STEPS CONFIG [--set key=value ...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
cd "$root"
steps="$1"; shift
cargo build --quiet --bin kiln
data="$(mktemp -d)/perf.data"
RAYON_NUM_THREADS=1 perf record -q --call-graph dwarf,32768 -F 250 -o "$data" \
  "$CARGO_TARGET_DIR/debug/kiln" bench "$@" --set backend.kind=cpu --steps "$steps" --warmup 1 --json \
  > /dev/null 2>&1
perf report -i "$data" --children --sort symbol --stdio -g none 2>/dev/null | python3 -c '
import re, sys
rows = []
for line in sys.stdin:
    m = re.match(r"\s+([\d.]+)%\s+([\d.]+)%\s+\[[.k]\]\s+(.*?)\s+-\s+-\s*$", line) or \
        re.match(r"\s+([\d.]+)%\s+([\d.]+)%\s+\[[.k]\]\s+(.*\S)", line)
    if m:
        rows.append((float(m.group(1)), float(m.group(2)), m.group(3)))
def incl(pattern):
    return max([c for c, _, s in rows if re.search(pattern, s)] or [0.0])
def self_(pattern):
    return sum(s_ for _, s_, s in rows if re.search(pattern, s))
data = incl(r"(kiln_data|kiln_train::data)::.*train_batch$") + incl(r"consts_for$")
backward = incl(r"burn_tensor::tensor::api::autodiff::backward_impl$")
forward = incl(r"kiln_models::model::Model::(loss|forward_batch)$")
optimizer = incl(r"GradAccumulator::add$") + incl(r"GradAccumulator::global_norm$") + incl(r"kiln_train::optim::AdamW::step$")
attention = incl(r"kiln_models::layers::attention::Attention::forward$")
step = data + forward + backward + optimizer
# Call stacks unwound from DWARF are sometimes cut short (and work run on a rayon worker loses its
# caller), so the phases are shares of what could be attributed, not of all samples.
print(f"attributed to a phase of the step: {step:.1f}% of all samples")
for name, v in (("data: batches, RoPE tables and masks", data), ("forward (taped)", forward),
                ("  of which attention (projections, RoPE, scores, softmax)", attention),
                ("backward", backward), ("optimizer: gradient sums, norm, AdamW", optimizer)):
    print(f"  {100 * v / max(step, 1e-9):5.1f}%  {name}")
kinds = [
    ("matmul (gemm micro-kernels and packing)", r"^gemm|gemm_common|gemm_f32"),
    ("exp from libm (scalar)", r"expf|xflowf|__exp"),
    ("kiln fused kernels (RMSNorm, RoPE, softmax, SwiGLU, cross-entropy, AdamW)", r"^kiln_kernels"),
    ("other element-wise kernels (Flex, SIMD)", r"^burn_flex::(ops|zip|simd)|macerator"),
    ("memory copies and fills", r"memmove|memcpy|memset|copy_2d|copy_nd"),
    ("allocator and page faults", r"malloc|free|_int_|clear_page|page_fault|do_anonymous|mmap|munmap"),
    ("threads (rayon, scheduler)", r"rayon|futex|sched|finish_task"),
]
total = sum(s for _, s, _ in rows)
print("kinds of work (self time, share of all samples):")
done = 0.0
for name, pat in kinds:
    v = self_(pat); done += v
    print(f"  {v:5.1f}%  {name}")
print(f"  {total - done:5.1f}%  everything else (autodiff graph, iterators, loading)")
'
