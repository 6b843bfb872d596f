"""A transfer frozen past --reclaim-idle: the task being shipped stays with its prefill
worker (its stream entry is kept alive), so it is neither prefilled twice nor run again
on blocks about to be freed; it ends once, with the transfer's error.

The decode workers are frozen (SIGSTOP) as a hung device would leave them: their
registry entries stay (kept alive here, as their heartbeat thread would), so the prefill
worker keeps trying them and the shipping takes three transfer timeouts."""

from __future__ import annotations

import signal
import threading
import time

from tandem.core.protocol import PrefillTask, TokenBatch, decode
from tandem.core.redis_client import add_task
from tandem.core.redis_keys import MESSAGE_FIELD, WORKER_TTL_S, prefill_stream, worker_key
from tandem.core.sampling_params import SamplingParams
from tests.faults.cluster import Cluster

STREAM = prefill_stream("smollm2")
REPLY = "tandem:reply:test-shipping"
DECODERS = ("decode-0", "decode-1")


def _deltas(cluster: Cluster) -> list:
    return [
        d
        for _, fields in cluster.client.xrange(REPLY)
        for d in decode(fields[MESSAGE_FIELD], TokenBatch).deltas
    ]


def _keep_registered(cluster: Cluster, names, stop: threading.Event) -> threading.Thread:
    """Refresh the registry entries of `names` as they are now until `stop`."""
    entries = {name: cluster.client.hgetall(worker_key(name)) for name in names}

    def run() -> None:
        while not stop.wait(0.3):
            for name, fields in entries.items():
                cluster.client.hset(worker_key(name), mapping=fields)
                cluster.client.expire(worker_key(name), WORKER_TTL_S)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_task_shipping_past_reclaim_idle_is_not_taken_again():
    cluster = Cluster()
    try:
        for name in DECODERS:
            cluster.start_worker(name, "decode")
        # Slow prefill (8 tokens a step) leaves time to freeze the decoders once one
        # has reserved blocks; then the transfer and a second reservation on each
        # decoder wait 0.95 s: the task ships for ~2.85 s, longer than --reclaim-idle 2.
        cluster.start_worker(
            "prefill-0",
            "prefill",
            "--max-num-batched-tokens",
            "8",
            "--reclaim-idle",
            "2",
            "--transfer-timeout",
            "0.95",
        )
        task = PrefillTask(
            request_id="shipped-once",
            prompt_token_ids=[(7 * i) % 20000 + 100 for i in range(400)],
            sampling=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
            reply_stream=REPLY,
            deadline=time.time() + 120,
        )
        add_task(cluster.client, STREAM, task)
        cluster.wait_for(
            lambda: sum(w.reservations for w in cluster.workers("decode")) == 1,
            "a decode worker to reserve blocks",
            timeout=60,
        )
        stop = threading.Event()
        for name in DECODERS:
            cluster.signal(name, signal.SIGSTOP)
        refresher = _keep_registered(cluster, DECODERS, stop)
        try:
            cluster.wait_for(
                lambda: any(d.error_code for d in _deltas(cluster)),
                "the shipping to fail",
                timeout=120,
            )
        finally:
            stop.set()
            refresher.join(5)
            for name in DECODERS:
                cluster.signal(name, signal.SIGCONT)
        # A copy reclaimed meanwhile would now be reserved, prefilled and answered again.
        cluster.assert_no_blocks_in_use(timeout=90)
        time.sleep(2)  # registry entries refreshed after the last step
        assert cluster.worker("prefill-0").admitted == 1, "the task was taken twice"
        deltas = _deltas(cluster)
        first_tokens = [d for d in deltas if d.token_ids and d.offset == 0]
        assert len(first_tokens) == 1, deltas
        assert [d.error_code for d in deltas if d.error_code] == ["unavailable"], deltas
        assert deltas[-1].error_code == "unavailable", "nothing may follow the end"
        assert cluster.client.xlen(STREAM) == 0
    finally:
        cluster.close()
