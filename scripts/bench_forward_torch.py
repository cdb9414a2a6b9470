#!/usr/bin/env python3
"""PyTorch side of scripts/bench-vs-torch.sh: dense forward (logits at every position) tokens/s of a HF model
directory at the same shapes, warm-up and repeats as `maskprune bench`, f32, same threads.

Usage: V/bin/python scripts/bench_forward_torch.py --model DIR [--shapes 1x1024,4x256]
       [--warmup 1] [--repeats 3] [--threads N] [--json OUT]
"""
import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--shapes", default="1x1024,4x256")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape in a.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        ids = torch.randint(0, model.config.vocab_size, (b, t), generator=gen)
        times = []
        for i in range(a.warmup + a.repeats):
            start = time.perf_counter()
            model(ids, use_cache=False).logits
            if i >= a.warmup:
                times.append(time.perf_counter() - start)
        times.sort()
        median = times[len(times) // 2]
        print(f"torch forward {b}x{t}: {median:.3f}s median of {len(times)}, {b * t / median:.0f} tokens/s")
        results.append({"batch": b, "seq_len": t, "seconds": times, "median_s": median, "tokens_per_s": b * t / median})
    report = {"bench": "dense_forward", "model": a.model, "backend": f"torch {torch.__version__} (transformers, sdpa)",
              "threads": torch.get_num_threads(), "results": results}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
