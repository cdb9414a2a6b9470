#!/usr/bin/env python3
"""Check `maskprune import-gguf` against transformers' own GGUF loader.

Loads the imported directory with the stock classes (AutoModelForCausalLM, AutoTokenizer) and
the original GGUF through `from_pretrained(dir_of_gguf, gguf_file=NAME)`, feeds both the same
token ids (from the imported tokenizer) and prints the max abs logit difference. Also reports
where the two tokenizers disagree (transformers' GGUF converter ignores llama.cpp's
pre-tokenizer type, e.g. SmolLM's digit splitting).

Usage: V/bin/python scripts/check_gguf_import.py FILE.gguf IMPORTED_DIR [--json OUT]
Needs: torch, transformers, gguf (see README). Run by hand; the tests do not need Python.
"""
import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SENTENCES = [
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Structured pruning removes whole attention heads and MLP channels from a language model.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("imported")
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    ours = AutoModelForCausalLM.from_pretrained(a.imported, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(a.imported)
    gdir, gname = os.path.split(os.path.abspath(a.gguf))
    ref = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, torch_dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    print(f"imported class: {type(ours).__name__}, tokenizer: {type(tok).__name__}")
    worst = 0.0
    rows = []
    for s in SENTENCES:
        ids = tok(s, return_tensors="pt").input_ids
        d = (ours(ids).logits - ref(ids).logits).abs().max().item()
        worst = max(worst, d)
        same_tok = ids[0].tolist() == ref_tok(s).input_ids
        rows.append({"sentence": s, "tokens": ids.shape[1], "max_abs_diff": d, "same_tokens_as_transformers_gguf": same_tok})
        print(f"{ids.shape[1]:3d} tokens  max|dlogit| {d:.3e}  tokens equal to transformers-GGUF tokenizer: {same_tok}")
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    wdiff = max((sd_ours[k] - sd_ref[k]).abs().max().item() for k in sd_ref if k in sd_ours)
    print(f"max |weight difference| over {len(sd_ref)} tensors: {wdiff:.3e}")
    print(f"max |logit difference|: {worst:.3e} ({'PASS' if worst < 1e-3 else 'FAIL'} at 1e-3)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"max_abs_logit_diff": worst, "max_abs_weight_diff": wdiff, "sentences": rows}, f, indent=2)


if __name__ == "__main__":
    main()
