"""A fixed pool of KV block ids with reference counts and a cache of full blocks.

Blocks are plain integers indexing the per-layer cache tensors. Reference counts let a
block be shared by every request whose prompt starts with the same tokens, and make
double frees loud instead of silent.

A full block whose contents are known (its hash, see prefix_hash.py) is *cached*: it
can be found by that hash and shared. When its last reference goes it is not returned
to the free list but becomes *evictable*: still findable, taken back (LRU first) only
when no truly free block is left. A block is therefore in exactly one of three states:
free, referenced (refcount > 0, maybe cached), or evictable (refcount 0, cached).
"""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # cached blocks, referenced or not
        self._block_of: dict[bytes, int] = {}
        # Unreferenced cached blocks, least recently released first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.num_evictions = 0
        self._watchers: list[deque[tuple[bool, bytes]]] = []

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some request references."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def allocate(self, n: int) -> list[int]:
        """Take n blocks (free ones first, then the least recently used evictable
        ones, forgetting their hashes), or raise MemoryError and take none."""
        if n > self.num_free:
            raise MemoryError(f"need {n} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                gone = self._hash_of.pop(block)
                del self._block_of[gone]
                self.num_evictions += 1
                self._notify(False, gone)
            self._refcount[block] = 1
            blocks.append(block)
        return blocks

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refcount[b] == 0:
                raise ValueError(f"block {b} is free")
            self._refcount[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Pass a request's blocks in order: the
        tail of a prompt is released last, so under pressure it is evicted first and
        the shared head (what other requests are most likely to reuse) stays."""
        for b in reversed(blocks):
            if self._refcount[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    # -- the cache of full blocks ------------------------------------------------------
    def cached_block(self, block_hash: bytes) -> int | None:
        return self._block_of.get(block_hash)

    def share(self, block: int) -> None:
        """Take a reference to a cached block (evictable or referenced)."""
        if self._refcount[block] == 0:
            if block not in self._evictable:
                raise ValueError(f"block {block} is free, not cached")
            del self._evictable[block]
        self._refcount[block] += 1

    def cache(self, block: int, block_hash: bytes) -> None:
        """Record that a referenced block now holds the full block `block_hash`. A
        hash already held by another block keeps that one (the same KV computed twice
        by two requests at once): this block stays private and is freed normally."""
        if self._refcount[block] == 0:
            raise ValueError(f"block {block} is free")
        if block in self._hash_of or block_hash in self._block_of:
            return
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block
        self._notify(True, block_hash)

    def watch(self) -> deque[tuple[bool, bytes]]:
        """A queue of (cached, hash) changes from now on: True when a hash becomes
        findable, False when it is evicted (what a worker publishes for routing)."""
        events: deque[tuple[bool, bytes]] = deque()
        self._watchers.append(events)
        return events

    def _notify(self, cached: bool, block_hash: bytes) -> None:
        for events in self._watchers:
            events.append((cached, block_hash))
