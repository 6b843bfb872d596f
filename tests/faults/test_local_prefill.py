"""A decode worker that also prefills (`tandem decode --local-prefill-after-ms`): with the
prefill worker frozen it takes the queued tasks itself and answers exactly as the
in-process engine; without the option it never takes one; beside a healthy prefill
worker and a long threshold it takes none; a cancel during its prefill frees every
block. With `--local-prefill-uncached-tokens`, a conversation's next turn that it
prefills itself is reclaimed by the prefill pool when it dies mid-prefill, and a request
it prefilled itself migrates (gateway --migrate) when it dies after the first token."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tandem.core.local_prefill import entry_time_ms
from tandem.core.redis_keys import PREFILL_GROUP, prefill_stream
from tandem.gateway.proto import tandem_pb2
from tests.faults.cluster import Cluster, collect, request, stream_in_background
from tests.service.conftest import PROMPTS, solo

STREAM = prefill_stream("smollm2")
LONG_PROMPT = "Once upon a time, in a valley between two mountains, " * 32


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start_worker("prefill-0", "prefill")
        c.start_gateway()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def engine():
    from tandem.engine.llm import LLM

    return LLM("smollm2", device="cpu")


@contextlib.contextmanager
def decode_worker(cluster: Cluster, name: str, *flags: str) -> Iterator[None]:
    cluster.start_worker(name, "decode", *flags)
    try:
        yield
    finally:  # drained: it leaves the registry, so no later request is routed to it
        cluster.signal(name, signal.SIGTERM)
        status = cluster.procs[name].wait(30)
    assert status == 0


@contextlib.contextmanager
def frozen_prefill(cluster: Cluster) -> Iterator[None]:
    # Registered (a thawed worker re-registers within a heartbeat): the gateway takes
    # requests until its entry expires, a few seconds into the freeze.
    cluster.wait_for(lambda: cluster.worker("prefill-0") is not None, "prefill-0 registered")
    cluster.signal("prefill-0", signal.SIGSTOP)
    try:
        # A read it was blocked in when frozen could still be handed a task: wait until
        # Redis has ended it (its BLOCK is 50 ms), so a new task stays in the stream.
        cluster.wait_for(lambda: not _blocked_reads(cluster), "prefill-0's last read to end")
        yield
    finally:
        cluster.signal("prefill-0", signal.SIGCONT)


def _blocked_reads(cluster: Cluster) -> list[dict]:
    return [
        c
        for c in cluster.client.client_list()
        if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")
    ]


def _pending(cluster: Cluster, consumer: str) -> int:
    for c in cluster.client.xinfo_consumers(STREAM, PREFILL_GROUP):
        if c["name"] in (consumer, consumer.encode()):
            return c["pending"]
    return 0


def _settled(cluster: Cluster) -> bool:
    """Every task handled: acknowledged and deleted."""
    return (
        cluster.client.xlen(STREAM) == 0
        and cluster.client.xpending(STREAM, PREFILL_GROUP)["pending"] == 0
    )


def _generate_all(cluster: Cluster, jobs: list[tuple[str, int]]) -> list[list[int]]:
    stub = cluster.stub()
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: collect(stub, request(*job)), jobs))


def test_with_prefill_frozen_the_decode_worker_prefills_them_itself(cluster, engine):
    jobs = [(PROMPTS[i], 6 + 3 * i) for i in range(4)]
    with (
        decode_worker(
            cluster, "decode-local", "--local-prefill-after-ms", "100", "--max-local-prefills", "2"
        ),
        frozen_prefill(cluster),
    ):
        results = _generate_all(cluster, jobs)
        assert results == [solo(engine, prompt, n).token_ids for prompt, n in jobs]
        cluster.wait_for(
            lambda: cluster.worker("decode-local").local_prefills == len(jobs),
            "the registry to count the local prefills",
        )
        assert cluster.worker("decode-local").admitted == 0  # no handoff: prefill is frozen
        assert _settled(cluster)
        cluster.assert_no_blocks_in_use()


def test_without_the_option_a_decode_worker_never_takes_a_task(cluster):
    with decode_worker(cluster, "decode-plain"):
        with frozen_prefill(cluster):
            call = cluster.stub().Generate(request(PROMPTS[1], 8), timeout=60)
            cluster.wait_for(lambda: cluster.client.xlen(STREAM) == 1, "the task to be queued")
            entry = cluster.client.xrange(STREAM)[0][0]

            def age_ms() -> int:
                seconds, micros = cluster.client.time()
                return seconds * 1000 + micros // 1000 - entry_time_ms(entry)

            # An idle worker that took tasks would have done so within milliseconds.
            cluster.wait_for(lambda: age_ms() >= 2000, "the task to wait 2 s")
            [group] = cluster.client.xinfo_groups(STREAM)
            assert entry_time_ms(group["last-delivered-id"]) < entry_time_ms(entry)
            assert cluster.client.xpending(STREAM, PREFILL_GROUP)["pending"] == 0
            call.cancel()
            with pytest.raises(grpc.RpcError) as err:
                next(iter(call))
            assert err.value.code() == grpc.StatusCode.CANCELLED
        plain = cluster.worker("decode-plain")
        assert (plain.local_prefills, plain.admitted, plain.used_blocks) == (0, 0, 0)
        # Thawed, the prefill worker finds the task aborted and drops it.
        cluster.wait_for(lambda: _settled(cluster), "the cancelled task to be dropped")
        cluster.assert_no_blocks_in_use()


def test_beside_a_healthy_prefill_worker_and_a_long_threshold_it_takes_nothing(cluster, engine):
    jobs = [(PROMPTS[i % len(PROMPTS)] + f" {i}", 5) for i in range(6)]
    cluster.wait_for(lambda: cluster.worker("prefill-0") is not None, "prefill-0 registered")
    before = cluster.worker("prefill-0").admitted
    with decode_worker(cluster, "decode-patient", "--local-prefill-after-ms", "600000"):
        results = _generate_all(cluster, jobs)
        assert results == [solo(engine, prompt, n).token_ids for prompt, n in jobs]
        cluster.wait_for(
            lambda: cluster.worker("decode-patient").admitted == len(jobs),
            "the registry to count the handoffs",
        )
        assert cluster.worker("decode-patient").local_prefills == 0
        cluster.wait_for(
            lambda: cluster.worker("prefill-0").admitted == before + len(jobs),
            "prefill-0 to count every task",
        )
        assert _settled(cluster)


def test_a_cancel_during_local_prefill_frees_every_block(cluster):
    # Four tokens a step: the long prompt takes seconds to prefill on a CPU.
    with (
        decode_worker(
            cluster, "decode-slow", "--local-prefill-after-ms", "0", "--max-num-batched-tokens", "4"
        ),
        frozen_prefill(cluster),
    ):
        call = cluster.stub().Generate(request(LONG_PROMPT, 20), timeout=120)
        cluster.wait_for(lambda: _pending(cluster, "decode-slow") == 1, "decode-slow to claim")
        cluster.wait_for(
            lambda: cluster.worker("decode-slow").used_blocks > 0, "its prefill to hold blocks"
        )
        # Still pending: the entry is acknowledged at the first token, so none went out.
        assert _pending(cluster, "decode-slow") == 1
        call.cancel()
        cluster.wait_for(lambda: _settled(cluster), "the claimed task to be acknowledged")
        cluster.assert_no_blocks_in_use()
        slow = cluster.worker("decode-slow")
        assert (slow.local_prefills, slow.running, slow.waiting) == (1, 0, 0)


def _ids_request(ids: list[int], max_tokens: int) -> tandem_pb2.GenerateRequest:
    return tandem_pb2.GenerateRequest(
        prompt_token_ids=ids,
        sampling=tandem_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


def test_a_short_turn_whose_decode_worker_dies_mid_prefill_is_reclaimed(cluster, engine):
    stub = cluster.stub()
    # One token a step: the turn's ~150 uncached tokens take seconds to prefill locally.
    cluster.start_worker(
        "decode-turns",
        "decode",
        "--local-prefill-uncached-tokens",
        "256",
        "--max-num-batched-tokens",
        "1",
    )
    first = [(13 * i + 5) % 900 + 10 for i in range(300)]  # > 256: the prefill worker's
    answer = collect(stub, _ids_request(first, 8))
    cluster.wait_for(lambda: cluster.worker("decode-turns").admitted == 1, "the handoff")
    # A plain decode worker to hand the reclaimed turn to once decode-turns is gone.
    with decode_worker(cluster, "decode-spare"):
        second = first + answer + [(17 * i + 3) % 900 + 10 for i in range(150)]
        call = stub.Generate(_ids_request(second, 6), timeout=120)
        cluster.wait_for(lambda: _pending(cluster, "decode-turns") == 1, "the local claim")
        cluster.kill("decode-turns")
        # Still pending under the dead worker: no first token went out before the kill.
        assert _pending(cluster, "decode-turns") == 1
        tokens = [t for msg in call for t in msg.token_ids]
        assert tokens == solo(engine, second, 6).token_ids
        cluster.wait_for(lambda: _settled(cluster), "the reclaimed task to be acknowledged")
        assert cluster.worker("decode-spare").admitted == 1
        cluster.assert_no_blocks_in_use(timeout=15)


def test_a_request_prefilled_on_its_decode_worker_migrates_when_that_worker_dies(engine):
    migrating = Cluster()
    try:
        migrating.start_worker("prefill-0", "prefill")
        # A short prompt is short with nothing cached: decode-local prefills it.
        migrating.start_worker("decode-local", "decode", "--local-prefill-uncached-tokens", "64")
        migrating.start_worker("decode-spare", "decode")  # not a peer routing knows of
        migrating.start_gateway("--migrate")
        result, started = stream_in_background(migrating, request(PROMPTS[0], 300), 6)
        assert started.wait(60)
        migrating.wait_for(
            lambda: migrating.worker("decode-local").local_prefills == 1, "the local prefill"
        )
        migrating.kill("decode-local")
        result["thread"].join(120)
        assert "error" not in result, result.get("error")
        assert result["tokens"] == solo(engine, PROMPTS[0], 300).token_ids
        # The rest was recomputed by the prefill pool and handed to the spare.
        assert migrating.worker("decode-spare").admitted == 1
        migrating.assert_no_blocks_in_use(timeout=15)
    finally:
        migrating.close()
