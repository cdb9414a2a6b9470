#!/usr/bin/env bash
# maskprune (burn) against PyTorch on this machine, the same model directory, shapes, windows
# and threads, in one run; writes one JSON with both sides' numbers and the ratios:
#   1. mask training: real `train-masks` updates, 4x128 (`bench --train-step`: the mean of a
#      20-update run on new windows, the teacher's forward in each, as a run's first epoch;
#      and with the teacher's hidden states cached, as its later epochs), against PyTorch's
#      step of the same work (scripts/bench_train_torch.py: teacher forward, student forward
#      and backward, KL at T = 1); alternated TRAIN_ROUNDS times (default 2). Also the mean
#      `seconds` of a real `train-masks --max-steps 20` run's log.jsonl (configs/…-30.toml),
#      and the update's GFLOP/s as a share of this machine's gemm peak (measured in-process).
#   2. dense forward, logits at every position, 8x128, 4x256 and 1x1024 tokens/s, ours / torch;
#   3. `eval ppl` on WikiText-2 at the same shapes (--batch x --seq-len, the first windows),
#      ours / transformers' perplexity loop (scripts/ref_ppl.py) on the same windows, and ours
#      / our own forward (>= 0.9: evaluation at forward speed);
#   4. `eval zeroshot` documents/s over the 7 tasks (first ZS_LIMIT documents each), this
#      build and, with BEFORE_BIN=path, an older binary (the speed-up of this build);
#   5. the 50% pruned model's prefill against dense (the plan of the committed 50% run),
#      the two models' processes alternated ROUNDS times (default 3), and the MAC limit;
#   6. peak RSS of the training run, ours / torch's step.
# Each measurement runs in its own process. Needs torch + transformers for the PyTorch side
# (`python3 -m venv V && V/bin/pip install torch==2.13.0 transformers`) and the data
# directory (WikiText-2, the zero-shot tasks, C4 for the real run).
#
#   scripts/bench-vs-torch.sh                       # SmolLM2 (fetched), results/bench-vs-torch.json
#   MODEL=DIR PYTHON=V/bin/python BEFORE_BIN=old/maskprune OUT=b.json scripts/bench-vs-torch.sh
# MASKPRUNE_BIN=path measures that binary instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MASKPRUNE_BIN:-}" ]; then
  cargo build --quiet --release -p maskprune-cli
fi
BIN="${MASKPRUNE_BIN:-${CARGO_TARGET_DIR:-target}/release/maskprune}"
MODEL="${MODEL:-$(MASKPRUNE_BIN="$BIN" scripts/fetch-smollm2.sh | tail -n 1)}"
REPEATS="${REPEATS:-5}"
WARMUP="${WARMUP:-2}"
TRAIN_SHAPE="${TRAIN_SHAPE:-4x128}"
TRAIN_ROUNDS="${TRAIN_ROUNDS:-2}"
FORWARD_SHAPES="${FORWARD_SHAPES:-8x128,4x256,1x1024}"
PPL_TOKENS="${PPL_TOKENS:-16384}"   # windows per eval-ppl shape: PPL_TOKENS / seq_len
ZS_LIMIT="${ZS_LIMIT:-50}"
OUT="${OUT:-results/bench-vs-torch.json}"
PYTHON="${PYTHON:-$( [ -x V/bin/python ] && echo V/bin/python || echo python3)}"
THREADS="$(nproc)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -c "import torch, transformers" 2>/dev/null ||
  { echo "error: torch/transformers not importable with $PYTHON (set PYTHON)" >&2; exit 1; }
quiet_torch() { grep -v -i "warn\|loading weights" || true; }

echo "== 1, 6: mask training $TRAIN_SHAPE, $TRAIN_ROUNDS rounds"
for r in $(seq "$TRAIN_ROUNDS"); do
  "$BIN" bench --quiet --model "$MODEL" --shapes "$TRAIN_SHAPE" --train-step --updates 20 --repeats "$REPEATS" --json "$tmp/ours-train-$r.json"
  "$PYTHON" scripts/bench_train_torch.py --model "$MODEL" --shapes "$TRAIN_SHAPE" --warmup "$WARMUP" --repeats "$REPEATS" --threads "$THREADS" --json "$tmp/torch-train-$r.json" 2>&1 | quiet_torch
done
echo "== 1: a real train-masks run, 20 updates"
"$BIN" train-masks --quiet --config configs/smollm2-135m-30.toml --model "$MODEL" --run-dir "$tmp/run" --max-steps 20 >/dev/null

echo "== 2: dense forward $FORWARD_SHAPES"
"$BIN" bench --quiet --model "$MODEL" --shapes "$FORWARD_SHAPES" --decode none --warmup "$WARMUP" --repeats "$REPEATS" --json "$tmp/ours-forward.json"
"$PYTHON" scripts/bench_forward_torch.py --model "$MODEL" --shapes "$FORWARD_SHAPES" --warmup "$WARMUP" --repeats "$REPEATS" --threads "$THREADS" --json "$tmp/torch-forward.json" 2>&1 | quiet_torch

echo "== 3: eval ppl (WikiText-2) at $FORWARD_SHAPES"
for shape in ${FORWARD_SHAPES//,/ }; do
  b=${shape%x*}; t=${shape#*x}; n=$((PPL_TOKENS / t))
  "$BIN" eval ppl --quiet --model "$MODEL" --dataset wikitext2 --seq-len "$t" --batch "$b" --max-windows "$n" --json "$tmp/ours-ppl-$shape.json"
  "$PYTHON" scripts/ref_ppl.py --model "$MODEL" --dataset wikitext2 --seq-len "$t" --batch "$b" --max-windows "$n" --threads "$THREADS" --json "$tmp/torch-ppl-$shape.json" 2>&1 | quiet_torch
done

echo "== 4: eval zeroshot, first $ZS_LIMIT documents of each task"
"$BIN" eval zeroshot --quiet --model "$MODEL" --limit "$ZS_LIMIT" --json "$tmp/ours-zs.json"
if [ -n "${BEFORE_BIN:-}" ]; then
  "$BEFORE_BIN" eval zeroshot --quiet --model "$MODEL" --limit "$ZS_LIMIT" --json "$tmp/before-zs.json"
  "$BEFORE_BIN" eval ppl --quiet --model "$MODEL" --dataset wikitext2 --seq-len 128 --batch 8 --max-windows $((PPL_TOKENS / 128)) --json "$tmp/before-ppl.json"
fi

echo "== 5: 50% pruned vs dense prefill"
PRUNED="$tmp/pruned-50"
"$BIN" surgery --quiet --model "$MODEL" --plan results/smollm2-135m/plan-maskprune-50.json --out "$PRUNED"
"$BIN" bench --quiet --model "$PRUNED" --baseline "$MODEL" --shapes "${PREFILL_SHAPES:-1x256,1x512,4x256,1x1024}" --decode 1x128+64 --warmup "$WARMUP" --repeats "$REPEATS" --rounds "${ROUNDS:-3}" --json "$tmp/pruned.json"

python3 - "$tmp" "$OUT" "$THREADS" "$TRAIN_ROUNDS" "$FORWARD_SHAPES" <<'PY'
import glob, json, os, platform, sys
tmp, out, threads, rounds, shapes = sys.argv[1:]
rounds, shapes = int(rounds), shapes.split(",")
load = lambda n: json.load(open(os.path.join(tmp, n)))
med = lambda xs: sorted(xs)[len(xs) // 2]
span = lambda xs: [min(xs), max(xs)]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
ours_train = [load(f"ours-train-{r}.json") for r in range(1, rounds + 1)]
torch_train = [load(f"torch-train-{r}.json") for r in range(1, rounds + 1)]
log = [json.loads(l) for l in open(os.path.join(tmp, "run", "log.jsonl"))]
run_mean = sum(r["seconds"] for r in log) / len(log)
o = [x["results"][0] for x in ours_train]
t = [x["results"][0]["median_s"] for x in torch_train]
ratios = [a["mean_s"] / b for a, b in zip(o, t)]
goals = {
    "1_train_update_seconds_ours_over_torch": {
        "shape": f"{o[0]['batch']}x{o[0]['seq_len']}",
        "ours_mean_s_per_round": [x["mean_s"] for x in o],
        "ours_cached_teacher_median_s_per_round": [x["cached_teacher_median_s"] for x in o],
        "torch_median_s_per_round": t,
        "ratio_per_round": ratios, "ratio": med(ratios), "range": span(ratios),
        "ratio_cached_teacher_per_round": [a["cached_teacher_median_s"] / b for a, b in zip(o, t)],
        "real_train_masks_run": {"config": "configs/smollm2-135m-30.toml", "updates": len(log),
                                 "mean_update_s": run_mean, "ratio_to_torch_step": run_mean / med(t)},
        "gflops_per_s": [x["gflops_per_s"] for x in o],
        "gemm_peak_gflops_per_s": [x["gemm_peak_gflops_per_s"] for x in ours_train],
        "share_of_gemm_peak": [x["share_of_gemm_peak"] for x in o],
        "goal": "<= 1.0 (and >= 50% of the gemm peak)"},
    "2_dense_forward_tokens_per_s_ours_over_torch": {
        f"{a['batch']}x{a['seq_len']}": {"ours": a["tokens_per_s"], "torch": b["tokens_per_s"],
                                         "ratio": a["tokens_per_s"] / b["tokens_per_s"]}
        for a, b in zip(load("ours-forward.json")["forward"], load("torch-forward.json")["results"])} | {"goal": ">= 1.0"},
}
forward = {f"{a['batch']}x{a['seq_len']}": a["tokens_per_s"] for a in load("ours-forward.json")["forward"]}
ppl = {}
for shape in shapes:
    ours = load(f"ours-ppl-{shape}.json")["result"]
    ref = load(f"torch-ppl-{shape}.json")
    torch_tps = ref["windows"] * ref["seq_len"] / ref["seconds"]
    ppl[shape] = {"ours": ours["tokens_per_s"], "torch": torch_tps, "ratio": ours["tokens_per_s"] / torch_tps,
                  "ours_forward": forward[shape], "share_of_forward": ours["tokens_per_s"] / forward[shape],
                  "windows": ours["windows"], "ppl_ours": ours["ppl"], "ppl_torch": ref["ppl"]}
goals["3_eval_ppl_tokens_per_s"] = ppl | {"goal": "ratio >= 1.0, share_of_forward >= 0.9"}
def docs_per_s(report):
    tasks = report["tasks"]
    n, s = sum(v["n"] for v in tasks.values()), sum(v["seconds"] for v in tasks.values())
    return {"documents": n, "seconds": s, "documents_per_s": n / s,
            "per_task": {k: v["n"] / v["seconds"] for k, v in tasks.items()}}
zs = {"ours": docs_per_s(load("ours-zs.json"))}
if os.path.exists(os.path.join(tmp, "before-zs.json")):
    zs["before"] = docs_per_s(load("before-zs.json"))
    zs["speedup"] = zs["ours"]["documents_per_s"] / zs["before"]["documents_per_s"]
    before_ppl = load("before-ppl.json")["result"]["tokens_per_s"]
    goals["3_eval_ppl_tokens_per_s"]["8x128"]["before"] = before_ppl
goals["4_zeroshot_documents_per_s"] = zs
pruned = load("pruned.json")
shape = lambda r: f"{r['batch']}x{r['seq_len']}"
def per_round(dense_s, pruned_s, rounds):
    n = len(dense_s) // rounds
    return [med(dense_s[i * n:(i + 1) * n]) / med(pruned_s[i * n:(i + 1) * n]) for i in range(rounds)]
goals["5_pruned50_prefill_tokens_per_s_over_dense"] = {
    shape(m): {"pruned": m["tokens_per_s"], "dense": b["tokens_per_s"], "ratio": m["tokens_per_s"] / b["tokens_per_s"],
               "limit_from_macs": b["macs_per_token"] / m["macs_per_token"],
               "share_of_limit": m["tokens_per_s"] / b["tokens_per_s"] / (b["macs_per_token"] / m["macs_per_token"]),
               "per_round_ratios": per_round(b["seconds"], m["seconds"], pruned["model"].get("rounds", 1))}
    for m, b in zip(pruned["model"]["prefill"], pruned["baseline"]["prefill"])} | {"goal": ">= 1.8"}
rss = [x["peak_rss_bytes"] for x in ours_train]
trss = [x["peak_rss_bytes"] for x in torch_train]
goals["6_train_peak_rss_ours_over_torch"] = {"ours_bytes": max(rss), "torch_bytes": max(trss),
                                             "ratio": max(rss) / max(trss), "goal": "<= 1.2"}
report = {"machine": {"cpus": os.cpu_count(), "threads": int(threads), "cpu": cpu, "platform": platform.platform()},
          "goals": goals,
          "raw": {"ours_train": ours_train, "torch_train": torch_train, "train_masks_log_seconds": [r["seconds"] for r in log],
                  "ours_forward": load("ours-forward.json"), "torch_forward": load("torch-forward.json"),
                  "pruned_vs_dense": pruned}}
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
json.dump(report, open(out + ".tmp", "w"), indent=2)
os.replace(out + ".tmp", out)
g = goals
print("\n| what | maskprune | PyTorch / other | ratio | range | goal |\n|---|---|---|---|---|---|")
x = g["1_train_update_seconds_ours_over_torch"]
print(f"| 1. train-masks update {x['shape']}, mean of 20, teacher forward in each (s) | {med(x['ours_mean_s_per_round']):.3f} | {med(x['torch_median_s_per_round']):.3f} | {x['ratio']:.2f} | {x['range'][0]:.2f}-{x['range'][1]:.2f} | <= 1.0 |")
c = x["ratio_cached_teacher_per_round"]
print(f"| 1. the same, teacher's hidden states cached (s) | {med(x['ours_cached_teacher_median_s_per_round']):.3f} | {med(x['torch_median_s_per_round']):.3f} | {med(c):.2f} | {min(c):.2f}-{max(c):.2f} | |")
rr = x["real_train_masks_run"]
print(f"| 1. a real `train-masks` run, mean of its {rr['updates']} updates (s) | {rr['mean_update_s']:.3f} | {med(x['torch_median_s_per_round']):.3f} | {rr['ratio_to_torch_step']:.2f} | | <= 1.0 |")
sh = x["share_of_gemm_peak"]
print(f"| 1. update GFLOP/s, share of the gemm peak | {med(x['gflops_per_s']):.0f} | {med(x['gemm_peak_gflops_per_s']):.0f} | {med(sh):.2f} | {min(sh):.2f}-{max(sh):.2f} | >= 0.5 |")
for k, v in g["2_dense_forward_tokens_per_s_ours_over_torch"].items():
    if k != "goal":
        print(f"| 2. dense forward {k} (tokens/s) | {v['ours']:.0f} | {v['torch']:.0f} | {v['ratio']:.2f} | | >= 1.0 |")
for k, v in g["3_eval_ppl_tokens_per_s"].items():
    if k != "goal":
        print(f"| 3. eval ppl {k}, {v['windows']} windows (tokens/s) | {v['ours']:.0f} | {v['torch']:.0f} | {v['ratio']:.2f} | | >= 1.0 |")
        print(f"| 3. eval ppl {k} / our forward | {v['ours']:.0f} | {v['ours_forward']:.0f} | {v['share_of_forward']:.2f} | | >= 0.9 |")
z = g["4_zeroshot_documents_per_s"]
before = f"{z['before']['documents_per_s']:.2f} (before)" if "before" in z else ""
print(f"| 4. eval zeroshot (documents/s) | {z['ours']['documents_per_s']:.2f} | {before} | {z.get('speedup', float('nan')):.2f} | | |")
for k, v in g["5_pruned50_prefill_tokens_per_s_over_dense"].items():
    if k != "goal":
        print(f"| 5. 50% pruned prefill {k} (tokens/s) | {v['pruned']:.0f} | {v['dense']:.0f} | {v['ratio']:.2f} | {min(v['per_round_ratios']):.2f}-{max(v['per_round_ratios']):.2f} | >= 1.8 (MAC limit {v['limit_from_macs']:.2f}) |")
x = g["6_train_peak_rss_ours_over_torch"]
print(f"| 6. training peak RSS (GiB) | {x['ours_bytes'] / 2**30:.2f} | {x['torch_bytes'] / 2**30:.2f} | {x['ratio']:.2f} | | <= 1.2 |")
print("wrote", out)
PY
