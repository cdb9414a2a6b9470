#!/usr/bin/env python3
"""Random-weight checkpoints with the shapes of real models, for memory and speed
measurements without a download: sharded bf16 safetensors (~2 GB shards, with
model.safetensors.index.json), config.json and a tokenizer copied from another model
directory (its ids must fit the vocabulary, which they do for SmolLM2's 49,152 tokens).

  1.7b: SmolLM2-1.7B's shape: llama, 24 layers, hidden 2048, 32/32 heads, MLP 8192,
        vocab 49,152, tied embeddings (3.4 GB).
  7b:   a Qwen2-7B-style GQA shape: qwen2 (q/k/v biases), 28 layers, hidden 3584, 28/4 heads,
        MLP 18,944, vocab 152,064, untied (15.2 GB).

Usage: V/bin/python scripts/make_shape_checkpoint.py {1.7b|7b} OUT_DIR TOKENIZER_MODEL_DIR
Needs torch and safetensors (the reference venv).
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

SHAPES = {
    "1.7b": dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=24,
                 hidden_size=2048, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=8192, vocab_size=49152, tie_word_embeddings=True,
                 rms_norm_eps=1e-5, rope_theta=130000.0, max_position_embeddings=8192),
    "7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=28,
               hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
               rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768),
}
SHARD_BYTES = 2 << 30


def tensors(c):
    """(name, shape) of every tensor, in order."""
    h, f, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    yield "model.embed_tokens.weight", (c["vocab_size"], h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (q, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        if c["model_type"] == "qwen2":
            yield p + "self_attn.q_proj.bias", (q,)
            yield p + "self_attn.k_proj.bias", (kv,)
            yield p + "self_attn.v_proj.bias", (kv,)
        yield p + "self_attn.o_proj.weight", (h, q)
        yield p + "mlp.gate_proj.weight", (f, h)
        yield p + "mlp.up_proj.weight", (f, h)
        yield p + "mlp.down_proj.weight", (h, f)
    yield "model.norm.weight", (h,)
    if not c["tie_word_embeddings"]:
        yield "lm_head.weight", (c["vocab_size"], h)


def main():
    shape, out, tok_dir = sys.argv[1:4]
    c = dict(SHAPES[shape], hidden_act="silu", torch_dtype="bfloat16", bos_token_id=0,
             eos_token_id=0)
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, os.path.join(out, name), metadata={"format": "pt"})
            shards.append(name)
            for k in current:
                weight_map[k] = name
            current, size = {}, 0

    for name, dims in tensors(c):
        if name.endswith("norm.weight"):
            t = torch.ones(dims, dtype=torch.bfloat16)
        else:
            t = (torch.randn(dims, generator=gen) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > SHARD_BYTES:
            flush()
        current[name] = t
        size += t.numel() * 2
    flush()
    # Name the shards as transformers does (model-0000i-of-0000n.safetensors).
    n = len(shards)
    renamed = {s: s.replace(".safetensors", f"-of-{n:05d}.safetensors") for s in shards}
    for old, new in renamed.items():
        os.replace(os.path.join(out, old), os.path.join(out, new))
    total = sum(os.path.getsize(os.path.join(out, s)) for s in renamed.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    json.dump(index, open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=1)
    json.dump(c, open(os.path.join(out, "config.json"), "w"), indent=1)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        if os.path.exists(os.path.join(tok_dir, f)):
            shutil.copy(os.path.join(tok_dir, f), os.path.join(out, f))
    print(f"wrote {out}: {shape} shape, {n} shards, {total / 2**30:.2f} GiB of bf16 weights")


if __name__ == "__main__":
    main()
