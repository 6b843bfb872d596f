"""Decode-side reuse when the decode worker holding a conversation dies between turns:
its registry entry and published hashes outlive it by up to a registry TTL, so the next
turn may still be reserved there first; that reservation fails, the next choice (by
load) is the live decode worker, which gets the whole conversation shipped, and the
answer is token-exact."""

from __future__ import annotations

from tandem.core.config import CacheConfig
from tandem.core.redis_keys import cached_blocks_key
from tandem.core.sampling_params import SamplingParams
from tandem.engine.engine import EngineConfig
from tandem.engine.llm import LLM
from tandem.gateway.proto import tandem_pb2
from tests.faults.cluster import Cluster, collect


def _turn(ids: list[int], max_tokens: int) -> tandem_pb2.GenerateRequest:
    return tandem_pb2.GenerateRequest(
        prompt_token_ids=ids,
        sampling=tandem_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


def _ids(n: int, seed: int) -> list[int]:
    return [(seed * 131 + 7 * i) % 900 + 10 for i in range(n)]


def test_the_next_turn_goes_to_the_live_decoder_when_the_holder_dies():
    uncached = LLM(
        config=EngineConfig(
            model="smollm2", device="cpu", cache=CacheConfig(enable_prefix_caching=False)
        )
    )
    layout = uncached.engine.kv_cache.layout

    def whole(prompt: list[int]) -> int:
        """KV bytes of every block of `prompt`: what a decode worker holding none gets."""
        return -(-len(prompt) // layout.block_size) * layout.bytes_per_block

    cluster = Cluster()
    try:
        cluster.start_worker("prefill-0", "prefill")
        for name in ("decode-a", "decode-b"):
            cluster.start_worker(name, "decode")
        cluster.start_gateway()
        stub = cluster.stub()
        first = _ids(50, seed=1)
        answer = collect(stub, _turn(first, 16))
        cluster.wait_for(
            lambda: sum(w.admitted for w in cluster.workers("decode")) == 1, "the handoff"
        )
        (holder,) = [w.worker_id for w in cluster.workers("decode") if w.admitted]
        other = "decode-b" if holder == "decode-a" else "decode-a"
        key = cached_blocks_key("smollm2", holder)
        cluster.wait_for(lambda: cluster.client.scard(key) > 0, "the holder's hashes")
        # The registry's figures lag a heartbeat: wait for the first turn's (its whole
        # prompt, shipped), or its bytes would count as the second turn's.
        sent_before = whole(first)
        cluster.wait_for(
            lambda: cluster.worker("prefill-0").kv_bytes_sent == sent_before,
            "the prefill worker's figures of the first turn",
        )
        cluster.kill(holder)

        second = first + answer + _ids(30, seed=2)
        tokens = collect(stub, _turn(second, 12), timeout=120)
        greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        assert tokens == uncached.generate([second], greedy)[0].token_ids
        cluster.wait_for(lambda: cluster.worker(other).admitted == 1, "the live decoder")
        # It held nothing of the conversation: the whole prompt was shipped to it.
        cluster.wait_for(
            lambda: cluster.worker("prefill-0").kv_bytes_sent - sent_before == whole(second),
            "the prefill worker's figures",
        )
        cluster.wait_for(lambda: not cluster.client.exists(key), "the dead holder's hashes")
        assert cluster.worker(holder) is None
        cluster.assert_no_blocks_in_use(timeout=15)
    finally:
        cluster.close()
