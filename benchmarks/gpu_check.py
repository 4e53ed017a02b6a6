"""GPU check: the card's copy bandwidth, the paged-decode kernel, and the engine on a
Llama-3.1-8B-shaped model with dummy weights, each beside its target. One run, one card.

Parts (all by default, in this order; `--parts` picks some):

* `copy`: a 2 GiB device-to-device copy; GB/s counts bytes read + bytes written. This is the
  roofline every other figure is measured against.
* `paged`: `kernels.attention_triton.paged_attention` in decode (one query per sequence) at
  contexts 512/4096/16384 x batch 1/32/128, Llama-3.1-8B attention shape, blocks scattered at
  random; the timed calls cycle over enough block sets to read 4x the L2 cache per cycle.
  Bytes = K + V read + q read + out written; GB/s over the copy's read+write GB/s.
* `attention`: the two launch shapes that the engine's CUDA graphs and mixed steps make, each
  against the plain case on the same data: decode of one 4k context launched as a graph
  captured for `max_model_len` 32k launches it (`max_seq_len` 32k) over the same call with
  `max_seq_len` 4k (ratio near 1: the split-KV work follows the sequence, not the launch); a
  mixed step of 256 decodes (1k context) and an 8k prefill chunk over the two run apart
  (ratio near 1: decode rows get no empty query tiles).
* `kv_blocks`: the engine's KV blocks after it profiles a step, against the count that the
  memory left once the weights are loaded would hold (`gpu_memory_utilization` x total, less
  what is in use after loading); and the peak memory of the load over the weights' size (a
  bf16 model built in fp32 and cast peaks at 2x and leaves that in torch's cache).
* `hf`: transformers `generate` on the same model shape with random weights (static,
  left-padded batches) on the first `--hf-max-seqs` sequences of the throughput workload.
  Run before the engine so that its memory is free again when the engine sizes its KV cache.
* `decode`: batch-1 decode tok/s (128-token prompt, 256 new tokens; decode steps only, timed
  through the step API after the prefill step) against the weight-streaming roofline.
* `ttft`: time to first token of a 1k-token prompt added while 31 sequences decode.
* `throughput`: 256 sequences, input and output lengths uniform in [100, 1024] (seeded),
  ignore_eos, one `LLM.generate`; output tok/s, and the ratio to transformers (also pagoda on
  transformers' subset alone).
* `moe_layer`: the fused MoE layer at Qwen3-30B-A3B's shape (hidden 2048, 128 experts of
  intermediate 768, top-8; random weights and routing), `kernels.moe_triton.fused_moe` against
  the torch reference `kernels.moe.fused_moe` on the same inputs, at 1/8/64/512/4096 tokens:
  max error over the reference's largest value, median ms of each, and the Triton layer's
  expert-weight GB/s (bytes of the experts the batch routes to, read once).
* `moe_decode`: batch-1 decode tok/s of Qwen3-30B-A3B (all 48 layers, `load_format="dummy"`)
  as `decode` times it, against the roofline of the weights a token streams (attention, router
  and embeddings-out in full, the 8 routed experts of 128 per layer). Runs after the dense
  model is freed: it needs about 61 GB.

`--smoke` runs every part at tiny shapes on CPU (torch kernels for the engine, the Triton
kernel under TRITON_INTERPRET=1) so the script can be checked without a GPU; its figures mean
nothing and no target is judged. A table goes to stdout; every figure to `OUT/gpu_check.json`,
rewritten after each part so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # The Triton kernel can only run under the interpreter on CPU, and that must be chosen
    # before triton is first imported (transformers and the engine import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from pagoda.engine import LLM, SamplingParams, loader  # noqa: E402
from pagoda.engine.config import EngineConfig  # noqa: E402
from pagoda.kernels import attention as torch_attention  # noqa: E402
from pagoda.kernels.attention import AttentionMetadata  # noqa: E402

PARTS = ("copy", "paged", "attention", "hf", "kv_blocks", "decode", "ttft", "throughput")
PARTS += ("moe_layer", "moe_decode")
MAX_REL_ERR = 2e-2  # paged decode vs the fp32 reference; bf16 output rounding alone is ~3e-3
MOE_MAX_ERR = 3e-2  # fused MoE vs the bf16 reference, over its largest value (tests: 3e-2)
TOKEN_ID_MARGIN = 100  # random prompt ids keep clear of special tokens at both vocab ends
GIB = 1 << 30

# What an H100 should reach (judged only on a GPU run).
TARGETS = {
    "decode_roofline_fraction": 0.85,  # batch-1 decode tok/s over the HBM roofline
    "paged_4k_copy_fraction": 0.75,  # paged decode GB/s at context 4096 over copy GB/s
    "throughput_ratio": 3.0,  # pagoda output tok/s over transformers'
    "ttft_ms": 150.0,  # 1k-token prompt arriving while 31 sequences decode
    "graph_decode_ratio": 1.25,  # 4k decode launched for 32k over launched for 4k, at most
    "mixed_step_ratio": 1.3,  # 256 decodes + 8k chunk in one launch over apart, at most
    "kv_blocks_fraction": 0.85,  # KV blocks over what the memory after loading would hold
    "load_peak_ratio": 1.2,  # peak allocated while loading over the weights' bytes, at most
}

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# Qwen/Qwen3-30B-A3B-Instruct-2507's config.json (the fields the engine reads)
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0},
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# the smoke run's shapes: a tiny model of each family that runs anywhere
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 16384,
    "torch_dtype": "float32",
}
TINY_LLAMA = {**LLAMA_8B, **TINY_SHAPE}
TINY_QWEN3_MOE = {
    **QWEN3_30B_A3B,
    **TINY_SHAPE,
    "moe_intermediate_size": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
}


@dataclass(frozen=True)
class Plan:
    """Every shape and count of one run."""

    device: str
    dtype: torch.dtype
    kernel_backend: str
    model_config: dict
    max_model_len: int
    copy_bytes: int
    paged_contexts: tuple[int, ...]
    paged_batches: tuple[int, ...]
    paged_heads: tuple[int, int, int]  # query heads, KV heads, head_dim
    block_size: int
    paged_rotations: int  # at least this many metadata sets cycled through (see PagedLayout)
    warmup: int
    reps: int
    decode_prompt_len: int
    decode_new_tokens: int
    num_seqs: int
    len_range: tuple[int, int]  # input and output lengths, inclusive
    hf_max_seqs: int
    hf_batch: int
    ttft_prompt_len: int
    ttft_background: int
    ttft_background_prompt_len: int
    ttft_trials: int
    moe_model_config: dict
    moe_tokens: tuple[int, ...]  # batch sizes of the MoE layer comparison


GPU_PLAN = Plan(
    device="cuda",
    dtype=torch.bfloat16,
    kernel_backend="auto",
    model_config=LLAMA_8B,
    max_model_len=4096,
    copy_bytes=2 * GIB,
    paged_contexts=(512, 4096, 16384),
    paged_batches=(1, 32, 128),
    paged_heads=(32, 8, 128),
    block_size=16,
    paged_rotations=8,
    warmup=3,
    reps=20,
    decode_prompt_len=128,
    decode_new_tokens=256,
    num_seqs=256,
    len_range=(100, 1024),
    hf_max_seqs=64,
    hf_batch=64,
    ttft_prompt_len=1024,
    ttft_background=31,
    ttft_background_prompt_len=256,
    ttft_trials=5,
    moe_model_config=QWEN3_30B_A3B,
    moe_tokens=(1, 8, 64, 512, 4096),
)

SMOKE_PLAN = replace(
    GPU_PLAN,
    device="cpu",
    dtype=torch.float32,
    kernel_backend="torch",
    model_config=TINY_LLAMA,
    max_model_len=512,
    copy_bytes=16 << 20,
    paged_contexts=(32, 100),
    paged_batches=(1, 3),
    paged_rotations=2,
    warmup=1,
    reps=3,
    decode_prompt_len=16,
    decode_new_tokens=8,
    num_seqs=8,
    len_range=(8, 32),
    hf_max_seqs=4,
    hf_batch=2,
    ttft_prompt_len=64,
    ttft_background=3,
    ttft_background_prompt_len=16,
    ttft_trials=2,
    moe_model_config=TINY_QWEN3_MOE,
    moe_tokens=(1, 5, 40),
)


@dataclass
class Report:
    """Everything measured, written out after each part."""

    path: Path
    smoke: bool
    card: dict
    plan: dict
    targets: dict = field(default_factory=lambda: dict(TARGETS))
    results: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        self.path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# -- the card and timing ----------------------------------------------------------------------


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {}
    query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.memory"
    cmd = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"]
    try:
        line = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    values = [v.strip() for v in line.splitlines()[0].split(",")] if line.strip() else []
    return dict(zip(query.split(","), values))


def card_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": version_of("triton"),
        "transformers": version_of("transformers"),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "name": torch.cuda.get_device_name(device),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / GIB, 1),
            "l2_mib": round(props.L2_cache_size / (1 << 20), 1),
            "nvidia_smi": nvidia_smi(),
        }
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Per-call times in ms: CUDA events on a GPU, the host clock elsewhere."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def free_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


# -- a. copy bandwidth ------------------------------------------------------------------------


def measure_copy(plan: Plan, device: torch.device) -> dict:
    n = plan.copy_bytes
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = time_ms(lambda: dst.copy_(src), device, plan.warmup, plan.reps)
    ms = statistics.median(times)
    assert torch.equal(dst[:4096], src[:4096])
    return {
        "bytes_copied": n,
        "median_ms": ms,
        "gbps_read_plus_write": 2 * n / ms / 1e6,
        "counting": "bytes read + bytes written (2 x size) over the median time",
    }


# -- b. paged decode --------------------------------------------------------------------------


def paged_kernel() -> Callable:
    from pagoda.kernels import attention_triton  # imported late: needs triton (interpreted on CPU)

    return attention_triton.paged_attention


def decode_metadata(
    blocks: torch.Tensor, batch: int, ctx: int, block_size: int
) -> AttentionMetadata:
    """Decode metadata for `batch` sequences of `ctx` tokens living in `blocks` (in order)."""
    device = blocks.device
    tables = blocks.view(batch, -1).to(torch.int32)
    last = ctx - 1
    slots = tables[:, last // block_size].long() * block_size + last % block_size
    return AttentionMetadata(
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=device),
        block_tables=tables,
        slot_mapping=slots,
        max_query_len=1,
        max_seq_len=ctx,
        query_lens_host=[1] * batch,
        seq_lens_host=[ctx] * batch,
    )


@dataclass(frozen=True)
class PagedLayout:
    """How one case lays its sequences over a pool of cache blocks.

    Timed calls cycle through `rotations` metadata sets so that one pass over them reads at
    least 4x the L2 cache: repeated calls then read from memory, not from the cache. Where
    that fits in 2 GiB, each set gets its own blocks (disjoint); otherwise the pool holds one
    batch's blocks, far larger than L2, and each set orders them anew. Blocks always land at
    random places in the pool."""

    blocks_per_seq: int
    rotations: int
    pool_blocks: int
    disjoint: bool


def paged_layout(plan: Plan, batch: int, ctx: int, block_bytes: int, l2: int) -> PagedLayout:
    per_seq = math.ceil(ctx / plan.block_size)
    needed = batch * per_seq
    rotations = max(plan.paged_rotations, min(256, math.ceil(4 * l2 / (needed * block_bytes))))
    disjoint = rotations * needed * block_bytes <= 2 * GIB
    pool = rotations * needed if disjoint else needed
    return PagedLayout(per_seq, rotations, pool, disjoint)


def layout_metadata(
    layout: PagedLayout, batch: int, ctx: int, block_size: int, device: torch.device
) -> list[AttentionMetadata]:
    needed = batch * layout.blocks_per_seq
    perm = torch.randperm(layout.pool_blocks, device=device)
    metas = []
    for r in range(layout.rotations):
        if layout.disjoint:
            blocks = perm[r * needed : (r + 1) * needed]
        else:
            blocks = torch.randperm(layout.pool_blocks, device=device)
        metas.append(decode_metadata(blocks, batch, ctx, block_size))
    return metas


def relative_error(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> float:
    """||out - ref|| / ||ref|| against the torch reference in fp32, over a compact fp32 copy
    of the blocks this metadata reads."""
    used = meta.block_tables.flatten().long()
    tables = torch.arange(used.numel(), dtype=torch.int32, device=used.device)
    compact = replace(meta, block_tables=tables.view_as(meta.block_tables), decode_plan=None)
    k, v = k_cache[used].float(), v_cache[used].float()
    ref = torch_attention.paged_attention(q.float(), k, v, compact, scale)
    return ((out.float() - ref).norm() / ref.norm()).item()


def time_rotations(
    calls: list[Callable[[], object]], device: torch.device, plan: Plan
) -> tuple[list[float], str]:
    """ms per call: one CUDA graph of all rotations replayed (no launch gaps), else eager."""
    if device.type == "cuda":
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for call in calls:  # warm on the side stream before capture
                    call()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                for call in calls:
                    call()
            times = time_ms(graph.replay, device, plan.warmup, plan.reps)
            return [t / len(calls) for t in times], "cuda_graph"
        except RuntimeError as err:
            print(f"  graph capture failed ({err}); timing eager calls", flush=True)

    def run_all() -> None:
        for call in calls:
            call()

    times = time_ms(run_all, device, plan.warmup, plan.reps)
    return [t / len(calls) for t in times], "eager"


def paged_case(
    plan: Plan, device: torch.device, batch: int, ctx: int, kernel: Callable, copy_gbps: float
) -> dict:
    heads, kv_heads, head_dim = plan.paged_heads
    itemsize = plan.dtype.itemsize
    block_bytes = 2 * plan.block_size * kv_heads * head_dim * itemsize  # K and V
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    layout = paged_layout(plan, batch, ctx, block_bytes, l2)
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * itemsize
    check = kv_bytes <= 512 << 20  # the fp32 reference needs ~4x the batch's K and V
    need = layout.pool_blocks * block_bytes + (4 * kv_bytes if check else 0)
    row = {"batch": batch, "context": ctx}
    free = free_memory(device)
    if free is not None and need > 0.85 * free:
        return row | {"skipped": f"needs {need / GIB:.1f} GiB, {free / GIB:.1f} GiB free"}
    shape = (layout.pool_blocks, plan.block_size, kv_heads, head_dim)
    k_cache = torch.empty(shape, dtype=plan.dtype, device=device).normal_()
    v_cache = torch.empty(shape, dtype=plan.dtype, device=device).normal_()
    scale = head_dim**-0.5
    metas = layout_metadata(layout, batch, ctx, plan.block_size, device)
    qs = [torch.randn(batch, heads, head_dim, dtype=plan.dtype, device=device) for _ in metas]
    out = kernel(qs[0], k_cache, v_cache, metas[0], scale)
    if check:
        row["rel_err_vs_torch_fp32"] = relative_error(out, qs[0], k_cache, v_cache, metas[0], scale)
    calls = [(lambda q=q, m=m: kernel(q, k_cache, v_cache, m, scale)) for q, m in zip(qs, metas)]
    times, method = time_rotations(calls, device, plan)
    qo_bytes = 2 * batch * heads * head_dim * itemsize
    ms = statistics.median(times)
    gbps = (kv_bytes + qo_bytes) / ms / 1e6
    return row | {
        "median_us": ms * 1e3,
        "bytes": kv_bytes + qo_bytes,
        "gbps": gbps,
        "copy_fraction": gbps / copy_gbps if copy_gbps else None,
        "layout": asdict(layout),
        "timing": method,
    }


def measure_paged(plan: Plan, device: torch.device, copy_gbps: float | None) -> dict:
    kernel = paged_kernel()
    rows = []
    for ctx in plan.paged_contexts:
        for batch in plan.paged_batches:
            row = paged_case(plan, device, batch, ctx, kernel, copy_gbps or 0.0)
            print(f"  paged ctx {ctx} batch {batch}: {fmt_paged(row)}", flush=True)
            rows.append(row)
            free_memory(device)
    return {
        "kernel": "kernels.attention_triton.paged_attention (decode: max_query_len 1)",
        "shape": dict(zip(("q_heads", "kv_heads", "head_dim"), plan.paged_heads))
        | {"dtype": str(plan.dtype), "block_size": plan.block_size},
        "bytes_counted": "K + V read (batch x ctx x kv_heads x head_dim x itemsize x 2) + q read "
        "+ out written; block tables and split-KV partials not counted",
        "roofline": "copy GB/s counted as bytes read + bytes written",
        "rows": rows,
    }


# -- c. attention launch shapes (graph decode, mixed step) -----------------------------------


def varlen_metadata(
    query_lens: list[int], context_lens: list[int], block_size: int, device: torch.device
) -> tuple[AttentionMetadata, int]:
    """Sequences with `context_lens[i]` cached tokens and `query_lens[i]` new ones, their
    blocks in order after one another; returns the metadata and the blocks used."""
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    per_seq = [math.ceil(n / block_size) for n in seq_lens]
    width = max(per_seq)
    tables, first = [], 0
    for n in per_seq:
        tables.append(list(range(first, first + n)) + [0] * (width - n))
        first += n
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    slots = [
        tables[i][p // block_size] * block_size + p % block_size
        for i, (c, n) in enumerate(zip(context_lens, seq_lens))
        for p in range(c, n)
    ]

    def ints(values, dtype=torch.int32):
        return torch.tensor(values, dtype=dtype, device=device)

    meta = AttentionMetadata(
        query_start_loc=ints(starts),
        seq_lens=ints(seq_lens),
        block_tables=ints(tables),
        slot_mapping=ints(slots, torch.int64),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_host=query_lens,
        seq_lens_host=seq_lens,
    )
    return meta, first


def attention_shapes(plan: Plan) -> dict:
    if plan.device == "cuda":
        return {"context": 4096, "graph_max_len": 32768, "decodes": 256, "decode_ctx": 1024,
                "chunk": 8192}  # fmt: skip
    return {"context": 256, "graph_max_len": 2048, "decodes": 8, "decode_ctx": 64, "chunk": 96}


def measure_attention(plan: Plan, device: torch.device) -> dict:
    kernel = paged_kernel()
    shapes = attention_shapes(plan)
    heads, kv_heads, head_dim = plan.paged_heads
    scale = head_dim**-0.5

    def run(metas: list[AttentionMetadata], num_blocks: int) -> tuple[float, float]:
        """Median ms of the calls on `metas` in turn (one cache), and the first output's
        relative error against the last one (same data, other launch)."""
        shape = (num_blocks, plan.block_size, kv_heads, head_dim)
        k = torch.empty(shape, dtype=plan.dtype, device=device).normal_()
        v = torch.empty(shape, dtype=plan.dtype, device=device).normal_()
        tokens = metas[0].slot_mapping.shape[0]
        q = torch.randn(tokens, heads, head_dim, dtype=plan.dtype, device=device)
        outs = [kernel(q, k, v, m, scale) for m in metas]
        err = ((outs[0].float() - outs[-1].float()).norm() / outs[-1].float().norm()).item()
        times = [
            statistics.median(time_ms(lambda m=m: kernel(q, k, v, m, scale), device,
                                      plan.warmup, plan.reps))
            for m in metas
        ]  # fmt: skip
        return times, err

    ctx = shapes["context"]
    eager, blocks = varlen_metadata([1], [ctx - 1], plan.block_size, device)
    graph = replace(eager, max_seq_len=shapes["graph_max_len"])
    (graph_ms, eager_ms), graph_err = run([graph, eager], blocks)
    free_memory(device)

    n, dctx, chunk = shapes["decodes"], shapes["decode_ctx"], shapes["chunk"]
    mixed, blocks = varlen_metadata(
        [1] * n + [chunk], [dctx - 1] * n + [0], plan.block_size, device
    )
    decode_only, _ = varlen_metadata([1] * n, [dctx - 1] * n, plan.block_size, device)
    prefill_only, _ = varlen_metadata([chunk], [0], plan.block_size, device)
    # the two apart read the same blocks as the mixed batch: decodes first, the chunk after
    prefill_only.block_tables += n * math.ceil(dctx / plan.block_size)
    prefill_only.slot_mapping += n * math.ceil(dctx / plan.block_size) * plan.block_size
    shape = (blocks, plan.block_size, kv_heads, head_dim)
    k = torch.empty(shape, dtype=plan.dtype, device=device).normal_()
    v = torch.empty(shape, dtype=plan.dtype, device=device).normal_()
    q = torch.randn(n + chunk, heads, head_dim, dtype=plan.dtype, device=device)
    mixed_out = kernel(q, k, v, mixed, scale)
    apart_out = torch.cat([kernel(q[:n], k, v, decode_only, scale),
                           kernel(q[n:], k, v, prefill_only, scale)])  # fmt: skip
    mixed_err = ((mixed_out.float() - apart_out.float()).norm() / apart_out.float().norm()).item()
    mixed_ms = statistics.median(
        time_ms(lambda: kernel(q, k, v, mixed, scale), device, plan.warmup, plan.reps)
    )

    def apart() -> None:
        kernel(q[:n], k, v, decode_only, scale)
        kernel(q[n:], k, v, prefill_only, scale)

    apart_ms = statistics.median(time_ms(apart, device, plan.warmup, plan.reps))
    free_memory(device)
    return {
        "graph_decode": {
            "context": ctx,
            "launched_for": shapes["graph_max_len"],
            "graph_ms": graph_ms,
            "eager_ms": eager_ms,
            "ratio": graph_ms / eager_ms,
            "rel_err_vs_eager": graph_err,
        },
        "mixed_step": {
            "decodes": n,
            "decode_context": dctx,
            "chunk": chunk,
            "mixed_ms": mixed_ms,
            "apart_ms": apart_ms,
            "ratio": mixed_ms / apart_ms,
            "rel_err_vs_apart": mixed_err,
        },
        "shape": dict(zip(("q_heads", "kv_heads", "head_dim"), plan.paged_heads))
        | {"dtype": str(plan.dtype)},
        "timing": "median of eager calls (CUDA events on a GPU)",
    }


# -- the model, the workload, and transformers ------------------------------------------------


def write_model_folder(config: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(TOKEN_ID_MARGIN, vocab - TOKEN_ID_MARGIN) for _ in range(n)]


def make_workload(plan: Plan, vocab: int, seed: int) -> Workload:
    rng = random.Random(seed)
    lo, hi = plan.len_range
    input_lens = [rng.randint(lo, hi) for _ in range(plan.num_seqs)]
    output_lens = [rng.randint(lo, hi) for _ in range(plan.num_seqs)]
    return Workload([random_ids(rng, n, vocab) for n in input_lens], output_lens)


def hf_generate_batch(
    model: torch.nn.Module, prompts: list[list[int]], max_new: int, device: torch.device
) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new,
        min_new_tokens=max_new,
        do_sample=False,
        pad_token_id=0,
    )


def measure_hf(plan: Plan, device: torch.device, folder: Path, work: Workload) -> dict:
    config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=plan.dtype).eval()
    model.generation_config.eos_token_id = None
    try:
        with torch.inference_mode():
            hf_generate_batch(model, work.prompts[:2], 4, device)  # warm-up
            synchronize(device)
            subset = list(range(min(plan.hf_max_seqs, len(work.prompts))))
            order = sorted(subset, key=lambda i: len(work.prompts[i]), reverse=True)
            batches = [order[i : i + plan.hf_batch] for i in range(0, len(order), plan.hf_batch)]
            generated = 0
            t0 = time.perf_counter()
            for batch in batches:
                max_new = max(work.output_lens[i] for i in batch)
                hf_generate_batch(model, [work.prompts[i] for i in batch], max_new, device)
                generated += max_new * len(batch)
            synchronize(device)
            seconds = time.perf_counter() - t0
    finally:
        del model
        free_memory(device)
    useful = sum(work.output_lens[i] for i in subset)
    return {
        "sequences": len(subset),
        "batch_size": plan.hf_batch,
        "seconds": seconds,
        "useful_output_tokens": useful,
        "generated_tokens_incl_overrun": generated,
        "output_tok_per_s": useful / seconds,
        "method": "AutoModelForCausalLM.from_config (random weights) on the device, generate in "
        "static left-padded batches sorted by input length; each batch runs to the max output "
        "length of its sequences but only each sequence's requested tokens count as output",
    }


# -- the engine -------------------------------------------------------------------------------


def make_llm(plan: Plan, folder: Path, max_num_seqs: int = 256) -> LLM:
    return LLM(
        str(folder),
        dtype=plan.dtype,
        device=plan.device,
        load_format="dummy",
        max_model_len=plan.max_model_len,
        max_num_seqs=max_num_seqs,
        kernel_backend=plan.kernel_backend,
        skip_tokenizer_init=True,
    )


def memory_in_use(device: torch.device) -> int | None:
    """Bytes in use on the card (by anyone) with torch's cache emptied; the peak counter reset."""
    if device.type != "cuda":
        return None
    free = free_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.mem_get_info(device)[1] - free


def measure_load_peak(plan: Plan, folder: Path, device: torch.device) -> dict:
    """The model alone, built as the engine builds it: peak allocation over the weights."""
    if device.type != "cuda":
        return {}
    source = loader.resolve_source(str(folder))
    config = EngineConfig(
        model=str(folder), dtype=plan.dtype, device=plan.device, load_format="dummy",
        kernel_backend=plan.kernel_backend,
    )  # fmt: skip
    memory_in_use(device)
    base = torch.cuda.memory_allocated(device)
    model = loader.build_model(
        loader.load_config(source), source, config, device, plan.dtype, plan.max_model_len
    )
    peak = torch.cuda.max_memory_allocated(device) - base
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    free_memory(device)
    return {"load_peak_bytes": peak, "load_peak_ratio": peak / weights}


def measure_kv_blocks(llm: LLM, device: torch.device, in_use_before: int | None) -> dict:
    engine = llm.engine
    model = engine.runner.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_block = engine.runner.kv_bytes_per_block(model, engine.config.block_size, engine.dtype)
    blocks = engine.block_manager.num_blocks
    result = {"kv_blocks": blocks, "bytes_per_block": per_block, "weight_bytes": weights}
    if device.type != "cuda":
        return result
    total = torch.cuda.mem_get_info(device)[1]
    util = engine.config.gpu_memory_utilization
    # what the memory left after the weights would hold, activations not deducted
    theoretical = (int(total * util) - in_use_before - weights) // per_block
    return result | {
        "total_bytes": total,
        "in_use_before_loading": in_use_before,
        "theoretical_blocks": theoretical,
        "fraction": blocks / theoretical,
        "counting": "theoretical = (utilization x total - in use before loading - weights) / "
        "bytes per block; load peak = torch's peak allocation while the model alone is built "
        "(dummy weights) over the weights' bytes",
    }


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def warm_up(llm: LLM, vocab: int) -> None:
    """Compile the prefill, mixed and decode paths before anything is timed."""
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": random_ids(rng, n, vocab)} for n in (100, 37, 5, 64)]
    llm.generate(prompts, [greedy(n) for n in (8, 3, 12, 1)])


def weight_bytes_per_token(model: torch.nn.Module, config: dict) -> int:
    """Bytes of weights a one-token decode step streams: all parameters except the input
    embedding, of which a step reads only its tokens' rows; of a MoE layer's stacked experts
    (w13, w2) only the share of the top-k routed ones."""
    experts = config.get("num_experts") or config.get("num_local_experts") or 1
    routed = config.get("num_experts_per_tok", 1) / experts
    total = 0.0
    for name, p in model.named_parameters():
        if "embed_tokens" not in name:
            share = routed if name.endswith((".w13", ".w2")) else 1.0
            total += p.numel() * p.element_size() * share
    return int(total)


def measure_decode(llm: LLM, plan: Plan, copy_gbps: float | None, vocab: int) -> dict:
    engine = llm.engine
    prompt = random_ids(random.Random(2), plan.decode_prompt_len, vocab)
    engine.add_request("decode-b1", prompt, greedy(plan.decode_new_tokens))
    engine.step()  # the prefill step, which also samples the first token
    step_ms = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()  # returns sampled ids on the host: the step's work is done
        step_ms.append((time.perf_counter() - t0) * 1e3)
    tok_per_s = len(step_ms) / (sum(step_ms) / 1e3)
    cfg = plan.model_config
    weights = weight_bytes_per_token(engine.runner.model, cfg)
    mean_ctx = plan.decode_prompt_len + plan.decode_new_tokens / 2
    kv_per_token = 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * plan.dtype.itemsize
    kv = int(mean_ctx * kv_per_token * cfg["num_hidden_layers"])
    roofline = copy_gbps * 1e9 / (weights + kv) if copy_gbps else None
    return {
        "prompt_len": plan.decode_prompt_len,
        "decode_steps_timed": len(step_ms),
        "tok_per_s": tok_per_s,
        "median_step_ms": statistics.median(step_ms),
        "weight_bytes_per_token": weights,
        "kv_bytes_per_token_mean": kv,
        "roofline_tok_per_s": roofline,
        "roofline_fraction": tok_per_s / roofline if roofline else None,
        "roofline": "copy GB/s counted as bytes read + bytes written, taken as the rate at which "
        "HBM can stream reads (not halved); a decode step reads every weight but the input "
        "embedding once, plus the KV cache at the mean context",
        "timing": "host clock around each engine.step() after the prefill step",
    }


def measure_pagoda_throughput(llm: LLM, work: Workload, count: int) -> dict:
    prompts = [{"prompt_token_ids": p} for p in work.prompts[:count]]
    params = [greedy(n) for n in work.output_lens[:count]]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    wanted = sum(work.output_lens[:count])
    assert produced == wanted, f"pagoda produced {produced} tokens, {wanted} asked"
    prompt_tokens = sum(len(p) for p in work.prompts[:count])
    return {
        "sequences": count,
        "seconds": seconds,
        "output_tokens": produced,
        "prompt_tokens": prompt_tokens,
        "output_tok_per_s": produced / seconds,
        "total_tok_per_s": (produced + prompt_tokens) / seconds,
    }


def step_until_token(llm: LLM, request_id: str) -> int:
    """Step until `request_id` gets a token; return the number of steps taken."""
    steps = 0
    while True:
        steps += 1
        if any(d.request_id == request_id for d in llm.engine.step()):
            return steps


def measure_ttft(llm: LLM, plan: Plan, vocab: int) -> dict:
    engine = llm.engine
    rng = random.Random(3)
    background = [f"bg-{i}" for i in range(plan.ttft_background)]
    for rid in background:
        prompt = random_ids(rng, plan.ttft_background_prompt_len, vocab)
        engine.add_request(rid, prompt, greedy(plan.max_model_len // 2))
    started: set[str] = set()
    while len(started) < len(background):
        started |= {d.request_id for d in engine.step()}
    trials = []
    try:
        for trial in range(plan.ttft_trials):
            for _ in range(3):  # a few pure decode steps between arrivals
                engine.step()
            rid = f"ttft-{trial}"
            prompt = random_ids(rng, plan.ttft_prompt_len, vocab)  # fresh: no prefix hit
            t0 = time.perf_counter()
            engine.add_request(rid, prompt, greedy(4))
            steps = step_until_token(llm, rid)
            trials.append({"ms": (time.perf_counter() - t0) * 1e3, "steps": steps})
            engine.abort_request(rid)
    finally:
        for rid in background:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
    times = [t["ms"] for t in trials]
    return {
        "prompt_len": plan.ttft_prompt_len,
        "decoding_alongside": plan.ttft_background,
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "trials": trials,
        "timing": "host clock from add_request until a step's deltas carry the new request",
    }


# -- mixture of experts -----------------------------------------------------------------------


def measure_moe_layer(plan: Plan, device: torch.device) -> dict:
    from pagoda.kernels import moe, moe_triton  # imported late: needs triton

    cfg = plan.moe_model_config
    hidden, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    experts, top_k = cfg["num_experts"], cfg["num_experts_per_tok"]
    # std 0.02 keeps both projections' outputs near unit scale at hidden 2048
    w13 = torch.empty(experts, 2 * inter, hidden, dtype=plan.dtype, device=device).normal_(0, 0.02)
    w2 = torch.empty(experts, hidden, inter, dtype=plan.dtype, device=device).normal_(0, 0.02)
    expert_bytes = 3 * hidden * inter * plan.dtype.itemsize
    rows = []
    for tokens in plan.moe_tokens:
        x = torch.randn(tokens, hidden, dtype=plan.dtype, device=device)
        logits = torch.randn(tokens, experts, device=device)
        weights, ids = moe.select_experts(logits, top_k, cfg["norm_topk_prob"])
        args = (x, w13, w2, weights, ids)
        got, want = moe_triton.fused_moe(*args), moe.fused_moe(*args)
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        triton_ms = statistics.median(
            time_ms(lambda args=args: moe_triton.fused_moe(*args), device, plan.warmup, plan.reps)
        )
        torch_ms = statistics.median(
            time_ms(lambda args=args: moe.fused_moe(*args), device, plan.warmup, plan.reps)
        )
        routed = ids.unique().numel()
        row = {
            "tokens": tokens,
            "experts_routed": routed,
            "max_err_over_max_ref": err,
            "triton_ms": triton_ms,
            "torch_ms": torch_ms,
            "speedup": torch_ms / triton_ms,
            "expert_gbps": routed * expert_bytes / triton_ms / 1e6,
        }
        print(f"  moe {tokens} tokens: {fmt_moe(row)}", flush=True)
        rows.append(row)
    return {
        "shape": {"hidden": hidden, "moe_intermediate": inter, "experts": experts}
        | {"top_k": top_k, "dtype": str(plan.dtype)},
        "rows": rows,
        "error": "max |triton - torch reference| over max |torch reference|, same bf16 inputs",
        "bytes_counted": "3 x hidden x intermediate x itemsize per routed expert (w13 + w2)",
        "timing": "median of eager calls (CUDA events on a GPU)",
    }


def fmt_moe(row: dict) -> str:
    err = row["max_err_over_max_ref"]
    wrong = "" if err < MOE_MAX_ERR else " WRONG"  # NaN too
    return (
        f"triton {row['triton_ms'] * 1e3:.0f} us, torch {row['torch_ms'] * 1e3:.0f} us "
        f"({row['speedup']:.1f}x), {row['expert_gbps']:.0f} GB/s, err {err:.1e}{wrong}"
    )


def measure_moe_decode(plan: Plan, root: Path, copy_gbps: float | None) -> dict:
    moe_plan = replace(plan, model_config=plan.moe_model_config)
    folder = write_model_folder(moe_plan.model_config, root / "qwen3_moe")
    vocab = moe_plan.model_config["vocab_size"]
    llm = make_llm(moe_plan, folder, max_num_seqs=8)  # few decode graphs to capture
    try:
        warm_up(llm, vocab)
        result = measure_decode(llm, moe_plan, copy_gbps, vocab)
    finally:
        del llm
        free_memory(torch.device(plan.device))
    cfg = moe_plan.model_config
    name = f"MoE {cfg['num_hidden_layers']} layers x {cfg['num_experts']} experts"
    return result | {"model": name}


# -- running the parts and the table ---------------------------------------------------------


def run_part(report: Report, name: str, fn: Callable[[], dict]) -> dict | None:
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as err:  # one part's failure must not cost the others their figures
        traceback.print_exc()
        report.errors[name] = f"{type(err).__name__}: {err}"
        report.save()
        return None
    result["part_seconds"] = round(time.perf_counter() - t0, 1)
    report.results[name] = result
    report.save()
    print(f"   done in {result['part_seconds']} s", flush=True)
    return result


def run_engine_parts(
    report: Report, plan: Plan, parts: set[str], folder: Path, work: Workload
) -> None:
    copy = report.results.get("copy", {}).get("gbps_read_plus_write")
    vocab = plan.model_config["vocab_size"]
    print("== loading the engine", flush=True)
    device = torch.device(plan.device)
    load = measure_load_peak(plan, folder, device) if "kv_blocks" in parts else {}
    before = memory_in_use(device)
    llm = make_llm(plan, folder)
    if "kv_blocks" in parts:
        run_part(report, "kv_blocks", lambda: measure_kv_blocks(llm, device, before) | load)
    warm_up(llm, vocab)
    if "decode" in parts:
        run_part(report, "decode", lambda: measure_decode(llm, plan, copy, vocab))
    if "ttft" in parts:
        run_part(report, "ttft", lambda: measure_ttft(llm, plan, vocab))
    if "throughput" in parts:  # the longest part comes last: a timeout costs only it
        run_part(report, "throughput", lambda: throughput_part(report, llm, plan, work))


def throughput_part(report: Report, llm: LLM, plan: Plan, work: Workload) -> dict:
    full = measure_pagoda_throughput(llm, work, len(work.prompts))
    result = {"pagoda": full, "workload": workload_info(plan)}
    hf = report.results.get("hf")
    if hf:
        same = measure_pagoda_throughput(llm, work, hf["sequences"])
        result |= {
            "pagoda_on_hf_subset": same,
            "ratio": full["output_tok_per_s"] / hf["output_tok_per_s"],
            "ratio_same_subset": same["output_tok_per_s"] / hf["output_tok_per_s"],
            "ratio_means": "pagoda output tok/s on all sequences over transformers' on its "
            "subset (ratio); both on the subset alone (ratio_same_subset)",
        }
    return result


def workload_info(plan: Plan) -> dict:
    lo, hi = plan.len_range
    return {"sequences": plan.num_seqs, "input_len": [lo, hi], "output_len": [lo, hi]}


def fmt_paged(row: dict) -> str:
    if "skipped" in row:
        return f"skipped ({row['skipped']})"
    frac = f" = {row['copy_fraction']:.0%} of copy" if row.get("copy_fraction") else ""
    err = row.get("rel_err_vs_torch_fp32")
    err_s = "" if err is None else f", rel err {err:.1e}"
    if err is not None and not err < MAX_REL_ERR:  # NaN too
        err_s += " WRONG"
    return f"{row['median_us']:.1f} us, {row['gbps']:.0f} GB/s{frac}{err_s}"


def verdict(value: float | None, target: float, higher_is_better: bool, smoke: bool) -> str:
    if smoke or value is None:
        return "-"
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def table_rows(report: Report) -> list[tuple[str, str, str, str]]:
    r, smoke = report.results, report.smoke
    rows = []
    if "copy" in r:
        rows.append(
            ("copy bandwidth (read+write)", f"{r['copy']['gbps_read_plus_write']:.0f} GB/s")
        )
    for row in r.get("paged", {}).get("rows", []):
        name = f"paged decode ctx {row['context']} batch {row['batch']}"
        frac = row.get("copy_fraction")
        target = ""
        if row["context"] == 4096 and "skipped" not in row:
            target = f">= {TARGETS['paged_4k_copy_fraction']:.0%} of copy"
            target += " " + verdict(frac, TARGETS["paged_4k_copy_fraction"], True, smoke)
        rows.append((name, fmt_paged(row), target))
    if "attention" in r:
        g, m = r["attention"]["graph_decode"], r["attention"]["mixed_step"]
        target = f"<= {TARGETS['graph_decode_ratio']}x "
        rows.append(
            (
                f"decode ctx {g['context']} launched for {g['launched_for']}",
                f"{g['graph_ms'] * 1e3:.0f} us = {g['ratio']:.2f}x of launched for {g['context']}",
                target + verdict(g["ratio"], TARGETS["graph_decode_ratio"], False, smoke),
            )
        )
        target = f"<= {TARGETS['mixed_step_ratio']}x "
        rows.append(
            (
                f"{m['decodes']} decodes + {m['chunk']} chunk, one launch",
                f"{m['mixed_ms'] * 1e3:.0f} us = {m['ratio']:.2f}x of apart",
                target + verdict(m["ratio"], TARGETS["mixed_step_ratio"], False, smoke),
            )
        )
    if "kv_blocks" in r:
        kv = r["kv_blocks"]
        if "load_peak_ratio" in kv:
            target = f">= {TARGETS['kv_blocks_fraction']:.0%} "
            rows.append(
                (
                    "KV blocks after profiling",
                    f"{kv['kv_blocks']} = {kv['fraction']:.0%} of {kv['theoretical_blocks']}",
                    target + verdict(kv["fraction"], TARGETS["kv_blocks_fraction"], True, smoke),
                )
            )
            target = f"<= {TARGETS['load_peak_ratio']}x "
            rows.append(
                (
                    "load peak over weights",
                    f"{kv['load_peak_ratio']:.2f}x",
                    target
                    + verdict(kv["load_peak_ratio"], TARGETS["load_peak_ratio"], False, smoke),
                )
            )
        else:
            rows.append(("KV blocks", f"{kv['kv_blocks']}"))
    if "hf" in r:
        hf = r["hf"]
        rows.append(
            (f"transformers ({hf['sequences']} seqs)", f"{hf['output_tok_per_s']:.0f} tok/s")
        )
    if "decode" in r:
        d = r["decode"]
        frac = d["roofline_fraction"]
        value = f"{d['tok_per_s']:.1f} tok/s"
        if frac is not None:
            value += f" = {frac:.0%} of {d['roofline_tok_per_s']:.0f}"
        target = f">= {TARGETS['decode_roofline_fraction']:.0%} of roofline "
        rows.append(
            (
                "batch-1 decode",
                value,
                target + verdict(frac, TARGETS["decode_roofline_fraction"], True, smoke),
            )
        )
    if "throughput" in r:
        t = r["throughput"]
        value = f"{t['pagoda']['output_tok_per_s']:.0f} tok/s"
        rows.append((f"pagoda offline ({t['pagoda']['sequences']} seqs)", value))
        if "ratio" in t:
            ratio = t["ratio"]
            value = f"{ratio:.2f}x (same subset {t['ratio_same_subset']:.2f}x)"
            target = f">= {TARGETS['throughput_ratio']:.0f}x " + verdict(
                ratio, TARGETS["throughput_ratio"], True, smoke
            )
            rows.append(("pagoda / transformers", value, target))
    moe_shape = r.get("moe_layer", {}).get("shape", {})
    for row in r.get("moe_layer", {}).get("rows", []):
        name = f"fused MoE {row['tokens']} tokens, {moe_shape['experts']} experts"
        rows.append((name, fmt_moe(row)))
    if "moe_decode" in r:
        d = r["moe_decode"]
        value = f"{d['tok_per_s']:.1f} tok/s"
        if d["roofline_fraction"] is not None:
            value += f" = {d['roofline_fraction']:.0%} of {d['roofline_tok_per_s']:.0f}"
        rows.append((f"batch-1 decode {d['model']}", value))
    if "ttft" in r:
        t = r["ttft"]
        name = f"TTFT {t['prompt_len']}-token prompt, {t['decoding_alongside']} decoding"
        target = f"<= {TARGETS['ttft_ms']:.0f} ms " + verdict(
            t["median_ms"], TARGETS["ttft_ms"], False, smoke
        )
        rows.append((name, f"{t['median_ms']:.1f} ms (median)", target))
    return [(*row, "", "")[:3] for row in rows]


def print_table(report: Report) -> None:
    card = report.card
    header = f"{card.get('name')} | torch {card['torch']} | triton {card['triton']}"
    driver = card.get("nvidia_smi", {}).get("driver_version")
    if driver:
        header += f" | driver {driver}"
    if report.smoke:
        header += " | smoke run: the figures mean nothing"
    print(f"\n{header}")
    rows = table_rows(report)
    width = max((len(r[0]) for r in rows), default=10)
    value_width = max((len(r[1]) for r in rows), default=10)
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<{value_width}}  {target}".rstrip())
    for name, err in report.errors.items():
        print(f"{name}: FAILED: {err}")
    print(f"JSON: {report.path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    p.add_argument("--num-seqs", type=int, default=None, help="throughput sequences")
    p.add_argument("--hf-max-seqs", type=int, default=None, help="transformers' subset")
    p.add_argument("--hf-batch", type=int, default=None, help="transformers' batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--report", type=Path, default=None, help="print the table of an earlier run's JSON, only"
    )
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    overrides = {
        "num_seqs": args.num_seqs,
        "hf_max_seqs": args.hf_max_seqs,
        "hf_batch": args.hf_batch,
    }
    return replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def load_report(path: Path) -> Report:
    data = json.loads(path.read_text())
    return Report(path, **data)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        report = load_report(args.report)
        print_table(report)
        return 1 if report.errors else 0
    plan = make_plan(args)
    if plan.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU check")
    device = torch.device(plan.device)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    plan_info = asdict(plan) | {"dtype": str(plan.dtype), "parts": args.parts, "seed": args.seed}
    report = Report(args.out / "gpu_check.json", args.smoke, card_info(device), plan_info)
    report.save()
    parts = set(args.parts)
    vocab = plan.model_config["vocab_size"]
    work = make_workload(plan, vocab, args.seed)
    if "copy" in parts:
        run_part(report, "copy", lambda: measure_copy(plan, device))
    copy_gbps = report.results.get("copy", {}).get("gbps_read_plus_write")
    if "paged" in parts:
        run_part(report, "paged", lambda: measure_paged(plan, device, copy_gbps))
    if "attention" in parts:
        run_part(report, "attention", lambda: measure_attention(plan, device))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        folder = write_model_folder(plan.model_config, Path(tmp) / "llama")
        if "hf" in parts:
            run_part(report, "hf", lambda: measure_hf(plan, device, folder, work))
        engine_parts = parts & {"kv_blocks", "decode", "throughput", "ttft"}
        if engine_parts:
            try:
                run_engine_parts(report, plan, engine_parts, folder, work)
            except Exception as err:  # the engine failed to load or warm up
                traceback.print_exc()
                report.errors["engine"] = f"{type(err).__name__}: {err}"
                report.save()
        free_memory(device)  # the dense engine's memory, before the MoE model's 61 GB
        if "moe_layer" in parts:
            run_part(report, "moe_layer", lambda: measure_moe_layer(plan, device))
        if "moe_decode" in parts:
            copy_gbps = report.results.get("copy", {}).get("gbps_read_plus_write")
            run_part(report, "moe_decode", lambda: measure_moe_decode(plan, Path(tmp), copy_gbps))
    print_table(report)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
