"""vigil's benchmarks, run from the repository root as modules: `.venv/bin/python -m bench.NAME` (the Makefile's
`make bench*` targets name each one).

A bench measures into raw results (JSON under bench/out/, or its work folder under bench-runs/) and renders
its section of BENCHMARKS.md (RELIABILITY.md for the soak) between its markers; the benches with
`--report-only` render from the raw results alone, without measuring. bench/common.py holds what they share:
paths, machine and commit, the command line, raw-result I/O, figures, and the generated sections.
"""
