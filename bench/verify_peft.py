#!/usr/bin/env python3
"""Checks a kiln LoRA adapter against Hugging Face PEFT and a kiln-fused model against transformers.

    python3 bench/verify_peft.py --base BASE --adapter ADAPTER_DIR [--text FILE]

BASE is a Hugging Face model directory or a GGUF file (converted first with `kiln fuse` without an
adapter, since PEFT needs an HF base). The script:
  1. has kiln write its logits for the first window of --text (base + adapter),
  2. loads the base with transformers and the adapter with `peft.PeftModel.from_pretrained`,
     reports missing / unexpected adapter keys, and compares logits,
  3. has `kiln fuse` merge the adapter, loads the result with `AutoModelForCausalLM`, compares logits.
Needs: pip install torch transformers peft safetensors.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent


def kiln(*args):
    cmd = [str(ROOT / "scripts/kiln"), *map(str, args)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--text", default=str(ROOT / "datasets/shakespeare/input.txt"))
    p.add_argument("--seq-len", type=int, default=64)
    a = p.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="kiln-verify-"))
    text = tmp / "sample.txt"
    text.write_text(pathlib.Path(a.text).read_text(encoding="utf-8")[:2000], encoding="utf-8")

    base = pathlib.Path(a.base)
    if not (base / "config.json").is_file():
        hf_base = tmp / "base"
        kiln("fuse", "--model", base, "--out", hf_base)
        base = hf_base

    # 1. kiln: base + adapter
    kiln_out = tmp / "kiln.safetensors"
    kiln("eval", "--model", a.base, "--adapter", a.adapter, "--data", text, "--seq-len", a.seq_len,
         "--logits-out", kiln_out, "--backend", "cpu")
    k = load_file(kiln_out)
    ids = k["input_ids"].long().unsqueeze(0)

    # 2. PEFT
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(model, a.adapter).eval()
    adapter = load_file(pathlib.Path(a.adapter) / "adapter_model.safetensors")
    wanted = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    # PEFT names parameters base_model.model....lora_A.default.weight; files omit the adapter name,
    # and DoRA's magnitude is saved as ...lora_magnitude_vector (no .weight).
    present = {n.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
               for n in wanted}
    missing = sorted(present - set(adapter))
    unexpected = sorted(set(adapter) - present)
    with torch.no_grad():
        peft_logits = peft_model(ids).logits[0]
    d_peft = (peft_logits - k["logits"]).abs().max().item()

    # 3. fused model in transformers
    fused = tmp / "fused"
    kiln("fuse", "--model", a.base, "--adapter", a.adapter, "--out", fused)
    fused_model = AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32).eval()
    with torch.no_grad():
        fused_logits = fused_model(ids).logits[0]
    d_fused = (fused_logits - k["logits"]).abs().max().item()
    # Both sides compute in f32; an f64 run of the fused model shows how far each is from exact.
    exact_model = AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float64).eval()
    with torch.no_grad():
        exact = exact_model(ids).logits[0]
    err_kiln = (k["logits"].double() - exact).abs().max().item()
    err_torch = (fused_logits.double() - exact).abs().max().item()
    # PEFT itself in f64: the adapter applied as PEFT applies it, without f32 rounding on the reference side.
    model64 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    peft64 = PeftModel.from_pretrained(model64, a.adapter).eval()
    peft64.double()
    with torch.no_grad():
        peft_exact = peft64(ids).logits[0]
    err_kiln_peft64 = (k["logits"].double() - peft_exact).abs().max().item()
    err_peft32_peft64 = (peft_logits.double() - peft_exact).abs().max().item()

    report = {
        "adapter_tensors": len(adapter),
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "tokens": ids.shape[1],
        "max_abs_diff_peft_vs_kiln": d_peft,
        "max_abs_diff_fused_transformers_vs_kiln": d_fused,
        "logit_scale": k["logits"].abs().max().item(),
        "max_abs_err_kiln_f32_vs_f64": err_kiln,
        "max_abs_err_transformers_f32_vs_f64": err_torch,
        "max_abs_diff_peft_f64_vs_kiln": err_kiln_peft64,
        "max_abs_err_peft_f32_vs_f64": err_peft32_peft64,
    }
    # The gate: kiln's f32 logits within 1e-4 (absolute, every logit) of PEFT's and of the fused model's
    # logits computed in f64 by PyTorch, i.e. of the exact values. f32 against f32 is reported too, but
    # there both sides round (each by ~5e-5 to 9e-5 at logit magnitudes near 30 over 30 layers), so their
    # difference measures the two roundings added, not kiln's error.
    report["allclose_1e-4_peft_f32"] = torch.allclose(peft_logits, k["logits"], rtol=1e-4, atol=1e-4)
    report["allclose_1e-4_fused_f32"] = torch.allclose(fused_logits, k["logits"], rtol=1e-4, atol=1e-4)
    close_peft = err_kiln_peft64 <= 1e-4
    close_fused = err_kiln <= 1e-4
    report["within_1e-4_of_peft_f64"] = close_peft
    report["within_1e-4_of_fused_f64"] = close_fused
    print(json.dumps(report, indent=2))
    ok = not missing and not unexpected and close_peft and close_fused
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
