"""Where a request's time to first token goes: a timestamp at each hop of the service.

Off unless the environment variable TANDEM_HOP_TRACE names a file. Then every process of
a deployment (gateway, workers) appends one line per hop a request passes on its way to
its first token, `<unix time> <request id> <hop>`, to that file; `tandem bench serve
--trace-hops` sets it and reports the hops' medians (bench/serve_hops.py). One short
write in append mode per line, so the processes' lines do not interleave mid-line.
Callers test ENABLED first, so the service pays nothing when it is off.
"""

from __future__ import annotations

import os
import time
from typing import TextIO

HOPS = (
    "queued",  # gateway: about to XADD the task to the prefill stream
    "read",  # worker: its intake read the task from the stream
    "admitted",  # worker: the engine took it (Engine.add)
    "scheduled",  # engine: the first step that computes part of its prompt is scheduled
    "launched",  # engine: ...and queued on the device
    "sampled",  # engine: ...and its results are on the host
    "first_token",  # worker: the delta carrying its first token is built to be sent
    "routed",  # gateway: the reply router read that token from Redis
    "answered",  # gateway: the stream handler returns the first output
)
ENV = "TANDEM_HOP_TRACE"
ENABLED = bool(os.environ.get(ENV))
_file: TextIO | None = None


def mark(request_id: str, hop: str) -> None:
    """Note that `request_id` passed `hop` now (callers check ENABLED first)."""
    global _file
    if _file is None:
        _file = open(os.environ[ENV], "a", buffering=1)  # noqa: SIM115 - the process's life
    _file.write(f"{time.time():.6f} {request_id} {hop}\n")
