#!/usr/bin/env bash
# Proof in llama.cpp itself (not CI: it compiles llama.cpp): export the dense SmolLM2 and two
# 50% MaskPrune models (kv_group: the committed plan, results/smollm2-135m/plan-maskprune-50.json;
# query_head: a short training run) as GGUF in f32, f16 and q8_0, load each file with
# llama-cpp-python built from source, and compare llama.cpp's logits and greedy tokens with
# maskprune's on the same file (scripts/llamacpp_compare.py). Writes
# results/llamacpp-check.json and results/llamacpp-check.md.
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
TYPES=${TYPES:-f32 f16 q8_0}
mkdir -p "$WORK" results

if ! "$VENV/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
  echo "== installing llama-cpp-python (compiles llama.cpp) into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet numpy
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

PROMPTS=(
  "The capital of France is"
  "Structured pruning removes whole attention heads and feed-forward channels from a language model, so the pruned network is a smaller dense model that runs on"
  "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning"
  "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
)
reports=()
for name in dense kv_group-50 query_head-50; do
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
    "$VENV/bin/python" scripts/llamacpp_compare.py "$gguf" "$ours" "$WORK/$name.$type.json"
    reports+=("$WORK/$name.$type.json")
  done
done

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
         f"({sum(p['prompt_tokens'] for p in rows[0]['prompts'])} positions), greedy up to 32 tokens.",
         "",
         "| model | type | file MiB | max abs dlogit | argmax agreement | greedy equal | decode tok/s llama.cpp | decode tok/s maskprune |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['model']} | {r['type']} | {r['bytes'] / 2**20:.1f} | {r['max_abs_dlogit']:.2e} "
                 f"| {r['argmax_agreement']:.4f} | {'yes' if r['greedy_equal'] else 'no'} "
                 f"| {r['llamacpp_decode_tokens_per_s']:.1f} | {r['maskprune_decode_tokens_per_s']:.1f} |")
open("results/llamacpp-check.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
