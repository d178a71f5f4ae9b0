#!/usr/bin/env bash
# The round trip of every model family, by hand (needs torch, transformers, peft): a short LoRA
# run on all linear modules of each tiny fixture (tests/fixtures/families, made by transformers),
# then bench/verify_peft.py: PEFT loads the adapter with kiln's logits, and transformers loads
# `kiln fuse`'s model with kiln's logits. Not a test: it prints figures for the issue notes.
#
#   bench/verify_families.sh [FAMILY ...]      (default: qwen3 gemma3 phi3 smollm3)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
cd "$root"
cargo build --quiet --bin kiln
work="$(mktemp -d -t kiln-families.XXXXXX)"
# Plain text in the fixtures' 96 characters.
mkdir -p "$work/data"
python3 - "$work/data" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = [l for l in pathlib.Path("datasets/shakespeare/input.txt").read_text().splitlines() if l.strip()]
for name, part in (("train", lines[:400]), ("valid", lines[400:440])):
    with open(out / f"{name}.jsonl", "w") as f:
        for i in range(0, len(part), 4):
            f.write(json.dumps({"text": "\n".join(part[i:i + 4])}) + "\n")
PY
status=0
for family in "${@:-qwen3 gemma3 phi3 smollm3}"; do
  for f in $family; do
    "$CARGO_TARGET_DIR/debug/kiln" finetune --model "tests/fixtures/families/$f" --data "$work/data" \
      --targets all-linear --rank 4 --alpha 8 --iters 30 --lr 1e-2 --batch-size 2 --seq-len 48 \
      --name "$f" --output-dir "$work/runs" --set backend.kind=cpu >/dev/null
    echo "== $f"
    python3 bench/verify_peft.py --base "tests/fixtures/families/$f" --adapter "$work/runs/$f/latest" \
      --seq-len 48 || status=1
  done
done
exit $status
