#!/usr/bin/env python3
"""Greedy generations of transformers for the generation test (tests/smollm2.rs): 32 new
tokens after a few prompts, with `generate(do_sample=False)` and no end-of-text stop, for
the dense SmolLM2 directory and for a pruned one (`maskprune surgery` with the committed
50% plan, results/smollm2-135m/plan-maskprune-50.json, no adapters).

Usage: V/bin/python scripts/make_generate_reference.py DENSE_DIR PRUNED_DIR [OUT.json]
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The capital of France is",
    "Structured pruning of language models",
    "Once upon a time, in a small village by the sea,",
]


def generations(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        new = model.generate(ids, do_sample=False, max_new_tokens=32, min_new_tokens=32,
                             eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
        out.append({"prompt": p, "prompt_ids": ids[0].tolist(), "greedy": new.tolist(),
                    "text": tok.decode(new)})
    return out


def main():
    dense, pruned = sys.argv[1:3]
    out = sys.argv[3] if len(sys.argv) > 3 else os.path.join(
        os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2-generate.json")
    torch.set_grad_enabled(False)
    report = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
              "max_new_tokens": 32, "dense": generations(dense), "pruned_50": generations(pruned)}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
