"""What a supervising launcher (`tandem serve`) tells the gateways about its pool.

The launcher refreshes one key per model about every second with a short TTL: how many
processes of each role it runs and how many it gave up on as crash-looping. A gateway
reads it for /ready ("degraded", still 200: the rest serves) and /metrics. No key (no
launcher, e.g. compose, or a launcher gone) means nothing is known to be given up.
"""

from __future__ import annotations

import msgspec

POOL_STATUS_TTL_S = 5


class PoolStatus(msgspec.Struct, frozen=True, kw_only=True):
    expected: dict[str, int]  # role -> processes the launcher runs
    given_up: dict[str, int]  # role -> processes it stopped restarting

    @property
    def degraded(self) -> bool:
        return any(self.given_up.values())


def encode_status(status: PoolStatus) -> bytes:
    return msgspec.msgpack.encode(status)


def decode_status(blob: bytes | None) -> PoolStatus | None:
    """None when there is no key or it is unreadable (treated as "nothing known")."""
    if blob is None:
        return None
    try:
        return msgspec.msgpack.decode(blob, type=PoolStatus)
    except msgspec.DecodeError:
        return None
