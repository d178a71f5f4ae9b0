#!/usr/bin/env bash
# The memory planner against measurement, and the cost of block recompute. Not a test: it prints
# figures, which go into docs/PERFORMANCE.md with the machine and date.
#
#   bench/memory.sh [SMOLLM2_GGUF]
#
# For each shape: the planner's estimated peak and the peak RSS measured while stepping (kiln
# bench, its own process; loading is excluded, see `kiln bench`), with and without recompute of
# every block. Then the 12-block model at sequence 512: step time and activation memory (what a
# step adds to RSS, less gradients and optimizer state) with and without recompute.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
cd "$root"
gguf="${1:-$("$root/scripts/fetch-smollm2")}"
cargo build --quiet --bin kiln
kiln="$CARGO_TARGET_DIR/debug/kiln"
out="$(mktemp -d)"
small=(configs/shakespeare-char.yaml)
deep=(configs/shakespeare-char.yaml --set model.hidden_size=384 --set model.num_attention_heads=6
  --set model.num_key_value_heads=6 --set model.intermediate_size=1024 --set model.num_hidden_layers=12
  --set model.max_position_embeddings=512 --set data.seq_len=512 --set train.batch_size=4)
lora=(configs/smollm2-lora.yaml --set model.pretrained="$gguf" --set data.seq_len=256
  --set train.batch_size=4 --set data.pack=true)
run() { # name rounds steps args...: alternating rounds, one process per run
  local name="$1" rounds="$2" steps="$3"; shift 3
  for r in $(seq "$rounds"); do
    for mode in none every:1; do
      "$kiln" bench "$@" --set backend.kind=cpu --set memory.checkpointing="$mode" \
        --steps "$steps" --warmup 1 --json > "$out/$name-${mode/:/}-$r.json"
    done
  done
}
run small 1 20 "${small[@]}"
run deep 3 3 "${deep[@]}"
run lora 1 3 "${lora[@]}"
python3 - "$out" <<'PY'
import json, pathlib, platform, statistics, sys
out = pathlib.Path(sys.argv[1])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"machine: {cpu}")
M = 2**20
runs = lambda name, mode: [json.loads(p.read_text()) for p in sorted(out.glob(f"{name}-{mode}-*.json"))]
med = statistics.median
print(f"{'shape':8} {'recompute':10} {'estimated':>10} {'measured':>10} {'error':>7} {'before':>9} {'step s':>7}")
for name in ("small", "deep", "lora"):
    for mode in ("none", "every1"):
        xs = runs(name, mode)
        est, meas = xs[0]["estimate"]["total"], med(x["peak_steps_bytes"] for x in xs)
        print(f"{name:8} {mode:10} {est/M:9.1f}M {meas/M:9.1f}M {100*(est-meas)/meas:+6.1f}% "
              f"{med(x['rss_before_steps'] for x in xs)/M:8.1f}M {med(med(x['step_secs']) for x in xs):7.2f}")
def act(x):
    e = x["estimate"]
    return x["peak_steps_bytes"] - x["rss_before_steps"] - e["gradients"] - e["optimizer"]
a, b = runs("deep", "none"), runs("deep", "every1")
ta, tb = med(med(x["step_secs"]) for x in a), med(med(x["step_secs"]) for x in b)
aa, ab = med(act(x) for x in a), med(act(x) for x in b)
print(f"12 blocks, sequence 512 (medians of {len(a)} alternating runs): activation memory {aa/M:.1f}M without "
      f"recompute, {ab/M:.1f}M with ({100*ab/aa:.1f}%); step {ta:.2f} s vs {tb:.2f} s ({100*(tb/ta-1):+.1f}%)")
PY
