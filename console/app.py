"""The console's web application: the page, its live websocket, its actions (Starlette).

Routes:
    GET  /                                 the page (static, the package's own files; no CDN)
    GET  /static/...                       its script and style
    GET  /api/state                        everything the page shows, as one JSON object
    WS   /ws                               a snapshot, then every update as it happens
    POST /api/requests/{id}/{action}       claim | answer | reject | release (token in X-Vigil-Token)
    GET  /api/preferences/{id}             a preference query and its two attempts, read from the pool
    POST /api/preferences/{id}/answer      {"answer": a | b | tie | unsure, "by": name} (token), exactly once
    POST /api/swap                         {"bundle": path} through the control channel (token; needs --control)

A page may send JSON on the websocket: {"op": "ping", "id": n} (answered with a pong) or {"op": "snapshot"}
(the whole state again). Anything else gets {"type": "error", ...} and counts in `ws_malformed`; the
connection stays open. A page that cannot keep up is sent a fresh snapshot instead of the updates it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from vigil.console import actions, preferences
from vigil.console.auth import HEADER, Guard
from vigil.console.feed import Feed
from vigil.runtime.auth import ClientKeys

log = logging.getLogger("vigil.console")
STATIC = Path(__file__).parent / "static"
QUEUE = 2000  # updates waiting for one page before it is sent a snapshot instead
MAX_WS_MESSAGE = 4096
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",  # the page's address may carry the token
    "cache-control": "no-store",
}


def finite(obj: Any) -> Any:
    """`obj` with every NaN or infinity as None: JSON has no such numbers, and the page's JSON.parse refuses
    them (a score or an alert value may be one)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(msg: dict[str, Any]) -> str:
    return json.dumps(finite(msg), default=str, allow_nan=False)


@dataclass(frozen=True)
class Settings:
    """What the application needs besides the feed: the store and control channel to act on, and how."""

    store: str
    control: str = ""
    keys: ClientKeys | None = None
    lease_s: float = 1800.0
    swap_timeout_s: float = 120.0


@dataclass(eq=False)
class Page:
    """One connected page: its queue of serialised updates."""

    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE))
    resync: bool = False


class Hub:
    """Every page's queue; `broadcast` serialises an update once and queues it for each page."""

    def __init__(self, feed: Feed):
        self.feed = feed
        self.pages: set[Page] = set()

    def broadcast(self, msg: dict[str, Any]) -> None:
        text = dumps(msg) if self.pages else ""
        for page in self.pages:
            if page.resync:
                continue
            try:
                page.queue.put_nowait(text)
            except asyncio.QueueFull:  # a page that cannot keep up: drop its backlog, send the state instead
                self.feed.counters["pages_resynced"] += 1
                page.resync = True
                while not page.queue.empty():
                    page.queue.get_nowait()
                page.queue.put_nowait(None)


class Guarded:
    """ASGI middleware: security headers on every response; Host and Origin checks on every request."""

    def __init__(self, app: ASGIApp, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        reason = self.guard.refuse_origin(headers.get("host"), headers.get("origin"))
        if reason is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4403, "reason": reason[:120]})
                return
            await JSONResponse({"error": reason}, 403, SECURITY_HEADERS)(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                names = {k.lower() for k, _ in message["headers"]}
                message["headers"] = [*message["headers"], *((k.encode(), v.encode()) for k, v in
                                                            SECURITY_HEADERS.items() if k.encode() not in names)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def build_app(feed: Feed, guard: Guard, settings: Settings) -> ASGIApp:
    hub = Hub(feed)
    feed.publish = hub.broadcast
    write_lock = asyncio.Lock()  # this console's store writes one at a time (the store arbitrates between consoles)
    swap_lock = asyncio.Lock()

    def refused(status: int, message: str) -> JSONResponse:
        feed.counters[f"http_{status}"] += 1
        return JSONResponse({"ok": False, "error": message}, status)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def state(request: Request) -> Response:
        no = guard.refuse_read(request.headers.get(HEADER))
        if no is not None:
            return refused(*no)
        return Response(dumps({**feed.snapshot(), **about()}), media_type="application/json")

    def about() -> dict[str, Any]:
        return {"console": {"control": bool(settings.control), "store": settings.store, "connect": feed.connect,
                            "loopback": guard.loopback, "lease_s": settings.lease_s}}

    async def body_of(request: Request) -> dict[str, Any] | JSONResponse:
        """The action's JSON body, or the refusal to send: token first (nothing is read without it)."""
        no = guard.refuse_action(request.headers.get(HEADER))
        if no is not None:
            return refused(*no)
        if not request.headers.get("content-type", "").startswith("application/json"):
            return refused(415, "actions take a JSON body (Content-Type: application/json)")
        raw = await request.body()
        if len(raw) > 64_000:
            return refused(413, "request body too large")
        try:
            body = json.loads(raw)
        except ValueError:
            return refused(400, "the body is not JSON")
        if not isinstance(body, dict):
            return refused(400, "the body must be a JSON object")
        return body

    async def request_action(request: Request) -> Response:
        body = await body_of(request)
        if isinstance(body, JSONResponse):
            return body
        request_id, action = request.path_params["id"], request.path_params["action"]
        async with write_lock:
            outcome = await asyncio.to_thread(actions.request_action, settings.store, request_id, action, body,
                                              settings.lease_s)
        feed.counters[f"action_{action}_{'ok' if outcome.status == 200 else 'refused'}"] += 1
        if outcome.request is not None:
            feed.upsert_request(outcome.request)
        return JSONResponse(outcome.to_json(), outcome.status)

    async def preference(request: Request) -> Response:
        no = guard.refuse_read(request.headers.get(HEADER))
        if no is not None:
            return refused(*no)
        status, body = await asyncio.to_thread(preferences.view, settings.store, request.path_params["id"])
        if status != 200:
            feed.counters[f"http_{status}"] += 1
        return Response(dumps(body), status, media_type="application/json")

    async def preference_answer(request: Request) -> Response:
        body = await body_of(request)
        if isinstance(body, JSONResponse):
            return body
        async with write_lock:
            outcome = await asyncio.to_thread(actions.answer_preference, settings.store, request.path_params["id"],
                                              body)
        feed.counters[f"action_preference_{'ok' if outcome.status == 200 else 'refused'}"] += 1
        if outcome.preference is not None:
            feed.upsert_preference(outcome.preference)
        return JSONResponse(outcome.to_json(), outcome.status)

    async def swap(request: Request) -> Response:
        body = await body_of(request)
        if isinstance(body, JSONResponse):
            return body
        if not settings.control:
            return refused(409, "no control channel: start the console with --control <the runtime's control "
                                "endpoint> to swap from here")
        if swap_lock.locked():
            return refused(409, "a swap from this console is in progress; wait for its answer")
        async with swap_lock:
            outcome = await asyncio.to_thread(actions.swap, settings.control, settings.keys, body.get("bundle"),
                                              settings.swap_timeout_s)
        feed.counters[f"action_swap_{'ok' if outcome.status == 200 else 'refused'}"] += 1
        return JSONResponse(outcome.to_json(), outcome.status)

    async def websocket(ws: WebSocket) -> None:
        no = guard.refuse_read(ws.query_params.get("token"))
        if no is not None:
            await ws.close(code=4401 if no[0] == 401 else 4403, reason=no[1][:120])
            return
        await ws.accept()
        page = Page()
        hub.pages.add(page)
        feed.counters["pages"] += 1
        sender = asyncio.create_task(send_updates(ws, page))
        try:
            await ws.send_text(dumps({**feed.snapshot(), **about()}))
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await ws.send_text(dumps(answer(message.get("text"))))
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            hub.pages.discard(page)
            sender.cancel()

    async def send_updates(ws: WebSocket, page: Page) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, asyncio.CancelledError):
            while True:
                text = await page.queue.get()
                if text is None:
                    page.resync = False
                    text = dumps({**feed.snapshot(), **about()})
                await ws.send_text(text)

    def answer(text: str | None) -> dict[str, Any]:
        """The reply to one message from a page; malformed ones are counted and answered with an error."""
        def malformed(why: str) -> dict[str, Any]:
            feed.counters["ws_malformed"] += 1
            return {"type": "error", "error": f"malformed message: {why}",
                    "ws_malformed": feed.counters["ws_malformed"]}

        if text is None:
            return malformed("binary, not text")
        if len(text) > MAX_WS_MESSAGE:
            return malformed(f"longer than {MAX_WS_MESSAGE} characters")
        try:
            msg = json.loads(text)
        except ValueError:
            return malformed("not JSON")
        if not isinstance(msg, dict):
            return malformed("not a JSON object")
        op = msg.get("op")
        if op == "ping":
            return {"type": "pong", "id": msg.get("id")}
        if op == "snapshot":
            return {**feed.snapshot(), **about()}
        return malformed(f"unknown op {op!r} (expected 'ping' or 'snapshot'; actions are HTTP POSTs)")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(feed.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            feed.close()

    app = Starlette(routes=[
        Route("/", index),
        Route("/api/state", state),
        Route("/api/requests/{id:int}/{action}", request_action, methods=["POST"]),
        Route("/api/preferences/{id:int}", preference),
        Route("/api/preferences/{id:int}/answer", preference_answer, methods=["POST"]),
        Route("/api/swap", swap, methods=["POST"]),
        WebSocketRoute("/ws", websocket),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], lifespan=lifespan)
    return Guarded(app, guard)
