#!/usr/bin/env bash
# Every system x every data set: quality, latency and memory in one results.csv (+ charts, report.md).
#
#   scripts/eval_all.sh                    # here: the built-in small model on the test fixtures (CPU, minutes)
#   NPROC=8 MODEL=/ckpt/lavida-llada-hd DATA=/data/eval OUT=outputs/eval-8b LIMIT= scripts/eval_all.sh
#                                          # full scale: 8 GPUs, one shard per rank, rank 0 merges and reports
#
# Environment: MODEL (checkpoint folder, default the built-in small model), DATA (data root with chartqa/,
# docvqa/, vqav2/, entitygrid/; default: fixtures written to $OUT/data), OUT (default outputs/eval), NPROC
# (processes; >1 runs under torchrun), SYSTEMS, DATASETS, LIMIT (questions per data set; empty = all),
# BATCH (questions sampled together), LATENCY_RUNS (timed runs per system x data set). Extra arguments go to
# python -m llava.eval.evaluate (e.g. --no-prefix-cache). Re-running with the same OUT resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-builtin:lavida-small}
OUT=${OUT:-outputs/eval}
NPROC=${NPROC:-1}
SYSTEMS=${SYSTEMS:-pool,full,shirg,shirg:fovea=saliency,random,stride,saint,topv,visionzip,divprune}
DATASETS=${DATASETS:-chartqa,docvqa,vqav2,entitygrid}
LIMIT=${LIMIT-4}
BATCH=${BATCH:-1}
LATENCY_RUNS=${LATENCY_RUNS:-5}
if [ -z "${DATA:-}" ]; then
    DATA=$OUT/data
    [ -d "$DATA" ] || "$PY" -m tests.llava.eval.fixtures "$DATA"
fi
args=(--model-path "$MODEL" --data-root "$DATA" --out "$OUT" --systems "$SYSTEMS" --datasets "$DATASETS"
      --batch-size "$BATCH" --latency-runs "$LATENCY_RUNS")
[ -n "$LIMIT" ] && args+=(--limit "$LIMIT")
if [ "$NPROC" -gt 1 ]; then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m llava.eval.evaluate "${args[@]}" "$@"
else
    "$PY" -m llava.eval.evaluate "${args[@]}" "$@"
fi
"$PY" -m llava.eval.report "$OUT"
