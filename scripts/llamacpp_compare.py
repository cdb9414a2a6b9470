#!/usr/bin/env python3
"""llama.cpp's side of scripts/llamacpp-check.sh: run one GGUF file through llama-cpp-python
on the prompts maskprune already ran, and compare.

For each prompt, maskprune wrote (`maskprune generate --json J --logits L`) its prompt ids,
its greedy tokens and the logits at every prompt position. Here llama.cpp evaluates the same
ids (so the tokenizers are compared separately, not mixed into the logits), and we record
max |Δlogit|, the share of positions whose argmax agrees, the greedy tokens of both and their
common prefix, llama.cpp's own tokenisation of the prompt, and llama.cpp's decode tokens/s.

Usage: python llamacpp_compare.py FILE.gguf OURS_DIR OUT.json
  OURS_DIR holds p0.json, p0.logits, p1.json, ... from maskprune generate.
"""
import glob
import json
import os
import sys
import time

import numpy as np
from llama_cpp import Llama


def main():
    gguf, ours_dir, out = sys.argv[1:4]
    threads = int(os.environ.get("THREADS", os.cpu_count() or 2))
    llm = Llama(model_path=gguf, n_ctx=512, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()
    prompts = []
    for meta in sorted(glob.glob(os.path.join(ours_dir, "p*.json"))):
        ours = json.load(open(meta))
        ids = ours["prompt_ids"]
        our_logits = np.fromfile(meta[:-5] + ".logits", dtype="<f4").reshape(len(ids), vocab)

        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
        delta = np.abs(theirs - our_logits)

        # Greedy continuation, as many tokens as maskprune produced (it stops at end of text).
        want = len(ours["generated"]["tokens"])
        llm.reset()
        greedy = []
        start = time.perf_counter()
        first = None
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0,
                                reset=True):
            if first is None:
                first = time.perf_counter()  # the prompt's prefill ends at the first token
            greedy.append(int(tok))
            if len(greedy) >= want:
                break
        end = time.perf_counter()
        decode_s = end - (first or start)
        common = 0
        for a, b in zip(greedy, ours["generated"]["tokens"]):
            if a != b:
                break
            common += 1
        our_decode_s = ours["generated"]["decode_s"]
        n_ours = len(ours["generated"]["tokens"])
        prompts.append({
            "prompt": ours["prompt"],
            "prompt_tokens": len(ids),
            "tokenizer_equal": llm.tokenize(ours["prompt"].encode(), add_bos=False,
                                            special=False) == ids,
            "max_abs_dlogit": float(delta.max()),
            "mean_abs_dlogit": float(delta.mean()),
            "argmax_agreement": float((theirs.argmax(1) == our_logits.argmax(1)).mean()),
            "greedy_llamacpp": greedy,
            "greedy_maskprune": ours["generated"]["tokens"],
            "greedy_common_prefix": common,
            "llamacpp_text": llm.detokenize(greedy).decode("utf-8", "replace"),
            "maskprune_text": ours["text"],
            # The first token comes with the prefill; the rest are decode steps.
            "llamacpp_decode_tokens_per_s": (len(greedy) - 1) / decode_s if decode_s > 0 else None,
            "maskprune_decode_tokens_per_s": n_ours / our_decode_s if our_decode_s > 0 else None,
        })
    report = {
        "gguf": gguf,
        "bytes": os.path.getsize(gguf),
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "threads": threads,
        "max_abs_dlogit": max(p["max_abs_dlogit"] for p in prompts),
        "argmax_agreement": float(np.average([p["argmax_agreement"] for p in prompts],
                                             weights=[p["prompt_tokens"] for p in prompts])),
        "greedy_equal": all(p["greedy_common_prefix"] == len(p["greedy_maskprune"])
                            for p in prompts),
        "llamacpp_decode_tokens_per_s": float(np.median(
            [p["llamacpp_decode_tokens_per_s"] for p in prompts])),
        "maskprune_decode_tokens_per_s": float(np.median(
            [p["maskprune_decode_tokens_per_s"] for p in prompts])),
        "prompts": prompts,
    }
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, out)
    print(f"{os.path.basename(gguf)}: max|dlogit| {report['max_abs_dlogit']:.2e}, argmax "
          f"{report['argmax_agreement']:.4f}, greedy equal {report['greedy_equal']}, "
          f"decode tokens/s llama.cpp {report['llamacpp_decode_tokens_per_s']:.1f} vs "
          f"maskprune {report['maskprune_decode_tokens_per_s']:.1f}")


if __name__ == "__main__":
    main()
