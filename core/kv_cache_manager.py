"""Which KV blocks each request owns.

The scheduler asks for room (`allocate_slots`) and gets yes or no; block ids themselves
only matter to the model runner (`block_table`) and to KV transfer. Requests are keyed
by request id so that a decode worker can reserve blocks for a request before the
request itself arrives.
"""

from __future__ import annotations

from core.block_pool import BlockPool


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

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

    def block_table(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def owns(self, request_id: str) -> bool:
        return request_id in self._blocks

    def free(self, request_id: str) -> None:
        blocks = self._blocks.pop(request_id, None)
        if blocks:
            self.pool.free(blocks)
