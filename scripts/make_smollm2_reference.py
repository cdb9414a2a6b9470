#!/usr/bin/env python3
"""Reference numbers for the SmolLM2 integration test (tests/smollm2.rs), from transformers.

Loads the directory written by `maskprune import-gguf` with the stock classes and records,
for a few sentences: the token ids of the tokenizer, the logits of a fixed subset of the
vocabulary at every position, the full-row logsumexp and argmax at every position; plus the
perplexity of the first 8 WikiText-2 windows of 128 tokens and of the first window of 1024
(when the data is present).

Usage: V/bin/python scripts/make_smollm2_reference.py IMPORTED_DIR [OUT.json]
"""
import json
import math
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ref_ppl import load_text  # noqa: E402

SENTENCES = [
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
    "Structured pruning removes whole attention heads and MLP channels from a language model, "
    "so that every layer keeps the same width and the result is a standard checkpoint.",
]
VOCAB_SUBSET = list(range(0, 49152, 769)) + [1, 2, 198, 279, 314, 4447]


def main():
    model_dir = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2-reference.json")
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for s in SENTENCES:
        ids = tok(s).input_ids
        logits = model(torch.tensor([ids])).logits[0]
        rows.append({
            "text": s,
            "input_ids": ids,
            "subset_logits": [[float(f"{v:.7g}") for v in logits[t, VOCAB_SUBSET].tolist()] for t in range(len(ids))],
            "logsumexp": [float(f"{v:.7g}") for v in torch.logsumexp(logits, -1).tolist()],
            "argmax": logits.argmax(-1).tolist(),
        })
    ref = {"generated_by": "scripts/make_smollm2_reference.py", "transformers_class": type(model).__name__,
           "vocab_subset": VOCAB_SUBSET, "sentences": rows}
    try:
        text, _ = load_text("wikitext2", None)
        ids = tok(text, return_tensors="pt").input_ids[0][: 8 * 128].view(8, 128)
        logp = torch.log_softmax(model(ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None])
        ref["wikitext2_first8x128"] = {"mean_nll": -logp.double().mean().item(), "ppl": math.exp(-logp.double().mean().item())}
        ids = tok(text, return_tensors="pt").input_ids[0][:1024].view(1, 1024)
        logp = torch.log_softmax(model(ids).logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])
        ref["wikitext2_first1x1024"] = {"mean_nll": -logp.mean().item(), "ppl": math.exp(-logp.mean().item())}
    except SystemExit as e:
        print("no WikiText-2 here, skipping the perplexity reference:", e)
    with open(out, "w") as f:
        json.dump(ref, f)
    print("wrote", out)


if __name__ == "__main__":
    main()
