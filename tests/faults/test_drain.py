"""SIGTERM drains a worker (decode or colocated): work in hand finishes, new work goes
elsewhere, then exit; a second signal exits at once."""

from __future__ import annotations

import contextlib
import signal
import threading

import grpc

from tests.faults.cluster import Cluster, collect, request, stream_in_background


def test_sigterm_drains_decode_then_exits_and_second_signal_is_immediate():
    cluster = Cluster()
    try:
        cluster.start_worker("decode-0", "decode")
        cluster.start_worker("prefill-0", "prefill")
        cluster.start_gateway()
        stub = cluster.stub()
        out: dict[str, list[int]] = {}
        first_tokens = threading.Event()

        def long_request() -> None:
            tokens: list[int] = []
            for msg in stub.Generate(request("Write a long essay about the sea.", 80), timeout=120):
                tokens += list(msg.token_ids)
                if len(tokens) >= 3:
                    first_tokens.set()
            out["tokens"] = tokens

        t = threading.Thread(target=long_request)
        t.start()
        assert first_tokens.wait(60)
        cluster.signal("decode-0", signal.SIGTERM)
        cluster.wait_for(
            lambda: (w := cluster.worker("decode-0")) is not None and w.draining,
            "decode-0 to report draining",
            timeout=10,
        )
        # A second decode worker takes the new work while decode-0 finishes its own.
        cluster.start_worker("decode-1", "decode")
        assert len(collect(stub, request("A new request", 5))) == 5
        t.join(120)
        assert len(out["tokens"]) == 80, "the in-flight request was cut short"
        assert cluster.procs["decode-0"].wait(30) == 0
        assert cluster.worker("decode-0") is None

        # decode-1 is idle now: give it a long request, then two signals: it exits at once
        # (the stream then fails, which is what the second signal means).
        def doomed() -> None:
            with contextlib.suppress(grpc.RpcError):
                collect(stub, request("Another essay", 400))

        threading.Thread(target=doomed, daemon=True).start()
        cluster.wait_for(lambda: cluster.worker("decode-1").running == 1, "decode-1 busy")
        cluster.signal("decode-1", signal.SIGTERM)
        cluster.wait_for(lambda: cluster.worker("decode-1").draining, "decode-1 draining")
        cluster.signal("decode-1", signal.SIGTERM)  # apart: pending signals coalesce
        assert cluster.procs["decode-1"].wait(10) == 0
    finally:
        cluster.close()


def test_sigterm_drains_a_colocated_worker_and_a_second_signal_is_immediate():
    cluster = Cluster()
    try:
        cluster.start_worker("colo-a", "worker")
        cluster.start_gateway()
        essay, started = stream_in_background(
            cluster, request("Write a long essay about the sea.", 150), 3
        )
        assert started.wait(60)
        cluster.signal("colo-a", signal.SIGTERM)
        cluster.wait_for(
            lambda: (w := cluster.worker("colo-a")) is not None and w.draining,
            "colo-a to report draining",
            timeout=10,
        )
        essay["thread"].join(120)
        assert "error" not in essay and len(essay["tokens"]) == 150, "cut short by the drain"
        assert cluster.procs["colo-a"].wait(30) == 0
        assert cluster.worker("colo-a") is None

        cluster.start_worker("colo-b", "worker")
        doomed, started = stream_in_background(cluster, request("Another essay", 400), 1)
        assert started.wait(60)
        cluster.signal("colo-b", signal.SIGTERM)
        cluster.wait_for(lambda: cluster.worker("colo-b").draining, "colo-b draining")
        cluster.signal("colo-b", signal.SIGTERM)  # apart: pending signals coalesce
        assert cluster.procs["colo-b"].wait(10) == 0
        doomed["thread"].join(30)
        assert doomed["error"].code() == grpc.StatusCode.UNAVAILABLE
    finally:
        cluster.close()
