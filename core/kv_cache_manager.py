"""Which KV blocks each request owns.

The scheduler asks for room (`allocate_slots`) and gets yes or no; block ids themselves
only matter to the model runner (`block_table`) and to KV transfer. Requests are keyed
by request id so that a decode worker can reserve blocks for a request before the
request itself arrives.
"""

from __future__ import annotations

from collections import deque

from tandem.core.block_pool import BlockPool


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[int]] = {}
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

    @property
    def num_parked_blocks(self) -> int:
        return sum(len(blocks) for _, blocks in self._parked)

    def free(self, request_id: str) -> None:
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
