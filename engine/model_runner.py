"""Turns a scheduled batch into one forward pass over a flat token batch, then samples."""

from __future__ import annotations

import math

import torch
from torch import nn

from pagoda.engine.cpu_graphs import ONCE_MAX_TOKENS, CpuGraphs
from pagoda.engine.cuda_graphs import DecodeGraphs
from pagoda.engine.sampler import sample, token_logprobs
from pagoda.engine.sampling_tensors import SamplingTensors, TokenCounts
from pagoda.engine.scheduler import ScheduledBatch
from pagoda.engine.sequence import TokenLogprobs
from pagoda.engine.staging import HostToDevice
from pagoda.kernels import cpu_native
from pagoda.kernels.attention import AttentionMetadata

# logits per slice of prompt logprobs: 2^26 fp32 values are 256 MiB (512 rows at 128k vocab)
PROMPT_LOGPROBS_ELEMENTS = 1 << 26

DecodeGraphLimits = tuple[int, int]  # (max_model_len, max_num_seqs) for the captured sizes
# prompt logprobs to compute: (batch entry, first row of the step's hidden states, first prompt
# position, rows)
PromptChunk = tuple[int, int, int, int]


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int,
        decode_graphs: DecodeGraphLimits | None = None,
    ) -> None:
        self.model = model
        self.leader = None  # rank 0 of tensor parallelism: a distributed.Leader
        self.block_size = block_size
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        # one staging buffer per kind of copy, so that neither waits on the other's last copy
        self.staging = HostToDevice(device)
        self.sampling_staging = HostToDevice(device)
        self.token_counts = TokenCounts(device)
        attn = model.layers[0].self_attn
        # one spare block past those the block manager owns: the CUDA graphs' padding rows
        cuda_graphs = decode_graphs is not None and device.type == "cuda"
        spare = 1 if cuda_graphs else 0
        shape = (num_blocks + spare, block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_caches = _kv_caches(shape, len(model.layers), dtype, device)
        self.graphs: DecodeGraphs | CpuGraphs | None = None
        if cuda_graphs:
            self.graphs = DecodeGraphs(
                model, self.kv_caches, num_blocks, block_size, *decode_graphs
            )
            self.graphs.capture()
        elif decode_graphs is not None:  # captured as batch sizes come
            self.graphs = CpuGraphs(model, self.kv_caches, block_size, *decode_graphs)

    @staticmethod
    def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
        attn = model.layers[0].self_attn
        per_token = 2 * attn.num_kv_heads * attn.head_dim * dtype.itemsize
        return per_token * block_size * len(model.layers)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> dict[int, tuple[int, TokenLogprobs | None]]:
        """Compute the batch's new tokens; return the sampled token of each entry that
        reached its last token, keyed by its index in the batch. Prompt logprobs, where
        asked for, are appended to their sequences."""
        host, sample_rows, prompt_chunks = self._host_inputs(batch)
        if self.leader is not None:  # tensor parallelism: the other ranks run the same pass
            self.leader.send(host)
        input_ids, positions, meta, logit_positions = self._device_inputs(host)
        seqs = [batch.seqs[i] for i in sample_rows]
        vocab = self.model.config.vocab_size
        # sent before the forward pass, so that the copy overlaps it
        tensors = SamplingTensors.build(seqs, vocab, self.token_counts, self.sampling_staging)
        hidden = self._forward(input_ids, positions, meta)
        if any(seq.params.prompt_logprobs is not None for seq in batch.seqs):
            self._record_prompt_logprobs(batch, hidden, prompt_chunks)
        if not sample_rows:
            return {}
        logits = self.model.compute_logits(hidden[logit_positions]).float()
        return dict(zip(sample_rows, sample(logits, seqs, self.generator, tensors)))

    @torch.inference_mode()
    def follow(self, host: list) -> None:
        """A tensor-parallel rank other than 0: rank 0's forward pass on this rank's shard."""
        input_ids, positions, meta, logit_positions = self._device_inputs(host)
        hidden = self._forward(input_ids, positions, meta)
        for _, row, _, count in host[-1]:  # rank 0's prompt logprobs gather these logits
            self.model.compute_logits(hidden[row : row + count])
        if len(logit_positions):
            self.model.compute_logits(hidden[logit_positions])

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_seqs = len(meta.seq_lens_host)
        lora = getattr(self.model, "lora", None)
        if lora is not None and lora.active and isinstance(self.graphs, CpuGraphs):
            # a CPU graph replays the C++ kernels alone, not the LoRA updates (torch): it runs
            # the steps without an adapter's token, those with one run eagerly
            return self.model(input_ids, positions, self.kv_caches, meta)
        if self.graphs and meta.max_query_len == 1 and num_seqs <= self.graphs.max_batch:
            return self.graphs.run(input_ids, positions, meta)
        if isinstance(self.graphs, CpuGraphs) and len(input_ids) <= ONCE_MAX_TOKENS:
            return self.graphs.run_once(input_ids, positions, meta)
        return self.model(input_ids, positions, self.kv_caches, meta)

    def _record_prompt_logprobs(
        self, batch: ScheduledBatch, hidden: torch.Tensor, chunks: list[PromptChunk]
    ) -> None:
        for seq in batch.seqs:
            if seq.params.prompt_logprobs is not None and seq.num_computed_tokens == 0:
                seq.prompt_logprobs.append(None)  # the first prompt token has none
        for entry, row, first, count in chunks:
            seq = batch.seqs[entry]
            # the logits at prompt position p score the prompt's token p + 1
            targets = torch.tensor(seq.token_ids[first + 1 : first + 1 + count])
            logits = self.model.compute_logits(hidden[row : row + count])
            k = seq.params.prompt_logprobs
            seq.prompt_logprobs += token_logprobs(logits, targets.to(self.device), [k] * count)

    def _prompt_chunks(self, batch: ScheduledBatch) -> list[PromptChunk]:
        """The prompt rows of this step whose logprobs are asked for, in slices of [rows x
        vocab] logits at a time: a whole 8k chunk at a 128k vocabulary is 4 GB per fp32 copy,
        and log-softmax, ranks and top-k make several."""
        rows = max(1, PROMPT_LOGPROBS_ELEMENTS // self.model.config.vocab_size)
        chunks: list[PromptChunk] = []
        row = 0
        for entry, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.params.prompt_logprobs is not None:
                first = seq.num_computed_tokens
                # positions whose next token is still a prompt token
                count = min(first + num_new, seq.num_prompt_tokens - 1) - first
                for lo in range(0, count, rows):
                    chunks.append((entry, row + lo, first + lo, min(rows, count - lo)))
            row += num_new
        return chunks

    def _host_inputs(self, batch: ScheduledBatch) -> tuple[list, list[int], list[PromptChunk]]:
        """The step's model inputs as plain lists (what rank 0 sends the other ranks), the
        batch entries that sample, and the prompt logprobs' slices of the hidden states (sent
        too: the other ranks take part in gathering their logits)."""
        size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        lora_slots: list[int] = []
        seq_lens: list[int] = []
        query_start = [0]
        sample_rows: list[int] = []
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // size] * size + p % size for p in range(start, end)]
            lora_slots += [seq.lora_slot] * num_new
            seq_lens.append(end)
            query_start.append(query_start[-1] + num_new)
            if batch.samples(i):
                sample_rows.append(i)
        width = max(len(s.block_table) for s in batch.seqs)
        flat_tables = [
            b for s in batch.seqs for b in s.block_table + [0] * (width - len(s.block_table))
        ]
        logit_positions = [query_start[i + 1] - 1 for i in sample_rows]
        lists = [input_ids, positions, slots, logit_positions, query_start, seq_lens, flat_tables]
        if getattr(self.model, "lora", None) is not None:
            lists.append(lora_slots)
        chunks = self._prompt_chunks(batch)
        return [lists, list(batch.num_new_tokens), width, chunks], sample_rows, chunks

    def _device_inputs(self, host: list):
        lists, query_lens, width, _ = host
        seq_lens = lists[5]
        tensors, _ = self.staging.send(lists)
        ids, pos, slot_mapping, logit_rows, starts, lens, tables = tensors[:7]
        if len(lists) > 7:  # the tokens' LoRA slots
            self.model.lora.set_step(tensors[7], set(lists[7]))
        meta = AttentionMetadata(
            query_start_loc=starts.int(),
            seq_lens=lens.int(),
            block_tables=tables.int().view(len(seq_lens), width),
            slot_mapping=slot_mapping,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
        )
        return ids, pos, meta, logit_rows


def _kv_caches(
    shape: tuple[int, ...], layers: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's K and V caches. Zeroed, not empty: masked-out cache slots must hold finite
    values (0 * NaN = NaN); and written now, so that the memory is the process's from the start
    rather than met by the OOM killer mid-request. On a CPU they lie on 2 MiB pages
    (`cpu_native.huge_pages`): decode attention reads every sequence's blocks each step."""
    if device.type != "cpu":
        return [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(layers)
        ]
    size = math.prod(shape) * dtype.itemsize
    block = cpu_native.huge_pages(2 * layers * size)
    block.zero_()
    caches = block.view(dtype).view(layers, 2, *shape)
    return [(caches[i, 0], caches[i, 1]) for i in range(layers)]
