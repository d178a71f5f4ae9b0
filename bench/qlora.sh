#!/usr/bin/env bash
# QLoRA on the CPU: SmolLM2-135M-Instruct LoRA (r=8, all linear layers, sequence 256, batch 4
# packed, recompute every block), the frozen base held in f32 (`base_quant: none`) against the
# GGUF file's own Q4_1/Q8_0 blocks (`keep`), and quantized as it loads from the f32 HF directory
# (`q8_0`, `q4_k`). Alternates them ROUNDS times, each run its own process, and prints per case
# the median tokens/s, the resident memory before the first step and the peak, and each as a
# ratio of the f32 base's.
#
#   bench/qlora.sh [THREADS] [ROUNDS]
#
# Not a test: its figures go into docs/PERFORMANCE.md with the machine and date.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
cd "$root"
threads="${1:-$(nproc)}"
rounds="${2:-3}"
cargo build --quiet --bin kiln
kiln="$CARGO_TARGET_DIR/debug/kiln"
gguf="$("$root/scripts/fetch-smollm2")"
hf="$HOME/.cache/kiln/models/smollm2-hf"
[ -f "$hf/model.safetensors" ] || "$kiln" fuse --model "$gguf" --out "$hf" >/dev/null
out="$(mktemp -d)"
export RAYON_NUM_THREADS="$threads"
cases=("none $gguf" "keep $gguf" "q8_0 $hf" "q4_k $hf")
for r in $(seq "$rounds"); do
  for c in "${cases[@]}"; do
    set -- $c
    "$kiln" bench configs/smollm2-lora.yaml --set model.pretrained="$2" --set data.seq_len=256 \
      --set train.batch_size=4 --set data.pack=true --set backend.kind=cpu \
      --set 'memory.checkpointing=every: 1' --set finetune.base_quant="$1" \
      --steps 4 --warmup 1 --json > "$out/$1-$r.json"
  done
done
echo "threads: $threads, rounds: $rounds"
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def runs(case):
    return [json.load(open(f"{out}/{case}-{r}.json")) for r in range(1, rounds + 1)]
def med(case, key):
    return statistics.median(r[key] for r in runs(case))
base = {k: med("none", k) for k in ("median_tokens_per_s", "rss_before_steps", "peak_rss_bytes")}
print(f"{'base_quant':<10} {'tokens/s':>9} {'x f32':>6} {'before step 1':>14} {'x f32':>6} {'peak':>9} {'x f32':>6}")
for case in ("none", "keep", "q8_0", "q4_k"):
    t, b, p = (med(case, k) for k in ("median_tokens_per_s", "rss_before_steps", "peak_rss_bytes"))
    print(f"{case:<10} {t:>9.0f} {t / base['median_tokens_per_s']:>6.2f} {b / 2**20:>11.0f} MiB "
          f"{b / base['rss_before_steps']:>6.2f} {p / 2**20:>6.0f} MiB {p / base['peak_rss_bytes']:>6.2f}")
PY
