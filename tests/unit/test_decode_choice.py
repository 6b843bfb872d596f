"""Which decode worker a prefill worker reserves on (prefill.decode_choice): the holder of
the longest prefix unless it lacks room, drains or is far busier, else by load; the
holders read from the published hash sets of a real redis-server."""

from __future__ import annotations

from tandem.core.kv_cache_manager import KVCacheManager
from tandem.core.prefix_routing import HashPublisher
from tandem.core.protocol import WorkerInfo
from tandem.core.redis_client import connect
from tandem.core.redis_keys import cached_blocks_key
from tandem.core.sampling_params import SamplingParams
from tandem.core.sequence import Sequence
from tandem.local_redis import LocalRedis
from tandem.prefill.decode_choice import (
    HOLDER_SLACK,
    DecodeWorkers,
    holder_slack,
    pick_decode_worker,
)


def _info(wid: str, free: int = 100, running: int = 0, **kw) -> WorkerInfo:
    kw.setdefault("role", "decode")
    return WorkerInfo(worker_id=wid, model="m", pid=1, free_blocks=free, running=running, **kw)


def _pick(workers, held=None, blocks=10, exclude=()):
    choice = pick_decode_worker(workers, set(exclude), held, blocks)
    return None if choice is None else (choice.worker.worker_id, choice.by_prefix)


def test_the_longest_held_prefix_wins_over_more_free_blocks():
    workers = [_info("a", free=500), _info("b", free=100), _info("c", free=90)]
    assert _pick(workers) == ("a", False)  # no holder: most free blocks
    assert _pick(workers, {"b": 3, "c": 5}) == ("c", True)
    # Equal prefixes: then most free blocks.
    assert _pick(workers, {"b": 5, "c": 5}) == ("b", True)


def test_a_far_busier_holder_is_not_chosen_for_its_cache():
    least = 2
    slack = holder_slack(least)
    assert slack == HOLDER_SLACK  # at small loads the absolute slack applies
    busy = _info("holder", free=500, running=least + slack, waiting=0)
    idle = _info("idle", free=100, running=least)
    assert _pick([busy, idle], {"holder": 4}) == ("holder", True)  # within the slack
    busy.waiting = 1  # reservations and queued requests count as load too
    assert _pick([busy, idle], {"holder": 4}) == ("holder", False)  # by load: most free
    assert _pick([busy, _info("idle", free=600, running=least)], {"holder": 4}) == (
        "idle",
        False,
    )
    # A large batch may grow by a quarter before the cache stops paying.
    assert holder_slack(200) == 50
    loaded = [_info("holder", free=50, running=250), _info("idle", free=90, running=200)]
    assert _pick(loaded, {"holder": 4}) == ("holder", True)
    loaded[0].running = 251
    assert _pick(loaded, {"holder": 4}) == ("idle", False)


def test_a_holder_without_room_for_the_request_is_not_chosen():
    workers = [_info("holder", free=9), _info("other", free=50)]
    assert _pick(workers, {"holder": 6}, blocks=10) == ("other", False)
    assert _pick(workers, {"holder": 6}, blocks=9) == ("holder", True)


def test_draining_tried_and_non_decode_workers_are_never_chosen():
    workers = [
        _info("draining", free=500, draining=True),
        _info("tried", free=400),
        _info("colocated", free=900, role="colocated"),
        _info("prefill", free=900, role="prefill"),
        _info("left", free=10),
    ]
    held = {"draining": 9, "tried": 8, "colocated": 9, "prefill": 9}
    assert _pick(workers, held, exclude={"tried"}) == ("left", False)
    assert _pick(workers, held) == ("tried", True)
    # Retrying: the holder was tried (refused or unreachable), the next choice is by load.
    assert _pick(workers, held, exclude={"tried", "left"}) is None
    assert _pick([], held) is None


def _decode_kv(client, wid: str, tokens: list[int]) -> tuple[KVCacheManager, HashPublisher]:
    """A decode worker's cache after it finished a request of `tokens`, published."""
    kv = KVCacheManager(32, 4, enable_prefix_caching=True, salt="m|float32")
    publisher = HashPublisher(client, "m", wid, kv, ttl_s=30)
    seq = Sequence(f"{wid}-r", tokens, SamplingParams(max_tokens=1))
    assert kv.allocate_slots(seq.request_id, len(tokens))
    seq.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(seq)
    kv.free(seq.request_id)
    publisher.flush()
    return kv, publisher


def test_held_prefixes_reads_each_decode_workers_leading_run_in_one_go(client):
    turn = list(range(1, 18))  # four full blocks of 4
    longer = turn + [50, 51, 52, 53, 54]
    _decode_kv(client, "d-holder", turn)
    _decode_kv(client, "d-partial", turn[:9])  # two full blocks
    _decode_kv(client, "d-other", [99] * 17)
    kv = KVCacheManager(32, 4, enable_prefix_caching=True, salt="m|float32")
    chain = kv.prefix_chain(longer, "")
    workers = [_info("d-holder"), _info("d-partial"), _info("d-other"), _info("d-none")]
    decoders = DecodeWorkers(client, "m", layout=None)
    assert decoders.held_prefixes(workers, chain) == {
        "d-holder": 4,
        "d-partial": 2,
        "d-other": 0,
        "d-none": 0,
    }
    assert decoders.held_prefixes(workers, kv.prefix_chain(longer, "tenant")) == dict.fromkeys(
        ("d-holder", "d-partial", "d-other", "d-none"), 0
    )
    assert decoders.held_prefixes(workers, []) == {}
    # A gap in the published set ends the run: blocks after it cannot be shared.
    client.srem(cached_blocks_key("m", "d-holder"), chain[1][:8])
    assert decoders.held_prefixes(workers, chain)["d-holder"] == 1


def test_redis_unreachable_means_choosing_by_load():
    server = LocalRedis()
    server.start()
    dead = connect(server.url)
    server.stop()
    decoders = DecodeWorkers(dead, "m", layout=None)
    kv = KVCacheManager(8, 4, enable_prefix_caching=True)
    assert decoders.held_prefixes([_info("a")], kv.prefix_chain(list(range(9)), "")) == {}
    assert decoders.workers() == []  # the last view (none yet)
