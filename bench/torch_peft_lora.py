#!/usr/bin/env python3
"""PyTorch + PEFT reference for kiln's LoRA benchmark: the same base model (a Hugging Face directory;
for SmolLM2 the one `kiln fuse --model <gguf> --out DIR` writes, de-quantized f32), the same LoRA
(rank, alpha, targets from a kiln YAML config), the same chat data, batch size, padding to the longest
example and thread count. Prints tokens/s (padded positions, as kiln counts them) and peak RSS.
With `--pack` (kiln's `data.pack: true`) examples are packed whole into rows of `--seq-len` as kiln
packs them, and attention stays within each example (a block-diagonal causal mask, as kiln's).

    python3 bench/torch_peft_lora.py --base DIR --config configs/smollm2-lora.yaml --threads 2 --json
    python3 bench/torch_peft_lora.py --base DIR --seq-len 256 --batch-size 4 --pack --device cuda

With `--text FILE` (kiln's `data.format: text`) the rows are windows of that text's tokens, every
position scored; `--targets q_proj,v_proj` overrides the config's target modules.
"""
import argparse
import json
import pathlib
import random
import resource
import statistics
import time

import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from process_clock import since_process_start

ROOT = pathlib.Path(__file__).resolve().parent.parent
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--config", default=str(ROOT / "configs/smollm2-lora.yaml"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seq-len", type=int, help="overrides data.seq_len")
    p.add_argument("--batch-size", type=int, help="overrides train.batch_size")
    p.add_argument("--pack", action="store_true", help="pack examples into full rows (kiln's data.pack)")
    p.add_argument("--text", help="a text file: rows are windows of its tokens, all positions scored")
    p.add_argument("--targets", help="comma-separated target modules, overriding the config's")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    cfg = yaml.safe_load(open(a.config))
    lora, data, train = cfg["finetune"]["lora"], cfg["data"], cfg["train"]
    targets = ALL if lora.get("target_modules") == "all-linear" else lora["target_modules"]
    if a.targets:
        targets = a.targets.split(",")
    tok = AutoTokenizer.from_pretrained(a.base)
    if a.seq_len:
        data["seq_len"] = a.seq_len
    if a.batch_size:
        train["batch_size"] = a.batch_size
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32).to(dev)
    model = get_peft_model(model, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                                             lora_dropout=lora.get("dropout", 0.0), target_modules=targets,
                                             task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    records = [] if a.text else [json.loads(l) for l in open(ROOT / data["train"] / "train.jsonl")]
    corpus = tok(open(a.text).read(), add_special_tokens=False)["input_ids"] if a.text else []
    examples = []
    for r in records:
        full = tok.apply_chat_template(r["messages"], tokenize=False)
        prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
        ids = tok(full, add_special_tokens=False)["input_ids"][: data["seq_len"] + 1]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        labels = [-100 if i < n_prompt else t for i, t in enumerate(ids)]
        examples.append((ids, labels))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["optim"]["lr"],
                            weight_decay=cfg["optim"].get("weight_decay", 0.0))
    rng = random.Random(0)
    bs = train["batch_size"]
    pad = tok.eos_token_id or 0
    rates, first = [], None
    seq = data["seq_len"]

    def packed_batch():
        # Whole examples, in random order, into rows of `seq` positions; the rest is padding.
        rows, row, seg, s_id = [], [], [], 0
        while len(rows) < bs:
            ids, lab = rng.choice(examples)
            n = min(len(ids) - 1, seq)
            if len(row) + n > seq:
                rows.append((row, seg))
                row, seg, s_id = [], [], 0
            row += [(ids[t], lab[t + 1]) for t in range(n)]
            seg += [s_id] * n
            s_id += 1
        rows = [(r + [(pad, -100)] * (seq - len(r)), sg + [sg[-1] + 1] * (seq - len(sg))) for r, sg in rows]
        x = torch.tensor([[t for t, _ in r] for r, _ in rows])
        y = torch.tensor([[t for _, t in r] for r, _ in rows])
        sg = torch.tensor([sg for _, sg in rows])
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        allowed = (sg[:, :, None] == sg[:, None, :]) & causal
        mask = torch.zeros(bs, 1, seq, seq).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        return x, y, mask

    model.train()
    for step in range(a.steps + a.warmup):
        if a.text:
            starts = [rng.randrange(len(corpus) - seq - 1) for _ in range(bs)]
            x = torch.tensor([corpus[i:i + seq] for i in starts])
            y = torch.tensor([corpus[i + 1:i + seq + 1] for i in starts])
            mask, n = None, seq
        elif a.pack:
            x, y, mask = packed_batch()
            n = seq
        else:
            batch = rng.sample(examples, bs)
            n = max(len(ids) for ids, _ in batch) - 1
            x = torch.tensor([(ids + [pad] * n)[:n] for ids, _ in batch])
            y = torch.tensor([(lab[1:] + [-100] * n)[:n] for _, lab in batch])
            mask = None
        x, y = x.to(dev), y.to(dev)
        t0 = time.perf_counter()
        if mask is not None:
            logits = model(input_ids=x, attention_mask=mask.to(dev)).logits
        else:
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
        if first is None:
            first = since_process_start()
        if step >= a.warmup:
            rates.append(bs * n / (time.perf_counter() - t0))
    report = {
        "framework": f"pytorch {torch.__version__} + peft",
        "threads": torch.get_num_threads(),
        "trainable_parameters": trainable,
        "parameters": total,
        "first_step_secs": first,
        "median_tokens_per_s": statistics.median(rates),
        "min_tokens_per_s": min(rates),
        "max_tokens_per_s": max(rates),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tokens_per_step": bs * seq if a.pack or a.text else None,
    }
    if dev.type == "cuda":
        report["device"] = torch.cuda.get_device_name(dev)
        report["peak_device_bytes"] = torch.cuda.max_memory_reserved(dev)
        report["peak_device_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    print(json.dumps(report) if a.json else "\n".join(f"{k}: {v}" for k, v in report.items()))


if __name__ == "__main__":
    main()
