#!/usr/bin/env python3
"""The tiny fixtures of every family we load (tests/fixtures/tiny-{llama,mistral,qwen2,qwen3}),
exported by `maskprune export-gguf` in f32 and run by llama.cpp (llama-cpp-python): its
logits against transformers' reference logits committed with each fixture. This checks the
`llama`, `qwen2` and `qwen3` GGUF architectures (biases, rotary layouts, per-head q/k norms) end to end without any model
download. Gemma-3 (`gemma3`): llama.cpp fixes what the config leaves free (every 6th layer
global, attention scaled by head_dim^-1/2), so the check runs a copy of tiny-gemma3 shaped
that way (both layers sliding, query_pre_attn_scalar = head_dim; the test
`gemma3_exports_with_its_norm_offset_and_imports_back_to_the_same_model` makes the same copy)
on the fixture's rows and its 40-token row past the 16-token window, against transformers'
logits computed here (needs torch). Part of scripts/llamacpp-check.sh; writes
results/llamacpp-fixtures.{json,md}.

Usage: python llamacpp_fixtures.py MASKPRUNE_BIN WORK_DIR
"""
import json
import os
import subprocess
import sys

import numpy as np
from llama_cpp import Llama

GGML_TYPE_F32 = 0
FIXTURES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3-swa"]


def gemma3_swa(root, work):
    """The llama.cpp-shaped copy of tiny-gemma3 and transformers' logits on its rows."""
    import shutil

    import torch
    from transformers import Gemma3ForCausalLM

    src = os.path.join(root, "tests", "fixtures", "tiny-gemma3")
    dst = os.path.join(work, "tiny-gemma3-swa")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    config = json.load(open(os.path.join(dst, "config.json")))
    config["layer_types"] = ["sliding_attention", "sliding_attention"]
    config["query_pre_attn_scalar"] = config["head_dim"]
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    ref = json.load(open(src + "-reference.json"))
    model = Gemma3ForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    rows = ref["input_ids"] + ref["long_input_ids"]
    with torch.no_grad():
        want = [model(torch.tensor([r])).logits[0].numpy() for r in rows]
    return dst, rows, want


def main():
    binary, work = sys.argv[1:3]
    root = os.path.join(os.path.dirname(__file__), "..")
    rows = []
    for name in FIXTURES:
        if name == "tiny-gemma3-swa":
            fixture, batch, want = gemma3_swa(root, work)
        else:
            fixture = os.path.join(root, "tests", "fixtures", name)
            ref = json.load(open(fixture + "-reference.json"))
            batch = ref["input_ids"]
            want = np.array(ref["logits"], dtype=np.float32).reshape(len(batch), len(batch[0]), -1)
        gguf = os.path.join(work, f"{name}.f32.gguf")
        subprocess.run([binary, "--quiet", "export-gguf", fixture, "--out", gguf, "--type", "f32",
                        "--overwrite"], check=True)
        llm = Llama(model_path=gguf, n_ctx=64, logits_all=True, n_threads=2,
                    type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, verbose=False)
        arch = llm.metadata.get("general.architecture")
        worst, agree, positions = 0.0, 0, 0
        for ids, w in zip(batch, want):
            llm.reset()
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)], dtype=np.float32)
            worst = max(worst, float(np.abs(got - w).max()))
            agree += int((got.argmax(1) == w.argmax(1)).sum())
            positions += len(ids)
        llm.close()
        rows.append({"fixture": name, "gguf_architecture": arch, "positions": positions,
                     "max_abs_dlogit_vs_transformers": worst, "argmax_agreement": agree / positions})
        print(f"{name} ({arch}): max|dlogit| vs transformers {worst:.2e} over {positions} positions")
    out = os.path.join(root, "results", "llamacpp-fixtures")
    with open(out + ".json.tmp", "w") as f:
        json.dump({"llama_cpp_python": __import__("llama_cpp").__version__, "rows": rows}, f,
                  indent=1)
    os.replace(out + ".json.tmp", out + ".json")
    lines = ["| fixture | GGUF architecture | positions | max abs dlogit vs transformers | argmax agreement |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['fixture']} | {r['gguf_architecture']} | {r['positions']} | "
              f"{r['max_abs_dlogit_vs_transformers']:.2e} | {r['argmax_agreement']:.4f} |" for r in rows]
    open(out + ".md", "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
