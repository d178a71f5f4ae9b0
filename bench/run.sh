#!/usr/bin/env bash
# Training throughput and peak memory, kiln against PyTorch, on the same model, shapes, data and
# thread count, on the CPU. Alternates the two ROUNDS times (each run its own process) and prints
# min/median/max tokens/s over rounds, peak memory, the time to the first step, and the ratios.
#
#   bench/run.sh [THREADS] [ROUNDS] [CASE ...]
#
# Cases (docs/PERFORMANCE.md):
#   scratch  the from-scratch nanoGPT-CPU-shaped model (configs/shakespeare-char.yaml) against
#            bench/torch_llama.py, the same architecture in PyTorch
#   lora     LoRA r=8 on all linear layers of SmolLM2-135M-Instruct, sequence 256, batch 4
#            (packed), against PyTorch + PEFT on the same f32 weights (bench/torch_peft_lora.py)
#   plain    the plain LoRA workload: PEFT's default targets (q_proj, v_proj), rows of 256 tokens
#            of Shakespeare, every position scored, batch 4, same model, against PyTorch + PEFT
#
# Needs python3 with torch, pyyaml, transformers and peft. Not a test: it prints figures, which go
# into docs/PERFORMANCE.md with the machine and date. bench/gpu.sh does the same on a GPU.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
cd "$root"
threads="${1:-$(nproc)}"
rounds="${2:-3}"
shift $(( $# < 2 ? $# : 2 ))
cases=(scratch lora plain)
[ $# -gt 0 ] && cases=("$@")
cargo build --quiet --bin kiln
kiln="$CARGO_TARGET_DIR/debug/kiln"
out="$(mktemp -d)"
export RAYON_NUM_THREADS="$threads"

for case in "${cases[@]}"; do
  case "$case" in
    scratch) ;;
    lora|plain)
      gguf="$("$root/scripts/fetch-smollm2")"
      base="$HOME/.cache/kiln/models/smollm2-hf"
      # PyTorch trains the same f32 weights kiln de-quantizes from the GGUF.
      [ -f "$base/model.safetensors" ] || "$kiln" fuse --model "$gguf" --out "$base" >/dev/null
      ;;
    *) echo "unknown case $case (scratch, lora, plain)" >&2; exit 2 ;;
  esac
done
for r in $(seq "$rounds"); do
  for case in "${cases[@]}"; do
    if [ "$case" = scratch ]; then
      "$kiln" bench configs/shakespeare-char.yaml --set backend.kind=cpu --steps 30 --warmup 5 \
        --json > "$out/scratch-kiln-$r.json"
      python3 bench/torch_llama.py --threads "$threads" --steps 30 --warmup 5 --json \
        > "$out/scratch-torch-$r.json"
    elif [ "$case" = plain ]; then
      "$kiln" bench configs/smollm2-lora.yaml --set model.pretrained="$gguf" --set data.seq_len=256 \
        --set train.batch_size=4 --set data.format=text --set data.train="$root/datasets/shakespeare/input.txt" \
        --set 'finetune.lora.target_modules=[q_proj, v_proj]' --set data.mask_prompt=false \
        --set backend.kind=cpu --steps 6 --warmup 1 --json > "$out/plain-kiln-$r.json"
      python3 bench/torch_peft_lora.py --base "$base" --threads "$threads" --seq-len 256 \
        --batch-size 4 --text datasets/shakespeare/input.txt --targets q_proj,v_proj --steps 6 \
        --warmup 1 --json 2>/dev/null > "$out/plain-torch-$r.json"
    else
      "$kiln" bench configs/smollm2-lora.yaml --set model.pretrained="$gguf" --set data.seq_len=256 \
        --set train.batch_size=4 --set data.pack=true --set backend.kind=cpu --steps 4 --warmup 1 \
        --json > "$out/lora-kiln-$r.json"
      python3 bench/torch_peft_lora.py --base "$base" --threads "$threads" --seq-len 256 \
        --batch-size 4 --pack --steps 4 --warmup 1 --json 2>/dev/null > "$out/lora-torch-$r.json"
    fi
  done
done
echo "threads: $threads"
python3 bench/compare.py "$out" "${cases[@]}"
