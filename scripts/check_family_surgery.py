"""The surgery output of each tiny family fixture loads in transformers with its standard
class and computes what transformers computes on the original with the pruned units masked
(query heads zeroed before o_proj, channels zeroed before down_proj), for both granularities.
Run by hand; prints one line per fixture and granularity and exits non-zero on a mismatch.

Usage: V/bin/python scripts/check_family_surgery.py MASKPRUNE_BIN WORK_DIR
"""
import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from make_tiny_fixture import masked_logits  # noqa: E402

FIXTURES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"]


def main():
    binary, work = sys.argv[1:3]
    root = os.path.join(os.path.dirname(__file__), "..")
    worst = 0.0
    for name in FIXTURES:
        fixture = os.path.join(root, "tests", "fixtures", name)
        ref = json.load(open(os.path.join(root, "tests", "fixtures", f"{name}-reference.json")))
        ids = torch.tensor(ref["input_ids"])
        original = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
        for granularity in ["kv_group", "query_head"]:
            plan = os.path.join(work, f"{name}-{granularity}.plan.json")
            out = os.path.join(work, f"{name}-{granularity}")
            subprocess.run([binary, "--quiet", "rank", "--model", fixture, "--sparsity", "0.5",
                            "--round-to", "16", "--granularity", granularity, "--out", plan], check=True)
            subprocess.run([binary, "--quiet", "surgery", "--model", fixture, "--plan", plan, "--out", out,
                            "--overwrite"], check=True)
            layers = json.load(open(plan))["layers"]
            heads = original.config.num_attention_heads
            inter = original.config.intermediate_size
            head_masks = [[1.0 if h in l["query_heads"] else 0.0 for h in range(heads)] for l in layers]
            channel_masks = [[1.0 if c in l["channels"] else 0.0 for c in range(inter)] for l in layers]
            pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            with torch.no_grad():
                expected = masked_logits(original, ids, head_masks, channel_masks)
                got = pruned(ids).logits
            diff = (got - expected).abs().max().item()
            worst = max(worst, diff)
            print(f"{name} {granularity}: {type(pruned).__name__} with {pruned.config.num_attention_heads} "
                  f"heads / {pruned.config.num_key_value_heads} KV heads / {pruned.config.intermediate_size} "
                  f"channels; max|dlogit| vs the masked original {diff:.2e}")
    if worst > 1e-4:
        sys.exit(f"surgery output differs from the masked original by {worst:.2e}")


if __name__ == "__main__":
    main()
