#!/usr/bin/env bash
# Dense forward throughput of maskprune (burn) and, where torch is installed, PyTorch on the
# same model directory, same shapes and threads, in one run. Writes one JSON with the ratio.
#
#   scripts/bench-forward.sh [MODEL_DIR]     (default: the imported SmolLM2)
#   PYTHON=V/bin/python SHAPES=1x1024,4x256 REPEATS=3 scripts/bench-forward.sh
#   TRAIN_STEP=1 scripts/bench-forward.sh    # also time one mask-training step (ours only)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p maskprune-cli
MODEL="${1:-$(MASKPRUNE_BIN="${CARGO_TARGET_DIR:-target}/release/maskprune" scripts/fetch-smollm2.sh | tail -n 1)}"
SHAPES="${SHAPES:-1x1024,4x256}"
REPEATS="${REPEATS:-3}"
OUT="${OUT:-results/bench-forward.json}"
PYTHON="${PYTHON:-$( [ -x V/bin/python ] && echo V/bin/python || echo python3)}"
mkdir -p "$(dirname "$OUT")"
tmp=$(mktemp -d)
EXTRA=()
[ "${TRAIN_STEP:-0}" = 1 ] && EXTRA=(--train-step)
"${CARGO_TARGET_DIR:-target}/release/maskprune" bench --model "$MODEL" --shapes "$SHAPES" --decode none --repeats "$REPEATS" "${EXTRA[@]}" --json "$tmp/ours.json"
if "$PYTHON" -c "import torch, transformers" 2>/dev/null; then
  "$PYTHON" scripts/bench_forward_torch.py --model "$MODEL" --shapes "$SHAPES" --repeats "$REPEATS" --threads "$(nproc)" --json "$tmp/torch.json"
else
  echo "torch/transformers not importable with $PYTHON: PyTorch side skipped" >&2
fi
python3 - "$tmp" "$OUT" <<'PY'
import json, os, platform, sys
tmp, out = sys.argv[1:]
ours = json.load(open(os.path.join(tmp, "ours.json")))
report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "maskprune": ours}
tp = os.path.join(tmp, "torch.json")
if os.path.exists(tp):
    torch = json.load(open(tp))
    report["torch"] = torch
    report["ratio_ours_over_torch_tokens_per_s"] = {
        f"{o['batch']}x{o['seq_len']}": o["tokens_per_s"] / t["tokens_per_s"]
        for o, t in zip(ours["prefill"], torch["results"])
    }
    for k, v in report["ratio_ours_over_torch_tokens_per_s"].items():
        print(f"{k}: maskprune / torch tokens/s = {v:.2f}")
json.dump(report, open(out, "w"), indent=2)
print("wrote", out)
PY
rm -rf "$tmp"
