"""`vigil prefs`: operator preference queries (docs/preferences.md): list | show | answer, and the learning half
(collect | ask | annotate | train, prefs/learn.py).

runtime/cli.py's main() imports this module only when `prefs` is asked for, and calls PARSERS["prefs"]. Each
subcommand is one entry of SUBCOMMANDS: a parser builder (its flags and description) and a handler, whose
docstring's first line is its help in `vigil prefs --help`. A new subcommand is a new entry; its handler
imports what it needs when it runs, so list, show and answer stay numpy only.

A refusal (an unknown id, an answer not allowed, a query already answered, a store that is missing or locked)
prints `vigil prefs: <what>` on stderr and exits 2, without a traceback: a handler raises `Refused` (or lets a
PreferenceError or sqlite3.Error through) and cmd_prefs says so.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigil.prefs.learn import LEARNING
from vigil.runtime.cliargs import Command
from vigil.runtime.config import add_flags, check_fields, config_from_args
from vigil.runtime.preferences import (
    ANSWERS,
    MEANINGS,
    STATUSES,
    PreferenceError,
    PreferenceRecord,
    PreferenceStore,
    answered_text,
)

DEFAULT_STORE = "vigil-alerts.db"
STORE = "the runtime's store (SQLite file) that holds the preference queries"
ANSWER_TEXT = ", ".join(f"{k} ({v})" for k, v in MEANINGS.items())


class Refused(Exception):
    """What `vigil prefs` prints after `vigil prefs: ` before it exits 2."""


# -- list ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefsListConfig:
    store: str = field(default=DEFAULT_STORE, metadata={"help": STORE})
    status: str | None = field(default=None, metadata={"help": "only queries in this state", "choices": STATUSES})
    task: str | None = field(default=None, metadata={"help": "only queries about this task"})
    json: bool = field(default=False, metadata={"help": "one JSON object per line instead of text"})

    def __post_init__(self) -> None:
        check_fields(self, [("store", bool(self.store), "a SQLite file")])


def _list_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("List the preference queries in the store, oldest first: open ones wait for an answer, "
                     "answered ones say who answered and what.")
    add_flags(p, PrefsListConfig)


def cmd_list(args: argparse.Namespace) -> int:
    """list the preference queries in the store (open, answered)"""
    config = config_from_args(PrefsListConfig, args)
    store = _open(config.store, readonly=True)
    try:
        records = store.list(status=config.status, task=config.task)
    finally:
        store.close()
    for r in records:
        if config.json:
            print(json.dumps(r.to_json()), flush=True)
            continue
        stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(r.t_ns / 1e9))
        predicted = "" if r.predicted is None else f"P(A)={r.predicted:.2f} "
        detail = f"by {r.by}: {r.answer}" if r.status == "answered" else ""
        print(f"#{r.id:<5} {stamp} {r.status:<8} {r.task:<24} {r.rule:<12} batch {r.batch:<3} {predicted}"
              f"A {r.episode_a} B {r.episode_b} {detail}".rstrip(), flush=True)
    return 0


# -- show ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefsShowConfig:
    id: int  # the positional ID: a positional argument, not a flag (written by hand in _show_parser)
    store: str = field(default=DEFAULT_STORE, metadata={"help": STORE})
    json: bool = field(default=False, metadata={"help": "print the query and its attempts as one JSON object"})

    def __post_init__(self) -> None:
        check_fields(self, [("id", self.id >= 1, "a query id >= 1"), ("store", bool(self.store), "a SQLite file")])


def _show_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Show one preference query and, for each of its two attempts, what the pool says: task, "
                     "steps, success and return (the sum of the rewards).")
    p.add_argument("id", type=int, metavar="ID", help="the query's id (`vigil prefs list`)")
    add_flags(p, PrefsShowConfig)


def attempts(r: PreferenceRecord) -> dict[str, dict[str, Any]]:
    """{"a": ..., "b": ...}: each attempt's task, steps, success and return, read from the pool; an attempt that
    cannot be read has an "error" instead (a missing pool or episode is a fact to show, not a failure)."""
    import numpy as np

    from vigil.training.demos import DemoSet  # numpy and the standard library only

    out: dict[str, dict[str, Any]] = {}
    try:
        pool: DemoSet | None = DemoSet(r.pool)
        problem = ""
    except (OSError, ValueError) as exc:
        pool, problem = None, f"pool {exc}"
    for side, episode in (("a", r.episode_a), ("b", r.episode_b)):
        if pool is None:
            out[side] = {"id": episode, "error": problem}
            continue
        try:
            ep = pool.load(episode)
        except KeyError as exc:
            out[side] = {"id": episode, "error": f"episode {exc.args[0]}"}
            continue
        except (OSError, ValueError) as exc:
            out[side] = {"id": episode, "error": f"episode {episode} of {r.pool} cannot be read: {exc}"}
            continue
        out[side] = {"id": episode, "task": ep.task, "steps": ep.steps, "success": ep.succeeded,
                     "return": float(np.sum(ep.rewards, dtype=np.float64))}
    return out


def cmd_show(args: argparse.Namespace) -> int:
    """show one query and its two attempts (task, steps, success, return)"""
    config = config_from_args(PrefsShowConfig, args, id=args.id)
    store = _open(config.store, readonly=True)
    try:
        r = store.get(config.id)
    finally:
        store.close()
    sides = attempts(r)
    if config.json:
        print(json.dumps({**r.to_json(), "attempts": sides}), flush=True)
        return 0
    predicted = "" if r.predicted is None else f"  predicted P(A better) {r.predicted:.3f}"
    state = answered_text(r) if r.status == "answered" else "open"
    print(f"preference query #{r.id}  {state}  task {r.task}  rule {r.rule}  batch {r.batch}{predicted}")
    print(f"pool {r.pool}")
    for side, a in sides.items():
        if "error" in a:
            print(f"{side.upper()}  {a['id']}  {a['error']}")
        else:
            print(f"{side.upper()}  {a['id']}  task {a['task']}  steps {a['steps']}  "
                  f"success {'yes' if a['success'] else 'no'}  return {a['return']:.4g}")
    return 0


# -- answer -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefsAnswerConfig:
    id: int  # the positional ID
    answer: str  # the positional ANSWER
    by: str = field(metadata={"help": "who answers: the operator's name, kept with the answer", "metavar": "NAME"})
    store: str = field(default=DEFAULT_STORE, metadata={"help": STORE})

    def __post_init__(self) -> None:
        check_fields(self, [("id", self.id >= 1, "a query id >= 1"),
                            ("answer", self.answer in ANSWERS, f"one of {ANSWER_TEXT}"),
                            ("by", bool(self.by.strip()), "the operator's name"),
                            ("store", bool(self.store), "a SQLite file")])


def _answer_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Answer one preference query, exactly once: the first answer stands, whoever gives it (this "
                     "command, the console, another operator); a later one is refused and says who answered. "
                     f"ANSWER is one of {ANSWER_TEXT}. Ties and unsure answers are kept but not fitted by "
                     "default.")
    p.add_argument("id", type=int, metavar="ID", help="the query's id (`vigil prefs list`)")
    p.add_argument("answer", metavar="ANSWER", help="a | b | tie | unsure")
    add_flags(p, PrefsAnswerConfig)


def cmd_answer(args: argparse.Namespace) -> int:
    """answer one query: a (A better), b (B better), tie, or unsure (cannot tell)"""
    config = config_from_args(PrefsAnswerConfig, args, id=args.id, answer=args.answer)
    if not Path(config.store).exists():
        raise Refused(f"store {config.store} does not exist; nothing was answered")
    store = _open(config.store)
    try:
        r = store.answer(config.id, config.answer, config.by.strip())
    finally:
        store.close()
    print(f"preference query #{r.id} {answered_text(r)}", flush=True)
    return 0


# -- the command --------------------------------------------------------------------------------------------


def _open(path: str, readonly: bool = False) -> PreferenceStore:
    try:
        return PreferenceStore(path, readonly=readonly)
    except FileNotFoundError as exc:
        raise Refused(str(exc)) from None


# subcommand -> (parser builder, handler); the handler's docstring's first line is its help
SUBCOMMANDS: dict[str, Command] = {
    "list": (_list_parser, cmd_list),
    "show": (_show_parser, cmd_show),
    "answer": (_answer_parser, cmd_answer),
    **LEARNING,  # collect, ask, annotate, train (prefs/learn.py; they import the training extra when they run)
}


def _prefs_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Operator preference queries (docs/preferences.md): pairs of recorded attempts at the same "
                     "task, each asked once of an operator (`which was better?`). The answers train a reward "
                     "model.")
    sub = p.add_subparsers(dest="prefs_command", required=True, metavar="SUBCOMMAND")
    for name, (build, handler) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=(handler.__doc__ or "").strip().split("\n")[0])
        build(sp)
        sp.set_defaults(prefs_run=handler)


def cmd_prefs(args: argparse.Namespace) -> int:
    try:
        return args.prefs_run(args)
    except (Refused, PreferenceError) as exc:
        print(f"vigil prefs: {exc}", file=sys.stderr)
    except sqlite3.Error as exc:  # locked for longer than the store's timeout, or not a SQLite file
        store = getattr(args, "store", None) or DEFAULT_STORE
        print(f"vigil prefs: store {store}: {exc}; nothing was changed", file=sys.stderr)
    return 2


PARSERS: dict[str, Command] = {"prefs": (_prefs_parser, cmd_prefs)}
