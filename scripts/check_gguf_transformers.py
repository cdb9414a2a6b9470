#!/usr/bin/env python3
"""Our GGUF export and import of Qwen3 and Gemma-3 against transformers' own GGUF loader.

transformers' loader reads only some of the metadata: it builds Qwen3 with its default
head_dim (128) and Gemma-3 with its default query_pre_attn_scalar (256). So this check makes
tiny random models at those values (Qwen3: hidden 64, 4/2 heads of 128; Gemma-3: hidden 64,
4/2 heads of 256, both layers sliding as llama.cpp's gemma3 assumes), saves them with
transformers, exports them with `maskprune export-gguf --type f32`, imports that file back
with `maskprune import-gguf`, and compares on the same token ids: transformers on the
original directory, transformers' GGUF loader on our file, and transformers on our import.
Writes results/gguf-transformers.{json,md}.

Usage: V/bin/python scripts/check_gguf_transformers.py MASKPRUNE_BIN WORK_DIR
"""
import json
import os
import shutil
import subprocess
import sys

import torch
from transformers import (AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def make(name, work):
    torch.manual_seed(3)
    common = dict(vocab_size=288, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0)
    if name == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=128, tie_word_embeddings=False, **common))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            head_dim=256, query_pre_attn_scalar=256, sliding_window=16, pad_token_id=0,
            layer_types=["sliding_attention", "sliding_attention"], **common))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(0.1 * torch.randn_like(p) if pname.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    out = os.path.join(work, f"tiny-{name}-gguf-check")
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    tok = os.path.join(ROOT, "tests", "fixtures", "tiny-llama")
    PreTrainedTokenizerFast(tokenizer_file=os.path.join(tok, "tokenizer.json"),
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(out)
    return out


def main():
    binary, work = sys.argv[1:3]
    os.makedirs(work, exist_ok=True)
    ids = torch.tensor([[5, 17, 42, 99, 7, 130, 250, 3, 64, 21, 11, 200]])
    rows = []
    for name in ["qwen3", "gemma3"]:
        src = make(name, work)
        gguf = src + ".f32.gguf"
        back = src + "-imported"
        subprocess.run([binary, "--quiet", "export-gguf", src, "--out", gguf, "--type", "f32",
                        "--overwrite"], check=True)
        subprocess.run([binary, "--quiet", "import-gguf", gguf, "--out", back, "--overwrite"],
                       check=True)
        with torch.no_grad():
            original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            loader = AutoModelForCausalLM.from_pretrained(
                os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32).eval()
            ours = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
            want = original(ids).logits
            row = {"family": name,
                   "gguf_loader_vs_original": (loader(ids).logits - want).abs().max().item(),
                   "our_import_vs_original": (ours(ids).logits - want).abs().max().item(),
                   "weights_equal": all(torch.equal(a, loader.state_dict()[k])
                                        for k, a in ours.state_dict().items() if k in loader.state_dict())}
        rows.append(row)
        print(row)
    out = os.path.join(ROOT, "results", "gguf-transformers")
    json.dump({"rows": rows}, open(out + ".json", "w"), indent=1)
    lines = ["| family | transformers' GGUF loader vs original, max abs dlogit | our import vs original | weights equal |",
             "|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['gguf_loader_vs_original']:.2e} | {r['our_import_vs_original']:.2e} | "
              f"{r['weights_equal']} |" for r in rows]
    open(out + ".md", "w").write("\n".join(lines) + "\n")
    if any(max(r["gguf_loader_vs_original"], r["our_import_vs_original"]) > 1e-4 for r in rows):
        sys.exit("a GGUF round trip differs from the original")


if __name__ == "__main__":
    main()
