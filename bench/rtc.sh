#!/usr/bin/env bash
# make bench-rtc: real-time chunking against its baselines (issue 16) from a fresh clone, resumable.
#   MT10 demonstrations -> four flow ensembles (chunk length 8 and 16; each plain, served with guided RTC,
#   and trained with training-time RTC) -> MT10 episodes through `vigil serve --execution async` for every
#   execution method and inference delay -> BENCHMARKS.md section `rtc` and docs/figures/rtc_*.png.
#   Every step is skipped when its output exists; delete $RTC (default bench-runs/rtc) to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
RTC=${RTC:-bench-runs/rtc}
V=.venv/bin/vigil
mkdir -p "$RTC"
[ -f "$RTC/mt10-demos/index.jsonl" ] || $V demos record --tasks mt10 --episodes 20 --seed 0 --out "$RTC/mt10-demos"
train() {  # variant rtc-mode
    [ -f "$RTC/$1/bundle/manifest.json" ] && return
    $V train flow --config "configs/flow-rtc-$1.toml" --demos "$RTC/mt10-demos" --out "$RTC/$1" --seed 0 \
        --encoder "$RTC/encoder" --rtc "$2"
}
train h8-base guided
train h8-trained trained
train h16-base guided
train h16-trained trained
.venv/bin/python -m bench.rtc --runs "$RTC" "$@"
