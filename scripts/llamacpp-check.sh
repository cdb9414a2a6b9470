#!/usr/bin/env bash
# Proof in llama.cpp itself (not CI: it compiles llama.cpp): export the dense SmolLM2 and two
# 50% MaskPrune models (kv_group: the committed plan, results/smollm2-135m/plan-maskprune-50.json;
# query_head: a short training run; both keep every head) and two one-shot models with pruned
# heads as GGUF in f32, f16 and q8_0, load each file with
# llama-cpp-python built from source, and compare llama.cpp's logits and greedy tokens with
# maskprune's on the same file (scripts/llamacpp_compare.py); then the tiny llama, mistral and
# qwen2 fixtures against transformers' logits (scripts/llamacpp_fixtures.py). Writes
# results/llamacpp-check.{json,md} and results/llamacpp-fixtures.{json,md}.
#
#   scripts/llamacpp-check.sh                 # ~20 min on 2 cores, most of it compiling llama.cpp
#
# Environment: VENV (default ~/.cache/maskprune/llamacpp-venv; llama-cpp-python and numpy are
# installed there), WORK (models and GGUF files; default ~/.cache/maskprune/llamacpp-check),
# QH_STEPS (updates of the query_head run; default 100), TYPES (default "f32 f16 q8_0"),
# MASKPRUNE_BIN (a built maskprune instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MASKPRUNE_BIN:-}" ]; then
  cargo build --quiet --release -p maskprune-cli
fi
BIN="${MASKPRUNE_BIN:-${CARGO_TARGET_DIR:-target}/release/maskprune}"
DENSE=$(MASKPRUNE_BIN=$BIN scripts/fetch-smollm2.sh | tail -n 1)
VENV=${VENV:-$HOME/.cache/maskprune/llamacpp-venv}
WORK=${WORK:-$HOME/.cache/maskprune/llamacpp-check}
TYPES=${TYPES:-f32 f16 q8_0}  # f32 first: the quantised rows compare with it
mkdir -p "$WORK" results

if ! "$VENV/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
  echo "== installing llama-cpp-python (compiles llama.cpp) into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet numpy gguf
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$VENV/bin/pip" install --quiet llama-cpp-python
fi

if [ ! -f "$WORK/kv_group-50/config.json" ]; then
  "$BIN" surgery --model "$DENSE" --plan results/smollm2-135m/plan-maskprune-50.json \
    --out "$WORK/kv_group-50" --overwrite
fi
if [ ! -f "$WORK/query_head-50/config.json" ]; then
  "$BIN" prune --config configs/smollm2-135m-50.toml --granularity query_head \
    --max-steps "${QH_STEPS:-100}" --model "$DENSE" --out "$WORK/query_head-50" \
    --run-dir "$WORK/query_head-50.run" --overwrite --overwrite-run
fi

# The learned 50% models keep all 9 query / 3 KV heads (their budget goes to the MLP), so two
# one-shot models with pruned heads exercise llama.cpp's head counts too: magnitude-ranked
# at 6 query / 2 KV heads (kv_group) and 6 query / 3 KV heads (query_head), MLP 768.
for g in kv_group query_head; do
  [ -f "$WORK/magnitude-$g-heads/config.json" ] && continue
  python3 - "$g" "$WORK/widths-$g.json" <<'EOF'
import json, sys
g, out = sys.argv[1:]
kv = [0, 1] if g == "kv_group" else [0, 1, 2]
q = list(range(6)) if g == "kv_group" else [0, 1, 3, 4, 6, 7]
layer = {"query_heads": q, "kv_heads": kv, "channels": list(range(768))}
json.dump({"method": "widths", "granularity": g, "layers": [layer] * 30}, open(out, "w"))
EOF
  "$BIN" rank --model "$DENSE" --method magnitude --granularity "$g" \
    --widths-from "$WORK/widths-$g.json" --out "$WORK/magnitude-$g-heads.plan.json"
  "$BIN" surgery --model "$DENSE" --plan "$WORK/magnitude-$g-heads.plan.json" \
    --out "$WORK/magnitude-$g-heads" --overwrite
done

PROMPTS=(
  "The capital of France is"
  "Structured pruning removes whole attention heads and feed-forward channels from a language model, so the pruned network is a smaller dense model that runs on"
  "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning"
  "The river rose slowly through the night. By morning the low fields on the east bank were under water, and the farmers who had stayed behind moved their animals to the churchyard on the hill. Nobody in the village could remember a flood like it; the oldest records in the parish book mention a winter when the ice dammed the river below the mill, but even then the water had stopped at the road. Now it crossed the road, filled the cellars of the bakery and the inn, and lapped at the steps of the school, where the teacher had carried the books to the upper floor the evening before. When the rain finally stopped, the mayor"
  "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
)
reports=()
for name in dense kv_group-50 query_head-50 magnitude-kv_group-heads magnitude-query_head-heads; do
  dir=$WORK/$name
  [ "$name" = dense ] && dir=$DENSE
  for type in $TYPES; do
    gguf=$WORK/$name.$type.gguf
    "$BIN" export-gguf "$dir" --out "$gguf" --type "$type" --overwrite
    ours=$WORK/$name.$type.ours
    rm -rf "$ours" && mkdir -p "$ours"
    # maskprune runs the GGUF file itself (imported as llama.cpp would read it).
    for i in "${!PROMPTS[@]}"; do
      "$BIN" --quiet generate --model "$gguf" --prompt "$(printf '%b' "${PROMPTS[$i]}")" \
        --max-new-tokens 32 --json "$ours/p$i.json" --logits "$ours/p$i.logits" >/dev/null
    done
    # llama.cpp's weight repacking crashes on quantised files here (llamacpp_compare.py).
    repack=1
    case $type in q*) repack=0 ;; esac
    f32=()
    [ "$repack" = 0 ] && f32=("$WORK/$name.f32.gguf")  # the reference for a quantised file
    LLAMACPP_REPACK=$repack "$VENV/bin/python" scripts/llamacpp_compare.py "$gguf" "$ours" \
      "$WORK/$name.$type.json" "${f32[@]}"
    reports+=("$WORK/$name.$type.json")
  done
done

# Every family we load, on its tiny fixture, against transformers' logits.
"$VENV/bin/python" scripts/llamacpp_fixtures.py "$BIN" "$WORK"

"$VENV/bin/python" - "$("$BIN" --version)" "${reports[@]}" <<'EOF'
import json, os, sys
version, paths = sys.argv[1], sys.argv[2:]
rows = [json.load(open(p)) for p in paths]
for r, p in zip(rows, paths):
    r["model"], r["type"] = os.path.basename(p)[:-5].rsplit(".", 1)
with open("results/llamacpp-check.json.tmp", "w") as f:
    json.dump({"maskprune": version, "rows": rows}, f, indent=1)
os.replace("results/llamacpp-check.json.tmp", "results/llamacpp-check.json")
lines = [f"llama.cpp (llama-cpp-python {rows[0]['llama_cpp_python']}, {rows[0]['threads']} threads) "
         f"against {version} on the same GGUF file, {len(rows[0]['prompts'])} prompts "
         f"({sum(p['prompt_tokens'] for p in rows[0]['prompts'])} positions), greedy up to 32 tokens; "
         "llama.cpp with an f32 KV cache (its default f16 cache in brackets); weight repacking "
         "off for the quantised files (it segfaults on this VM, SmolLM2's own Q4_1 included).",
         "",
         "| model | type | file MiB | max abs dlogit | (llama.cpp's default f16 KV cache) | argmax agreement | greedy equal | decode tok/s llama.cpp | decode tok/s maskprune | tensors equal to llama.cpp's quantiser | llama.cpp's argmax vs its own f32 |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['model']} | {r['type']} | {r['bytes'] / 2**20:.1f} | {r['max_abs_dlogit']:.2e} "
                 f"| {r['max_abs_dlogit_default_cache']:.2e} | {r['argmax_agreement']:.4f} | {'yes' if r['greedy_equal'] else 'no'} "
                 f"| {r['llamacpp_decode_tokens_per_s']:.1f} | {r['maskprune_decode_tokens_per_s']:.1f} "
                 + (f"| {q.get('tensors_equal_to_llama_quantize', '?')} of {q.get('tensors', '?')} "
                    f"| {q['llamacpp_argmax_agreement_with_its_f32']:.4f} |" if (q := r["quantised"]) else "| | |"))
open("results/llamacpp-check.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
