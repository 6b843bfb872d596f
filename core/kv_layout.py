"""What a model's KV cache looks like: the one description every component reads.

The model declares it (ModelConfig.kv_layout); the engine's KVCache allocates from it,
the runner and attention read their views from that cache, pack/unpack and every
transport check frames against it, workers publish it in the registry and refuse a
peer whose layout differs. Nothing else spells the shape out.

Every layer's cache is one tensor `[planes, num_blocks, block_size, heads, dim]`:

- kind "kv": planes 2 (K and V), heads = the KV heads, dim = head_dim (MHA / GQA);
- kind "latent": planes 1, heads 1, dim = the compressed latent width (MLA keeps one
  latent vector per token, keys and values are projected out of it).

All layers share one layout, so the whole cache is one tensor `[layers, planes, ...]`
and a transfer moves a request's blocks as `[layers, planes, n, block_size, heads,
dim]`. The dtype is a torch dtype name ("bfloat16", "float8_e4m3fn", ...), so an FP8
cache changes only this description, never a transport.
"""

from __future__ import annotations

import msgspec

# Bytes per element of the dtypes a KV cache may have (the names torch uses).
KV_DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}
PLANES_BY_KIND = {"kv": 2, "latent": 1}
# Planes a cache tensor may have, whatever the kind (for shape checks on raw frames).
KV_PLANES = frozenset(PLANES_BY_KIND.values())


class KVLayout(msgspec.Struct, frozen=True):
    model: str
    dtype: str  # torch dtype name without prefix: "float32", "bfloat16", ...
    block_size: int
    num_layers: int
    num_kv_heads: int  # 1 for a latent cache
    head_dim: int  # the latent width for a latent cache
    kind: str = "kv"  # "kv" | "latent"

    def __post_init__(self) -> None:
        if self.kind not in PLANES_BY_KIND:
            raise ValueError(f"KV cache kind must be one of {sorted(PLANES_BY_KIND)}")
        if self.dtype not in KV_DTYPE_BYTES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}")
        if min(self.block_size, self.num_layers, self.num_kv_heads, self.head_dim) < 1:
            raise ValueError("KV layout sizes must be positive")
        if self.kind == "latent" and self.num_kv_heads != 1:
            raise ValueError("a latent cache has one head")

    @property
    def planes(self) -> int:
        return PLANES_BY_KIND[self.kind]

    def layer_shape(self, num_blocks: int) -> tuple[int, ...]:
        """One layer's cache (or one layer of a packed transfer) for `num_blocks`."""
        return (self.planes, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The whole cache, every layer: also the shape of `num_blocks` packed."""
        return (self.num_layers, *self.layer_shape(num_blocks))

    @property
    def bytes_per_token(self) -> int:
        elems = self.num_layers * self.planes * self.num_kv_heads * self.head_dim
        return elems * KV_DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def cache_salt(self, weights: str = "") -> str:
        """Everything besides the tokens that decides a block's contents: the model
        (and `weights`, e.g. the dummy-weight seed), the layout and the dtype. Prefix
        hashes start from it, so workers agree on them only when their KV agrees."""
        return "|".join([weights, *(str(getattr(self, f)) for f in self.__struct_fields__)])

    def mismatch(self, other: KVLayout) -> str | None:
        """Why two workers cannot exchange KV blocks, or None when they can."""
        for name in self.__struct_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"KV layout differs in {name}: {mine!r} != {theirs!r}"
        return None
