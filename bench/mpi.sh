#!/usr/bin/env bash
# What data parallelism over MPI costs here: for each workload, two ranks on this machine
# (`mpirun -np 2`, one micro-batch each) against one process accumulating the same two
# micro-batches, on the same cores. Prints each run's summary: tokens/s, and for the ranks the
# gradient bytes a rank received a step and the milliseconds a step spent in the collectives
# (waiting for the slower rank included). Not a test: the figures go into docs/PERFORMANCE.md.
#
#   bench/mpi.sh [STEPS]
#
# Workloads: LoRA on SmolLM2-135M-Instruct (configs/smollm2-lora.yaml, what the README fine-tunes)
# and full training of the shipped default (configs/shakespeare-char.yaml).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
cd "$root"
steps="${1:-20}"
cargo build --quiet --bin kiln --features mpi
kiln="$CARGO_TARGET_DIR/debug/kiln"
out="$(mktemp -d)"
gguf="$("$root/scripts/fetch-smollm2")"
mpirun=(mpirun --oversubscribe -np 2)
[ "$(id -u)" = 0 ] && mpirun+=(--allow-run-as-root)
summary() { grep -E "^done|tokens/s|gradients from" || true; }
for workload in lora shakespeare; do
  case "$workload" in
    lora) config=(configs/smollm2-lora.yaml --set model.pretrained="$gguf" --set finetune.lora.dropout=0.0) ;;
    shakespeare) config=(configs/shakespeare-char.yaml) ;;
  esac
  common=("${config[@]}" --set run.output_dir="$out" --set train.eval_every=0 --stop-after "$steps")
  echo "== $workload: 2 ranks, one micro-batch each"
  "${mpirun[@]}" "$kiln" train "${common[@]}" --set run.name="$workload-ranks" 2>&1 | summary
  echo "== $workload: one process, grad_accum 2"
  "$kiln" train "${common[@]}" --set run.name="$workload-alone" --set train.grad_accum=2 2>&1 | summary
done
rm -rf "$out"
