"""Engine settings as the user gives them, and their resolution against the model and device."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from pagoda.kernels import linear_bf16
from pagoda.kernels.backends import BACKENDS

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DEFAULT_CPU_KV_CACHE_MEMORY = 2 << 30
BF16_MIN_CAPABILITY = (8, 0)  # Ampere: NVIDIA's first GPUs with bf16 arithmetic

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    model: str
    # a hub id's branch, tag or commit (None: its default branch); tokenizer_revision pins
    # `tokenizer`, or the model's own tokenizer where none is given (tokenizer_source)
    revision: str | None = None
    tokenizer: str | None = None
    tokenizer_revision: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    kv_cache_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    enable_prefix_caching: bool = True
    seed: int | None = 0  # None: a random one
    kernel_backend: str = "auto"  # auto: Triton on CUDA, the torch reference elsewhere
    enforce_eager: bool = False  # True: no decode graphs (CUDA graphs, or CPU kernel replays)
    skip_tokenizer_init: bool = False  # token ids in and out only (no tokenizer files needed)
    serving: bool = False  # an online server: favour time to first token over batch throughput
    # CPU threads for the model; None: torch's default, and a server's engine gives threads
    # back while other processes keep cores busy (engine/cpu_threads.py)
    cpu_threads: int | None = None
    # tensor parallelism (engine/distributed.py): ranks in all, over `nnodes` machines whose
    # process group meets at master_addr:master_port (None: a free port, one node only)
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    distributed_timeout_s: float = 120.0  # for every rank to join
    # the defaults of the sampling fields a request leaves unset (engine/sampling_defaults.py)
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None
    # LoRA adapters served beside the model (engine/lora.py): name -> a PEFT adapter's folder
    # or hub id, loaded at start; max_loras: adapter slots in all (None: one per lora_modules
    # entry), those beyond lora_modules for adapters loaded later (LLMEngine.load_lora);
    # max_lora_rank bounds their ranks (None: the largest adapter's, at least 16 where slots
    # are left for later)
    lora_modules: dict[str, str] | None = None
    max_loras: int | None = None
    max_lora_rank: int | None = None

    def __post_init__(self) -> None:
        if self.seed is None:  # drawn here, so that every tensor-parallel rank gets the same
            self.seed = random.SystemRandom().getrandbits(63)
        self._check_parallel()
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {self.cpu_threads}")
        if self.kv_cache_blocks is not None and self.kv_cache_blocks < 1:
            raise ValueError("kv_cache_blocks must be at least 1")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be at least 1, got {self.max_lora_rank}")
        loaded = len(self.lora_modules or {})
        if self.max_loras is not None and self.max_loras < max(loaded, 1):
            raise ValueError(
                f"max_loras must be at least 1 and hold the {loaded} lora_modules, "
                f"got {self.max_loras}"
            )
        if self.kernel_backend not in BACKENDS:
            raise ValueError(
                f"kernel_backend must be one of {BACKENDS}, got {self.kernel_backend!r}"
            )

    def tokenizer_source(self) -> tuple[str | None, str | None]:
        """Where the tokenizer comes from: (None, None) for the model's own files, else a hub id
        or folder and its revision. Unlike vLLM, a separate `tokenizer` does not take the
        model's `revision` (a commit of one repository means nothing in another)."""
        if self.tokenizer is not None:
            return self.tokenizer, self.tokenizer_revision
        if self.tokenizer_revision not in (None, self.revision):
            return self.model, self.tokenizer_revision
        return None, None

    def _check_parallel(self) -> None:
        size, nnodes = self.tensor_parallel_size, self.nnodes
        if size < 1 or nnodes < 1:
            raise ValueError("tensor_parallel_size and nnodes must be at least 1")
        if size % nnodes:
            raise ValueError(
                f"tensor_parallel_size {size} does not split evenly over {nnodes} nodes"
            )
        if not 0 <= self.node_rank < nnodes:
            raise ValueError(f"node_rank must be in 0-{nnodes - 1}, got {self.node_rank}")
        if self.master_port is not None and not 0 <= self.master_port <= 65535:
            raise ValueError(
                f"master_port must be in 0-65535 (0: a free one, on one node), "
                f"got {self.master_port}"
            )
        if nnodes > 1 and not self.master_port:
            raise ValueError("several nodes need master_port (and master_addr) to meet at")

    def resolve_device(self) -> torch.device:
        """`auto`: the first GPU, else the CPU (with a warning where torch was built for CUDA:
        a driver older than its CUDA makes the GPU invisible). An explicit `cuda` or `cuda:N`
        that cannot run is an error, never a silent fall-back to the CPU."""
        ranks = self.tensor_parallel_size // self.nnodes  # this node's, one GPU each
        if self.device == "auto":
            if torch.cuda.is_available():
                return _check_gpu(torch.device("cuda", 0), ranks, self.tensor_parallel_size)
            if torch.version.cuda is not None:
                logger.warning(
                    "torch %s is built for CUDA %s but sees no GPU (no device visible, or a "
                    "driver older than that CUDA needs): running on the CPU",
                    torch.__version__,
                    torch.version.cuda,
                )
            return torch.device("cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            return _check_gpu(device, ranks, self.tensor_parallel_size)
        return device

    def resolve_dtype(
        self, device: torch.device, checkpoint_dtype: torch.dtype | None
    ) -> torch.dtype:
        """`auto`: the checkpoint's half-precision dtype on a GPU, float16 on one without bf16
        arithmetic (compute capability below 8.0: Turing's T4, RTX 20xx), as vLLM does; on a
        CPU bf16 where it runs natively (AMX or AVX512-BF16, as vLLM does), fp32 elsewhere
        (torch's bf16 without them is slower than fp32). An explicit bf16 on a GPU without
        bf16 arithmetic is an error that says to use float16."""
        if isinstance(self.dtype, torch.dtype):
            dtype = self.dtype
        elif self.dtype == "auto":
            return _auto_dtype(device, checkpoint_dtype)
        elif self.dtype in DTYPES:
            dtype = DTYPES[self.dtype]
        else:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if dtype == torch.bfloat16 and device.type == "cuda" and not _gpu_has_bf16(device):
            raise ValueError(
                f"dtype {str(self.dtype).removeprefix('torch.')!r}: {_describe_gpu(device)} has "
                f"no bfloat16 arithmetic (it needs compute capability "
                f"{'.'.join(map(str, BF16_MIN_CAPABILITY))} or newer); set dtype to 'float16' "
                "(--dtype float16, or dtype: float16 in the catalog) or 'auto', which serves "
                "float16 on this GPU"
            )
        return dtype

    def resolve_max_num_batched_tokens(self, device: torch.device) -> int:
        """The per-step token budget. On a CPU a step's time grows with its tokens, so a server
        takes prompts in 256-token chunks: measured on 2 cores with 32 prompts arriving at once,
        the median time to first token drops from 3.1 s (2048) to 1.1 s (512) at the same
        throughput (fp32), and in bf16 under 32 concurrent requests 256 cut it by 6-10% against
        512 (243 against 266 ms, 272 against 289, 278 against 308 and 225 against 250 in other
        rounds) for 2-8% fewer tokens/s.
        Offline batches keep the larger steps (8% more tokens/s than 512)."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        if device.type == "cuda":
            return 8192
        return 256 if self.serving else 2048


def _auto_dtype(device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    if device.type == "cpu":
        return torch.bfloat16 if linear_bf16.available() else torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        dtype = checkpoint_dtype
    else:
        dtype = torch.bfloat16
    if dtype == torch.bfloat16 and not _gpu_has_bf16(device):
        logger.warning(
            "%s has no bfloat16 arithmetic: dtype auto serves float16 instead of bfloat16 "
            "(checkpoint dtype: %s); values past float16's range (+-65504) overflow, so set "
            "dtype float32 if the output turns to inf or nan",
            _describe_gpu(device),
            str(checkpoint_dtype).removeprefix("torch."),
        )
        return torch.float16
    return dtype


def _gpu_has_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY


def _describe_gpu(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} ({device}, compute capability {major}.{minor})"


def _check_gpu(device: torch.device, ranks: int, tensor_parallel_size: int) -> torch.device:
    """`device` with its index (`cuda`: the current GPU), once it can run, and so can the GPUs
    after it that this node's other ranks take."""
    if torch.version.cuda is None:
        raise ValueError(
            f"device {str(device)!r}: this torch ({torch.__version__}) is a CPU-only build; "
            "install a CUDA build of torch, or set device to 'cpu' or 'auto'"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r}: torch {torch.__version__} (CUDA {torch.version.cuda}) sees "
            "no GPU: none is visible (CUDA_VISIBLE_DEVICES, docker --gpus) or the NVIDIA driver "
            f"is older than CUDA {torch.version.cuda} needs"
        )
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    last = device.index + ranks - 1
    if last < count:
        return device
    visible = f"only {count} GPU(s) visible (cuda:0-{count - 1})"
    if ranks == 1:
        raise ValueError(f"device {str(device)!r}: {visible}")
    raise ValueError(
        f"tensor_parallel_size {tensor_parallel_size} puts {ranks} ranks on this node, one GPU "
        f"each from {str(device)!r}, on cuda:{device.index}-{last}: {visible}"
    )
