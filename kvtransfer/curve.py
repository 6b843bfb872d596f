"""Optional authentication (and encryption) of the internal plane with ZMQ CURVE.

Off by default: on one host the control sockets bind to loopback. Across hosts, give
every prefill and decode worker `--kv-curve-dir DIR` (or TANDEM_KV_CURVE_DIR), where DIR
holds two key pairs in pyzmq's certificate format, made once with

    python -c "import zmq.auth as a; a.create_certificates('DIR', 'decode'); \\
               a.create_certificates('DIR', 'prefill')"

decode.key_secret: the decode workers' pair; their sockets are CURVE servers that
accept only clients proving prefill.key (ZAP). prefill.key_secret: the prefill workers'
pair; their sockets are CURVE clients that trust decode.key. Each role needs its own
secret file and the other's public one: ship decode.key_secret only to decode hosts.
A peer without the keys cannot complete a handshake, so it reaches no handler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

CURVE_DIR_ENV = "TANDEM_KV_CURVE_DIR"


@dataclass(frozen=True)
class CurveKeys:
    directory: Path

    def __post_init__(self) -> None:
        if not zmq.has("curve"):
            raise ValueError("this libzmq has no CURVE support; run without --kv-curve-dir")
        if not self.directory.is_dir():
            raise ValueError(f"--kv-curve-dir {self.directory} is not a directory")

    def _pair(self, name: str, secret: bool) -> tuple[bytes, bytes | None]:
        path = self.directory / (f"{name}.key_secret" if secret else f"{name}.key")
        try:
            return zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"CURVE key {path}: {exc}") from None

    def check(self, role: str) -> None:
        """Load what `role` ("decode" or "prefill") will need, so a missing or bad key
        stops the worker at startup, not at its first transfer."""
        self._pair(role, secret=True)
        self._pair("prefill" if role == "decode" else "decode", secret=False)

    def serve(self, ctx: zmq.Context, sock: zmq.Socket) -> ThreadAuthenticator:
        """Make `sock` (a decode worker's ROUTER, before it binds) a CURVE server that
        admits the prefill key alone; the returned authenticator must be stopped."""
        public, secret = self._pair("decode", secret=True)
        client_public, _ = self._pair("prefill", secret=False)
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback("*", credentials_provider=_OneKey(client_public))
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = public, secret
        return auth

    def connect_as_client(self, sock: zmq.Socket) -> None:
        """Make `sock` (a prefill worker's DEALER, before it connects) a CURVE client."""
        public, secret = self._pair("prefill", secret=True)
        server_public, _ = self._pair("decode", secret=False)
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = server_public


class _OneKey:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self._key  # both z85-encoded


def curve_dir_for(role: str, directory: str | None) -> str:
    """`directory`, else TANDEM_KV_CURVE_DIR ("" when neither is set), checked for what
    `role` needs."""
    chosen = directory or os.environ.get(CURVE_DIR_ENV, "")
    if chosen:
        CurveKeys(Path(chosen)).check(role)
    return chosen


def curve_keys(directory: str) -> CurveKeys | None:
    return CurveKeys(Path(directory)) if directory else None
