"""KV block manager: which blocks of the paged KV pool hold which sequence's positions.

The pool (C++ `KVCache`) holds `num_blocks` blocks of `block_size` positions. A sequence owns a block table:
position p lives in block `table[p // block_size]`. This module only does the bookkeeping; the engine passes
the tables to the forward step.

Prefix caching: once a block is full and its K/V computed, it is registered under a hash of (the hash of the
block before it, its token ids), so the hash names the whole prefix up to the end of the block. A new
sequence whose prompt starts with the same tokens takes those blocks (reference count + 1) instead of
recomputing them. When the last sequence using a registered block lets go of it, the block stays in the cache
as "evictable"; allocation takes never-used or unregistered blocks first and evicts cached ones least recently
released first (the tail of a prefix before its head, since a tail is useless without its head).

Placement: a sequence's blocks should be adjacent in the pool. The pool stores each (layer, KV head)'s blocks side
by side, so attention over adjacent blocks reads one long run, which the CPU streams; over scattered blocks it reads
2 KiB pieces, each on its own page (on the Zen 5 box we measure on, 16 decodes at context 1,000 take 17 ms over
adjacent blocks, 30 over interleaved ones and 38 over shuffled ones: `bench_step.py --placement`). So a sequence takes the block after its last
one while that is free, and otherwise starts an extent: the first run of free blocks as long as it expects to
need (the engine tells it: prompt plus max_tokens, up to MAX_EXTENT blocks), whose rest is reserved for it. Other
sequences place their extents past the reservations, and take reserved blocks only when no other free block is
left. Lowest addresses first, so the pages in use stay few. Once the prefix cache fills the pool, an extent is made
of the least recently released cached blocks, evicted together.

Hashes are 128-bit BLAKE2b digests chained through the parents, so two different prefixes never share a
block in practice (a sequence must never read another's data).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence

__all__ = ["BlockManager", "block_hashes"]

_ROOT = b"realizar-kv-prefix-v1"
MAX_EXTENT = 128  # most blocks a sequence reserves ahead of itself (2,048 positions of 16)


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """The key of a full block: a digest of the parent block's key and this block's token ids."""
    h = hashlib.blake2b(parent or _ROOT, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def block_hashes(tokens: Sequence[int], block_size: int, parent: bytes | None = None) -> list[bytes]:
    """Keys of every full block of `tokens` (a trailing partial block has none)."""
    out = []
    for i in range(len(tokens) // block_size):
        parent = block_hash(parent, tokens[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class _SeqBlocks:
    __slots__ = ("blocks", "hashes", "expect", "extent")

    def __init__(self) -> None:
        self.blocks: list[int] = []   # the block table
        self.hashes: list[bytes] = []  # keys of blocks[:len(hashes)], every one full and computed
        self.expect = 0               # blocks it expects to hold in the end (where to place it)
        self.extent = (0, 0)          # blocks [start, end) reserved for it to grow into


class BlockManager:
    """Free list, per-sequence block tables, reference counts and the prefix cache of one KV pool.

    Not thread-safe: the engine's scheduler thread is its only user. Sequence ids are any hashable.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # per block, 1 or 0: unused (no table holds it, not in the prefix cache); unused and reserved by nobody
        self._unused = bytearray(b"\x01") * num_blocks
        self._open = bytearray(b"\x01") * num_blocks
        self._num_unused = num_blocks
        self._reserved: list[Hashable | None] = [None] * num_blocks  # the sequence an unused block is kept for
        self._refs = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks   # prefix-cache key of each block, if registered
        self._cached: dict[bytes, int] = {}                    # key -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, refs == 0; oldest first
        self._seqs: dict[Hashable, _SeqBlocks] = {}

    # -- pool state ---------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: unused ones plus cached ones no sequence holds."""
        return self._num_unused + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (held or evictable)."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a table needs to cover positions [0, num_tokens)."""
        return -(-num_tokens // self.block_size)

    # -- per sequence -------------------------------------------------------------------------------------

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The sequence's block table (the live list: don't modify it)."""
        return self._seqs[seq_id].blocks

    def match_prefix(self, seq_id: Hashable, tokens: Sequence[int]) -> int:
        """Start the table of a new sequence with the cached blocks of the longest cached prefix of `tokens`.

        At most len(tokens) - 1 tokens are matched: the last token must still be computed to get its logits.
        Returns the number of tokens whose K/V are now in the table (a multiple of block_size).
        """
        if seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} already has blocks")
        seq = self._seqs[seq_id] = _SeqBlocks()
        if not self.prefix_caching or len(tokens) <= 1:
            return 0
        for key in block_hashes(tokens[:len(tokens) - 1], self.block_size):
            block = self._cached.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            seq.blocks.append(block)
            seq.hashes.append(key)
        return len(seq.blocks) * self.block_size

    def allocate(self, seq_id: Hashable, num_tokens: int, expect_tokens: int = 0) -> bool:
        """Grow the sequence's table to cover positions [0, num_tokens) (creating the sequence if new).
        expect_tokens: how many positions it will probably fill in the end (where its blocks go; see above).

        Returns False, changing nothing, when the pool is short of blocks.
        """
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seqs[seq_id] = _SeqBlocks()
        seq.expect = max(seq.expect, self.blocks_for(expect_tokens))
        need = self.blocks_for(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        for _ in range(need):
            block = self._take(seq_id, seq)
            self._refs[block] = 1
            seq.blocks.append(block)
        return True

    def commit(self, seq_id: Hashable, tokens: Sequence[int], num_computed: int) -> None:
        """Register in the prefix cache the full blocks of tokens[:num_computed] (K/V written) not yet in it.

        A block whose key another block already holds (the same prefix computed twice at once) stays
        private to its sequence and is freed with it.
        """
        if not self.prefix_caching:
            return
        seq = self._seqs[seq_id]
        n_full = min(num_computed // self.block_size, len(seq.blocks))
        bs = self.block_size
        parent = seq.hashes[-1] if seq.hashes else None
        for i in range(len(seq.hashes), n_full):
            parent = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            seq.hashes.append(parent)
            block = seq.blocks[i]
            if self._key[block] is None and parent not in self._cached:
                self._key[block] = parent
                self._cached[parent] = block

    def free(self, seq_id: Hashable) -> None:
        """Release every block of the sequence (finished, cancelled or preempted); unknown ids are ignored."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        self._release(seq_id, seq)
        # tail first, so that a prefix's tail is evicted before its head
        for block in reversed(seq.blocks):
            refs = self._refs[block] - 1
            self._refs[block] = refs
            if refs > 0:
                continue
            if self._key[block] is not None:
                self._evictable[block] = None
            else:
                self._put_unused(block)

    def reset_prefix_cache(self) -> int:
        """Forget every evictable cached block (held blocks stay); returns how many were dropped."""
        n = len(self._evictable)
        while self._evictable:
            self._put_unused(self._evict())
        return n

    # -- internals ----------------------------------------------------------------------------------------

    def _take(self, seq_id: Hashable, seq: _SeqBlocks) -> int:
        """A block for the end of seq's table: the next one in the pool, else the start of a new extent, else
        any unused block, else the least recently released cached one."""
        nxt = seq.blocks[-1] + 1 if seq.blocks else -1
        if 0 <= nxt < self.num_blocks and self._unused[nxt] and self._reserved[nxt] in (None, seq_id):
            return self._claim(nxt)
        self._release(seq_id, seq)  # the rest of its old extent: it moves on
        want = max(1, min(seq.expect - len(seq.blocks), MAX_EXTENT))
        # short of unused blocks: the least recently released cached ones make up the extent, evicted together
        # (blocks released together, one sequence's, lie side by side, so they form a run rather than being
        # handed out one by one, tail first, in descending order)
        for _ in range(min(want - self._num_unused, len(self._evictable))):
            self._put_unused(self._evict())
        while want > 1 and (start := self._open.find(b"\x01" * want)) < 0:
            want //= 2  # no run that long: the first of the longest ones
        if want == 1 and (start := self._open.find(1)) < 0:
            return self._claim(self._unused.find(1))  # every unused block is reserved: take one anyway
        if want > 1:
            end = start + want
            self._reserved[start + 1:end] = [seq_id] * (want - 1)
            self._open[start + 1:end] = bytes(want - 1)
            seq.extent = (start + 1, end)
        return self._claim(start)

    def _claim(self, block: int) -> int:
        self._unused[block] = 0
        self._open[block] = 0
        self._reserved[block] = None  # (another sequence's extent, if it was reserved: that one moves on)
        self._num_unused -= 1
        return block

    def _put_unused(self, block: int) -> None:
        self._unused[block] = 1
        self._open[block] = 1
        self._num_unused += 1

    def _release(self, seq_id: Hashable, seq: _SeqBlocks) -> None:
        """The blocks of seq's extent it has not taken are open again."""
        start, end = seq.extent
        for block in range(start, end):
            if self._reserved[block] is not None and self._reserved[block] == seq_id:
                self._reserved[block] = None
                self._open[block] = 1
        seq.extent = (0, 0)

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        key = self._key[block]
        self._key[block] = None
        if key is not None and self._cached.get(key) == block:
            del self._cached[key]
        return block

    def check(self) -> None:
        """Assert the invariants (tests): every block is free, evictable or held, with matching counts."""
        refs = [0] * self.num_blocks
        for seq in self._seqs.values():
            for b in seq.blocks:
                refs[b] += 1
            assert len(seq.hashes) <= len(seq.blocks)
        assert refs == self._refs, "reference counts disagree with the block tables"
        free = {b for b in range(self.num_blocks) if self._unused[b]}
        assert len(free) == self._num_unused, "the unused count disagrees with the unused blocks"
        for b in range(self.num_blocks):
            owner = self._reserved[b]
            assert self._open[b] == (b in free and owner is None), f"block {b}: open flag wrong"
            if owner is not None:
                assert b in free, f"held block {b} is reserved"
                s, e = self._seqs[owner].extent
                assert s <= b < e, f"block {b} is reserved outside its sequence's extent"
        evictable = set(self._evictable)
        assert not free & evictable
        for b in range(self.num_blocks):
            if refs[b] == 0:
                assert (b in free) != (b in evictable), f"block {b} is unheld but neither free nor evictable"
                assert (b in evictable) == (self._key[b] is not None)
            else:
                assert b not in free and b not in evictable, f"held block {b} is also free"
        for key, b in self._cached.items():
            assert self._key[b] == key
        assert sum(k is not None for k in self._key) == len(self._cached)
