#!/usr/bin/env bash
# GPU figures: kiln on wgpu (Vulkan) against PyTorch on CUDA, on a lent NVIDIA machine (the
# workplace's `device` tool), for the two benchmark shapes of docs/PERFORMANCE.md and a
# compute-heavy one (LoRA on random weights of SmolLM2-360M's shapes, rows of 1024 tokens, batch
# 8), plus the time from `kiln train` start to the first completed step with a cold and a warm
# autotune cache.
# Not a test: it prints figures.
#
# That machine has no Rust toolchain and reaches no network, so what it needs travels with the
# call (paths ignored by git, listed in `carry`):
#   .devrun/kiln.gz            the kiln binary built here (stripped, gzip)
#   .devrun/smollm2/           SmolLM2-135M's config.json, tokenizer.json, tokenizer_config.json
#   .gl/*.deb                  the Vulkan loader (Debian's libvulkan1 and friends)
# The 538 MB f32 weights don't fit the 64 MiB a call can carry, so PyTorch draws random weights
# of SmolLM2-135M's exact shapes there (seeded) and both sides train that: throughput doesn't
# depend on the weights' values.
#
#   bench/gpu.sh [ROUNDS]      (on the device machine; $OUT collects the JSON and logs)
#   bench/gpu.sh util          GPU utilisation while each side trains (host-bound or device-bound)
set -uo pipefail
mode=all
if [ "${1:-}" = util ]; then mode=util; shift; fi
rounds="${1:-2}"
out="${OUT:-/tmp/kiln-gpu}"
mkdir -p "$out"
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
ls /usr/local/nvidia/share/vulkan/icd.d /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>/dev/null | tr '\n' ' '; echo
[ -x /tmp/kiln ] || { gunzip -c .devrun/kiln.gz > /tmp/kiln && chmod +x /tmp/kiln; }
kiln=/tmp/kiln
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
"$kiln" devices 2>&1 | tee "$out/devices.txt"

# Random weights of SmolLM2-135M's shapes, saved as the f32 Hugging Face directory kiln and
# transformers both load.
[ -f /tmp/smollm2-random/model.safetensors ] || python3 - <<'PY' 2>&1 | tail -2
import shutil, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
c = LlamaConfig.from_pretrained(".devrun/smollm2")
m = LlamaForCausalLM(c).float()
m.save_pretrained("/tmp/smollm2-random", safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f".devrun/smollm2/{f}", "/tmp/smollm2-random/")
print("random SmolLM2-135M-shaped base:", sum(p.numel() for p in m.parameters()), "parameters")
PY
# The compute-heavy shape's base: SmolLM2-360M's shapes (its config.json differs from 135M's in
# these fields only), random weights, the same tokenizer.
[ -f /tmp/smollm2-360m-random/model.safetensors ] || python3 - <<'PY' 2>&1 | tail -2
import shutil, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
c = LlamaConfig.from_pretrained(".devrun/smollm2")
c.hidden_size, c.intermediate_size, c.num_hidden_layers = 960, 2560, 32
c.num_attention_heads, c.num_key_value_heads, c.head_dim = 15, 5, 64
m = LlamaForCausalLM(c).float()
m.save_pretrained("/tmp/smollm2-360m-random", safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f".devrun/smollm2/{f}", "/tmp/smollm2-360m-random/")
print("random SmolLM2-360M-shaped base:", sum(p.numel() for p in m.parameters()), "parameters")
PY

scratch=(configs/shakespeare-char.yaml)
lora=(configs/smollm2-lora.yaml --set model.pretrained=/tmp/smollm2-random --set data.seq_len=256
  --set train.batch_size=4 --set data.pack=true)
text=datasets/shakespeare/input.txt
heavy=(configs/smollm2-lora.yaml --set model.pretrained=/tmp/smollm2-360m-random --set data.seq_len=1024
  --set train.batch_size=8 --set data.format=text --set data.train="$text" --set data.mask_prompt=false)
heavy_torch=(--base /tmp/smollm2-360m-random --device cuda --seq-len 1024 --batch-size 8 --text "$text")

if [ "$mode" = util ]; then
  # Samples the GPU's utilisation every 100 ms while each run trains; the mean over the second
  # half of the run (after setup and the first kernels) says whether the device or the host is
  # the bottleneck.
  util() { # name command...
    local name="$1"; shift
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 100 > "$out/util-$name.txt" &
    local smi=$!
    "$@" > "$out/util-$name.json" 2> "$out/util-$name.err"
    kill "$smi"
    python3 -c "import sys; v=[int(l) for l in open(sys.argv[1]) if l.strip().isdigit()]; h=v[len(v)//2:]; print(f'{sys.argv[2]:14} GPU busy {sum(h)/max(len(h),1):5.1f}% of the second half ({len(v)} samples)')" "$out/util-$name.txt" "$name"
  }
  util kiln-scratch "$kiln" bench "${scratch[@]}" --set backend.kind=wgpu --steps 300 --warmup 10 --json
  util torch-scratch python3 bench/torch_llama.py --device cuda --steps 600 --warmup 10 --json
  util kiln-lora "$kiln" bench "${lora[@]}" --set backend.kind=wgpu --steps 40 --warmup 5 --json
  util torch-lora python3 bench/torch_peft_lora.py --base /tmp/smollm2-random --device cuda --seq-len 256 \
    --batch-size 4 --pack --steps 100 --warmup 5 --json
  util kiln-heavy "$kiln" bench "${heavy[@]}" --set backend.kind=wgpu --steps 20 --warmup 3 --json
  util torch-heavy python3 bench/torch_peft_lora.py "${heavy_torch[@]}" --steps 40 --warmup 3 --json
  tar czf "$out/util.tgz" -C "$out" $(cd "$out" && ls util-*)
  exit 0
fi

# Time to the first completed step, `kiln train` from start: cold (no autotune results on disk),
# then warm (the results CubeCL kept from the cold run).
rm -rf target/environment ~/.cache/cubecl
for pass in cold warm; do
  rm -rf /tmp/runs
  /usr/bin/time -f "%e s wall" "$kiln" train configs/shakespeare-char.yaml --set backend.kind=wgpu \
    --set train.max_steps=20 --set train.eval_every=0 --set train.save_every=0 \
    --set run.output_dir=/tmp/runs > "$out/first-step-$pass.txt" 2>&1
  echo "$pass: $(grep -m1 'done .* s after start' "$out/first-step-$pass.txt")"
done

for r in $(seq "$rounds"); do
  "$kiln" bench "${scratch[@]}" --set backend.kind=wgpu --steps 50 --warmup 10 --json > "$out/scratch-kiln-$r.json" 2> "$out/scratch-kiln-$r.err"
  python3 bench/torch_llama.py --device cuda --steps 50 --warmup 10 --json > "$out/scratch-torch-$r.json" 2> "$out/scratch-torch-$r.err"
  "$kiln" bench "${lora[@]}" --set backend.kind=wgpu --steps 20 --warmup 5 --json > "$out/lora-kiln-$r.json" 2> "$out/lora-kiln-$r.err"
  python3 bench/torch_peft_lora.py --base /tmp/smollm2-random --device cuda --seq-len 256 --batch-size 4 \
    --pack --steps 20 --warmup 5 --json > "$out/lora-torch-$r.json" 2> "$out/lora-torch-$r.err"
  # The same LoRA step issued eagerly (no capture): what the replay is worth on this GPU.
  "$kiln" bench "${lora[@]}" --set backend.kind=wgpu --set backend.capture=false --steps 20 --warmup 5 --json > "$out/lora-eager-kiln-$r.json" 2> "$out/lora-eager-kiln-$r.err"
  # Warmup 5: the capture happens at the fifth step, before the measured window.
  "$kiln" bench "${heavy[@]}" --set backend.kind=wgpu --steps 8 --warmup 5 --json > "$out/heavy-kiln-$r.json" 2> "$out/heavy-kiln-$r.err"
  python3 bench/torch_peft_lora.py "${heavy_torch[@]}" --steps 8 --warmup 3 --json > "$out/heavy-torch-$r.json" 2> "$out/heavy-torch-$r.err"
  echo "round $r done"
done
python3 bench/compare.py "$out" scratch lora heavy
# Replayed against eager (kiln alone): tokens/s and the host's time to issue a step.
python3 - "$out" <<'PY'
import glob, json, sys
for kind in ("lora", "lora-eager"):
    for path in sorted(glob.glob(f"{sys.argv[1]}/{kind}-kiln-*.json")):
        r = json.load(open(path))
        print(f"{kind}: {r['median_tokens_per_s']:.0f} tokens/s, issue {1e3 * r['median_issue_secs']:.2f} ms "
              f"({1e3 * r['median_issue_cpu_secs']:.2f} ms CPU), {r['replayed_steps']} steps replayed")
PY
# Only a few files come back from the device machine: the reports travel as one archive.
tar czf "$out/reports.tgz" -C "$out" $(cd "$out" && ls ./*.json ./*.err ./*.txt)
