"""Per-robot queues between the socket and the tick, so that robots are served fairly.

The loop reads a bounded number of messages from the robot link (ZeroMQ's ROUTER already takes them from
the connections in turn), puts each in the queue of the connection it came from, then serves one message
from every non-empty queue in turn (a round), and reads again. A robot that floods the runtime gets one
tick per round, like every other robot: its backlog waits in its own queue and in its own ZeroMQ pipe, never
ahead of another robot's work.

Each queue holds at most the robot's pipeline depth: how many messages it may have waiting at the runtime
(declared in `hello` as `pipeline`, else the runtime's default). A message beyond it pushes out the oldest
waiting observation, which is answered with an `overflow` error (counted). Other messages (hello, reset,
heartbeat, bye) are never pushed out; a queue holding nothing but those refuses a new message past
`HARD_LIMIT`. In realtime mode a newer observation also replaces a waiting one from the same robot
(`stale_dropped`, no reply): the runtime acts on the freshest.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import NamedTuple

from vigil.wire.protocol import Message

HARD_LIMIT = 256  # messages of any kind one connection may have waiting


class Queued(NamedTuple):
    """A decoded message waiting for its turn. `t_arrival` (perf_counter) is when it is deemed to have
    arrived: the robot's send time where the clocks are comparable, else when the runtime read the batch
    it came in. The deadline runs from there."""

    identity: bytes
    msg: Message
    t_arrival: float


class Inbox:
    def __init__(self, default_depth: int, freshest: bool, counters: Counter):
        self.default_depth, self.freshest, self.counters = default_depth, freshest, counters
        self._queues: dict[bytes, deque[Queued]] = {}  # only non-empty queues, in round-robin order
        self._depth: dict[bytes, int] = {}

    def __bool__(self) -> bool:
        return bool(self._queues)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def set_depth(self, identity: bytes, depth: int) -> None:
        """The pipeline depth a robot declared on this connection."""
        self._depth[identity] = depth

    def forget(self, identity: bytes) -> None:
        """The connection is no longer a robot's (its session ended): back to the default depth."""
        self._depth.pop(identity, None)

    def put(self, item: Queued) -> Queued | None:
        """Queue `item`; returns a message pushed out for overflow (answer it with an `overflow` error), or
        `item` itself if the queue refuses it."""
        queue = self._queues.get(item.identity)
        if queue is None:
            self._queues[item.identity] = deque((item,))
            return None
        is_obs = item.msg.kind == "obs"
        if is_obs and self.freshest:  # realtime: a newer observation makes a waiting one stale
            stale = [q for q in queue if q.msg.kind == "obs"]
            for q in stale:
                queue.remove(q)
            self.counters["stale_dropped"] += len(stale)
        pushed = None
        if len(queue) >= self._depth.get(item.identity, self.default_depth):
            pushed = next((q for q in queue if q.msg.kind == "obs"), None)
            if pushed is not None:
                queue.remove(pushed)
            elif len(queue) >= HARD_LIMIT:
                pushed = item
        if pushed is not item:
            queue.append(item)
        if pushed is not None:
            self.counters["overflow_dropped"] += 1
        return pushed

    def round(self) -> list[Queued]:
        """One message from every connection with messages waiting, oldest first within each."""
        out = []
        queues = self._queues
        for identity in list(queues):
            queue = queues[identity]
            out.append(queue.popleft())
            del queues[identity]
            if queue:  # back of the line for the next round
                queues[identity] = queue
        return out
