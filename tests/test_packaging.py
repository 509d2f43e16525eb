"""The onboard install's rule: runtime/, policies/ and monitors/ import no heavy dependency."""

from __future__ import annotations

import subprocess
import sys


def test_onboard_path_imports_no_heavy_dependency():
    """Standing rule: runtime/, policies/ and monitors/ run on numpy, onnxruntime, pyzmq and msgpack only."""
    code = (
        "import sys, importlib, pkgutil\n"
        "import vigil.runtime, vigil.policies, vigil.monitors\n"
        "for pkg in (vigil.runtime, vigil.policies, vigil.monitors):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "heavy = ('torch', 'scipy', 'metaworld', 'mujoco', 'gymnasium', 'transformers', 'tokenizers',\n"
        "         'sentence_transformers', 'control', 'cvxpy', 'onnx', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
