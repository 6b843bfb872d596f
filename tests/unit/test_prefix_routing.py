"""KV-aware routing against a real redis-server: the published hash sets follow the
cache (adds, evictions, worker death) and a worker leaves a task to the peer holding
its prefix only while that is worth it, and only to a peer of its own role (prefill or
colocated) or a decode worker that prefills the rest itself."""

from __future__ import annotations

import time

from tandem.core.config import WorkerConfig
from tandem.core.kv_cache_manager import KVCacheManager
from tandem.core.local_prefill import Backlog
from tandem.core.prefix_hash import prefix_hashes
from tandem.core.prefix_routing import (
    PUBLISHED_HASH_BYTES,
    HashPublisher,
    PrefixRouter,
    WorkerRouting,
)
from tandem.core.protocol import PrefillTask, WorkerInfo
from tandem.core.redis_client import add_task
from tandem.core.redis_keys import cached_blocks_key
from tandem.core.registry import publish_worker, remove_worker
from tandem.core.sampling_params import SamplingParams
from tandem.core.sequence import Sequence
from tandem.core.task_intake import TaskIntake

BS = 4
SALT = "m|float32"
PROMPT = list(range(1, 30))  # 7 full blocks


def _kv(num_blocks: int = 16) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, enable_prefix_caching=True, salt=SALT)


def _prefill(kv: KVCacheManager, rid: str, prompt: list[int]) -> None:
    """What a step does: take blocks, compute the prompt, record its full blocks."""
    seq = Sequence(rid, prompt, SamplingParams(max_tokens=1))
    kv.match_prefix(seq)
    assert kv.allocate_slots(rid, len(prompt))
    seq.num_computed_tokens = len(prompt)
    kv.cache_full_blocks(seq)
    kv.free(rid)


def _published(client, key: str) -> set[bytes]:
    return set(client.smembers(key))


def _short(tokens: list[int]) -> list[bytes]:
    return [h[:PUBLISHED_HASH_BYTES] for h in prefix_hashes(tokens, BS, SALT)]


def test_published_set_follows_caching_eviction_and_expires_with_the_worker(client):
    kv = _kv(num_blocks=8)
    key = cached_blocks_key("m", "w-pub")
    client.sadd(key, b"stale-from-a-previous-life")
    publisher = HashPublisher(client, "m", "w-pub", kv, ttl_s=0.5)
    publisher.set_load(2)
    _prefill(kv, "a", PROMPT[:17])  # 4 full blocks
    publisher.flush()
    assert _published(client, key) == set(_short(PROMPT[:17]))
    second = [900 + t for t in range(24)]
    _prefill(kv, "b", second)  # 6 blocks: evicts 2 of a's
    publisher.flush()
    assert kv.pool.num_evictions == 2
    cached = [
        h
        for h in prefix_hashes(PROMPT[:17], BS, SALT) + prefix_hashes(second, BS, SALT)
        if kv.pool.cached_block(h) is not None
    ]
    assert len(cached) == kv.pool.num_cached == 4 - 2 + 6
    assert _published(client, key) == {h[:PUBLISHED_HASH_BYTES] for h in cached}
    assert 0 < client.pttl(key) <= 500 and client.get(publisher.load_key) == b"2"
    deadline = time.monotonic() + 10
    while client.exists(key, publisher.load_key) and time.monotonic() < deadline:
        time.sleep(0.05)  # no heartbeat: both go with the registry entry's TTL
    assert not client.exists(key, publisher.load_key)


def _task(prompt: list[int]) -> PrefillTask:
    return PrefillTask(
        request_id="t",
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=4),
        reply_stream="r",
        deadline=0.0,
    )


def test_router_leaves_a_task_to_the_live_peer_holding_its_prefix(client):
    holder, idle = _kv(), _kv()
    holder_events = HashPublisher(client, "m", "holder", holder, 30)
    _prefill(holder, "old", PROMPT)
    holder_events.flush()
    holder_events.set_load(0)
    publish_worker(client, WorkerInfo(worker_id="holder", role="prefill", model="m", pid=1), 30)
    router = PrefixRouter(client, "m", "idle", idle, wait_ms=200, peers_ttl_s=0)
    task = _task(PROMPT + [77, 78])
    assert router.defers(Backlog(b"1-0", task, age_ms=5), my_load=0)
    assert router.num_deferred == 1
    # Waited long enough: anyone takes it.
    assert not router.defers(Backlog(b"1-0", task, age_ms=250), my_load=0)
    # The holder itself takes it, and so does a peer for an unrelated prompt.
    own = PrefixRouter(client, "m", "holder", holder, wait_ms=200, peers_ttl_s=0)
    assert not own.defers(Backlog(b"2-0", task, age_ms=5), my_load=0)
    other = _task([500 + t for t in range(20)])
    assert not router.defers(Backlog(b"3-0", other, age_ms=5), my_load=0)
    # A different cache_salt shares nothing.
    salted = PrefillTask(**{**_fields(task), "sampling": SamplingParams(cache_salt="x")})
    assert not router.defers(Backlog(b"4-0", salted, age_ms=5), my_load=0)
    # A holder busier than us does not get it (its load as it published it last, not
    # its registry entry's, which is up to a heartbeat old).
    holder_events.set_load(3)
    assert not router.defers(Backlog(b"5-0", task, age_ms=5), my_load=1)
    assert router.defers(Backlog(b"6-0", task, age_ms=5), my_load=3)
    holder_events.set_load(0)
    stale = WorkerInfo(worker_id="holder", role="prefill", model="m", pid=1, waiting=4)
    publish_worker(client, stale, 30)
    assert router.defers(Backlog(b"6-1", task, age_ms=5), my_load=0)
    # A task left for the holder is taken once the holder is gone (its registry entry
    # expired), even though it was already left for it once.
    assert router.defers(Backlog(b"7-0", task, age_ms=5), my_load=0)
    deferred = router.num_deferred
    remove_worker(client, "holder")
    assert not router.defers(Backlog(b"7-0", task, age_ms=5), my_load=0)
    assert router.num_deferred == deferred


def test_router_balances_load_between_peers_holding_as_much(client):
    peer, mine = _kv(), _kv()
    events = HashPublisher(client, "m", "even", peer, 30)
    publish_worker(client, WorkerInfo(worker_id="even", role="prefill", model="m", pid=1), 30)
    router = PrefixRouter(client, "m", "me", mine, wait_ms=200, peers_ttl_s=0)
    task = _task(PROMPT + [77])
    try:
        events.set_load(1)
        # Nothing cached anywhere: left to a peer two tasks less busy, not one.
        assert router.defers(Backlog(b"1-0", task, age_ms=5), my_load=3)
        assert not router.defers(Backlog(b"2-0", task, age_ms=5), my_load=2)
        # Both hold the whole prefix: the same.
        _prefill(peer, "old", PROMPT)
        _prefill(mine, "old", PROMPT)
        events.flush()
        assert router.defers(Backlog(b"3-0", task, age_ms=5), my_load=3)
        assert not router.defers(Backlog(b"4-0", task, age_ms=5), my_load=2)
        # This worker holds more: it keeps the task however busy.
        _prefill(mine, "longer", PROMPT + [77, 78, 79, 80])
        longer = _task(PROMPT + [77, 78, 79, 80, 81])
        assert not router.defers(Backlog(b"5-0", longer, age_ms=5), my_load=9)
        # A prompt shorter than a block: by load alone.
        assert router.defers(Backlog(b"6-0", _task([1, 2]), age_ms=5), my_load=3)
    finally:
        remove_worker(client, "even")
        client.delete(events.key, events.load_key)


def _fields(struct) -> dict:
    return {name: getattr(struct, name) for name in struct.__struct_fields__}


def _decoder(client, name: str, uncached: int, most: int = 1, draining: bool = False) -> None:
    info = WorkerInfo(worker_id=name, role="decode", model="m", pid=2, draining=draining,
                      local_prefill_uncached_tokens=uncached, max_local_prefills=most)  # fmt: skip
    publish_worker(client, info, 30)


def test_router_leaves_a_task_mostly_cached_on_a_decode_worker_to_it(client):
    decoder, prefill = _kv(), _kv()
    events = HashPublisher(client, "m", "decoder", decoder, 30)
    turn = PROMPT[:24]  # the previous turn, kept by the decode worker: 6 full blocks
    _prefill(decoder, "turn-1", turn)
    events.flush()
    events.set_load(0)
    _decoder(client, "decoder", uncached=8, most=1)
    router = PrefixRouter(client, "m", "prefill", prefill, wait_ms=200, peers_ttl_s=0)
    try:
        # The next turn adds 5 tokens: 24 cached there, 5 left <= 8: left to it.
        assert router.defers(Backlog(b"1-0", _task(turn + [1, 2, 3, 4, 5]), 5), my_load=0)
        # ...for wait_ms at most.
        assert not router.defers(Backlog(b"1-0", _task(turn + [1, 2, 3, 4, 5]), 250), 0)
        # Adding 12: 12 left > 8, so the prefill worker takes it (and ships the rest).
        assert not router.defers(Backlog(b"2-0", _task(turn + list(range(12))), 5), 0)
        # A short prompt is short with nothing cached; a long unrelated one is not.
        assert router.defers(Backlog(b"3-0", _task([600, 601, 602]), 5), my_load=0)
        assert not router.defers(Backlog(b"4-0", _task(list(range(700, 720))), 5), 0)
        # Another tenant's salt finds nothing cached there.
        salted = PrefillTask(
            **{**_fields(_task(turn + [1])), "sampling": SamplingParams(cache_salt="x")}
        )
        assert not router.defers(Backlog(b"5-0", salted, 5), my_load=0)
        # No room for one more local prefill (its load, as it published it), draining,
        # or a decode worker that prefills nothing itself: not left to it.
        events.set_load(1)
        assert not router.defers(Backlog(b"6-0", _task(turn + [1]), 5), my_load=0)
        events.set_load(0)
        assert router.defers(Backlog(b"7-0", _task(turn + [1]), 5), my_load=0)
        _decoder(client, "decoder", uncached=8, most=1, draining=True)
        assert not router.defers(Backlog(b"8-0", _task(turn + [1]), 5), my_load=0)
        _decoder(client, "decoder", uncached=0)
        assert not router.defers(Backlog(b"9-0", _task(turn + [1]), 5), my_load=0)
        assert router.live_peers() == []
    finally:
        remove_worker(client, "decoder")


def _peer(client, name: str, role: str, draining: bool = False) -> None:
    info = WorkerInfo(worker_id=name, role=role, model="m", pid=3, draining=draining)
    publish_worker(client, info, 30)


def test_a_colocated_worker_leaves_a_task_only_to_a_colocated_holder(client):
    holder, mine = _kv(), _kv()
    events = HashPublisher(client, "m", "co-holder", holder, 30)
    _prefill(holder, "old", PROMPT)
    events.flush()
    events.set_load(1)  # the requests it holds, running or waiting
    _peer(client, "co-holder", "colocated")
    router = PrefixRouter(client, "m", "co-me", mine, 200, peers_ttl_s=0, role="colocated")
    task = _task(PROMPT + [77])
    try:
        assert router.defers(Backlog(b"1-0", task, age_ms=5), my_load=1)
        assert not router.defers(Backlog(b"2-0", task, age_ms=5), my_load=0)  # busier
        assert not router.defers(Backlog(b"1-0", task, age_ms=250), my_load=1)  # waited
        # The same blocks on a prefill worker: it reads the stream (so nobody here
        # blocks in a read), but a colocated worker does not wait for it...
        _peer(client, "co-holder", "prefill")
        assert [p.worker_id for p in router.live_peers()] == ["co-holder"]
        assert not router.defers(Backlog(b"3-0", task, age_ms=5), my_load=5)
        # ...nor a prefill worker for a colocated holder: their loads mean different
        # things (a colocated worker keeps its requests to the last token).
        _peer(client, "co-holder", "colocated")
        prefill = PrefixRouter(client, "m", "p-me", _kv(), 200, peers_ttl_s=0)
        assert not prefill.defers(Backlog(b"4-0", task, age_ms=5), my_load=5)
        # A draining holder reads nothing: neither waited for nor a reader.
        _peer(client, "co-holder", "colocated", draining=True)
        assert not router.defers(Backlog(b"5-0", task, age_ms=5), my_load=5)
        assert router.live_peers() == []
    finally:
        remove_worker(client, "co-holder")
        client.delete(events.key, events.load_key)


def test_colocated_routing_judges_the_oldest_task_of_the_stream(client):
    config = WorkerConfig(redis_url="redis://unused", role="colocated")
    mine, holder = _kv(), _kv()
    intake = TaskIntake(client, "m", "co-a", config)
    intake.ensure_group()
    routing = WorkerRouting.of(client, "m", "co-a", mine, config)
    holder_routing = WorkerRouting.of(client, "m", "co-b", holder, config)
    for each in (routing, holder_routing):
        each.router.peers_ttl_s = 0  # a fresh view of the peers on every look
    assert not routing.active  # alone: it reads as it would without routing
    _prefill(holder, "old", PROMPT)
    holder_routing.publish(load=0)
    _peer(client, "co-b", "colocated")
    _peer(client, "co-a", "colocated")
    taken = None
    try:
        assert routing.active and holder_routing.active
        add_task(client, intake.stream, _task(PROMPT + [5, 6]))
        add_task(client, intake.stream, _task([900, 901]))
        # The holder reads it, and only it (each task is judged before it is read);
        # this worker leaves it.
        assert routing.new_tasks(intake, load=0) == 0
        assert intake.poll(4, None, {}, new=0) == []  # room, but no new task to read
        assert holder_routing.new_tasks(intake, load=0) == 1
        assert routing.router.num_deferred == 1
        (taken,) = intake.poll(4, None, {}, new=1)
        assert taken[1].prompt_token_ids == PROMPT + [5, 6]
        # The next one is judged on its own: nobody holds it, both may read it.
        assert routing.new_tasks(intake, load=0) == 1
        (second,) = intake.poll(4, None, {}, new=1)
        intake.ack(second[0])
        # Nothing waits: no new read (one would take a task arriving meanwhile
        # unjudged).
        assert routing.new_tasks(intake, load=0) == 0
        # No routing without prefix caching, or with no wait.
        off = KVCacheManager(16, BS, enable_prefix_caching=False, salt=SALT)
        assert WorkerRouting.of(client, "m", "co-c", off, config) is None
        no_wait = WorkerConfig(redis_url="redis://unused", role="colocated", prefix_route_wait_ms=0)
        assert WorkerRouting.of(client, "m", "co-c", mine, no_wait) is None
    finally:
        for name in ("co-a", "co-b"):
            remove_worker(client, name)
        client.delete(holder_routing.publisher.key, holder_routing.publisher.load_key)
        if taken is not None:
            intake.ack(taken[0])
