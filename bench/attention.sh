#!/usr/bin/env bash
# Long sequences with attention in tiles: peak memory against the planner, the reach, and speed
# against PyTorch's scaled_dot_product_attention + PEFT on the same shapes and threads. Not a
# test: it prints figures, which go into docs/PERFORMANCE.md with the machine and date.
#
#   bench/attention.sh [THREADS] [ROUNDS] [KILN_BEFORE]
#
# The workload: LoRA r=8 on all linear layers of SmolLM2-135M-Instruct, rows of Shakespeare text
# (every position scored), batch 1, no recompute.
#   memory  sequence 2048: the planner's estimate and the peak RSS while stepping (`kiln bench`);
#           with KILN_BEFORE (a kiln binary from before tiled attention) its peak too
#   reach   sequence 8192: one step, its peak and the estimate
#   speed   sequence 2048: tokens/s, kiln against bench/torch_peft_lora.py, ROUNDS alternating
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
cd "$root"
threads="${1:-$(nproc)}"
rounds="${2:-3}"
before="${3:-}"
cargo build --quiet --bin kiln
kiln="$CARGO_TARGET_DIR/debug/kiln"
out="$(mktemp -d)"
export RAYON_NUM_THREADS="$threads"
gguf="$("$root/scripts/fetch-smollm2")"
base="$HOME/.cache/kiln/models/smollm2-hf"
[ -f "$base/model.safetensors" ] || "$kiln" fuse --model "$gguf" --out "$base" >/dev/null
text="$root/datasets/shakespeare/input.txt"
shape() { # seq
  echo configs/smollm2-lora.yaml --set model.pretrained="$gguf" --set data.seq_len="$1" \
    --set train.batch_size=1 --set data.format=text --set data.train="$text" \
    --set data.mask_prompt=false --set memory.checkpointing=none --set backend.kind=cpu
}
# shellcheck disable=SC2046
"$kiln" bench $(shape 2048) --steps 2 --warmup 1 --json > "$out/memory.json"
if [ -n "$before" ]; then
  # shellcheck disable=SC2046
  "$before" bench $(shape 2048) --steps 2 --warmup 1 --json > "$out/memory-before.json"
fi
# shellcheck disable=SC2046
"$kiln" bench $(shape 8192) --steps 1 --warmup 1 --json > "$out/reach.json"
for r in $(seq "$rounds"); do
  # shellcheck disable=SC2046
  "$kiln" bench $(shape 2048) --steps 3 --warmup 1 --json > "$out/speed-kiln-$r.json"
  python3 bench/torch_peft_lora.py --base "$base" --threads "$threads" --seq-len 2048 \
    --batch-size 1 --text "$text" --steps 3 --warmup 1 --json 2>/dev/null > "$out/speed-torch-$r.json"
done
python3 - "$out" "$threads" <<'PY'
import json, pathlib, platform, statistics, sys
out, threads = pathlib.Path(sys.argv[1]), sys.argv[2]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"machine: {cpu}, {threads} threads")
M = 2**20
load = lambda name: json.loads((out / name).read_text())
m = load("memory.json")
est, peak = m["estimate"]["total"], m["peak_steps_bytes"]
print(f"seq 2048: estimated {est/M:.0f} MiB, measured peak {peak/M:.0f} MiB ({100*(est-peak)/peak:+.1f}%)")
if (out / "memory-before.json").exists():
    b = load("memory-before.json")
    print(f"seq 2048 before: estimated {b['estimate']['total']/M:.0f} MiB, measured peak "
          f"{b['peak_steps_bytes']/M:.0f} MiB; now {100*peak/b['peak_steps_bytes']:.1f}% of it")
r = load("reach.json")
print(f"seq 8192: estimated {r['estimate']['total']/M:.0f} MiB, measured peak {r['peak_steps_bytes']/M:.0f} MiB, "
      f"step {statistics.median(r['step_secs']):.1f} s, {r['median_tokens_per_s']:.0f} tokens/s")
med = statistics.median
k = [load(f"speed-kiln-{i}.json")["median_tokens_per_s"] for i in range(1, len(list(out.glob("speed-kiln-*"))) + 1)]
t = [load(f"speed-torch-{i}.json")["median_tokens_per_s"] for i in range(1, len(list(out.glob("speed-torch-*"))) + 1)]
print(f"seq 2048 tokens/s: kiln {min(k):.0f} / {med(k):.0f} / {max(k):.0f}, PyTorch SDPA + PEFT "
      f"{min(t):.0f} / {med(t):.0f} / {max(t):.0f} (min / median / max); kiln / PyTorch {med(k)/med(t):.2f}x")
peak = lambda who: med(load(p.name)["peak_rss_bytes"] for p in out.glob(f"speed-{who}-*.json"))
print(f"seq 2048 peak RSS (loading included): kiln {peak('kiln')/M:.0f} MiB, PyTorch {peak('torch')/M:.0f} MiB "
      f"({peak('kiln')/peak('torch'):.2f}x)")
PY
