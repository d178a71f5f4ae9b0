#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/seeds/<target>/: small valid files of each kind, so that the
fuzzer starts from inputs that get deep into each reader. Committed; `cargo test` replays them.

    pip install gguf numpy tokenizers && python3 fuzz/make_seeds.py
"""
import json
import pathlib
import shutil
import struct

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFWriter, quants

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz/seeds"
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def out(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def safetensors_bytes(tensors, metadata=None):
    header, blobs, at = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def tiny_gguf(path, with_tokenizer=True):
    w = GGUFWriter(str(path), "llama")
    d, ffn, vocab = 32, 32, 8
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if with_tokenizer:
        tokens = ["<|im_start|>", "<|im_end|>", "H", "i", "Ġ", "Hi", "1", "9"]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types([3, 3, 1, 1, 1, 1, 1, 1])
        w.add_token_merges(["H i"])
        w.add_eos_token_id(1)
        w.add_chat_template(SMOL_TEMPLATE)
    else:
        w.add_vocab_size(vocab)
    rng = np.random.default_rng(0)
    kinds = [("attn_q", T.Q4_0, d), ("attn_k", T.Q8_0, d // 2), ("attn_v", T.F16, d // 2),
             ("attn_output", T.BF16, d), ("ffn_gate", T.Q4_1, ffn), ("ffn_up", T.Q4_1, ffn),
             ("ffn_down", T.Q4_1, d)]

    def put(name, rows, cols, qtype):
        x = rng.standard_normal((rows, cols)).astype(np.float32) if rows else rng.standard_normal(cols).astype(np.float32)
        if qtype == T.F32:
            w.add_tensor(name, x)
        elif qtype == T.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            q = quants.quantize(x, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    put("token_embd.weight", vocab, d, T.Q8_0)
    put("output_norm.weight", 0, d, T.F32)
    put("blk.0.attn_norm.weight", 0, d, T.F32)
    put("blk.0.ffn_norm.weight", 0, d, T.F32)
    for g, qtype, rows in kinds:
        put(f"blk.0.{g}.weight", rows, ffn if g == "ffn_down" else d, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    shutil.rmtree(SEEDS, ignore_errors=True)
    for y in sorted((ROOT / "configs").glob("*.yaml")):
        out("config_yaml", y.name, y.read_bytes())
    out("config_yaml", "minimal.yaml", "data:\n  train: datasets/shakespeare/input.txt\n")

    f32 = np.arange(6, dtype=np.float32).tobytes()
    out("safetensors", "f32.safetensors", safetensors_bytes({"a": ("F32", [2, 3], f32)}, {"format": "pt"}))
    out("safetensors", "mixed.safetensors", safetensors_bytes({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("F16", [2, 2], np.ones(4, np.float16).tobytes()),
        "b": ("BF16", [3], b"\x80\x3f" * 3),
        "c": ("F32", [], np.float32(2).tobytes()),
        "d": ("I64", [1], np.int64(5).tobytes()),
    }))

    for d in sorted((ROOT / "tests/fixtures/parity").iterdir()):
        out("hf_json", f"{d.name}-config.json", (d / "config.json").read_bytes())
    out("hf_json", "index.json", (ROOT / "tests/fixtures/parity/llama3-untied-bf16-sharded/model.safetensors.index.json").read_bytes())

    SEEDS.joinpath("gguf").mkdir(parents=True, exist_ok=True)
    tiny_gguf(SEEDS / "gguf/tokenizer.gguf")
    tiny_gguf(SEEDS / "gguf/no-tokenizer.gguf", with_tokenizer=False)

    out("jsonl", "text.jsonl", '{"text": "I = 1"}\n{"text": "II = 2, III = 3"}\n')
    out("jsonl", "completions.jsonl", '{"prompt": "Write 4.", "completion": "IV"}\n\n{"prompt": "9?", "completion": "IX"}\n')
    out("jsonl", "chat.jsonl", json.dumps({"messages": [
        {"role": "system", "content": "Roman numerals only."}, {"role": "user", "content": "12"},
        {"role": "assistant", "content": "XII"}, {"role": "user", "content": "40"},
        {"role": "assistant", "content": "XL"}]}) + "\n")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello, world! I = 1, II = 2, MCMLXXXVII = 1987"] * 4, trainer)
    out("tokenizer_json", "bpe.json", tok.to_str())
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "he": 1, "##llo": 2}, unk_token="[UNK]"))
    out("tokenizer_json", "wordpiece.json", wp.to_str())
    print("wrote", sum(1 for _ in SEEDS.rglob("*") if _.is_file()), "seeds under", SEEDS)


if __name__ == "__main__":
    main()
