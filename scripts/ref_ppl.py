#!/usr/bin/env python3
"""Reference perplexity with transformers, on the same text and protocol as `maskprune eval ppl`.

Reads the dataset manifest from datasets/NAME.toml (the same file the Rust code compiles in),
joins the rows the same way, tokenizes the whole text once with the model's tokenizer
(add_special_tokens=True), cuts non-overlapping windows of --seq-len tokens (tail dropped) and
reports exp(mean next-token NLL over all predicted positions).

Usage: V/bin/python scripts/ref_ppl.py --model DIR --dataset wikitext2 --seq-len 128
       [--max-windows K] [--batch B] [--data-dir D] [--threads N] [--json OUT]
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import time
import tomllib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_dirs(explicit):
    if explicit:
        return [explicit]
    dirs = []
    if os.environ.get("MASKPRUNE_DATA"):
        dirs.append(os.environ["MASKPRUNE_DATA"])
    dirs.append("../shared/data")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(os.path.join(cache, "maskprune/data"))
    return dirs


def load_text(name, data_dir):
    with open(os.path.join(ROOT, "datasets", f"{name}.toml"), "rb") as f:
        m = tomllib.load(f)
    path = next((os.path.join(d, m["file"]) for d in data_dirs(data_dir) if os.path.isfile(os.path.join(d, m["file"]))), None)
    if path is None:
        raise SystemExit(f"dataset {name}: {m['file']} not found in {data_dirs(data_dir)}")
    raw = open(path, "rb").read()
    if m.get("sha256") and hashlib.sha256(raw).hexdigest() != m["sha256"]:
        raise SystemExit(f"{path}: checksum mismatch")
    fmt = m["format"]
    if fmt == "text":
        rows = [raw.decode()]
    elif fmt == "lines":
        rows = raw.decode().splitlines()
    else:
        text = gzip.decompress(raw).decode() if fmt == "jsonl.gz" else raw.decode()
        rows = []
        for line in text.splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            row = ""
            for field in m["fields"]:
                v = obj
                for k in field.split("."):
                    v = v[k]
                row += v
            rows.append(row)
    if m.get("strip"):
        rows = [r.strip() for r in rows]
    if m.get("skip_empty"):
        rows = [r for r in rows if r]
    if m.get("take"):
        rows = rows[: m["take"]]
    return m.get("join", "").join(rows), m.get("max_windows")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="wikitext2")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--data-dir")
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    text, protocol_limit = load_text(a.dataset, a.data_dir)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // a.seq_len
    limit = a.max_windows or protocol_limit
    if limit:
        n = min(n, limit)
    windows = ids[: n * a.seq_len].view(n, a.seq_len)
    nll, count = 0.0, 0
    start = time.time()
    for i in range(0, n, a.batch):
        batch = windows[i : i + a.batch]
        logits = model(batch).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, batch[:, 1:, None])
        nll -= logp.double().sum().item()
        count += logp.numel()
    secs = time.time() - start
    ppl = math.exp(nll / count)
    print(f"{a.dataset} ppl {ppl:.4f} (seq_len {a.seq_len}, {n} windows, {count} predicted tokens, "
          f"{ids.numel()} text tokens, {n * a.seq_len / secs:.0f} tokens/s, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {type(model).__name__})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"dataset": a.dataset, "seq_len": a.seq_len, "windows": n, "text_tokens": ids.numel(),
                       "predicted_tokens": count, "mean_nll": nll / count, "ppl": ppl, "seconds": secs,
                       "implementation": f"transformers (torch {torch.__version__})",
                       "model_class": type(model).__name__}, f, indent=2)


if __name__ == "__main__":
    main()
