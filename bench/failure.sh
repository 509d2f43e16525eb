#!/usr/bin/env bash
# make bench-failure: the failure-prediction study of issue 18 from a fresh clone, resumable.
#   demonstrations that hold the goal 40 steps (and, for comparison, 10) -> three training seeds of
#   configs/flow-mt10-failure.toml with RND/logpZO heads (~40 s each) and one seed on the hold-10 demonstrations
#   -> every signal at every plan of whole episodes (bench/failure_rollouts.py: ~2400 episodes, ~8 min with 2
#   workers) -> bands, combiners, ranking (bench/failure.py): BENCHMARKS.md section `failure` and
#   docs/figures/failure_*.png. Every step is skipped when its output exists; delete $OUT to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-runs/failure}
V=.venv/bin/vigil
PY=.venv/bin/python
export OMP_NUM_THREADS=1 PYTHONPATH=.
mkdir -p "$OUT"
for hold in 40 10; do
    [ -f "$OUT/demos-hold$hold/index.jsonl" ] || \
        $V demos record --tasks mt10 --episodes 20 --seed 0 --hold-steps $hold --out "$OUT/demos-hold$hold"
done
train() {  # name demos seed
    [ -f "$OUT/$1/bundle/manifest.json" ] && return
    $V train flow --config configs/flow-mt10-failure.toml --demos "$OUT/$2" --out "$OUT/$1" --seed "$3" \
        --encoder "$OUT/encoder" --no-progress
}
for s in 0 1 2; do train "h40-s$s" demos-hold40 "$s"; done
train h10-s0 demos-hold10 0
$PY -m bench.failure_rollouts --runs "$OUT/h40-s0,$OUT/h40-s1,$OUT/h40-s2" --out "$OUT/episodes"
$PY -m bench.failure_rollouts --runs "$OUT/h10-s0" --out "$OUT/episodes" --conditions nominal,calibration
$PY -m bench.failure --runs h40-s0,h40-s1,h40-s2 --hold10 h10-s0 --episodes "$OUT/episodes"
