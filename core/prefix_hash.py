"""Content hashes of full KV blocks: the identity prefix caching and routing share.

A block's hash covers its parent's hash and its own token ids, so equal hashes mean
equal token prefixes up to and including the block. The chain starts from a root that
covers a salt: everything besides the tokens that changes the KV (model, weights,
dtype, block size: see KVLayout.cache_salt) and the request's own `cache_salt`, so
tenants who must not share get disjoint chains. blake2b, not Python's hash(): the
hashes must agree across processes and restarts (workers publish them for routing).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

HASH_BYTES = 16


def root_hash(salt: str, request_salt: str = "") -> bytes:
    """The parent of a chain's first block."""
    h = hashlib.blake2b(digest_size=HASH_BYTES, person=b"tandem-kv-root")
    h.update(salt.encode())
    h.update(b"\0")
    h.update(request_salt.encode())
    return h.digest()


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=HASH_BYTES, person=b"tandem-kv-block")
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def extend_chain(
    chain: list[bytes], token_ids: Sequence[int], block_size: int, root: bytes
) -> list[bytes]:
    """Append to `chain` (the hashes of the first len(chain) blocks of `token_ids`)
    the hashes of every further full block; returns `chain`."""
    for start in range(len(chain) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = chain[-1] if chain else root
        chain.append(block_hash(parent, token_ids[start : start + block_size]))
    return chain


def prefix_hashes(
    token_ids: Sequence[int], block_size: int, salt: str, request_salt: str = ""
) -> list[bytes]:
    """The hashes of every full block of `token_ids` (what a router looks up)."""
    return extend_chain([], token_ids, block_size, root_hash(salt, request_salt))
