"""Import rules, checked on the source and in fresh interpreters.

(a) The onboard packages (vigil.wire, vigil.runtime, vigil.policies, vigil.monitors) import only numpy,
    onnxruntime, zmq, msgpack, the standard library and each other: never torch, vigil.sim or
    vigil.training. A robot computer has only the base install.
(b) The layering has no cycles: vigil.wire imports nothing of vigil, vigil.monitors only vigil.wire,
    vigil.policies only vigil.wire and vigil.monitors, vigil.runtime those three.
(c) The onboard commands (keys, serve, alerts, requests, swap), run to their end, load nothing else: the
    entry point imports a command's module only when that command is asked for.
(d) vigil.record (recordings, the extra vigil[record]) is loaded by name only when a recording is configured
    (runtime/extras.py); it imports the onboard packages, foxglove, mcap and protobuf, never the simulator,
    the training code or torch.

The source check reads every import statement of every module file, also those inside functions (lazy
imports are imports too); the interpreter check imports every module (or runs the command) in a child
process and reads its sys.modules.
"""

from __future__ import annotations

import ast
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env, free_port

from vigil.runtime.requests import RequestStore
from vigil.runtime.store import AlertStore

ROOT = Path(__file__).resolve().parents[1]

# package -> the vigil packages it may import besides itself (b)
LAYERS = {
    "vigil.wire": set(),
    "vigil.monitors": {"vigil.wire"},
    "vigil.policies": {"vigil.wire", "vigil.monitors"},
    "vigil.runtime": {"vigil.wire", "vigil.monitors", "vigil.policies"},
}
ONBOARD = tuple(LAYERS)
THIRD_PARTY = {"numpy", "onnxruntime", "zmq", "msgpack"}  # the base install: pyproject.toml's dependencies
# what the onboard path must never load, named for a clear failure (the allow-list refuses them anyway)
FORBIDDEN = ("torch", "vigil.sim", "vigil.training", "gymnasium", "mujoco", "metaworld", "scipy", "cvxpy",
             "matplotlib", "control", "onnx", "tqdm", "rich", "starlette", "uvicorn", "selenium", "vigil.console")
# modules an interpreter registers by itself whatever is imported: Cython's runtime, which the compiled
# extensions of numpy and pyzmq register under these names
INTERPRETER = ("_cython_", "cython_runtime")
# the dynamic imports of the onboard path: main() imports the module that owns the command asked for, and
# runtime/extras.py imports vigil.record.hook when `vigil serve` is asked to record
DYNAMIC_IMPORTS = {"runtime/cli.py", "runtime/extras.py"}
RECORD = "vigil.record"
RECORD_THIRD_PARTY = {"foxglove", "mcap", "google"}  # vigil[record]'s packages, and protobuf (onnxruntime's)


def module_name(path: Path) -> str:
    package = "vigil." + path.relative_to(ROOT).parts[0]
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def onboard_files() -> list[Path]:
    return sorted(p for package in ONBOARD for p in (ROOT / package.removeprefix("vigil.")).rglob("*.py"))


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in the file, at any depth (functions, TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).rsplit(".", 1)[0] if path.stem != "__init__" else module_name(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{parent}.{base}" if base else parent
            if base == "vigil":  # from vigil import wire: the package named is what is imported
                out += [(node.lineno, f"vigil.{alias.name}") for alias in node.names]
            elif base != "__future__":
                out.append((node.lineno, base))
    return out


def package_of(module: str) -> str | None:
    """The vigil package (vigil.wire, ...) of a vigil module, None for anything else."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "vigil" and len(parts) > 1 else None


def is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def outside_onboard(modules: list[str], baseline: set[str]) -> list[str]:
    """The modules that are not the standard library, the base install's packages or the onboard packages."""
    out = []
    for m in modules:
        top = m.split(".")[0]
        if m in baseline or top in sys.stdlib_module_names or top in THIRD_PARTY or m.startswith(INTERPRETER):
            continue
        if m == "vigil" or package_of(m) in ONBOARD:
            continue
        out.append(m)
    return out


@pytest.fixture(scope="module")
def baseline() -> set[str]:
    """What a bare interpreter of this installation has loaded before any import (site hooks, __main__)."""
    r = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sorted(sys.modules)))"],
                       capture_output=True, text=True, timeout=60, env=child_env())
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout))


# -- (a) and (b) on the source ------------------------------------------------------------------------------


def test_every_onboard_package_has_module_files():
    for package in ONBOARD:
        assert any(module_name(p).startswith(package) for p in onboard_files()), package


def test_onboard_source_imports_only_the_base_install():
    bad = []
    for path in onboard_files():
        for line, module in imported(path):
            top = module.split(".")[0]
            ok = top in sys.stdlib_module_names or top in THIRD_PARTY or package_of(module) in ONBOARD
            if not ok or is_forbidden(module):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "the onboard path imports outside the base install:\n" + "\n".join(bad)


def test_onboard_source_imports_no_module_by_name_except_the_command_dispatch():
    """importlib.import_module / __import__ hide an import from the check above; only main() may use it."""
    bad = []
    for path in onboard_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                if name in ("import_module", "__import__") and str(path.relative_to(ROOT)) not in DYNAMIC_IMPORTS:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {name}")
    assert not bad, "\n".join(bad)


def test_the_command_table_names_only_command_modules():
    """What main() may import by name: the onboard commands' own module, sim/cli.py, training/cli.py,
    console/cli.py and prefs/cli.py."""
    from vigil.runtime.cli import COMMANDS
    from vigil.runtime.cli import ONBOARD as ONBOARD_CLI

    assert {module for module, _ in COMMANDS.values()} == {ONBOARD_CLI, "vigil.sim.cli", "vigil.training.cli",
                                                           "vigil.console.cli", "vigil.prefs.cli"}


def test_the_recording_is_the_only_module_loaded_by_name_from_the_runtime():
    from vigil.runtime.extras import RECORD_MODULE

    assert RECORD_MODULE == f"{RECORD}.hook"
    calls = [node for node in ast.walk(ast.parse((ROOT / "runtime/extras.py").read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"]
    assert [ast.unparse(c.args[0]) for c in calls] == ["RECORD_MODULE"]


def test_recording_source_imports_only_the_onboard_packages_and_its_extra():
    bad = []
    for path in sorted((ROOT / "record").rglob("*.py")):
        for line, module in imported(path):
            top = module.split(".")[0]
            ok = (top in sys.stdlib_module_names or top in THIRD_PARTY | RECORD_THIRD_PARTY
                  or package_of(module) in (*ONBOARD, RECORD))
            if not ok or is_forbidden(module):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "vigil.record imports outside the onboard packages and vigil[record]:\n" + "\n".join(bad)


def test_importing_the_recording_loads_nothing_forbidden():
    modules = [module_name(p) for p in sorted((ROOT / "record").rglob("*.py"))]
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL, *modules], capture_output=True, text=True, timeout=120,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout)
    assert not [m for m in loaded if is_forbidden(m)], [m for m in loaded if is_forbidden(m)]
    assert {package_of(m) for m in loaded} - {None, RECORD} <= set(ONBOARD)


@pytest.mark.parametrize("package", ONBOARD)
def test_layering_on_the_source(package):
    bad = []
    for path in onboard_files():
        if not module_name(path).startswith(package):
            continue
        for line, module in imported(path):
            other = package_of(module)
            if other is not None and other != package and other not in LAYERS[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, f"{package} may import only {sorted(LAYERS[package]) or 'nothing of vigil'}:\n" + "\n".join(bad)


# -- (a) and (b) in fresh interpreters ----------------------------------------------------------------------

IMPORT_ALL = "import importlib, json, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n" \
             "print(json.dumps(sorted(sys.modules)))"


@pytest.mark.parametrize("package", ONBOARD)
def test_importing_every_module_of_an_onboard_package_loads_only_the_base_install_and_its_layers(package,
                                                                                                 baseline):
    modules = [module_name(p) for p in onboard_files() if module_name(p).startswith(package)]
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL, *modules], capture_output=True, text=True, timeout=120,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout)
    assert not [m for m in loaded if is_forbidden(m)], [m for m in loaded if is_forbidden(m)]
    assert not outside_onboard(loaded, baseline)
    packages = {package_of(m) for m in loaded} - {None, package}
    assert packages <= LAYERS[package], f"{package} loads {sorted(packages - LAYERS[package])}"


# -- (c) the onboard commands, run in fresh interpreters ----------------------------------------------------

RUN_MAIN = """
import json, sys
from vigil.runtime.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:  # --help and usage errors end in SystemExit
    rc = exc.code
print(json.dumps({"rc": rc, "modules": sorted(sys.modules)}))
"""


def run_main(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", RUN_MAIN, *args], capture_output=True, text=True, timeout=120,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_onboard_only(result: dict, baseline: set[str]) -> None:
    loaded = result["modules"]
    assert not [m for m in loaded if is_forbidden(m)], [m for m in loaded if is_forbidden(m)]
    assert not outside_onboard(loaded, baseline)


@pytest.mark.parametrize("command", ["keys", "serve", "alerts", "requests", "swap"])
def test_onboard_command_help_loads_nothing_else(command, baseline):
    result = run_main(command, "--help")
    assert result["rc"] == 0
    assert_onboard_only(result, baseline)


def test_top_level_help_loads_no_command_module(baseline):
    result = run_main("--help")
    assert result["rc"] == 0
    assert_onboard_only(result, baseline)
    assert "vigil.runtime.server" not in result["modules"]


def test_onboard_commands_run_to_their_end_load_nothing_else(tmp_path, baseline):
    alerts = AlertStore(tmp_path / "alerts.db")
    alerts.append("robot-0", "warn", "saturation", "a reason", {}, 1)
    alerts.close()
    RequestStore(tmp_path / "requests.db").close()
    runs = {
        "keys": (["keys", "robot-1", "--dir", str(tmp_path / "keys")], 0),
        "alerts": (["alerts", "--store", str(tmp_path / "alerts.db"), "--since", "0", "--json"], 0),
        "requests": (["requests", "--store", str(tmp_path / "requests.db"), "--json"], 0),
        # nobody listens there: the no-answer exit, after the whole request path ran
        "swap": (["swap", "--bundle", str(tmp_path), "--connect", f"tcp://127.0.0.1:{free_port()}",
                  "--timeout", "0.2"], 2),
        "serve (refused config)": (["serve", "--store", str(tmp_path / "serve.db")], 2),  # no --bundle
    }
    for name, (args, rc) in runs.items():
        result = run_main(*args)
        assert result["rc"] == rc, name
        assert_onboard_only(result, baseline)


def test_serve_serving_a_bundle_loads_nothing_else(tmp_path, lqr_bundle, baseline):
    proc = subprocess.Popen([sys.executable, "-c", RUN_MAIN, "serve", "--bundle", str(lqr_bundle),
                             "--robot-endpoint", "tcp://127.0.0.1:0", "--operator-endpoint", "tcp://127.0.0.1:0",
                             "--store", str(tmp_path / "alerts.db")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        ready = json.loads(proc.stdout.readline())  # printed once serving, after the signal handlers are set
        assert ready["vigil"] == "ready", ready
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["rc"] == 0
    assert_onboard_only(result, baseline)


def test_prefs_answering_loads_no_training_code():
    """`vigil prefs list | show | answer` run on an operator's computer with the base install: prefs/cli.py and
    its learning subcommands' parsers (prefs/learn.py) import no torch, simulator or training code."""
    code = ("import sys; import vigil.prefs.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith(('vigil.training', "
            "'vigil.sim'))]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
