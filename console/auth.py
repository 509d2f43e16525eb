"""Who may read and who may act: the console's token, and the request checks that go with it.

One secret token per console process (from --token-file, or generated and printed in the console's URL).
Actions (request lifecycle, swap) always need it, in the `X-Vigil-Token` header: a header, never a cookie,
so another web site the operator has open cannot make the browser act for it (no ambient credential, no
CSRF). Reads (the state, the live websocket) need it only when the console listens beyond loopback. Two more
checks stop other web sites from reading a loopback console through the operator's browser: on loopback the
`Host` header must name a loopback host (DNS rebinding), and a request that says where it comes from (`Origin`)
must come from the console's own page.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

HEADER = "x-vigil-token"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class TokenError(ValueError):
    """A token file that cannot be used (missing, empty, readable by others)."""


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_token(path: str) -> str:
    """The token in `path` (its first line). Refused if the file is empty or group/other may read it: a
    token others can read is no token."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text().strip().splitlines()
    except OSError as exc:
        raise TokenError(f"token file {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"token file {path} is readable by others (mode {stat.filemode(mode)}); chmod 600 it")
    if not text or len(text[0]) < 16:
        raise TokenError(f"token file {path} must hold a token of at least 16 characters on its first line")
    return text[0]


def new_token() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Guard:
    """The console's access rules. `loopback`: the console listens on loopback only."""

    token: str
    loopback: bool

    def token_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def refuse_action(self, given: str | None) -> tuple[int, str] | None:
        """(HTTP status, message) when an action must be refused, None when it may proceed."""
        if not given:
            return 401, ("refused: actions need the console's token. Open the address `vigil console` printed "
                         "(http://HOST:PORT/?token=...) in this browser, then try again.")
        if not self.token_ok(given):
            return 403, "refused: wrong token (the console was restarted with another one? open its new address)"
        return None

    def refuse_read(self, given: str | None) -> tuple[int, str] | None:
        """Reads are open on loopback; beyond it they need the token too."""
        if self.loopback:
            return None
        return self.refuse_action(given)

    def refuse_origin(self, host: str | None, origin: str | None) -> str | None:
        """A reason to refuse a request by its Host and Origin headers, None if they are fine."""
        if self.loopback:
            name = urlsplit(f"//{host or ''}").hostname or ""
            if not is_loopback_host(name):
                return f"refused: Host {host!r} is not a loopback name (this console listens on loopback only)"
        if origin and origin != "null":
            if urlsplit(origin).netloc != (host or ""):
                return f"refused: request from another site ({origin})"
        return None


def write_token_file(path: str | os.PathLike, token: str) -> None:
    """Write `token` to a new file readable by its owner only (for scripts and tests)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
