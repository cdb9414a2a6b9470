#!/usr/bin/env python3
"""PyTorch reference of one MaskPrune mask-training step, for the speed comparison with
`maskprune bench --train-step` (scripts/bench-vs-torch.sh): the same computation on the same model directory.

Teacher: the dense model, no grad. Student: the same frozen weights with straight-through
binary masks (forward 1[m != 0], backward identity) on each KV group's query heads (before
o_proj) and on each MLP channel (before down_proj), and LoRA rank 8 (alpha 16) on q_proj and
v_proj. Loss: KL(teacher || student) at --temperature (1, as the configs and `maskprune bench
--train-step`), mean over positions, times T^2. Backward reaches the masks and the adapters only.

Usage: V/bin/python scripts/bench_train_torch.py --model DIR [--shapes 4x128] [--warmup 1]
       [--repeats 3] [--threads N] [--temperature 1] [--json OUT]
"""
import argparse
import json
import os
import resource
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


class LoRA(torch.nn.Module):
    def __init__(self, base, rank=8, alpha=16.0):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.randn(base.in_features, rank) * 0.01)
        self.b = torch.nn.Parameter(torch.zeros(rank, base.out_features))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.a @ self.b) * self.scale


def ste(m):
    return m - m.detach() + (m != 0).to(m.dtype)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--shapes", default="4x128")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    for w in model.parameters():
        w.requires_grad_(False)
    c = model.config
    heads, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim if getattr(c, "head_dim", None) else c.hidden_size // c.num_attention_heads
    group = heads // kv
    layers = model.model.layers
    mask_kv = [torch.ones(kv, requires_grad=True) for _ in layers]
    mask_ch = [torch.ones(c.intermediate_size, requires_grad=True) for _ in layers]
    enabled = {"on": False}
    for i, layer in enumerate(layers):
        layer.self_attn.q_proj = LoRA(layer.self_attn.q_proj)
        layer.self_attn.v_proj = LoRA(layer.self_attn.v_proj)

        def o_hook(_m, args, i=i):
            if not enabled["on"]:
                return None
            x = args[0]
            per_head = ste(mask_kv[i]).repeat_interleave(group).repeat_interleave(d)
            return (x * per_head,)

        def down_hook(_m, args, i=i):
            if not enabled["on"]:
                return None
            return (args[0] * ste(mask_ch[i]),)

        layer.self_attn.o_proj.register_forward_pre_hook(o_hook)
        layer.mlp.down_proj.register_forward_pre_hook(down_hook)
    lora = [p for n, p in model.named_parameters() if n.endswith(".a") or n.endswith(".b")]
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape in a.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        ids = torch.randint(0, c.vocab_size, (b, t), generator=gen)
        times = []
        for i in range(a.warmup + a.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                enabled["on"] = False
                # The teacher: no masks; the adapters are in the graph but B = 0 at start, as
                # ours (our teacher runs without adapters: one small matmul pair per layer).
                teacher = model(ids, use_cache=False).logits
            enabled["on"] = True
            student = model(ids, use_cache=False).logits
            temp = a.temperature
            kl = F.kl_div(
                F.log_softmax(student / temp, -1).reshape(b * t, -1),
                F.log_softmax(teacher / temp, -1).reshape(b * t, -1),
                log_target=True,
                reduction="sum",
            ) / (b * t) * temp * temp
            grads = torch.autograd.grad(kl, mask_kv + mask_ch + lora)
            if i >= a.warmup:
                times.append(time.perf_counter() - start)
            del grads
        times.sort()
        median = times[len(times) // 2]
        print(f"torch train step {b}x{t}: {median:.3f}s median of {len(times)}")
        results.append({"batch": b, "seq_len": t, "seconds": times, "median_s": median})
    # Peak resident set of this process (model load included, as in `maskprune bench`).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"torch peak RSS {peak / 2**30:.2f} GiB")
    report = {"bench": "train_step", "model": a.model, "backend": f"torch {torch.__version__}",
              "threads": torch.get_num_threads(), "results": results, "peak_rss_bytes": peak}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
