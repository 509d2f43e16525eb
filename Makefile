# vigil: `make demo` runs the main job, `make test` the tests, `make bench` the benchmarks.
# Each creates .venv when it is missing (torch==2.13.0 first, so nothing pulls a CUDA build) and is
# quick when it exists: the install step re-runs only when pyproject.toml changes.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OPENPI  := .venv-openpi

.PHONY: browser ffmpeg-libs test-lerobot demo demo-lqr demo-assets lint test test-slow bench bench-latency bench-wakeup bench-flow-latency bench-flow bench-failure bench-dynamics bench-posttrain bench-fleet bench-prefs bench-online-rl bench-save bench-lqr \
	bench-lqr-loop bench-rl bench-soak bench-fairness bench-throughput bench-rtc bench-record bench-console clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[sim,train,dev,console,record,lerobot,fleet]'
	touch $(STAMP)

# The main job (sim/demo.py): the shipped MT10 flow ensemble served with VFD, robots nominal then shifted, data
# requests, the scripted expert, a SAVE round, a hot swap; about 4 minutes on 2 cores. demo-lqr: the LQR demo.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/vigil demo

demo-lqr: $(STAMP)
	$(BIN)/vigil demo-lqr

# Rebuild the demo's ensemble (sim/assets/mt10) from scripted-expert demonstrations; about 2 minutes.
demo-assets: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m vigil.sim.demo_assets

lint: $(STAMP)
	$(BIN)/ruff check .

# The console's tests drive headless Chromium (tests/test_console.py): install it (Debian packages) when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# LeRobot's own dataset code reads vigil's exports and writes datasets vigil imports (tests/test_lerobot.py). It needs
# torchvision and torchcodec, which cannot live beside the project's CPU torch: an environment of its own (about 6 GB,
# from this machine's wheel cache) and FFmpeg's shared libraries (Debian packages) for torchcodec.
LEROBOT := .venv-lerobot
$(LEROBOT)/.installed:
	$(PY) -m venv $(LEROBOT)
	$(LEROBOT)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(LEROBOT)/bin/pip install --quiet torchcodec==0.17.0 lerobot-dataset==0.4.4
	touch $@

ffmpeg-libs:
	ldconfig -p | grep -q libavdevice.so || ($(SUDO) apt-get update && $(SUDO) apt-get install -y libavdevice59 \
		libavfilter8 libavformat59 libavcodec59 libavutil57 libswscale6 libswresample4)

test-lerobot: $(STAMP) $(LEROBOT)/.installed ffmpeg-libs
	VIGIL_LEROBOT_PYTHON=$(LEROBOT)/bin/python $(BIN)/python -m pytest -q tests/test_lerobot.py

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The openpi-client peer pins numpy < 2, so it lives in an environment of its own.
$(OPENPI)/.installed:
	$(PY) -m venv $(OPENPI)
	$(OPENPI)/bin/pip install --quiet "openpi-client==0.1.2" typing_extensions websockets onnxruntime "numpy<2"
	touch $@

bench: bench-latency bench-wakeup bench-flow-latency bench-throughput

bench-latency: $(STAMP) $(OPENPI)/.installed
	$(BIN)/python -m bench.latency --openpi-python $(OPENPI)/bin/python

bench-wakeup: $(STAMP)
	$(BIN)/python -m bench.wakeup

bench-flow-latency: $(STAMP)
	$(BIN)/python -m bench.flow_latency

# Throughput (robots at 100 Hz one runtime serves with zero deadline verdicts): N robots from one load-generator
# process against a fresh `vigil serve` (realtime, 10 ms deadline) per step, N rising, both bundles, the gaussian one
# with --batch-plans 16 and (a diagnostic) with its telemetry off. About 6 minutes; writes its section of BENCHMARKS.md
# and docs/figures/throughput.png.
bench-throughput: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.throughput

# The flow ensemble's evaluation (issue 4): demos, 3 training seeds + shared-encoder + vision runs, VFD
# calibration, success with the runtime in the loop, failure and shift detection against the baselines.
# About 2 hours on 2 cores; resumable (outputs in bench-runs/flow). Not part of `make bench`.
bench-flow: $(STAMP)
	bash bench/flow.sh

# Failure prediction (issue 18): hold-the-goal demos, 3 seeds with RND/logpZO heads, every signal at every plan of
# ~2400 whole episodes, time-varying conformal bands, combiners, one ranking. About 18 minutes on 2 cores;
# resumable (outputs in bench-runs/failure). Not part of `make bench`.
bench-failure: $(STAMP)
	bash bench/failure.sh

# The dynamics monitor against VFD (issue 24): each failure-study run's bundle given a forward-dynamics ensemble,
# 3000 episodes played by the runtime's Agent under friction, mass, actuation-gain, latency and position shifts, AUROC
# in the first 30 steps and per episode, false alarms, diagnosis, cost per tick (bench/dynamics.py). Needs the runs of
# `make bench-failure`; about 15 minutes on 2 cores, resumable (bench-runs/dynamics). Not part of `make bench`.
bench-dynamics: $(STAMP)
	@[ -f bench-runs/failure/h40-s2/bundle/manifest.json ] || bash bench/failure.sh
	OMP_NUM_THREADS=1 PYTHONPATH=. $(BIN)/python -m bench.dynamics

# Post-training without an expert (issue 19): 2 seeds x (pretrained + 6 arms: mean with two machineries, cvar-left,
# constrained, expand guided by VFD and uniformly), 300 simulator episodes per arm, 200 (+200 shifted) evaluation
# episodes. About 15 minutes on 2 cores; resumable (outputs in bench-runs/posttrain). Not part of `make bench`.
bench-posttrain: $(STAMP)
	OMP_NUM_THREADS=1 PYTHONPATH=. $(BIN)/python -m bench.posttrain

# Fleets on Ray (issue 20): one evaluation serially, on a local Ray with 2 workers and on a two-node cluster started
# on this machine, then the same served (robots on real links to `vigil serve`), with a runtime killed mid-run. About 5
# minutes. Not part of `make bench`.
bench-fleet: $(STAMP)
	OMP_NUM_THREADS=1 PYTHONPATH=. $(BIN)/python -m bench.fleet

# Preferences as a training signal (issue 21): a pool of the pretrained policy's attempts, reward models x selection
# rules x seeds answered by simulated operators, and post-training with the learned reward (bench/prefs.py). About
# 25 minutes from scratch on 2 cores, resumable (bench-runs/prefs). Not part of `make bench`.
bench-prefs: $(STAMP)
	OMP_NUM_THREADS=1 PYTHONPATH=. $(BIN)/python -m bench.prefs

# Online RL through the runtime (issue 22): SAC pretrained in nominal Hopper-v5, deployed into a heavier, slipperier,
# weaker, one-step-late "real" Hopper through vigil serve with vigil learn swapping (bench/online_rl.py). About 30
# minutes for one seed of the main arms; --ablations --seeds 3 runs the study's choices (hours). Resumable
# (bench-runs/online_rl). Not part of `make bench`.
bench-online-rl: $(STAMP)
	OMP_NUM_THREADS=1 PYTHONPATH=. $(BIN)/python -m bench.online_rl --bpo

# The SAVE experiment (issue 5): 10 seeds x 5 acquisition rules x 5 rounds; about 1.5 h on 2 cores;
# resumable (outputs in bench-runs/save). Not part of `make bench`.
bench-save: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.save

# IR-LQR against its baselines (issue 6): both systems, 40 trials x 200 steps, a 10^4-step horizon for the
# growth exponent, a sweep of g1, g2. A few minutes on 2 cores, one process. Not part of `make bench`.
bench-lqr: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.lqr

# The onboard IR-LQR learner with the simulator in the loop (issue 6 item 4): 10 trials of the same prior and
# noise offline and through `vigil serve` + the sim robot (realtime, 20 Hz). About 2-3 minutes. Not in `make bench`.
bench-lqr-loop: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.lqr_loop --system aircraft-pitch
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.lqr_loop --system uav-2d

# BPO vs our PPO vs Stable-Baselines3 PPO (issue 7): 3 tasks x 3 algorithms x 3 seeds (100k steps on
# InvertedPendulum, 200k on Hopper and HalfCheetah), two runs at a time; then the deployment check of the BPO
# Hopper bundle over ZeroMQ. About 45 min on 2 idle cores; resumable (bench-runs/rl). Not part of `make bench`.
bench-rl: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.rl

# The soak test (issue 8): 10 simulated robots (one process each) x 100 Hz against one `vigil serve` (realtime,
# 10 ms deadline) for 10^6 ticks: latency over time, deadline misses, runtime RSS and CPU; then the CURVE cost on
# the round trip. About 17 minutes; writes RELIABILITY.md. Not part of `make bench`.
bench-soak: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.soak

# Fairness under a flood (issue 23): 4 robots x 100 Hz beside one robot that floods the runtime, with and without it
# (and the runtime before fair serving), realtime and lockstep, interleaved rounds. About 5 minutes; writes its section
# of BENCHMARKS.md and docs/figures/fairness.png. Not part of `make bench`.
bench-fairness: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.fairness

# Real-time chunking against its baselines (issue 16): MT10 demos, four flow ensembles (H = 8 and 16, plain and
# trained with RTC; OMP_NUM_THREADS=1: two threads on two busy cores are 6x slower), then every execution method x
# inference delay through `vigil serve --execution async`. About 40 min of training and 30 of episodes on 2 cores;
# resumable (bench-runs/rtc). Not part of `make bench`.
bench-rtc: $(STAMP)
	OMP_NUM_THREADS=1 bash bench/rtc.sh

# What a recording costs (`vigil serve --record`, issue 17): the hook on the loop's thread, the runtime's CPU per tick
# with and without it, reply latency, and file size per hour of robot time, for a 100 Hz robot on the LQR bundle and
# (when bench-runs/rtc has one) a flow ensemble. About 3 minutes; writes its section of BENCHMARKS.md. Not in `make bench`.
bench-record: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.record

# How soon an alert reaches the operator: stored -> `vigil console` page in headless Chromium, beside the operator
# stream's own subscriber (bench/console.py). About 20 s; writes its section of BENCHMARKS.md. Not in `make bench`.
bench-console: $(STAMP) browser
	$(BIN)/python -m bench.console

clean:
	rm -rf $(VENV) $(OPENPI) $(LEROBOT) .vigil-demo .pytest_cache
