"""The order in which a colocated worker, and a decode worker prefilling locally, queue a
step's Redis writes, with a real engine (SmolLM2 on the CPU) and a real redis-server: a
first token is not held behind the routing update of the blocks its prefill cached, and
a request's last token never goes out before the routing update that shows its blocks
(a peer judging the next request with that prefix must see them)."""

from __future__ import annotations

import time

from tandem.core.config import WorkerConfig
from tandem.core.protocol import PrefillTask
from tandem.core.sampling_params import SamplingParams
from tandem.decode.colocated import ColocatedWorker
from tandem.decode.worker import DecodeWorker
from tandem.engine.engine import EngineConfig
from tandem.local_redis import LocalRedis


class RecordingOutbox:
    """Stands in for the outbox thread: what the main loop queues, in order."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, object]] = []

    def publish(self, deltas) -> None:
        for batch in deltas.values():
            for delta in batch:
                self.queued.append(("token", delta.finish_reason))

    def call(self, fn, *args) -> None:
        self.queued.append((fn.__name__, args))
        if fn.__name__ in ("publish", "flush"):  # routing's: reach Redis as the thread would
            fn(*args)


def _task(prompt_len: int) -> PrefillTask:
    return PrefillTask(
        request_id="r",
        prompt_token_ids=list(range(100, 100 + prompt_len)),
        sampling=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
        reply_stream="tandem:reply:test",
        deadline=time.time() + 60,
    )


def test_first_token_before_the_routing_update_and_last_token_after_it():
    with LocalRedis() as server:
        config = WorkerConfig(redis_url=server.url, role="colocated")
        worker = ColocatedWorker(config, EngineConfig(model="smollm2", device="cpu"))
        try:
            assert worker.routing is not None, "routing is on by default with caching"
            outbox = worker.outbox = RecordingOutbox()
            worker._admit_task(b"1-0", _task(64))  # four full blocks to publish

            _, got = worker.engine.step()  # the prefill: the first token
            assert [seq.output_token_ids for seq in got] and not got[0].is_finished
            assert worker.routing.publisher.pending, "the prefill cached blocks"
            worker._publish_results(got)
            kinds = [kind for kind, _ in outbox.queued]
            assert kinds == ["token", "ack", "publish"], kinds
            assert not worker.routing.publisher.pending

            outbox.queued.clear()
            _, got = worker.engine.step()  # the last token
            assert got[0].is_finished
            worker._publish_results(got)
            assert outbox.queued[0] == ("publish", (0,)), outbox.queued
            assert outbox.queued[1] == ("token", "length"), outbox.queued
        finally:
            worker.shutdown()


def test_a_decode_worker_prefilling_locally_orders_its_hash_flush_the_same_way():
    with LocalRedis() as server:
        config = WorkerConfig(redis_url=server.url, role="decode", local_prefill_uncached_tokens=64)
        worker = DecodeWorker(config, EngineConfig(model="smollm2", device="cpu"))
        try:
            assert worker.hash_publisher is not None, "published with caching on"
            outbox = worker.outbox = RecordingOutbox()
            # 63 prompt tokens: three full blocks at the prefill, and the decode step
            # that finishes the request fills the fourth (the 64th token's KV).
            worker._admit_task(b"1-0", _task(63))

            worker._step()  # the local prefill: the first token
            kinds = [kind for kind, _ in outbox.queued]
            assert kinds == ["token", "ack", "flush"], kinds
            assert not worker.hash_publisher.pending

            outbox.queued.clear()
            worker._step()  # the last token
            kinds = [kind for kind, _ in outbox.queued]
            assert kinds == ["flush", "token"], kinds
            assert outbox.queued[1] == ("token", "length"), outbox.queued
        finally:
            worker.shutdown()
