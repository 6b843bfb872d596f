"""Decode-side reuse through `tandem serve` (1 prefill + 2 decode workers on SmolLM2, CPU,
P/D over zmq): a conversation's next turn is reserved on the decode worker that holds
its previous turn, even while that worker is busier than the other one (a choice by
free blocks alone sends it to the idle worker and ships the whole conversation again),
and only the blocks it lacks are shipped. Every answer is token-exact with an engine
whose prefix caching is off."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tandem.core.protocol import WorkerInfo
from tandem.core.redis_client import connect
from tandem.core.registry import list_workers
from tandem.core.sampling_params import SamplingParams
from tandem.gateway.proto import tandem_pb2
from tests.service.conftest import assert_every_worker_clean, generate, start_service, stop_service

B2_TOKENS = 256  # long enough to keep its decode worker busy through another turn


@pytest.fixture(scope="module")
def svc():
    service = start_service("--prefill-workers", "1", "--decode-workers", "2")
    yield service
    if service.proc.poll() is None:
        stop_service(service)


def _ids(n: int, seed: int) -> list[int]:
    return [(seed * 131 + 7 * i) % 900 + 10 for i in range(n)]


def _workers(svc, since: float, cond=lambda ws: True) -> dict[str, WorkerInfo]:
    """Worker id -> registry entry, every entry written after `since` (a worker settles a
    request before the entry that follows: its figures count it) and `cond` true of them."""
    redis = connect(svc.redis_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = {w.worker_id: w for w in list_workers(redis)}
        if (
            len(workers) == 3
            and all(w.heartbeat > since for w in workers.values())
            and cond(workers)
        ):
            return workers
        time.sleep(0.1)
    raise AssertionError(f"the registry never showed what the test waits for: {workers}")


def _prefill(workers: dict[str, WorkerInfo]) -> WorkerInfo:
    (prefill,) = [w for w in workers.values() if w.role == "prefill"]
    return prefill


def _admitted_on(before: dict[str, WorkerInfo], after: dict[str, WorkerInfo]) -> list[str]:
    """The decode workers that admitted a handoff between the two views."""
    return [
        wid for wid, w in after.items() if w.role == "decode" and w.admitted > before[wid].admitted
    ]


class Turns:
    """Greedy turns through gRPC (several may stream at once), checked against the
    uncached engine on the test's thread (the engine is not thread-safe)."""

    def __init__(self, svc, uncached) -> None:
        self.svc, self.uncached = svc, uncached
        self.bs = uncached.engine.kv_cache.layout.block_size
        self.bytes_per_block = uncached.engine.kv_cache.layout.bytes_per_block

    def stream(self, ids: list[int], max_tokens: int, generating: threading.Event) -> list[int]:
        """The answer; `generating` is set once the decode worker generates (token 2)."""
        req = tandem_pb2.GenerateRequest(
            prompt_token_ids=ids,
            sampling=tandem_pb2.SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True
            ),
        )
        tokens: list[int] = []
        for msg in self.svc.stub().Generate(req, timeout=300):
            tokens += list(msg.token_ids)
            if len(tokens) >= 2:
                generating.set()
        return tokens

    def check(self, ids: list[int], tokens: list[int]) -> list[int]:
        greedy = SamplingParams(max_tokens=len(tokens), temperature=0.0, ignore_eos=True)
        assert tokens == self.uncached.generate([ids], greedy)[0].token_ids
        return tokens

    def run(self, ids: list[int], max_tokens: int) -> list[int]:
        tokens, _, _ = generate(
            self.svc.stub(), ids=ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
        )
        assert len(tokens) == max_tokens
        return self.check(ids, tokens)

    def shipped(self, prompt: list[int], held_tokens: int) -> int:
        """KV bytes a turn of `prompt` ships to a decode worker holding the full blocks of
        its first `held_tokens` tokens."""
        whole = -(-len(prompt) // self.bs)
        return (whole - held_tokens // self.bs) * self.bytes_per_block


def test_next_turns_go_to_the_decode_worker_holding_the_conversation(svc, uncached):
    turns = Turns(svc, uncached)
    bs = turns.bs
    system = _ids(3 * bs, seed=9)  # a system prompt both conversations start with
    start = _workers(svc, time.time())

    # A's first turn: nothing held anywhere, so by load.
    a1 = system + _ids(40, seed=1)
    a1_answer = turns.run(a1, max_tokens=20)
    after_a1 = _workers(svc, time.time())
    (holder,) = _admitted_on(start, after_a1)
    (other,) = [w for w in after_a1 if w not in (holder, _prefill(after_a1).worker_id)]
    sent = _prefill(after_a1).kv_bytes_sent - _prefill(start).kv_bytes_sent
    assert sent == turns.shipped(a1, 0)

    # B's first turn shares the system prompt, held by A's decode worker: it goes there
    # and only B's own blocks are shipped.
    b1 = system + _ids(30, seed=2)
    b1_answer = turns.run(b1, max_tokens=20)
    after_b1 = _workers(svc, time.time())
    assert _admitted_on(after_a1, after_b1) == [holder]
    sent = _prefill(after_b1).kv_bytes_sent - _prefill(after_a1).kv_bytes_sent
    assert sent == turns.shipped(b1, len(system))

    # B's second turn, long: it stays on the holder, which is busy with it while...
    b2 = b1 + b1_answer + _ids(20, seed=3)
    generating = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        b2_answer = pool.submit(turns.stream, b2, B2_TOKENS, generating)
        while not generating.wait(0.5):
            if b2_answer.done():
                b2_answer.result()  # raises what ended it
                raise AssertionError("B's second turn ended before its decode worker started")
        b2_sent = turns.shipped(b2, len(b1) + len(b1_answer) - 1)
        busy = _workers(
            svc,
            time.time(),
            lambda ws: (
                ws[holder].running >= 1
                and _prefill(ws).kv_bytes_sent == _prefill(after_b1).kv_bytes_sent + b2_sent
            ),
        )
        assert busy[other].running == 0 and busy[other].free_blocks > busy[holder].free_blocks
        # ...A's second turn comes: the other decode worker is idle with more free
        # blocks, but the holder of A's first turn gets it and receives the new blocks only.
        a2 = a1 + a1_answer + _ids(25, seed=4)
        a2_answer = turns.stream(a2, 8, threading.Event())
        assert not b2_answer.done()  # the holder was busier all through A's turn
        after_a2 = _workers(svc, time.time())
        b2_tokens = b2_answer.result(timeout=300)
    turns.check(a2, a2_answer)
    turns.check(b2, b2_tokens)
    assert _admitted_on(busy, after_a2) == [holder]
    sent = _prefill(after_a2).kv_bytes_sent - _prefill(busy).kv_bytes_sent
    assert sent == turns.shipped(a2, len(a1) + len(a1_answer) - 1)
    # The routing decisions (in /metrics too): A's first turn by load, the rest by prefix.
    prefill, before = _prefill(after_a2), _prefill(start)
    assert prefill.decode_by_load - before.decode_by_load == 1
    assert prefill.decode_by_prefix - before.decode_by_prefix == 3
    assert_every_worker_clean(svc, time.time())
