#!/usr/bin/env bash
# Training throughput, kiln against PyTorch, on the same model, shapes, data and thread count.
# Alternates the two ROUNDS times and prints min/median/max tokens/s, the ratio, and peak RSS.
#
#   bench/run.sh [CONFIG] [THREADS] [ROUNDS] [STEPS]
#
# Needs: python3 with torch and pyyaml (pip install torch pyyaml). Not a test: it prints figures,
# which go into docs/PERFORMANCE.md with the machine and date.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
cd "$root"
config="${1:-configs/shakespeare-char.yaml}"
threads="${2:-$(nproc)}"
rounds="${3:-3}"
steps="${4:-30}"
cargo build --quiet --bin kiln
kiln="$CARGO_TARGET_DIR/debug/kiln"
out="$(mktemp -d)"
for r in $(seq "$rounds"); do
  RAYON_NUM_THREADS="$threads" "$kiln" bench "$config" --set backend.kind=cpu --steps "$steps" --warmup 5 --json > "$out/kiln-$r.json"
  python3 bench/torch_llama.py --config "$config" --threads "$threads" --steps "$steps" --warmup 5 --json > "$out/torch-$r.json"
done
python3 - "$out" "$rounds" "$threads" <<'PY'
import json, statistics, sys, pathlib, platform
out, rounds, threads = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
k = [json.loads((out / f"kiln-{r}.json").read_text()) for r in range(1, rounds + 1)]
t = [json.loads((out / f"torch-{r}.json").read_text()) for r in range(1, rounds + 1)]
kt = [x["median_tokens_per_s"] for x in k]
tt = [x["median_tokens_per_s"] for x in t]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"machine: {cpu}, {threads} threads; {rounds} alternating rounds; per-round median of {k[0]['tokens_per_step']}-token steps")
print(f"{'':10} {'min':>9} {'median':>9} {'max':>9}  tokens/s   peak RSS   first step")
for name, v, runs in (("kiln", kt, k), (t[0]["framework"], tt, t)):
    rss = max(x["peak_rss_bytes"] for x in runs) / 2**20
    first = statistics.median(x["first_step_secs"] for x in runs)
    print(f"{name[:10]:10} {min(v):9.0f} {statistics.median(v):9.0f} {max(v):9.0f}            {rss:7.1f} MiB  {first:6.2f} s")
print(f"ratio kiln/pytorch (median): {statistics.median(kt) / statistics.median(tt):.2f}x")
PY
