"""Shard independent jobs over workers: serially, over local processes, or on Ray (a local Ray or a cluster).

Every rollout-heavy experiment here (bench-flow's episodes, bench-save's seeds, post-training's attempts,
calibration's rollouts through sim/fleet.py) is a list of independent jobs, each a pure function of its
arguments (seeded, so the result does not depend on where or in what order it runs). `shard` runs such a list
on the backend asked for and yields each job's outcome as it completes, so a caller can append results to a
resumable file as they come:

    for out in shard(run_job, jobs, Backend("ray", workers=2)):
        if out.error is None:
            save(out.item, out.value)

Faults: on Ray a job whose worker process or node dies is run again (`retries`); an exception raised by the job
itself is not retried but handed back in `Outcome.error`, as the process pool does, so one broken job never
throws away the others. Each job's outcome is yielded exactly once. `shared` arguments (a model, a config) are
sent once per run (Ray's object store) rather than once per job.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

BACKENDS = ("serial", "processes", "ray")


@dataclass(frozen=True)
class Backend:
    """Where jobs run. `address` (ray only): None starts a local Ray with `workers` CPUs; an address joins a
    cluster (its CPUs are what it offers)."""

    kind: str = "processes"
    workers: int = 2
    address: str | None = None
    retries: int = 3

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ValueError(f"backend kind {self.kind!r}: expected one of {BACKENDS}")
        if self.workers < 1:
            raise ValueError(f"backend workers {self.workers}: expected an integer >= 1")
        if self.address and self.kind != "ray":
            raise ValueError(f"backend address {self.address!r} needs kind 'ray', not {self.kind!r}")


def backend_from_args(ray: bool, workers: int, address: str | None) -> Backend:
    """The flags every bench and command shares: --ray, --workers, --address (an address implies Ray)."""
    if ray or address:
        return Backend("ray", workers, address)
    return Backend("processes" if workers > 1 else "serial", workers)


@dataclass
class Outcome:
    item: Any
    value: Any = None
    error: BaseException | None = None


_INITIALISED: set[tuple] = set()  # per worker process: initialisers already run (Ray tasks have no initializer)


class _Refs(tuple):
    """Shared arguments as object-store references (Ray resolves only top-level arguments, not a tuple's)."""


def _call(fn: Callable, item: Any, shared: tuple, init: Callable | None, initargs: tuple) -> Any:
    """One job in a Ray worker: the initializer once per process, the shared arguments fetched, the job."""
    if init is not None and (key := (init.__module__, init.__qualname__, initargs)) not in _INITIALISED:
        init(*initargs)
        _INITIALISED.add(key)
    if isinstance(shared, _Refs):
        import ray

        shared = tuple(ray.get(list(shared)))
    return fn(item, *shared)


def shard(fn: Callable, items: Sequence[Any], backend: Backend, shared: tuple = (),
          initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[Outcome]:
    """`fn(item, *shared)` for every item, on `backend`; outcomes as they complete (in item order serially).
    `initializer(*initargs)` runs once in every worker process before its first job (as ProcessPoolExecutor's)."""
    if backend.kind == "serial" or (backend.kind == "processes" and backend.workers == 1):
        yield from _serial(fn, items, shared, initializer, initargs)
    elif backend.kind == "processes":
        yield from _processes(fn, items, backend, shared, initializer, initargs)
    else:
        yield from _ray(fn, items, backend, shared, initializer, initargs)


def _serial(fn, items, shared, initializer, initargs) -> Iterator[Outcome]:
    if initializer is not None:
        initializer(*initargs)
    for item in items:
        try:
            yield Outcome(item, fn(item, *shared))
        except Exception as exc:
            yield Outcome(item, error=exc)


def _processes(fn, items, backend, shared, initializer, initargs) -> Iterator[Outcome]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(backend.workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                             initargs=initargs) as pool:
        futures = {pool.submit(fn, item, *shared): item for item in items}
        for fut in as_completed(futures):
            try:
                yield Outcome(futures[fut], fut.result())
            except Exception as exc:
                yield Outcome(futures[fut], error=exc)


def _ray(fn, items, backend, shared, initializer, initargs) -> Iterator[Outcome]:
    with ray_session(backend) as ray:
        task = ray.remote(num_cpus=1, max_retries=backend.retries, retry_exceptions=False)(_call)
        refs = tuple(ray.put(s) for s in shared)
        fn_ref = ray.put(fn)
        pending = {task.remote(fn_ref, item, _Refs(refs), initializer, initargs): item for item in items}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(done[0])
            try:
                yield Outcome(item, ray.get(done[0]))
            except ray.exceptions.RayTaskError as exc:  # the job raised: its own exception, once
                yield Outcome(item, error=exc.cause if isinstance(exc.cause, Exception) else exc)
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:  # retries used up
                yield Outcome(item, error=RuntimeError(f"worker lost {backend.retries + 1} times: {exc}"))


class ray_session:
    """Context manager: Ray initialised for `backend` (a local Ray of `workers` CPUs, or the cluster at its address),
    shut down on exit if this call started it. Clear errors when Ray is missing or the cluster is unreachable."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.started = False

    def __enter__(self):
        try:
            import ray
        except ImportError:
            raise RuntimeError("Ray is not installed: pip install 'vigil[fleet]' (or run without --ray)") from None
        address = self.backend.address
        if address:
            reachable(address)
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    ray.init(num_cpus=self.backend.workers, include_dashboard=False, log_to_driver=False,
                             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": _import_path()}})
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RuntimeError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
            self.started = True
        return ray

    def __exit__(self, *exc: object) -> None:
        if self.started:
            import ray

            ray.shutdown()


def _import_path() -> str:
    """The driver's own import folders (a checkout's bench/ and tests/, PYTHONPATH) for a local Ray's workers, so a
    job function defined there unpickles; installed packages they find themselves. A cluster's nodes need the
    code installed (or a Ray runtime_env with working_dir)."""
    own = [p for p in sys.path if p and os.path.isdir(p) and not p.startswith((sys.prefix, sys.base_prefix))]
    return os.pathsep.join(dict.fromkeys([os.path.abspath(p) for p in own]))


def reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a cluster address nothing listens at (Ray itself would wait for minutes)."""
    import socket

    hostport = address.split("://", 1)[-1]
    if hostport == "auto":
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot reach the Ray cluster at {address!r}: {exc} (start one with `ray start "
                           "--head`, or leave out --address for a local Ray)") from None
