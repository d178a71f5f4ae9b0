#!/usr/bin/env python3
"""PyTorch reference for kiln's training benchmark: the same Llama architecture (RMSNorm, rotate-half
RoPE, SwiGLU, grouped-query attention, tied embeddings), the same shapes, AdamW, the same char corpus.

    python3 bench/torch_llama.py --threads 2 --steps 30 --warmup 5 [--json]

Reads the shapes from a kiln YAML config so both sides train the same model
(default: configs/shakespeare-char.yaml). Prints tokens/s (median/min/max over steps) and peak RSS.
"""
import argparse
import json
import math
import pathlib
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from process_clock import since_process_start


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, h, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        self.h, self.kv, self.hd = h, kv, d // h
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, kv * self.hd, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.gate_proj = nn.Linear(d, c["intermediate_size"], bias=False)
        self.up_proj = nn.Linear(d, c["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(c["intermediate_size"], d, bias=False)
        self.input_layernorm = RMSNorm(d, c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(d, c["rms_norm_eps"])

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        y = self.input_layernorm(x)
        q = self.q_proj(y).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(y).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(y).view(b, t, self.kv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv != self.h:
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class Llama(nn.Module):
    def __init__(self, c, vocab):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, c["hidden_size"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        hd = c["hidden_size"] // c["num_attention_heads"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(c["max_position_embeddings"]).float(), inv)
        emb = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.embed_tokens(idx)
        cos, sin = self.cos[:t], self.sin[:t]
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.norm(x) @ self.embed_tokens.weight.t()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(root / "configs/shakespeare-char.yaml"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    cfg = yaml.safe_load(open(a.config))
    m = {"num_key_value_heads": None, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, **cfg["model"]}
    m["num_key_value_heads"] = m["num_key_value_heads"] or m["num_attention_heads"]
    data, train = cfg["data"], cfg["train"]
    text = (root / data["train"]).read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:200_000]], dtype=torch.long)
    bs, seq = train["batch_size"], data["seq_len"]
    model = Llama(m, len(chars)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["optim"]["lr"], betas=tuple(cfg["optim"]["betas"]),
                            weight_decay=cfg["optim"]["weight_decay"])
    gen = torch.Generator().manual_seed(0)
    times = []
    first = None
    for step in range(a.steps + a.warmup):
        t0 = time.perf_counter()
        ix = torch.randint(len(ids) - seq - 1, (bs,), generator=gen)
        x = torch.stack([ids[i:i + seq] for i in ix])
        y = torch.stack([ids[i + 1:i + seq + 1] for i in ix])
        loss = model(x.to(dev), y.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
        if first is None:
            first = since_process_start()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    tps = [bs * seq / t for t in times]
    report = {
        "framework": f"pytorch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": bs * seq,
        "first_step_secs": first,
        "median_tokens_per_s": statistics.median(tps),
        "min_tokens_per_s": min(tps),
        "max_tokens_per_s": max(tps),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if dev.type == "cuda":
        report["device"] = torch.cuda.get_device_name(dev)
        report["peak_device_bytes"] = torch.cuda.max_memory_reserved(dev)
        report["peak_device_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    if a.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
