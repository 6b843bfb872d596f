"""Which KV blocks each request owns: the one owner of block ids on a worker.

Everything that takes, shares or gives back blocks goes through here: the scheduler
(`allocate_slots`, `match_prefix`, `free`), a decode worker reserving blocks for an
incoming transfer (`reserve`) and the prefix cache (`cache_full_blocks`). Block ids
themselves only matter to the model runner (`block_table`) and to KV transfer.
Requests are keyed by request id so that a decode worker can reserve blocks for a
request before the request itself arrives.

With prefix caching on, every full block a request has computed is recorded under its
content hash (prefix_hash.py); a later request whose tokens start the same way shares
those blocks (reference counts) and computes only the rest.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass

from tandem.core.block_pool import BlockPool
from tandem.core.prefix_hash import extend_chain, prefix_hashes, root_hash
from tandem.core.sequence import Sequence


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass
class PrefixStats:
    """Prefix cache counters since start (for /metrics)."""

    queried_tokens: int = 0  # prompt tokens of the requests that looked up a prefix
    hit_tokens: int = 0  # ...of which found cached

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = False,
        salt: str = "",
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.salt = salt  # what besides tokens makes KV differ: KVLayout.cache_salt()
        self.prefix_stats = PrefixStats()
        self._blocks: dict[str, list[int]] = {}
        self._chains: dict[str, list[bytes]] = {}  # hashes of each request's full blocks
        self._num_recorded: dict[str, int] = {}  # ...of which recorded in the pool
        # Blocks freed while a launched step may still write them (a sequence that
        # finished or was aborted mid-step keeps its slot in that step's batch) wait
        # here until the step is done: a KV transfer from another process into a new
        # reservation must never land before that step's stray write.
        self._steps_launched = 0
        self._steps_done = 0
        self._parked: deque[tuple[int, list[int]]] = deque()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    def figures(self) -> dict[str, int]:
        """What a worker publishes about its cache (WorkerInfo's fields)."""
        pool = self.pool
        return {
            "total_blocks": pool.num_blocks,
            "free_blocks": pool.num_free,
            "used_blocks": pool.num_used,
            "cached_blocks": pool.num_cached,
            "evictable_blocks": pool.num_evictable,
            "evictions": pool.num_evictions,
            "prefix_queried_tokens": self.prefix_stats.queried_tokens,
            "prefix_hit_tokens": self.prefix_stats.hit_tokens,
        }

    def allocate_slots(self, request_id: str, total_tokens: int) -> bool:
        """Grow the request's blocks to hold `total_tokens` tokens; False if out of blocks."""
        owned = self._blocks.setdefault(request_id, [])
        extra = blocks_needed(total_tokens, self.block_size) - len(owned)
        if extra <= 0:
            return True
        if extra > self.pool.num_free:
            if not owned:
                del self._blocks[request_id]
            return False
        owned.extend(self.pool.allocate(extra))
        return True

    def reserve(
        self, request_id: str, num_tokens: int, chain: Sequence_[bytes] = ()
    ) -> tuple[list[int], int] | None:
        """Blocks for `num_tokens` tokens of KV that another process will write (a
        decode worker's reservation), and how many leading ones already hold it: the
        cached blocks of `chain` (the hashes of the request's full blocks, as the sender
        computed them), shared, at least one block always left to fill. None when
        they do not fit."""
        shared: list[int] = []
        if self.enable_prefix_caching and not self._blocks.get(request_id):
            usable = min(len(chain), max(0, (num_tokens - 1) // self.block_size))
            for block_hash in chain[:usable]:
                block = self.pool.cached_block(block_hash)
                if block is None:
                    break
                self.pool.share(block)
                shared.append(block)
            if shared:
                self._blocks[request_id] = list(shared)
                self._chains[request_id] = list(chain[: len(shared)])
                self._num_recorded[request_id] = len(shared)
        if not self.allocate_slots(request_id, num_tokens):
            self.free(request_id)
            return None
        return list(self._blocks[request_id]), len(shared)

    def prefix_chain(self, token_ids: Sequence_[int], cache_salt: str) -> list[bytes]:
        """The hashes of every full block of `token_ids` here (none with caching off):
        what a peer or a router looks up."""
        if not self.enable_prefix_caching:
            return []
        return prefix_hashes(token_ids, self.block_size, self.salt, cache_salt)

    def holds_prefix_of(self, seq: Sequence, num_blocks: int) -> bool:
        """Whether the first `num_blocks` blocks `seq` owns were shared for exactly its
        tokens (a reservation matched them by hashes its sender computed)."""
        if not num_blocks:
            return True
        tokens = seq.all_token_ids[: num_blocks * self.block_size]
        mine = self.prefix_chain(tokens, seq.sampling.cache_salt)
        return self._chains.get(seq.request_id, [])[:num_blocks] == mine

    def block_table(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def owns(self, request_id: str) -> bool:
        return request_id in self._blocks

    # -- prefix caching ----------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Share the longest cached run of `seq`'s leading full blocks and return how
        many tokens they hold (0 with caching off). At least one token is left to
        compute, so the step that finishes the prefill can sample. `seq` must own no
        blocks yet."""
        if not self.enable_prefix_caching:
            return 0
        if self._blocks.get(seq.request_id):
            raise ValueError(f"{seq.request_id} already owns blocks")
        tokens = seq.all_token_ids
        chain = self._chain(seq)
        extend_chain(chain, tokens, self.block_size, self._root(seq))
        usable = (len(tokens) - 1) // self.block_size
        shared: list[int] = []
        for block_hash in chain[:usable]:
            block = self.pool.cached_block(block_hash)
            if block is None:
                break
            self.pool.share(block)
            shared.append(block)
        if shared:
            self._blocks[seq.request_id] = shared
            self._num_recorded[seq.request_id] = len(shared)
        hit = len(shared) * self.block_size
        self.prefix_stats.queried_tokens += len(tokens)
        self.prefix_stats.hit_tokens += hit
        return hit

    def usable_chain(self, token_ids: Sequence_[int], cache_salt: str) -> list[bytes]:
        """The hashes of the full blocks of `token_ids` a request may share (all but
        the block holding its last token, which must be computed to sample)."""
        usable = max(0, (len(token_ids) - 1) // self.block_size)
        return self.prefix_chain(token_ids, cache_salt)[:usable]

    def num_cached_leading(self, chain: list[bytes]) -> int:
        """How many of the leading blocks of `chain` are cached here (no sharing)."""
        n = 0
        for block_hash in chain:
            if self.pool.cached_block(block_hash) is None:
                break
            n += 1
        return n

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Record every full block of `seq` whose KV is computed (call after its
        num_computed_tokens moved), so later requests can share it."""
        if not self.enable_prefix_caching:
            return
        table = self._blocks.get(seq.request_id, [])
        full = min(seq.num_computed_tokens // self.block_size, len(table))
        done = self._num_recorded.get(seq.request_id, 0)
        if full <= done:
            return
        chain = self._chain(seq)
        if full > len(chain):
            tokens = seq.all_token_ids[: full * self.block_size]
            extend_chain(chain, tokens, self.block_size, self._root(seq))
        for block, block_hash in zip(table[done:full], chain[done:full], strict=True):
            self.pool.cache(block, block_hash)
        self._num_recorded[seq.request_id] = full

    def _chain(self, seq: Sequence) -> list[bytes]:
        return self._chains.setdefault(seq.request_id, [])

    def _root(self, seq: Sequence) -> bytes:
        return root_hash(self.salt, seq.sampling.cache_salt)

    # -- giving blocks back ------------------------------------------------------------
    @property
    def num_parked_blocks(self) -> int:
        return sum(len(blocks) for _, blocks in self._parked)

    def free(self, request_id: str) -> None:
        self._chains.pop(request_id, None)
        self._num_recorded.pop(request_id, None)
        blocks = self._blocks.pop(request_id, None)
        if not blocks:
            return
        if self._steps_launched > self._steps_done:
            self._parked.append((self._steps_launched, blocks))
        else:
            self.pool.free(blocks)

    def step_launched(self) -> int:
        """Note a step going to the device; returns its number for step_done."""
        self._steps_launched += 1
        return self._steps_launched

    def step_done(self, step: int) -> None:
        """Step `step` (and every earlier one: steps complete in order) has finished on
        the device, so the blocks freed while it ran can be handed out again."""
        self._steps_done = max(self._steps_done, step)
        while self._parked and self._parked[0][0] <= self._steps_done:
            self.pool.free(self._parked.popleft()[1])
