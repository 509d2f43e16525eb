"""ZeroMQ CURVE authentication and encryption for the robot link, the operator stream and the control channel.

With authentication on, the runtime's sockets are CURVE servers holding the runtime's secret key, and a
ZAP handler (pyzmq's ThreadAuthenticator) admits only clients whose public key is in the allow-list folder.
A client without keys, or with a key that is not allowed, never completes the handshake: it gets nothing,
not even an error reply (the runtime cannot know who it would be talking to). Traffic of admitted clients
is encrypted and authenticated (CurveZMQ: Curve25519, XSalsa20-Poly1305).

Key files are pyzmq's certificate format (`zmq.auth.create_certificates`): NAME.key holds the public key,
NAME.key_secret both; `vigil keys NAME --dir DIR` writes a pair. The runtime needs its own secret file and
a folder of the allowed clients' public files; a client needs its own secret file and the runtime's public
file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


class KeyFileError(ValueError):
    """A key file or folder that cannot be used; the message names it and says what was expected."""


def create_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write a new CURVE key pair NAME.key (public, to hand out) and NAME.key_secret (keep private) in
    `folder`; refuses to overwrite an existing pair. Returns (public file, secret file)."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"key name must be a plain file name, got {name!r}")
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise KeyFileError(f"{public} or {secret} exists already; choose another name or remove them")
    pub, sec = zmq.auth.create_certificates(str(d), name)
    Path(sec).chmod(0o600)
    return Path(pub), Path(sec)


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a CURVE key file ({exc})") from None


def load_public(path: str | Path) -> bytes:
    public, _ = _load(path)
    if not public:
        raise KeyFileError(f"{path}: no public key in it")
    return public


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a NAME.key_secret file."""
    public, secret = _load(path)
    if not secret:
        raise KeyFileError(f"{path}: holds no secret key (pass the NAME.key_secret file, not NAME.key)")
    return public, secret


@dataclass(frozen=True)
class ClientKeys:
    """What a client (robot, operator, `vigil swap`) needs: its own pair and the runtime's public key."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, secret_file: str | Path, server_public_file: str | Path) -> ClientKeys:
        public, secret = load_secret(secret_file)
        return cls(public, secret, load_public(server_public_file))

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the runtime (before connect)."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


class ServerAuth:
    """The runtime's side: its key pair, and a ZAP handler admitting only the allow-listed client keys."""

    def __init__(self, ctx: zmq.Context, secret_file: str | Path, allow_dir: str | Path):
        self.public, self.secret = load_secret(secret_file)
        allow = Path(allow_dir)
        if not allow.is_dir():
            raise KeyFileError(f"allow-list {allow} is not a folder (expected a folder of client NAME.key files)")
        self.allowed = sorted(p.name for p in allow.glob("*.key"))
        if not self.allowed:
            raise KeyFileError(f"allow-list {allow} holds no client public key (*.key); no client could connect")
        self.auth = ThreadAuthenticator(ctx, log=None)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(allow))

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server (before bind)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def close(self) -> None:
        self.auth.stop()
