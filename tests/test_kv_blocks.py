"""The KV block manager: allocation, reference counts, prefix cache and LRU eviction."""
from __future__ import annotations

import random

import pytest

from realizar.kv_blocks import BlockManager, block_hashes


def test_allocate_grows_tables_and_free_returns_blocks():
    bm = BlockManager(8, block_size=4)
    assert bm.allocate("a", 5)          # 2 blocks
    assert len(bm.block_table("a")) == 2
    assert bm.allocate("a", 8)          # still 2
    assert len(bm.block_table("a")) == 2
    assert bm.allocate("a", 9)          # 3
    assert bm.allocate("b", 16)         # 4
    assert bm.num_used == 7 and bm.num_free == 1
    assert not bm.allocate("c", 8)      # needs 2, 1 free: nothing changes
    assert bm.block_table("c") == []
    assert bm.num_free == 1
    assert set(bm.block_table("a")).isdisjoint(bm.block_table("b"))
    bm.check()
    bm.free("a")
    bm.free("b")
    bm.free("c")
    bm.free("never-seen")
    assert bm.num_free == 8 and bm.num_used == 0
    bm.check()


def test_freed_blocks_are_reused_first():
    bm = BlockManager(100, block_size=4)
    bm.allocate("a", 8)
    first = list(bm.block_table("a"))
    bm.free("a")
    bm.allocate("b", 8)
    assert sorted(bm.block_table("b")) == sorted(first)


def runs(table: list[int]) -> int:
    """How many runs of adjacent pool blocks a table is made of."""
    return 1 + sum(b != a + 1 for a, b in zip(table, table[1:], strict=False))


def test_sequences_growing_in_lockstep_each_get_adjacent_blocks():
    """Sequences that grow a block at a time side by side (a decode batch) each keep one run of adjacent blocks:
    the rest of each one's expected length is reserved for it."""
    bm = BlockManager(200, block_size=4)
    for s in range(8):
        assert bm.allocate(s, 5, expect_tokens=5 + 60)
    for n in range(6, 66):
        for s in range(8):
            assert bm.allocate(s, n)
    bm.check()
    tables = [bm.block_table(s) for s in range(8)]
    assert [runs(t) for t in tables] == [1] * 8 and [len(t) for t in tables] == [17] * 8
    # without the hint they interleave: one run per block
    plain = BlockManager(200, block_size=4)
    for n in range(5, 66):
        for s in range(8):
            plain.allocate(s, n)
    assert runs(plain.block_table(0)) == 16  # (its first two blocks came together)


def test_a_new_sequence_goes_to_the_first_gap_that_fits_it():
    bm = BlockManager(64, block_size=4)
    for s, n in enumerate([3, 10, 2, 12]):           # blocks [0,3) [3,13) [13,15) [15,27)
        bm.allocate(s, 4 * n, expect_tokens=4 * n)
    assert [bm.block_table(s)[0] for s in range(4)] == [0, 3, 13, 15]
    bm.free(1)                                       # a gap of 10 at 3
    bm.free(2)                                       # ... now 12 at 3 (beside 0's blocks)
    bm.allocate("long", 4, expect_tokens=4 * 20)     # 20 do not fit the gap: after 3's blocks
    assert bm.block_table("long") == [27]
    bm.allocate("short", 4, expect_tokens=4 * 8)     # 8 fit
    assert bm.block_table("short") == [3]
    assert bm.allocate("long", 4 * 20) and bm.allocate("short", 4 * 8)
    assert bm.block_table("long") == list(range(27, 47)) and bm.block_table("short") == list(range(3, 11))
    bm.check()


def test_reserved_blocks_are_taken_only_when_nothing_else_is_free():
    bm = BlockManager(10, block_size=1)
    bm.allocate("a", 1, expect_tokens=6)             # holds 0, reserves 1-5
    assert bm.allocate("b", 4)                       # the open blocks 6-9 first
    assert bm.block_table("b") == [6, 7, 8, 9]
    assert bm.allocate("c", 2)                       # then a's reservation, from its lowest block
    assert bm.block_table("c") == [1, 2]
    assert bm.allocate("a", 4)                       # a moves on to what is left of its extent
    assert bm.block_table("a") == [0, 3, 4, 5]
    assert bm.num_free == 0 and not bm.allocate("a", 5)
    bm.check()
    bm.free("a")
    assert bm.num_free == 4
    bm.check()


def test_a_pool_full_of_cached_blocks_gives_extents_of_evicted_neighbours():
    """Once every block is cached, a new sequence's extent is the least recently released sequence's blocks,
    evicted together, in ascending order (not handed out one at a time, tail first)."""
    bm = BlockManager(24, block_size=2)
    for s in range(3):                               # 8 blocks each: [0, 8), [8, 16), [16, 24)
        toks = [100 * s + i for i in range(16)]
        bm.allocate(s, 16, expect_tokens=16)
        bm.commit(s, toks, 16)
    for s in (1, 0, 2):                              # released in this order: 1's blocks are the oldest
        bm.free(s)
    assert bm.num_cached == 24 and bm.num_free == 24
    bm.allocate("new", 2, expect_tokens=12)          # expects 6 blocks
    assert bm.allocate("new", 12)
    assert bm.block_table("new") == [10, 11, 12, 13, 14, 15]  # 1's last 6 (a prefix's tail goes first)
    assert bm.num_cached == 18
    bm.check()
    assert bm.match_prefix("again", [i for i in range(16)] + [7]) == 16  # 0's prefix is still cached
    bm.check()


def test_prefix_hit_shares_full_blocks_only():
    bm = BlockManager(16, block_size=4)
    prompt = list(range(10))            # blocks [0..3] [4..7], partial [8, 9]
    assert bm.match_prefix("a", prompt) == 0
    assert bm.allocate("a", len(prompt))
    bm.commit("a", prompt, len(prompt))
    assert bm.num_cached == 2
    # a second sequence with the same first 9 tokens takes both full blocks
    other = prompt[:9] + [99, 98]
    assert bm.match_prefix("b", other) == 8
    assert bm.block_table("b") == bm.block_table("a")[:2]
    assert bm.allocate("b", len(other))
    assert bm.block_table("b")[2] != bm.block_table("a")[2]
    bm.check()
    # a diverging first block shares nothing, even with an equal second block
    assert bm.match_prefix("c", [7, 1, 2, 3] + prompt[4:]) == 0
    bm.check()


def test_match_leaves_the_last_token_to_compute():
    bm = BlockManager(16, block_size=4)
    prompt = list(range(8))
    bm.allocate("a", 8)
    bm.commit("a", prompt, 8)
    bm.free("a")
    assert bm.match_prefix("b", prompt) == 4     # not 8: the last token's logits are needed
    assert bm.match_prefix("c", prompt + [8]) == 8


def test_commit_registers_only_computed_blocks():
    bm = BlockManager(16, block_size=4)
    tokens = list(range(12))
    bm.allocate("a", 12)
    bm.commit("a", tokens, 6)       # one full computed block
    assert bm.num_cached == 1
    bm.commit("a", tokens, 12)
    assert bm.num_cached == 3
    bm.check()


def test_released_cached_blocks_survive_until_evicted_lru_tail_first():
    bm = BlockManager(6, block_size=2)
    a = [1, 2, 3, 4, 5, 6]          # three full blocks
    bm.allocate("a", 6)
    bm.commit("a", a, 6)
    bm.free("a")
    assert bm.num_free == 6 and bm.num_cached == 3
    bm.check()
    # the three never-used blocks go first
    assert bm.allocate("x", 6)
    assert bm.num_cached == 3
    # then the tail of a's prefix, then its middle
    assert bm.allocate("y", 2)
    assert bm.num_cached == 2
    assert bm.match_prefix("z", a + [7]) == 4
    bm.check()
    bm.free("z")
    assert bm.allocate("y", 6)
    assert bm.num_cached == 0
    assert bm.num_free == 0
    bm.check()


def test_held_cached_blocks_are_not_evicted():
    bm = BlockManager(4, block_size=2)
    a = [1, 2, 3, 4]
    bm.allocate("a", 4)
    bm.commit("a", a, 4)
    assert bm.match_prefix("b", a + [5]) == 4
    bm.free("a")                    # b still holds both
    assert bm.num_free == 2
    assert not bm.allocate("c", 6)
    assert bm.allocate("c", 4)
    assert bm.num_cached == 2
    bm.check()


def test_duplicate_prefix_computed_twice_stays_private():
    bm = BlockManager(8, block_size=2)
    tokens = [1, 2, 3, 4]
    for s in ("a", "b"):            # both computed before either committed
        bm.match_prefix(s, tokens)
        bm.allocate(s, 4)
    bm.commit("a", tokens, 4)
    bm.commit("b", tokens, 4)
    assert bm.num_cached == 2
    bm.free("b")                    # b's copies go straight back to the free list
    assert bm.num_cached == 2
    bm.check()
    assert bm.match_prefix("c", tokens + [5]) == 4
    assert bm.block_table("c") == bm.block_table("a")


def test_prefix_caching_off():
    bm = BlockManager(8, block_size=2, prefix_caching=False)
    bm.allocate("a", 4)
    bm.commit("a", [1, 2, 3, 4], 4)
    bm.free("a")
    assert bm.num_cached == 0
    assert bm.match_prefix("b", [1, 2, 3, 4, 5]) == 0


def test_reset_prefix_cache():
    bm = BlockManager(8, block_size=2)
    bm.allocate("a", 4)
    bm.commit("a", [1, 2, 3, 4], 4)
    bm.free("a")
    assert bm.reset_prefix_cache() == 2
    assert bm.num_cached == 0 and bm.num_free == 8
    bm.check()


def test_hash_chain_names_the_whole_prefix():
    h1 = block_hashes([1, 2, 3, 4], 2)
    h2 = block_hashes([9, 9, 3, 4], 2)
    assert h1[1] != h2[1]           # same block tokens, different parents
    assert block_hashes([1, 2, 3], 2) == h1[:1]
    with pytest.raises(ValueError):
        BlockManager(0)


def test_random_workload_keeps_invariants():
    rng = random.Random(0)
    bm = BlockManager(40, block_size=4)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(0, 13))] for _ in range(4)]
    live: dict[int, tuple[list[int], int]] = {}
    for step in range(3000):
        op = rng.random()
        if op < 0.3 or not live:
            sid = step
            toks = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            computed = bm.match_prefix(sid, toks)
            assert computed < len(toks) and computed % 4 == 0
            # the cached blocks hold exactly this prefix
            assert block_hashes(toks[:computed], 4) == bm._seqs[sid].hashes
            if bm.allocate(sid, len(toks), expect_tokens=len(toks) + rng.randrange(0, 30)):
                live[sid] = (toks, computed)
            else:
                bm.free(sid)
        elif op < 0.8:
            sid = rng.choice(list(live))
            toks, _ = live[sid]
            toks = toks + [rng.randrange(50)]
            if bm.allocate(sid, len(toks)):
                bm.commit(sid, toks, len(toks) - 1)
                live[sid] = (toks, len(toks) - 1)
            else:
                bm.free(sid)        # preempted
                del live[sid]
        else:
            sid = rng.choice(list(live))
            bm.free(sid)
            del live[sid]
        if step % 50 == 0:
            bm.check()
    for sid in list(live):
        bm.free(sid)
    bm.check()
    assert bm.num_used == 0 and bm.num_free == 40
