#!/usr/bin/env bash
# Run every --prune_method on one image and print visual tokens, answer and stage timings.
# Usage: scripts/compare_methods.sh [IMAGE] [QUESTION] [extra llava.eval.run flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-playground/images/demo.png}
QUESTION=${2:-What is the value of the tallest bar?}
shift $(( $# > 2 ? 2 : $# )) || true
PY=${PY:-.venv/bin/python}
METHODS=$($PY -c "import shirg_patches as s; print(' '.join(m for m in sorted(s.REGISTRY) if m != 'lavida'))")
printf "%-10s %8s %10s %10s %10s  %s\n" method tokens vision_ms select_ms steps_ms answer
for m in $METHODS; do
  $PY -m llava.eval.run --image "$IMAGE" --question "$QUESTION" --prune_method "$m" --json "$@" 2>/dev/null |
    $PY -c "import json,sys; r=json.load(sys.stdin); t=r['timings_ms']
print(f\"{r['prune_method']:<10} {r['visual_tokens']:>8} {t.get('vision',0):>10.1f} {t.get('selection',t.get('merge',0)):>10.1f} {t.get('steps',0):>10.1f}  {r['answer'][:40]!r}\")"
done
