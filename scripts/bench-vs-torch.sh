#!/usr/bin/env bash
# maskprune (burn) against PyTorch on the same machine, same model directory, same shapes and
# threads, in one run; writes one JSON with both sides' numbers and the ratios of issue 6:
#   1. mask-training step (teacher forward + student forward/backward, masks via STE, LoRA r8
#      on q and v, KL to the teacher), ours / torch seconds (<= 1.0 is the goal); ours also
#      with the teacher's hidden states cached, as `train-masks` runs it (the teacher runs
#      outside autodiff in both, as there);
#   2. dense forward with logits at every position (perplexity), 4x256 and 1x1024, ours /
#      torch tokens/s (>= 1.0);
#   3. the 50% pruned model's prefill tokens/s / the dense model's, ours (>= 1.8), next to the
#      limit its work allows (dense MACs / pruned MACs per token, attention included), the
#      two models' processes alternated ROUNDS times (default 5) and their timings pooled, at
#      PREFILL_SHAPES (default 1x256,1x512,4x256,1x1024: the limit falls as prompts grow,
#      because attention's work per token grows with the length and the 50% plan keeps it);
#   4. peak RSS of the training step, ours / torch (<= 1.2).
# Each measurement runs in its own process. Needs torch + transformers for the PyTorch side
# (scripts/README: `python3 -m venv V && V/bin/pip install torch transformers`).
#
#   scripts/bench-vs-torch.sh                       # SmolLM2 (fetched), results/bench-vs-torch.json
#   MODEL=DIR PRUNED=DIR PYTHON=V/bin/python WARMUP=3 REPEATS=3 ROUNDS=5 PREFILL_SHAPES=1x512 \
#     OUT=b.json scripts/bench-vs-torch.sh
# PRUNED defaults to SmolLM2 cut with the committed plan of the 50% MaskPrune run
# (results/smollm2-135m/plan-maskprune-50.json): 9/3 heads, 512 MLP channels per layer.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p maskprune-cli
BIN="${CARGO_TARGET_DIR:-target}/release/maskprune"
MODEL="${MODEL:-$(MASKPRUNE_BIN="$BIN" scripts/fetch-smollm2.sh | tail -n 1)}"
REPEATS="${REPEATS:-3}"
# Untimed runs first, on both sides: a model's first prefills after the full-logits forward
# run up to 1.6x slower than its later ones (seen in the pruned model at 1x512).
WARMUP="${WARMUP:-3}"
TRAIN_SHAPE="${TRAIN_SHAPE:-4x128}"   # the 20% config's batch: 4 windows of 128 tokens
OUT="${OUT:-results/bench-vs-torch.json}"
PYTHON="${PYTHON:-$( [ -x V/bin/python ] && echo V/bin/python || echo python3)}"
THREADS="$(nproc)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "${PRUNED:-}" ]; then
  PRUNED="$tmp/pruned-50"
  "$BIN" surgery --quiet --model "$MODEL" --plan results/smollm2-135m/plan-maskprune-50.json --out "$PRUNED"
fi
"$PYTHON" -c "import torch, transformers" 2>/dev/null ||
  { echo "error: torch/transformers not importable with $PYTHON (set PYTHON)" >&2; exit 1; }

echo "== 1, 4: training step $TRAIN_SHAPE"
"$BIN" bench --quiet --model "$MODEL" --shapes "$TRAIN_SHAPE" --train-step --warmup "$WARMUP" --repeats "$REPEATS" --json "$tmp/ours-train.json"
"$PYTHON" scripts/bench_train_torch.py --model "$MODEL" --shapes "$TRAIN_SHAPE" --warmup "$WARMUP" --repeats "$REPEATS" --threads "$THREADS" --json "$tmp/torch-train.json" 2>&1 | grep -v -i "warn\|loading weights" || true
echo "== 2: dense forward 4x256, 1x1024"
"$BIN" bench --quiet --model "$MODEL" --shapes 4x256,1x1024 --decode none --warmup "$WARMUP" --repeats "$REPEATS" --json "$tmp/ours-forward.json"
"$PYTHON" scripts/bench_forward_torch.py --model "$MODEL" --shapes 4x256,1x1024 --warmup "$WARMUP" --repeats "$REPEATS" --threads "$THREADS" --json "$tmp/torch-forward.json" 2>&1 | grep -v -i "warn\|loading weights" || true
PREFILL_SHAPES="${PREFILL_SHAPES:-1x256,1x512,4x256,1x1024}"
echo "== 3: 50% pruned vs dense prefill $PREFILL_SHAPES"
"$BIN" bench --quiet --model "$PRUNED" --baseline "$MODEL" --shapes "$PREFILL_SHAPES" --decode 1x128+64 --warmup "$WARMUP" --repeats "$REPEATS" --rounds "${ROUNDS:-5}" --json "$tmp/pruned.json"

python3 - "$tmp" "$OUT" "$THREADS" <<'PY'
import json, os, platform, sys
tmp, out, threads = sys.argv[1:]
load = lambda n: json.load(open(os.path.join(tmp, n)))
ours_train, torch_train = load("ours-train.json"), load("torch-train.json")
ours_fwd, torch_fwd = load("ours-forward.json"), load("torch-forward.json")
pruned = load("pruned.json")
ot, tt = ours_train["results"][0], torch_train["results"][0]
shape = lambda r: f"{r['batch']}x{r['seq_len']}"
med = lambda xs: sorted(xs)[len(xs) // 2]
def per_round(dense_s, pruned_s, rounds):
    """Dense / pruned median time of each round (the rounds' timings are pooled in order)."""
    n = len(dense_s) // rounds
    return [med(dense_s[i * n:(i + 1) * n]) / med(pruned_s[i * n:(i + 1) * n]) for i in range(rounds)]
goals = {
    "1_train_step_seconds_ours_over_torch": {
        "shape": shape(ot), "ours_s": ot["median_s"], "torch_s": tt["median_s"],
        "ratio": ot["median_s"] / tt["median_s"],
        "ours_cached_teacher_s": ot["cached_teacher_median_s"],
        "ratio_cached_teacher": ot["cached_teacher_median_s"] / tt["median_s"], "goal": "<= 1.0"},
    "2_dense_forward_tokens_per_s_ours_over_torch": {
        shape(o): {"ours": o["tokens_per_s"], "torch": t["tokens_per_s"], "ratio": o["tokens_per_s"] / t["tokens_per_s"]}
        for o, t in zip(ours_fwd["forward"], torch_fwd["results"])} | {"goal": ">= 1.0"},
    "3_pruned50_prefill_tokens_per_s_over_dense": {
        shape(m): {"pruned": m["tokens_per_s"], "dense": b["tokens_per_s"], "ratio": m["tokens_per_s"] / b["tokens_per_s"],
                   "limit_from_macs": b["macs_per_token"] / m["macs_per_token"],
                   "share_of_limit": m["tokens_per_s"] / b["tokens_per_s"] / (b["macs_per_token"] / m["macs_per_token"]),
                   "per_round_ratios": per_round(b["seconds"], m["seconds"], pruned["model"].get("rounds", 1))}
        for m, b in zip(pruned["model"]["prefill"], pruned["baseline"]["prefill"])} | {"goal": ">= 1.8"},
    "4_train_peak_rss_ours_over_torch": {
        "ours_bytes": ours_train["peak_rss_bytes"], "torch_bytes": torch_train["peak_rss_bytes"],
        "ratio": ours_train["peak_rss_bytes"] / torch_train["peak_rss_bytes"], "goal": "<= 1.2"},
}
report = {"machine": {"cpus": os.cpu_count(), "threads": int(threads), "platform": platform.platform()},
          "goals": goals,
          "raw": {"ours_train": ours_train, "torch_train": torch_train, "ours_forward": ours_fwd,
                  "torch_forward": torch_fwd, "pruned_vs_dense": pruned}}
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
json.dump(report, open(out + ".tmp", "w"), indent=2)
os.replace(out + ".tmp", out)
g = goals
print("\n| goal | ours | torch / dense | ratio | target |\n|---|---|---|---|---|")
x = g["1_train_step_seconds_ours_over_torch"]
print(f"| 1. train step {x['shape']} (s) | {x['ours_s']:.3f} | {x['torch_s']:.3f} | {x['ratio']:.2f} | <= 1.0 |")
print(f"| 1. train step, teacher cached (s) | {x['ours_cached_teacher_s']:.3f} | {x['torch_s']:.3f} | {x['ratio_cached_teacher']:.2f} | <= 1.0 |")
for k, v in g["2_dense_forward_tokens_per_s_ours_over_torch"].items():
    if k != "goal":
        print(f"| 2. dense forward {k} (tokens/s) | {v['ours']:.0f} | {v['torch']:.0f} | {v['ratio']:.2f} | >= 1.0 |")
for k, v in g["3_pruned50_prefill_tokens_per_s_over_dense"].items():
    if k != "goal":
        rounds = ", ".join(f"{x:.2f}" for x in v["per_round_ratios"])
        print(f"| 3. 50% pruned prefill {k} (tokens/s) | {v['pruned']:.0f} | {v['dense']:.0f} | {v['ratio']:.2f} | >= 1.8 (MAC limit {v['limit_from_macs']:.2f}, {100 * v['share_of_limit']:.0f}% of it; rounds {rounds}) |")
x = g["4_train_peak_rss_ours_over_torch"]
print(f"| 4. train step peak RSS (GiB) | {x['ours_bytes'] / 2**30:.2f} | {x['torch_bytes'] / 2**30:.2f} | {x['ratio']:.2f} | <= 1.2 |")
print("wrote", out)
PY
