#!/usr/bin/env python3
"""Reference zero-shot scorer with transformers, to check `maskprune eval zeroshot`.

Encodes every (context, continuation) pair as lm-eval-harness 0.4 does (`_encode_pair`:
trailing context spaces move to the continuation, the continuation is the whole encoding
past the context's length, no special tokens), sums the continuation log-probabilities with
the stock AutoModelForCausalLM, and reports acc / acc_norm. With --compare it reads the
JSONL that `maskprune eval zeroshot --dump-scores` wrote and reports, per task, whether every
document's chosen answer agrees (acc and acc_norm) and the largest log-likelihood gap.

Usage: V/bin/python scripts/ref_zeroshot.py --model DIR --tasks boolq,piqa --limit 200
       [--data-dir D] [--compare scores.jsonl] [--json OUT]
"""
import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def encode_pair(tok, context, continuation):
    n = len(context) - len(context.rstrip(" "))
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tasks", default="boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa")
    p.add_argument("--limit", type=int)
    p.add_argument("--data-dir", default=os.environ.get("MASKPRUNE_DATA", "../shared/data"))
    p.add_argument("--compare")
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    ours = {}
    if a.compare:
        for line in open(a.compare):
            r = json.loads(line)
            ours[(r["task"], r["doc"])] = r["scores"]
    report = {}
    for task in a.tasks.split(","):
        docs = [json.loads(l) for l in open(os.path.join(a.data_dir, "zeroshot", f"{task}.jsonl")) if l.strip()]
        docs = docs[: a.limit] if a.limit else docs
        acc = acc_norm = 0
        same_acc = same_norm = 0
        worst = 0.0
        for i, d in enumerate(docs):
            scores = []
            for ctx, cont in zip(d["contexts"], d["continuations"]):
                c, k = encode_pair(tok, ctx, cont)
                ids = torch.tensor([(c + k)[:-1]])
                logp = torch.log_softmax(model(ids).logits[0, -len(k):].double(), -1)
                scores.append(logp.gather(-1, torch.tensor(k)[:, None]).sum().item())
            lens = [len(c[1:] if c.startswith(" ") else c) for c in d["continuations"]]
            pick = max(range(len(scores)), key=lambda j: scores[j])
            pick_n = max(range(len(scores)), key=lambda j: scores[j] / lens[j])
            acc += pick == d["gold"]
            acc_norm += pick_n == d["gold"]
            if (task, i) in ours:
                o = ours[(task, i)]
                worst = max(worst, max(abs(x - y) for x, y in zip(o, scores)))
                same_acc += max(range(len(o)), key=lambda j: o[j]) == pick
                same_norm += max(range(len(o)), key=lambda j: o[j] / lens[j]) == pick_n
        n = len(docs)
        line = f"{task:<14} n {n}  acc {acc / n:.4f}  acc_norm {acc_norm / n:.4f}"
        report[task] = {"n": n, "acc": acc / n, "acc_norm": acc_norm / n}
        if ours:
            line += f"  same choice as maskprune: acc {same_acc}/{n}, acc_norm {same_norm}/{n}; max |dloglik| {worst:.2e}"
            report[task].update({"same_acc_choice": same_acc, "same_acc_norm_choice": same_norm, "max_abs_loglik_diff": worst})
        print(line, flush=True)
    if a.json:
        json.dump(report, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
