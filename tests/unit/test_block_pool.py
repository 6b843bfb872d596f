import pytest

from tandem.core.block_pool import BlockPool
from tandem.core.kv_cache_manager import KVCacheManager, blocks_needed


def test_allocate_and_free_restore_the_pool():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a + b)) == 8 and pool.num_free == 0
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.free(a)
    assert pool.num_free == 3
    pool.free(b)
    assert pool.num_free == 8 and pool.num_used == 0


def test_failed_allocation_takes_nothing():
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(MemoryError):
        pool.allocate(2)
    assert pool.num_free == 1


def test_refcounts_keep_shared_blocks_until_last_free():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.incref(blocks)
    pool.free(blocks)
    assert pool.num_free == 2 and pool.refcount(blocks[0]) == 1
    pool.free(blocks)
    assert pool.num_free == 4


def test_double_free_is_an_error():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(ValueError):
        pool.free(blocks)
    with pytest.raises(ValueError):
        pool.incref(blocks)


def test_kv_manager_grows_per_request_and_frees():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    assert kv.allocate_slots("a", 5)  # 2 blocks
    assert len(kv.block_table("a")) == 2
    assert kv.allocate_slots("a", 8)  # still 2
    assert len(kv.block_table("a")) == 2
    assert kv.allocate_slots("a", 9)
    assert len(kv.block_table("a")) == 3
    assert not kv.allocate_slots("b", 40)  # needs 10, 7 free
    assert not kv.owns("b") and kv.num_free_blocks == 7
    kv.free("a")
    kv.free("a")  # freeing an unknown request is a no-op
    assert kv.num_free_blocks == 10


@pytest.mark.parametrize(
    ("tokens", "size", "want"), [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2)]
)
def test_blocks_needed(tokens, size, want):
    assert blocks_needed(tokens, size) == want


def test_frees_during_a_launched_step_are_parked_until_it_is_done():
    from tandem.core.kv_cache_manager import KVCacheManager

    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate_slots("a", 8) and kv.allocate_slots("b", 4)
    first = kv.step_launched()
    kv.free("a")  # freed while `first` may still write a's blocks
    assert kv.num_free_blocks == 5 and kv.num_parked_blocks == 2
    second = kv.step_launched()
    kv.free("b")
    kv.step_done(first)
    assert kv.num_free_blocks == 7 and kv.num_parked_blocks == 1
    kv.step_done(second)
    assert kv.num_free_blocks == 8 and kv.num_parked_blocks == 0
    assert kv.allocate_slots("c", 4)
    kv.free("c")  # no step on the device: straight back to the pool
    assert kv.num_free_blocks == 8
