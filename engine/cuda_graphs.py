"""CUDA graphs for decode steps: one captured forward per batch size, replayed with the
step's inputs copied into static buffers.

A decode step of B sequences is padded to the next captured size G >= B. The G - B padding
rows are one-token sequences living in a spare KV block that the block manager never hands
out (`pad_block`), so their cache writes and attention reads touch nothing real.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.kernels.attention import AttentionMetadata

# vLLM's choice: small sizes one by one (decode at low load is latency-bound), then steps of 8
CAPTURE_SIZES = [1, 2, 4, 8] + list(range(16, 513, 8))


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        pad_block: int,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.pad_block = pad_block
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = [s for s in CAPTURE_SIZES if s <= max_num_seqs] or [1]
        device = kv_caches[0][0].device
        largest = self.sizes[-1]
        blocks_per_seq = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((largest,), pad_block * block_size, device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full(
            (largest, blocks_per_seq), pad_block, dtype=torch.int32, device=device
        )
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _meta(self, size: int) -> AttentionMetadata:
        # max_seq_len is fixed at the model's limit: a captured kernel's launch shape
        # (e.g. its number of KV splits) cannot change between replays. The decode kernel
        # cuts each sequence's own context into those splits, so short ones lose nothing.
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_lens_host=[1] * size,
            seq_lens_host=[self.max_model_len] * size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        if getattr(self.model, "lora", None) is not None:  # the KV cache profile left its flags
            self.model.lora.for_graphs()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first, so smaller ones reuse its memory
            meta = self._meta(size)
            args = (self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
            self.model(*args)  # warm-up: compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(*args)
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states of a decode-only batch (one token per sequence)."""
        batch = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= batch)
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.slot_mapping[batch:size].fill_(self.pad_block * self.block_size)
        self.seq_lens[:batch].copy_(meta.seq_lens)
        self.seq_lens[batch:size].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:batch, :width].copy_(meta.block_tables)
        self.block_tables[batch:size, 0].fill_(self.pad_block)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:batch]
