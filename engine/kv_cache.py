"""The engine's KV cache: the tensors its layout describes and the one owner of blocks.

`KVCache` is what the rest of the worker sees of the cache. `layout` says what it
holds (the model declared it: ModelConfig.kv_layout); `tensor` is the one allocation,
`layers` its per-layer views (what attention reads and writes); `blocks` owns every
block id (allocate, reserve for a transfer, share cached prefixes, free: see
core/kv_cache_manager.py). Workers and transports take block ids from `blocks` and
move bytes with `pack` / `unpack` / `layers`; nobody else allocates or frees blocks,
or spells out the cache's shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.core.kv_cache_manager import KVCacheManager
from tandem.core.kv_layout import KVLayout
from tandem.kvtransfer.pack import dtype_from_name, pack_blocks, unpack_blocks


class KVCache:
    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        device: torch.device | str,
        enable_prefix_caching: bool = False,
        weights_salt: str = "",
    ) -> None:
        self.layout = layout
        self.device = torch.device(device)
        # One allocation, one view per layer: a transfer backend can then reach every
        # layer's blocks through a single tensor (one IPC handle, one copy kernel).
        self.tensor = torch.zeros(
            layout.cache_shape(num_blocks), dtype=dtype_from_name(layout.dtype), device=device
        )
        self.layers: list[torch.Tensor] = list(self.tensor.unbind(0))
        self.blocks = KVCacheManager(
            num_blocks,
            layout.block_size,
            enable_prefix_caching=enable_prefix_caching,
            salt=layout.cache_salt(weights_salt),
        )

    @property
    def num_blocks(self) -> int:
        return self.blocks.pool.num_blocks

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def pack(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """`block_ids` of every layer as one `layout.cache_shape(len(block_ids))` tensor."""
        return pack_blocks(self.layers, block_ids, out=out)

    def unpack(self, block_ids: Sequence[int], packed: torch.Tensor) -> None:
        unpack_blocks(self.layers, block_ids, packed)

    def release(self) -> None:
        """Drop the tensors (the cache is unusable afterwards)."""
        self.layers = []
        self.tensor = torch.empty(0)
