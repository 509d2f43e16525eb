"""Features of `vigil serve` that need more than the base install, loaded by name only when configured.

The onboard packages import only numpy, onnxruntime, pyzmq, msgpack and the standard library
(tests/test_imports.py). A recording (`--record DIR`, `--foxglove-ws PORT`) needs foxglove-sdk and mcap, the extra
vigil[record]; its hook lives in `vigil.record`, which is imported here, by name, and nowhere else on the onboard
path: a runtime that records nothing never loads it, and a runtime asked to record without the extra refuses to
start with a message that names the install command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vigil.runtime.config import ConfigError

if TYPE_CHECKING:
    from vigil.runtime.hooks import Hook
    from vigil.runtime.server import Runtime

RECORD_MODULE = "vigil.record.hook"  # the one module imported by name here (tests/test_imports.py checks it)


def wants_recorder(runtime: Runtime) -> bool:
    return bool(runtime.config.record or runtime.config.foxglove_ws)


def recorder(runtime: Runtime) -> Hook:
    """The recording hook for `runtime` (vigil.record.hook.RecordHook.start). ConfigError when vigil[record] is
    not installed, or the folder or port cannot be used."""
    key = "record" if runtime.config.record else "foxglove_ws"
    try:
        module = importlib.import_module(RECORD_MODULE)
    except ModuleNotFoundError as exc:
        if (exc.name or "vigil").startswith("vigil"):
            raise  # part of vigil itself is missing: a broken install, not a missing extra
        raise ConfigError(f"config key {key!r} needs the recording extra, which is not installed (no module "
                          f"{exc.name!r}): pip install 'vigil[record]'") from None
    return module.RecordHook.start(runtime)
