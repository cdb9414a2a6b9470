# r0-default's plan applied to the dense weights without its mask-training adapters, then the
# table's recovery. Run from this directory with MASKPRUNE_BIN = the binary of commit f8db474.
set -euo pipefail
B=${MASKPRUNE_BIN:?the binary of commit f8db474}
M=${MODEL:-$HOME/.cache/maskprune/models/smollm2-135m-instruct}
W=${WORK:-$HOME/.cache/maskprune/ablation/smollm2-135m/ablation-30}
$B surgery --quiet --model $M --plan r0-plan.json --out $W/x-r0-plan --overwrite
$B eval ppl --quiet --model $W/x-r0-plan --dataset c4 --seq-len 128 --json c4.json
$B finetune --quiet --model $W/x-r0-plan --teacher $M --out $W/x-r0-plan-tuned \
  --run-dir $W/x-r0-plan-tuned.run --overwrite --overwrite-run
cp $W/x-r0-plan-tuned.run/summary.json tuned-summary.json
for ds in c4 wikitext2 ptb; do
  w=(); [ $ds = c4 ] || w=(--max-windows 1024)
  $B eval ppl --quiet --model $W/x-r0-plan-tuned --dataset $ds --seq-len 128 "${w[@]}" --json tuned-$ds.json
done
