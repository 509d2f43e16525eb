"""openpi-style peer for bench/latency.py: a websocket + msgpack policy server and its client.

Runs inside .venv-openpi (openpi-client 0.1.2 pins numpy < 2), so it must not import vigil.

    serve   an asyncio `websockets` server in the style of openpi's WebsocketPolicyServer: on connect it
            sends the packed metadata, then for every message: unpackb -> onnxruntime -> packb({"actions"}).
            Prints "READY <port>" once it listens.
    client  drives the server with the real `openpi_client.websocket_client_policy.WebsocketClientPolicy`
            and times `infer({"state": obs})`; writes the latencies (ns) and the peer's versions as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from importlib import metadata as importlib_metadata

import numpy as np
import onnxruntime as ort
from openpi_client import msgpack_numpy


def make_session(model: str) -> ort.InferenceSession:
    """Same session options as vigil's runtime: one intra-op thread, sequential, all graph optimisations."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


class OnnxPolicy:
    """The policy the server hosts: observation dict {"state": (n,)} -> {"actions": (m,)}."""

    def __init__(self, model: str, input_name: str, output_name: str):
        self.session = make_session(model)
        self.input_name, self.output_name = input_name, output_name

    def infer(self, obs: dict) -> dict:
        x = np.asarray(obs["state"], dtype=np.float32)[None]
        (action,) = self.session.run([self.output_name], {self.input_name: x})
        return {"actions": action[0]}


async def serve(args: argparse.Namespace) -> None:
    import websockets
    from websockets.asyncio.server import serve as ws_serve

    policy = OnnxPolicy(args.model, args.input_name, args.output_name)
    metadata = {"server": "openpi-style websocket + msgpack", "model": args.model}

    async def handler(websocket) -> None:
        packer = msgpack_numpy.Packer()
        await websocket.send(packer.pack(metadata))
        while True:
            try:
                obs = msgpack_numpy.unpackb(await websocket.recv())
                await websocket.send(packer.pack(policy.infer(obs)))
            except websockets.ConnectionClosed:
                break

    async with ws_serve(handler, args.host, args.port, compression=None, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"READY {port}", flush=True)
        await server.serve_forever()


def client(args: argparse.Namespace) -> None:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    observations = np.load(args.obs).astype(np.float32)
    deadline = time.monotonic() + args.connect_timeout
    while True:  # WebsocketClientPolicy 0.1.2 tries to connect once; the server may still be starting
        try:
            policy = WebsocketClientPolicy(args.host, args.port)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    n = len(observations)
    for i in range(args.warmup):
        policy.infer({"state": observations[i % n]})
    lat = np.empty(args.ticks, np.int64)
    clock = time.perf_counter_ns
    last = None
    for i in range(args.ticks):
        obs = {"state": observations[i % n]}
        t0 = clock()
        reply = policy.infer(obs)
        lat[i] = clock() - t0
        last = reply
    assert last is not None and "actions" in last
    policy._ws.close()  # noqa: SLF001 - the client policy has no close() of its own in 0.1.2

    def version(dist: str) -> str:
        try:
            return importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            return "?"

    with open(args.out, "w") as f:
        json.dump({"latencies_ns": lat.tolist(), "action_shape": list(np.shape(last["actions"])),
                   "versions": {"python": platform.python_version(), "numpy": np.__version__,
                                "onnxruntime": ort.__version__, "openpi-client": version("openpi-client"),
                                "websockets": version("websockets"), "msgpack": version("msgpack")}}, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve an ONNX model over websocket + msgpack")
    s.add_argument("--model", required=True, help="ONNX file")
    s.add_argument("--input-name", required=True, help="graph input fed with the observation (batch 1)")
    s.add_argument("--output-name", default="action", help="graph output returned as 'actions'")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0, help="0: any free port (printed as READY <port>)")
    c = sub.add_parser("client", help="time WebsocketClientPolicy.infer against a running server")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--obs", required=True, help=".npy file of observations (ticks cycle through them)")
    c.add_argument("--ticks", type=int, default=5000)
    c.add_argument("--warmup", type=int, default=200)
    c.add_argument("--connect-timeout", type=float, default=30.0)
    c.add_argument("--out", required=True, help="JSON file for the latencies")
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            asyncio.run(serve(args))
        except KeyboardInterrupt:
            pass
        return 0
    client(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
