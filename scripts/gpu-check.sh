#!/usr/bin/env bash
# The GPU check (issue 18, item 4), in two halves because the GPU machine reaches nothing
# (no crates.io, no data, no PyPI) and takes at most 64 MiB of working tree:
#
#   scripts/gpu-check.sh prepare   # here, on the CPU machine: builds the CUDA binary and the
#                                  # CPU reference numbers into gpu-carry/ (ignored by git)
#   scripts/gpu-check.sh run       # on the GPU machine, with gpu-carry/ carried: the same
#                                  # numbers on CUDA, compared; JSON into $OUT (or gpu-carry/)
#
# With the device tool: run(command="scripts/gpu-check.sh run", carry=["gpu-carry"]), then
# copy the returned gpu-check.json to results/. What `run` checks, on every tiny fixture
# (llama, mistral, qwen2, qwen3, gemma3; the fixtures travel with the tree):
#  - perplexity on CUDA equals the CPU's within 1e-3 relative (f32; the text is this README,
#    windows of 64): the forward on burn-cuda's ops against the fused CPU kernels;
#  - greedy decoding of 24 tokens with the KV cache gives the CPU's tokens;
#  - 20 `train-masks` updates (tiny-llama, the prepared calibration windows) finish, and their
#    final KL and plan are compared with the CPU run's (reported, not required equal:
#    reductions differ);
#  - `bench` of the forward and of mask-training updates on tiny-llama: tokens/s, and MFU
#    against PEAK_TFLOPS (default 67, an H200's dense f32 without tensor cores).
# Not in it: SmolLM2 (its PyPI wheel is ~100 MB, over the 64 MiB the device takes) and the
# 1.7B shape (3.4 GB); for those, copy a checkpoint to the machine by other means and run
# `maskprune eval ppl --device cuda` by hand. Written without a GPU to try it on: untested.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=gpu-carry
FIXTURES="tiny-llama tiny-mistral tiny-qwen2 tiny-qwen3 tiny-gemma3"
PEAK_TFLOPS=${PEAK_TFLOPS:-67}

prepare() {
  mkdir -p "$CARRY"
  cargo build --release --features cuda -p maskprune-cli
  cp "${CARGO_TARGET_DIR:-target}/release/maskprune" "$CARRY/maskprune"
  strip "$CARRY/maskprune" # 60 -> 49 MiB: the device takes 64 MiB with the tree
  local bin=$CARRY/maskprune
  for f in $FIXTURES; do
    "$bin" --quiet eval ppl --model "tests/fixtures/$f" --dataset README.md --seq-len 64 \
      --json "$CARRY/cpu-ppl-$f.json"
    "$bin" --quiet generate --model "tests/fixtures/$f" --prompt "Structured pruning" \
      --max-new-tokens 24 --temperature 0 --json "$CARRY/cpu-generate-$f.json" > /dev/null
  done
  "$bin" --quiet calib --model tests/fixtures/tiny-llama --samples 72 --seq-len 64 \
    --out "$CARRY/calib-tiny-llama.json"
  "$bin" --quiet train-masks --config configs/smollm2-135m-30.toml --model tests/fixtures/tiny-llama \
    --calib "$CARRY/calib-tiny-llama.json" --max-steps 20 --set budget.round_to=16 \
    --run-dir "$CARRY/cpu-train.run" --overwrite-run
  du -sh "$CARRY"
}

run() {
  local bin=$CARRY/maskprune out=${OUT:-$CARRY}
  mkdir -p "$out/gpu"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu/device.txt" || true
  for f in $FIXTURES; do
    "$bin" --quiet eval ppl --model "tests/fixtures/$f" --dataset README.md --seq-len 64 \
      --device cuda --json "$out/gpu/ppl-$f.json"
    "$bin" --quiet generate --model "tests/fixtures/$f" --prompt "Structured pruning" \
      --max-new-tokens 24 --temperature 0 --device cuda --json "$out/gpu/generate-$f.json" > /dev/null
  done
  "$bin" --quiet train-masks --config configs/smollm2-135m-30.toml --model tests/fixtures/tiny-llama \
    --calib "$CARRY/calib-tiny-llama.json" --max-steps 20 --set budget.round_to=16 \
    --run-dir "$out/gpu/train.run" --overwrite-run --device cuda
  "$bin" --quiet bench --model tests/fixtures/tiny-llama --shapes 8x64,32x128 --decode none \
    --repeats 5 --device cuda --json "$out/gpu/bench-forward.json"
  "$bin" --quiet bench --model tests/fixtures/tiny-llama --shapes 4x64 --train-step --updates 20 \
    --device cuda --json "$out/gpu/bench-train.json"
  python3 - "$CARRY" "$out" "$PEAK_TFLOPS" <<'PY'
import json, os, sys
carry, out, peak = sys.argv[1], sys.argv[2], float(sys.argv[3])
load = lambda p: json.load(open(p))
rows, ok = [], True
for f in ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"]:
    cpu = load(f"{carry}/cpu-ppl-{f}.json")["result"]["ppl"]
    gpu = load(f"{out}/gpu/ppl-{f}.json")["result"]["ppl"]
    rel = abs(gpu - cpu) / cpu
    same = load(f"{carry}/cpu-generate-{f}.json")["generated"]["tokens"] == \
        load(f"{out}/gpu/generate-{f}.json")["generated"]["tokens"]
    ok &= rel <= 1e-3 and same
    rows.append({"fixture": f, "ppl_cpu": cpu, "ppl_cuda": gpu, "relative": rel,
                 "greedy_tokens_equal": same})
summary = lambda run: load(f"{run}/summary.json")
plan = lambda run: load(f"{run}/plan.json")
fwd = load(f"{out}/gpu/bench-forward.json")
# MFU of the forward: 2 FLOPs per MAC, linear MACs plus attention over half the window.
mfu = [{"batch": r["batch"], "seq_len": r["seq_len"], "tokens_per_s": r["tokens_per_s"],
        "mfu": 2 * (fwd["macs_per_token_linear"] + fwd["attention_macs_per_token_per_context_position"]
                    * r["seq_len"] / 2) * r["tokens_per_s"] / (peak * 1e12)}
       for r in fwd["forward"]]
train = {"cpu": summary(f"{carry}/cpu-train.run"), "cuda": summary(f"{out}/gpu/train.run"),
         "same_plan": plan(f"{carry}/cpu-train.run") == plan(f"{out}/gpu/train.run")}
doc = {"device": open(f"{out}/gpu/device.txt").read().strip(), "fixtures": rows,
       "train_20_updates": train, "forward_mfu": mfu, "bench_forward": fwd,
       "bench_train": load(f"{out}/gpu/bench-train.json"), "peak_tflops_assumed": peak,
       "passed": bool(ok)}
json.dump(doc, open(f"{out}/gpu-check.json", "w"), indent=1)
for r in rows:
    print(r)
print("passed" if ok else "FAILED", "->", f"{out}/gpu-check.json")
sys.exit(0 if ok else 1)
PY
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: scripts/gpu-check.sh prepare|run" >&2; exit 2 ;;
esac
