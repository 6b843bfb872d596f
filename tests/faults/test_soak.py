"""Soak: a few hundred requests with random cancels while a decode worker and a prefill
worker are killed and replaced midway. Every request must end (finished, cancelled, or
an explicit error), none may hang, and no worker may hold a block afterwards."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from tests.faults.cluster import Cluster, request

NUM_REQUESTS = 200
EXPLICIT_FAILURES = {grpc.StatusCode.UNAVAILABLE}


def test_soak_with_cancels_and_worker_loss():
    cluster = Cluster()
    try:
        for name in ("prefill-0", "prefill-1"):
            cluster.start_worker(
                name, "prefill", "--reclaim-idle", "2", "--transfer-timeout", "0.9"
            )
        for name in ("decode-0", "decode-1"):
            cluster.start_worker(name, "decode")
        cluster.start_gateway()
        stub = cluster.stub()
        rng = random.Random(1234)
        plans = [
            (rng.randrange(2, 14), rng.random() < 0.2, rng.uniform(0.05, 1.5))
            for _ in range(NUM_REQUESTS)
        ]
        done = 0
        lock = threading.Lock()

        def run(i: int) -> tuple[str, object]:
            nonlocal done
            max_tokens, cancel, delay = plans[i]
            call = stub.Generate(request(f"Soak {i}: tell me about", max_tokens), timeout=120)
            if cancel:
                threading.Timer(delay, call.cancel).start()
            tokens, finish = 0, None
            try:
                for msg in call:
                    tokens += len(msg.token_ids)
                    finish = msg.finish_reason or finish
                outcome = ("finished", (tokens, max_tokens, finish))
            except grpc.RpcError as err:
                outcome = ("error", err.code())
            with lock:
                done += 1
            return outcome

        killer_done = threading.Event()

        def kill_and_replace() -> None:
            while done < NUM_REQUESTS // 3:
                time.sleep(0.1)
            cluster.kill("decode-0")
            cluster.kill("prefill-0")
            cluster.start_worker("decode-2", "decode")
            cluster.start_worker(
                "prefill-2", "prefill", "--reclaim-idle", "2", "--transfer-timeout", "0.9"
            )
            killer_done.set()

        killer = threading.Thread(target=kill_and_replace)
        killer.start()
        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(run, range(NUM_REQUESTS)))
        killer.join(120)
        assert killer_done.is_set()

        finished = [o[1] for o in outcomes if o[0] == "finished"]
        errors = [o[1] for o in outcomes if o[0] == "error"]
        assert len(finished) + len(errors) == NUM_REQUESTS
        # A finished stream carries every token it asked for (ignore_eos) and a reason.
        assert all(tokens == want and finish for tokens, want, finish in finished), finished
        # Errors are cancels or explicit UNAVAILABLE from the lost worker; a client-side
        # DEADLINE_EXCEEDED would be a hung stream.
        assert set(errors) <= {grpc.StatusCode.CANCELLED} | EXPLICIT_FAILURES, set(errors)
        assert len(finished) > NUM_REQUESTS // 2
        cluster.assert_no_blocks_in_use(timeout=30)
    finally:
        cluster.close()
