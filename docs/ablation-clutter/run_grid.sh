#!/bin/bash
# The clutter grid (plan: scripts/bench_ablation.py's docstring, commit a549966), seed by seed: each seed's
# three arms at clutter 4 (the heavy level) and at clutter 0 (the light level, run again with this code
# because the fourth world's llava seed 0 did not reproduce) side by side, one run of each at a time.
cd /work/grid-clutter || exit 1
. /work/venv/bin/activate
for s in 0 1 2 3 4 5 6 7; do
  seeds=$(seq -s ' ' 0 "$s")
  echo "=== seed $s: $(date -u +%H:%M:%S)"
  python scripts/bench_ablation.py --arms llava captions victor --seeds $seeds --clutter 4 --jobs 1 \
      --out-dir out/ablation-clutter >> heavy.log 2>&1 &
  python scripts/bench_ablation.py --arms llava captions victor --seeds $seeds --jobs 1 \
      --out-dir out/ablation-light >> light.log 2>&1 &
  wait
  echo "=== seed $s done: $(date -u +%H:%M:%S)"
done
