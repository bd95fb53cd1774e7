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
    __slots__ = ("blocks", "hashes")

    def __init__(self) -> None:
        self.blocks: list[int] = []   # the block table
        self.hashes: list[bytes] = []  # keys of blocks[:len(hashes)], every one full and computed


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
        # LIFO: the most recently freed block is reused first, so the pages in use stay few and warm
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks   # prefix-cache key of each block, if registered
        self._cached: dict[bytes, int] = {}                    # key -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, refs == 0; oldest first
        self._seqs: dict[Hashable, _SeqBlocks] = {}

    # -- pool state ---------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: unused ones plus cached ones no sequence holds."""
        return len(self._free) + len(self._evictable)

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

    def allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Grow the sequence's table to cover positions [0, num_tokens) (creating the sequence if new).

        Returns False, changing nothing, when the pool is short of blocks.
        """
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seqs[seq_id] = _SeqBlocks()
        need = self.blocks_for(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        for _ in range(need):
            block = self._take()
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
        # tail first, so that a prefix's tail is evicted before its head
        for block in reversed(seq.blocks):
            refs = self._refs[block] - 1
            self._refs[block] = refs
            if refs > 0:
                continue
            if self._key[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def reset_prefix_cache(self) -> int:
        """Forget every evictable cached block (held blocks stay); returns how many were dropped."""
        n = len(self._evictable)
        while self._evictable:
            self._free.append(self._evict())
        return n

    # -- internals ----------------------------------------------------------------------------------------

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        return self._evict()

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
        free = set(self._free)
        assert len(free) == len(self._free), "a block is twice in the free list"
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
