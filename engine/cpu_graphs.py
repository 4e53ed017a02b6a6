"""CPU graphs: a forward pass captured as the list of its C++ kernel calls
(`kernels.cpu_native.call`), then run as that list alone.

At batch 1 the kernels of SmolLM2-135M take about 11 ms of a 15 ms step; most of the rest is the
Python around them (wrappers, modules, views), 330 kernel calls a step. A replay calls the same
functions with the same arguments, whose pointers lead into:

- static inputs, which each step fills first: the tokens' embeddings and rotary rows (the
  model's `embed` runs outside the graph), slots, block tables and sequence lengths;
- two scratch arenas for every output: decoder layer i allocates from arena i % 2 and reads
  layer i - 1's outputs from the other, which layer i + 1 no longer needs.

A decode graph's calls run from C (`kernels/csrc/replay.cpp`), one ctypes call for the whole
step: called from Python one by one, they took 0.9-1.1 ms more of a batch-1 step (SmolLM2-135M,
2-core EPYC: 20.2 against 19.0 ms in fp32, 12.2 against 11.3 with bf16 weights, medians of 30
alternated steps), as no weights stream between them.

Decode steps: one graph per exact batch size (no padding rows), captured on the second decode
step of that size (a size seen once, as load comes and goes, is not worth the capture's cost:
that step run eagerly under a guard, about 1.4x an eager step). All graphs share the arenas,
sized at the first capture for the largest batch (a layer's buffers grow with the batch's rows),
and grown, dropping the graphs, should a batch need more. The kernels' thread count is one of
the recorded arguments: when the thread governor (`engine/cpu_threads.py`) changes it, the
graphs are dropped too. A forward pass that does arithmetic in torch (a kernel falling back to
its torch reference, a layer with no C++ kernel) cannot be replayed: its capture stops at the
first such op and decode steps stay eager. Where that op comes from the batch's size alone (bf16
linears on AVX512-BF16 without AMX hand batches past 4 rows to oneDNN), only decode steps of
that size stay eager.

Other steps (prefill chunks, alone or among decodes) of up to ONCE_MAX_TOKENS tokens are
graphs used once (`run_once`). Run eagerly, each kernel's Python wrapper runs right after a
kernel that evicted what that Python reads, and costs several times what it costs warm (a
torch.empty: 13-15 us against 0.6): about 14 ms of the forward pass of 32 decodes and two
130-token prompts (SmolLM2-135M, 2 cores). Recorded first, its Python runs warm (about 6 ms),
and then the calls back to back: that forward pass took 78.6 ms against 93.6 eagerly (medians
of 10 alternated). A recording runs no kernel, so nothing its Python reads may come from one:
the guard against torch arithmetic (`_ViewsOnly`, about 7 ms a step of its own) checks
the first recording of each token count and context class (what the CPU kernels' Python does
in torch depends on the model, its dtypes and layouts, the token count through the linears'
row limits, and whether a prefill's context is past attention_cpu.LONG_PREFILL, where torch
takes the rest of it); later recordings of the same class run unguarded.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pagoda.kernels import cpu_native
from pagoda.kernels.attention import AttentionMetadata
from pagoda.kernels.attention_cpu import LONG_PREFILL

logger = logging.getLogger(__name__)

aten = torch.ops.aten
# ops that only make a new view of memory: free to leave out of a replay
VIEW_OPS = {
    aten.view,
    aten._unsafe_view,
    aten._reshape_alias,
    aten.alias,
    aten.as_strided,
    aten.detach,
    aten.slice,
    aten.select,
    aten.split,
    aten.split_with_sizes,
    aten.squeeze,
    aten.unsqueeze,
    aten.t,
    aten.transpose,
    aten.permute,
}
# ops that make a view where they can and copy otherwise
VIEW_OR_COPY_OPS = {aten.reshape, aten.flatten, aten.contiguous}
ALIGN = 16  # floats: every buffer starts on a 64-byte line
# the most tokens of a step that is not decode-only run as a graph used once (the arenas then
# hold its outputs: 50 MB for SmolLM2-135M at 512); past that the kernels dwarf the Python
ONCE_MAX_TOKENS = 512


class NotCapturable(Exception):
    pass


class ArenaFull(Exception):
    def __init__(self, needed: int) -> None:
        super().__init__(f"the arena needs {needed} floats")
        self.needed = needed


class _ViewsOnly(TorchDispatchMode):
    """Refuses every torch op that computes: a replay would skip it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket
        if op not in VIEW_OPS and op not in VIEW_OR_COPY_OPS:
            raise NotCapturable(f"{func} runs in torch, outside the C++ kernels")
        out = func(*args, **(kwargs or {}))
        if op in VIEW_OR_COPY_OPS and not _same_storage(out, args[0]):
            raise NotCapturable(f"{func} copies its input")
        return out


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


REPLAY = "replay"
REPLAY_SIGNATURES: cpu_native.Signatures = {
    "pagoda_replay": (None, [cpu_native.PTR, cpu_native.I32]),
    "pagoda_replay_timed": (None, [cpu_native.PTR, cpu_native.I32, cpu_native.PTR]),
    "pagoda_replay_ints": (cpu_native.I32, []),
    "pagoda_replay_floats": (cpu_native.I32, []),
}


# the argument types replay.cpp passes in integer registers (with F32 in float ones): a double
# or a struct would need a convention of its own, and the kernels take no other type
INTEGER_KINDS = (cpu_native.PTR, cpu_native.I64, cpu_native.I32)


def packed_calls(calls: list[tuple[ctypes._CFuncPtr, tuple]]) -> ctypes.Array | None:
    """`calls` as `csrc/replay.cpp`'s array of Call, which it runs in one ctypes call; None
    where it does not build, or a kernel takes an argument of another type or more of a class
    than it passes."""
    lib = cpu_native.load(REPLAY, REPLAY_SIGNATURES)
    if lib is None:
        return None
    most_ints, most_floats = lib.pagoda_replay_ints(), lib.pagoda_replay_floats()

    class Call(ctypes.Structure):
        _fields_ = [
            ("function", ctypes.c_void_p),
            ("ints", ctypes.c_int64 * most_ints),
            ("floats", ctypes.c_float * most_floats),
        ]

    packed = (Call * len(calls))()
    for entry, (function, args) in zip(packed, calls):
        kinds = getattr(function, "argtypes", None)  # None: a wrapper (benchmarks time calls)
        if kinds is None:
            return None
        ints, floats = [], []
        for arg, kind in zip(args, kinds):
            if kind is cpu_native.F32:
                floats.append(arg)
            elif kind in INTEGER_KINDS:
                ints.append(arg or 0)
            else:
                return None
        if len(ints) > most_ints or len(floats) > most_floats:
            return None
        entry.function = ctypes.cast(function, ctypes.c_void_p).value
        entry.ints[: len(ints)] = ints
        entry.floats[: len(floats)] = floats
    return packed


@dataclass(slots=True)
class Graph:
    calls: list[tuple[ctypes._CFuncPtr, tuple]]
    hidden: torch.Tensor  # the replay's output, in an arena
    packed: ctypes.Array | None = None  # `calls` for replay.cpp, where it builds

    def replay(self) -> torch.Tensor:
        if self.packed is None:
            for function, args in self.calls:
                function(*args)
        else:
            cpu_native.load(REPLAY).pagoda_replay(self.packed, len(self.packed))
        return self.hidden


class _Capture:
    """The `cpu_native.Recorder` of one capture."""

    def __init__(self, arenas: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.arenas = arenas
        self.arena = arenas[0]
        self.offset = 0
        self.calls: list[tuple[ctypes._CFuncPtr, tuple]] = []

    def layer_hook(self, index: int):
        """A forward pre-hook for decoder layer `index`: its outputs go to arena index % 2."""

        def enter(*_) -> None:
            self.arena, self.offset = self.arenas[index % 2], 0

        return enter

    def record(self, function: ctypes._CFuncPtr, args: tuple) -> None:
        self.calls.append((function, args))

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        end = self.offset + math.prod(shape)
        if end > self.arena.numel():
            raise ArenaFull(end)
        buffer = self.arena[self.offset : end].view(shape)
        self.offset = -(-end // ALIGN) * ALIGN
        return buffer


class CpuGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_batch = max_num_seqs
        blocks_per_seq = -(-max_model_len // block_size)
        self.slot_mapping = torch.zeros(max_num_seqs, dtype=torch.long)
        self.seq_lens = torch.ones(max_num_seqs, dtype=torch.int32)
        self.query_start_loc = torch.arange(max_num_seqs + 1, dtype=torch.int32)
        self.block_tables = torch.zeros(max_num_seqs, blocks_per_seq, dtype=torch.int32)
        self.inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.arenas = (torch.empty(0), torch.empty(0))
        self.graphs: dict[int, Graph] = {}
        self.seen: set[int] = set()  # batch sizes stepped once, not captured yet
        self.threads = torch.get_num_threads()  # that the graphs were captured with
        self.eager_reason: str | None = None
        # the most rows every linear takes in C++ (bf16 linears on AVX512-BF16 alone: 4, then
        # oneDNN, through torch); a decode batch past it refused capture for its size alone
        self.kernel_rows = min(
            (m.kernel_rows for m in model.modules() if hasattr(m, "kernel_rows")),
            default=sys.maxsize,
        )
        self.refused: dict[int, str] = {}  # batch size -> why it runs eagerly
        # run_once: (tokens, long context) classes checked for torch arithmetic, and the
        # context classes (long or not) found to have it
        self.once_checked: set[tuple[int, bool]] = set()
        self.once_refused: set[bool] = set()

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states of a decode-only batch (one token per sequence), valid until the next
        call."""
        x, rotary = self.model.embed(input_ids, positions)
        batch = x.shape[0]
        if self.eager_reason is not None or batch in self.refused:
            return self.model.decode(x, rotary, self.kv_caches, meta)
        x, rotary, static_meta = self._fill(x, rotary, meta)
        if torch.get_num_threads() != self.threads:
            self.graphs.clear()
            self.threads = torch.get_num_threads()
        graph = self.graphs.get(batch)
        if graph is not None:
            return graph.replay()
        if batch not in self.seen:
            self.seen.add(batch)
            return self.model.decode(x, rotary, self.kv_caches, static_meta)
        try:
            graph = self._capture(x, rotary, static_meta)
        except NotCapturable as e:
            if batch > self.kernel_rows:
                self.refused[batch] = str(e)
                logger.info("decode steps of %d sequences run eagerly: %s", batch, e)
            else:
                self.eager_reason = str(e)
                logger.info("decode steps run eagerly, not from CPU graphs: %s", e)
            return self.model.decode(x, rotary, self.kv_caches, static_meta)
        graph.packed = packed_calls(graph.calls)
        self.graphs[batch] = graph
        return graph.hidden

    def run_once(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states of a batch that is not decode-only, valid until the next call: its
        forward pass recorded, then its kernel calls run back to back."""
        x, rotary = self.model.embed(input_ids, positions)
        long = meta.max_seq_len > LONG_PREFILL
        if self.eager_reason is not None or long in self.once_refused:
            return self.model.decode(x, rotary, self.kv_caches, meta)
        key = (x.shape[0], long)
        try:
            graph = self._capture(x, rotary, meta, checked=key not in self.once_checked)
        except NotCapturable as e:
            self.once_refused.add(long)
            logger.info("steps with prefills run eagerly, not as graphs: %s", e)
            return self.model.decode(x, rotary, self.kv_caches, meta)
        self.once_checked.add(key)
        return graph.hidden

    def _fill(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], AttentionMetadata]:
        """Copy the step's inputs into the static buffers; their views for this batch."""
        batch = x.shape[0]
        if self.inputs is None:
            self.inputs = tuple(
                torch.empty(self.max_batch, *t.shape[1:], dtype=t.dtype) for t in (x, *rotary)
            )
        static = [buffer[:batch] for buffer in self.inputs]
        for buffer, value in zip(static, (x, *rotary)):
            buffer.copy_(value)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.seq_lens[:batch].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        self.block_tables[:batch, :width].copy_(meta.block_tables)
        static_meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch],
            slot_mapping=self.slot_mapping[:batch],
            max_query_len=1,
            max_seq_len=meta.max_seq_len,
            query_lens_host=[1] * batch,
            seq_lens_host=meta.seq_lens_host,
        )
        return static[0], (static[1], static[2]), static_meta

    def _capture(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        checked: bool = True,
    ) -> Graph:
        """Record the step (guarded by _ViewsOnly where `checked`), then run its calls. While
        the arenas are too small, grow them (for this step's rows or the largest decode batch,
        whichever is more) and record again: nothing has run yet."""
        rows = x.shape[0]
        while True:
            capture = _Capture(self.arenas)
            hooks = [
                layer.register_forward_pre_hook(capture.layer_hook(i))
                for i, layer in enumerate(self.model.layers)
            ]
            try:
                guard = _ViewsOnly() if checked else contextlib.nullcontext()
                with cpu_native.recording(capture), guard:
                    hidden = self.model.decode(x, rotary, self.kv_caches, meta)
            except ArenaFull as full:
                # `needed` is where the layer's first buffer past the end ends: a lower bound of
                # its buffers, which grow with the rows, at this batch
                most = max(rows, self.max_batch)
                largest = -(-full.needed * most // rows // ALIGN) * ALIGN
                floats = max(2 * self.arenas[0].numel(), largest)
                self.arenas = (torch.empty(floats), torch.empty(floats))
                self.graphs.clear()  # they point into the old arenas
                continue
            finally:
                for hook in hooks:
                    hook.remove()
            for function, args in capture.calls:
                function(*args)
            return Graph(capture.calls, hidden)
