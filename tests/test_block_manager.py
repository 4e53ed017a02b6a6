"""KV block bookkeeping: reference counts, prefix hits, LRU eviction of cached free blocks."""

from pagoda.engine.block_manager import BlockManager
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.sequence import Sequence

BLOCK = 4


def seq(tokens: list[int]) -> Sequence:
    return Sequence(
        request_id="r",
        index=0,
        token_ids=list(tokens),
        num_prompt_tokens=len(tokens),
        params=SamplingParams(),
        max_tokens=16,
        eos_token_ids=frozenset(),
    )


def compute_all(manager: BlockManager, s: Sequence) -> None:
    manager.allocate(s, s.num_tokens - s.num_computed_tokens)
    s.num_computed_tokens = s.num_tokens
    manager.cache_computed_blocks(s)


def test_shared_prefix_is_found_and_refcounted():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    a = seq(list(range(10)))  # 2 full blocks + 2 tokens
    compute_all(manager, a)
    assert len(a.block_table) == 3 and manager.num_free_blocks == 5

    b = seq(list(range(8)) + [99, 98, 97])  # same first two blocks
    manager.take_cached_prefix(b)
    assert b.block_table == a.block_table[:2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [manager.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]

    manager.free(a)
    assert [manager.blocks[i].ref_count for i in b.block_table] == [1, 1]
    manager.free(b)
    assert manager.num_free_blocks == 8


def test_last_token_is_always_computed():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    compute_all(manager, seq(list(range(8))))
    again = seq(list(range(8)))  # fully cached: the last block is computed again
    manager.take_cached_prefix(again)
    assert again.num_computed_tokens == 4


def test_prefix_differing_early_misses():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    compute_all(manager, seq(list(range(12))))
    other = seq([7] + list(range(1, 12)))  # first block differs, so the chain differs
    manager.take_cached_prefix(other)
    assert other.block_table == [] and other.num_computed_tokens == 0


def test_freed_cached_blocks_survive_until_evicted_lru():
    manager = BlockManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    old = seq(list(range(100, 108)))
    new = seq(list(range(200, 208)))
    compute_all(manager, old)
    manager.free(old)
    compute_all(manager, new)
    manager.free(new)
    assert manager.num_free_blocks == 4 and len(manager.cached) == 4

    # one fresh block evicts the least recently freed cached block: old's tail
    filler = seq([1, 2, 3])
    compute_all(manager, filler)
    hit_old = seq(list(range(100, 108)) + [5])
    manager.take_cached_prefix(hit_old)
    assert hit_old.num_computed_tokens == 4  # head survived, tail evicted
    hit_new = seq(list(range(200, 208)) + [5])
    manager.take_cached_prefix(hit_new)
    assert hit_new.num_computed_tokens == 8


def test_uncached_free_blocks_are_used_before_cached_ones():
    manager = BlockManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    cached = seq(list(range(8)))
    compute_all(manager, cached)
    manager.free(cached)
    partial = seq([1, 2])  # a block that never fills: no hash
    compute_all(manager, partial)
    manager.free(partial)
    fresh = seq([9, 9])
    compute_all(manager, fresh)
    assert len(manager.cached) == 2  # nothing evicted


def test_without_prefix_caching_nothing_is_shared():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    compute_all(manager, seq(list(range(8))))
    again = seq(list(range(8)) + [1])
    manager.take_cached_prefix(again)
    assert again.num_computed_tokens == 0 and not manager.cached
