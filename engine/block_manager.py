"""Paged KV cache bookkeeping: blocks, block tables, reference counts, prefix cache.

A full block is named by a hash chain over the token ids it holds and all before it, so two
sequences with the same prefix map the same hashes to the same physical blocks. A block whose
reference count drops to zero goes back to the free queue but keeps its hash and contents:
it can still be hit until allocation evicts it, least recently freed first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from pagoda.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


def lora_salt(lora_id: int) -> bytes:
    return b"" if lora_id < 0 else b"lora%d" % lora_id


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the front is taken first. Blocks holding nothing
        # reusable go to the front, cached ones to the back.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_queue)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict
                del self.cached[block.hash]
                block.hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)

    def take_cached_prefix(self, seq: Sequence) -> None:
        """Give a new sequence the cached blocks of its longest known prefix.

        At least one token is always left to compute: its logits are what we sample from.
        A sequence that wants prompt logprobs computes its whole prompt.
        """
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return
        self._hash_full_blocks(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for block_hash in seq.block_hashes[:max_blocks]:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        if seq.first_scheduled_time is None:  # a preempted sequence's hits are its own work
            seq.num_cached_tokens = seq.num_computed_tokens

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the blocks that a step has just filled, so that others can hit them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_hashed_blocks:
            return
        self._hash_full_blocks(seq)
        for i in range(seq.num_hashed_blocks, num_full):
            block_hash = seq.block_hashes[i]
            if block_hash not in self.cached:  # else another sequence computed it too
                self.cached[block_hash] = seq.block_table[i]
                self.blocks[seq.block_table[i]].hash = block_hash
        seq.num_hashed_blocks = num_full

    def free(self, seq: Sequence) -> None:
        # Reversed, so that a sequence's tail blocks (the least shareable) are evicted first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_table.clear()
        seq.num_hashed_blocks = 0

    def _hash_full_blocks(self, seq: Sequence) -> None:
        size = self.block_size
        for i in range(len(seq.block_hashes), seq.num_tokens // size):
            # a LoRA adapter's KV differs from the base model's: its chain starts elsewhere
            parent = seq.block_hashes[i - 1] if i else lora_salt(seq.lora_id)
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * size : (i + 1) * size]))
