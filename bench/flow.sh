#!/usr/bin/env bash
# make bench-flow: the whole flow-ensemble evaluation of issue 4 from a fresh clone, resumable.
#   demonstrations -> three training seeds of the state policy, the shared-encoder variant and the vision
#   policy -> VFD calibration of each bundle -> success with the runtime in the loop -> failure and shift
#   detection against the baselines -> BENCHMARKS.md sections flow-success and flow-detect, PNGs in
#   docs/figures/. Every step is skipped when its output exists, so an interrupted run resumes; delete
#   $FLOW (default bench-runs/flow) to start over. On this 2-core machine: ~20 s of demos, ~17 min per
#   state training seed, ~15 min for the vision run, ~10 min per run of rollouts: about 2 hours in all.
set -euo pipefail
cd "$(dirname "$0")/.."
FLOW=${FLOW:-bench-runs/flow}
V=.venv/bin/vigil
PY=.venv/bin/python
SEEDS=${SEEDS:-"0 1 2"}
mkdir -p "$FLOW"

[ -f "$FLOW/mt10-demos/index.jsonl" ] || $V demos record --tasks mt10 --episodes 20 --seed 0 --out "$FLOW/mt10-demos"
VISION_TASKS=reach-v3,push-v3,drawer-open-v3,button-press-topdown-v3
[ -f "$FLOW/vision-demos/index.jsonl" ] || $V demos record --tasks $VISION_TASKS --episodes 20 --seed 0 --camera \
    --out "$FLOW/vision-demos"

train() {  # name config demos seed
    [ -f "$FLOW/$1/bundle/manifest.json" ] && return
    $V train flow --config "$2" --demos "$FLOW/$3" --out "$FLOW/$1" --seed "$4" --encoder "$FLOW/encoder"
    $V calibrate --bundle "$FLOW/$1/bundle" --episodes 10 --seed 40
}
RUNS=()
for s in $SEEDS; do train "mt10-s$s" configs/flow-mt10.toml mt10-demos "$s"; RUNS+=("$FLOW/mt10-s$s"); done
train mt10-shared-s0 configs/flow-mt10-shared.toml mt10-demos 0
train vision-s0 configs/flow-vision.toml vision-demos 0

first=${RUNS[0]}
$PY -m bench.flow_success --bundle "$first/bundle" --demos "$FLOW/mt10-demos" --episodes 10
state=$(IFS=,; echo "${RUNS[*]}")
$PY -m bench.flow_detect --out "$FLOW/detect" --runs "$state,$FLOW/mt10-shared-s0,$FLOW/vision-s0" \
    --groups "state M=5:$state;shared encoder M=5:$FLOW/mt10-shared-s0;vision M=5:$FLOW/vision-s0"
