#!/bin/bash
# The clutter grid (plan: scripts/bench_ablation.py's docstring, commit a549966), seed by seed, one run at
# a time per level: the three arms at clutter 4 (the heavy level, out/ablation-clutter) and at clutter 0
# (the light level, run again with this code because the fourth world's llava seed 0 did not reproduce,
# out/ablation-light), each level's loop on its own so that neither waits for the other.
# Usage: run_grid.sh FIRST_SEED [PID to wait for before the light loop starts]
cd /work/grid-clutter || exit 1
. /work/venv/bin/activate
first=${1:-0}
level_loop() {  # $1: the level's name, then bench_ablation's world flags
  local name=$1; shift
  for s in $(seq "$first" 7); do
    echo "=== $name seed $s: $(date -u +%H:%M:%S)"
    python scripts/bench_ablation.py --arms llava captions victor --seeds $(seq -s ' ' 0 "$s") --jobs 1 "$@" \
        >> "$name.log" 2>&1 || echo "=== $name seed $s FAILED"
    echo "=== $name seed $s done: $(date -u +%H:%M:%S)"
  done
}
level_loop heavy --clutter 4 --out-dir out/ablation-clutter &
( if [ -n "$2" ]; then while kill -0 "$2" 2>/dev/null; do sleep 10; done; fi
  level_loop light --out-dir out/ablation-light ) &
wait
