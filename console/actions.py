"""What an operator may do from the page: the lifecycle of a data request, a preference answer, and a hot swap.

Requests go through the store's own API (runtime/requests.py, RequestStore), so the console obeys the rules
every expert and teleoperation tool obeys: only the current claimer resolves, and every step is one
conditional UPDATE, so of two pages that answer the same request exactly one wins; the other is told who
did. The page's actions (decision 114, docs/console.md):

- claim:   take the request (a lease of `lease_s`) while recording its demonstration by teleoperation;
- answer:  fulfil it with a demonstration already recorded: the dataset folder on this computer and the
           episode id in it (checked: the index must list it, so a fulfilled request always names an episode
           that exists); the console claims it first if the operator does not hold it;
- reject:  with a reason (claimed first likewise): final;
- release: give a claim back (open again).

A preference query (runtime/preferences.py) is answered through `PreferenceStore.answer`, the same single
conditional UPDATE `vigil prefs answer` runs: the first answer stands, from whichever page or command gives it,
and a later one is refused (409) with who answered and what.

Each function blocks (SQLite, ZeroMQ) and runs on a worker thread; it returns an `Outcome`, an HTTP status
and a message for the page, and never raises for a refusal.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vigil.runtime.auth import ClientKeys
from vigil.runtime.preferences import ANSWERS, PreferenceError, PreferenceStore, answered_text
from vigil.runtime.requests import RequestError, RequestRecord, RequestStore

ACTIONS = ("claim", "answer", "reject", "release")
MAX_TEXT = 500


@dataclass(frozen=True)
class Outcome:
    status: int  # HTTP status: 200 done, 400 bad input, 404 unknown, 409 refused by the rules, 503 store, 504 no answer
    message: str
    request: dict[str, Any] | None = None  # the request as it is now, when known
    answer: dict[str, Any] | None = None  # the runtime's answer to a swap
    preference: dict[str, Any] | None = None  # the preference query as it is now, when known

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.status == 200, "message": self.message}
        if self.status != 200:
            out["error"] = self.message
        if self.request is not None:
            out["request"] = self.request
        if self.answer is not None:
            out["answer"] = self.answer
        if self.preference is not None:
            out["preference"] = self.preference
        return out


def check_text(name: str, value: Any, limit: int = MAX_TEXT) -> str | None:
    """Why `value` is no good as the text field `name`, or None."""
    if not isinstance(value, str) or not value.strip():
        return f"'{name}' must be a non-empty string"
    if len(value) > limit or any(ord(c) < 32 for c in value):
        return f"'{name}' must be at most {limit} printable characters"
    return None


def holder(r: RequestRecord, by: str) -> str:
    """Why `by` cannot act on request `r` now, in the words the page shows."""
    state = r.state()
    if state == "fulfilled":
        return f"request #{r.id} is already fulfilled by {r.resolved_by} (dataset {r.dataset}, episode {r.demo})"
    if state == "rejected":
        return f"request #{r.id} is already rejected by {r.resolved_by}: {r.reason}"
    if state == "claimed" and r.claimed_by != by:
        until = time.strftime("%H:%M:%S", time.localtime((r.lease_until_ns or 0) / 1e9))
        return f"request #{r.id} is already claimed by {r.claimed_by} (until {until})"
    return f"request #{r.id} is {state}, not claimed by {by}"


def check_demo(dataset: str, demo: str) -> str | None:
    """Why (dataset, demo) does not name a recorded episode on this computer, or None."""
    from vigil.training.demos import INDEX, read_index  # numpy and the standard library only

    folder = Path(dataset)
    if not (folder / INDEX).is_file():
        return f"{dataset} is not a dataset folder on this computer (no {INDEX})"
    try:
        ids = {e.id for e in read_index(folder / INDEX)}
    except (OSError, ValueError) as exc:
        return f"cannot read the dataset index of {dataset}: {exc}"
    if demo not in ids:
        return f"dataset {dataset} has no episode {demo!r} (record the demonstration before answering)"
    return None


def request_action(store_path: str, request_id: int, action: str, body: dict[str, Any], lease_s: float
                   ) -> Outcome:
    """Do `action` on request `request_id` for the operator named in `body["by"]`."""
    if action not in ACTIONS:
        return Outcome(404, f"unknown action {action!r}; one of {ACTIONS}")
    bad = check_text("by", body.get("by"), 64)
    if action == "answer":
        bad = bad or check_text("dataset", body.get("dataset")) or check_text("demo", body.get("demo"), 200)
    elif action == "reject":
        bad = bad or check_text("reason", body.get("reason"))
    if bad:
        return Outcome(400, bad)
    by = body["by"].strip()
    if action == "answer":
        dataset = str(Path(body["dataset"].strip()).expanduser().resolve())
        bad = check_demo(dataset, body["demo"].strip())
        if bad:
            return Outcome(400, bad)
    if not Path(store_path).exists():
        return Outcome(503, f"store {store_path} does not exist (yet); nothing was changed")
    try:
        store = RequestStore(store_path, timeout=2.0)  # an operator can wait for a lock; the control loop cannot
    except sqlite3.Error as exc:
        return Outcome(503, f"store {store_path} cannot be opened ({exc}); nothing was changed, try again")
    try:
        return _act(store, request_id, action, by, body, lease_s)
    except sqlite3.OperationalError as exc:
        return Outcome(503, f"store {store_path} is busy ({exc}); nothing was changed, try again")
    finally:
        store.close()


def _act(store: RequestStore, request_id: int, action: str, by: str, body: dict[str, Any], lease_s: float
         ) -> Outcome:
    try:
        r = store.get(request_id)
    except RequestError as exc:
        return Outcome(404, str(exc))
    if action == "release":
        try:
            r = store.release(request_id, by)
        except RequestError:
            return Outcome(409, holder(store.get(request_id), by), store.get(request_id).to_json())
        return Outcome(200, f"request #{r.id} released by {by}: open again", r.to_json())
    if not (r.state() == "claimed" and r.claimed_by == by):  # claim it first (atomic: one claimer wins)
        if r.state() not in ("open", "expired"):
            return Outcome(409, holder(r, by), r.to_json())
        claimed = store.claim(by, lease_s, request_id=request_id)
        if claimed is None:
            r = store.get(request_id)
            return Outcome(409, holder(r, by), r.to_json())
        r = claimed
    try:
        if action == "claim":
            until = time.strftime("%H:%M:%S", time.localtime((r.lease_until_ns or 0) / 1e9))
            return Outcome(200, f"request #{r.id} claimed by {by} until {until}", r.to_json())
        if action == "answer":
            dataset, demo = body["dataset"].strip(), body["demo"].strip()
            r = store.fulfil(request_id, by, Path(dataset).expanduser(), demo)
            return Outcome(200, f"request #{r.id} fulfilled by {by} with episode {demo} of {r.dataset}", r.to_json())
        r = store.reject(request_id, by, body["reason"].strip())
        return Outcome(200, f"request #{r.id} rejected by {by}: {r.reason}", r.to_json())
    except RequestError:  # someone took it over between our claim and now (a lapsed lease): say who
        r = store.get(request_id)
        return Outcome(409, holder(r, by), r.to_json())


def answer_preference(store_path: str, query_id: int, body: dict[str, Any]) -> Outcome:
    """Answer preference query `query_id` with `body["answer"]` for the operator named in `body["by"]`."""
    bad = check_text("by", body.get("by"), 64)
    if bad:
        return Outcome(400, bad)
    if body.get("answer") not in ANSWERS:
        return Outcome(400, f"'answer' must be one of {ANSWERS} (A better, B better, equally good, cannot tell), "
                            f"got {body.get('answer')!r}")
    if not Path(store_path).exists():
        return Outcome(503, f"store {store_path} does not exist (yet); nothing was changed")
    try:
        store = PreferenceStore(store_path, timeout=2.0)
    except sqlite3.Error as exc:
        return Outcome(503, f"store {store_path} cannot be opened ({exc}); nothing was changed, try again")
    try:
        r = store.answer(query_id, body["answer"], body["by"].strip())
        return Outcome(200, f"preference query #{r.id} {answered_text(r)}", preference=r.to_json())
    except PreferenceError as exc:  # unknown, or answered already (by whom, what): the query as it is now
        try:
            current = store.get(query_id)
        except PreferenceError:
            return Outcome(404, str(exc))
        return Outcome(409, str(exc), preference=current.to_json())
    except sqlite3.OperationalError as exc:
        return Outcome(503, f"store {store_path} is busy ({exc}); nothing was changed, try again")
    finally:
        store.close()


def swap(control: str, keys: ClientKeys | None, bundle: Any, timeout_s: float) -> Outcome:
    """Ask the runtime's control channel to serve `bundle` (a folder on this computer) and wait for its answer."""
    from vigil.runtime.client import ControlLink, LinkError

    bad = check_text("bundle", bundle, 4096)
    if bad:
        return Outcome(400, bad)
    folder = Path(bundle.strip()).expanduser().resolve()
    if not (folder / "manifest.json").is_file():
        return Outcome(400, f"{folder} is not a bundle on this computer (no manifest.json)")
    try:
        answer = ControlLink(control, keys).swap(folder, timeout_s)
    except LinkError:
        return Outcome(504, f"no answer from the control channel {control} within {timeout_s:g} s (is the runtime "
                            "running, with --control-endpoint?)")
    if answer.get("kind") == "swap" and answer.get("ok"):
        return Outcome(200, f"swapped {answer.get('previous')} -> {answer.get('policy')}", answer=answer)
    return Outcome(409, f"swap refused: {answer.get('reason') or answer.get('message') or answer}", answer=answer)
