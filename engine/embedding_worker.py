"""The embedding worker: one sentence-transformers model in its own process, driven by the
shared worker loop (engine/worker.py), with dynamic batching across requests.

An add's payload is `inputs, truncate, dimensions`: `inputs` a list of strings or of token-id
lists, `truncate` None or a token count (vLLM's truncate_prompt_tokens, -1 for the model's
limit), `dimensions` None or the Matryoshka size to cut to. Once all of a request's inputs ran,
its output is `[request_id, float32 little-endian rows in input order, rows, dims, tokens]`.

Every input waits in one queue. Each step looks at the oldest inputs (a window of a few
batches), sorts them by length and runs the longest ones together, bounded by a batch size and
a budget of tokens: the window keeps a request that arrived later from overtaking older ones
for long.

Inputs of unlike length are packed, in one of two layouts, so that nothing is spent on padding
(one-input requests of 8-64 words wasted about 40% of a padded batch):

- `rows`: several short inputs share a row of the batch, each with its own positions, and a
  block-diagonal mask keeps each input's attention to its own tokens;
- `run` (bf16 on a CPU with AMX, `engine/embedding_bf16.py`): all inputs in one run of tokens,
  and an attention kernel that takes the inputs' bounds (`cu_seq_lens_q`) instead of a mask,
  so it computes no row's full width squared.

    rows:   row 0   [a a a a a a a a]          mask of row 1:  b b b c c .
            row 1   [b b b c c . . .]                          b 1 1 1 0 0 0
                     position ids 0 1 2 0 1                    c 0 0 0 1 1 0
    run:    [a a a a a a a a b b b c c . .]    cu_seq_lens_q = 0 8 11 13 15

The inputs come apart again before pooling, so the model's own pooling and normalization
modules run as they would in `SentenceTransformer.encode`. Which layout a model takes is found
at load, by comparing packed probes with a padded one: a model for which packing would change
the result (a causal decoder, positions it numbers itself) keeps `padded` batches.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from pagoda.engine.config import DTYPES
from pagoda.engine.cpu_threads import ThreadGovernor, governor_for
from pagoda.engine.embedding_inputs import EmbeddingInputs
from pagoda.engine.stats import Histogram
from pagoda.engine.worker import BatchGather, Rejected, run_worker
from pagoda.kernels.linear_bf16 import padded_rows
from pagoda.logs import LogSettings, at_revision

logger = logging.getLogger(__name__)
WINDOW_BATCHES = 4
# Packed rows carry little padding, so a CPU's budget mostly bounds a pass's activations:
# lists of 64 texts of 8-64 words ran 1.36x faster in one pass of their ~5,000 tokens than in
# passes of 2,048 (bf16, 2 cores; the per-pass cost of a small model's many small ops dominates).
CPU_BATCH_TOKENS = 8192
GPU_BATCH_TOKENS = 16384
# Packed rows are this many tokens wide, or a multiple: a batch's matrix products then come in
# few shapes, and oneDNN (bf16) compiles a kernel for every new shape it meets. Rows exactly as
# wide as the longest input gave every batch new shapes: 53 ms a pass of 32 texts against 36.
PACK_WIDTH_STEP = 32
LAYOUT_LOG = {
    "run": "inputs packed into one run (attention by their bounds)",
    "rows": "inputs packed into rows",
    "padded": "padded batches",
}
# upper bounds of the batch-size histogram the worker keeps (its stats carry it, bounds included)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(slots=True)
class EmbeddingConfig:
    model: str  # a sentence-transformers folder or hub id
    revision: str | None = None  # a hub id's commit (server/catalog.py resolve_revision)
    device: str = "auto"
    dtype: str = "auto"  # auto: float32 on CPU, float16 on a GPU
    max_model_len: int | None = None  # default: the model's max_seq_length
    # tokens per forward pass (packed: the inputs' own; padded: rows x longest); default:
    # CPU_BATCH_TOKENS on a CPU, GPU_BATCH_TOKENS on a GPU
    max_batch_tokens: int | None = None
    max_batch_size: int = 64  # inputs per forward pass
    cpu_threads: int | None = None
    cross_encoder: bool = False  # a reranker (engine/cross_encoder_worker.py)


@dataclass(slots=True)
class Job:
    """One request: its rows fill in as its inputs' batches run."""

    request_id: str
    rows: torch.Tensor  # (inputs, dims) float32
    remaining: int
    num_tokens: int
    dimensions: int | None


@dataclass(slots=True)
class Item:
    """One input waiting for a batch."""

    job: Job
    index: int
    token_ids: list[int]
    token_type_ids: list[int] | None = None  # a pair's: which of its two texts a token is of


@dataclass
class EmbeddingWorker:
    config: EmbeddingConfig
    governor: ThreadGovernor | None = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        self.max_batch_tokens = config.max_batch_tokens or (
            CPU_BATCH_TOKENS if self.device.type == "cpu" else GPU_BATCH_TOKENS
        )
        self._load()
        self.governor = governor_for(self.device, config.cpu_threads)
        self.jobs: dict[str, Job] = {}
        self.queue: deque[Item] = deque()
        self.failed: list[tuple[str, str]] = []  # (request id, why): batches that failed
        self.gather = BatchGather()  # counts requests (self.jobs: those with inputs to embed)
        self.batches = 0
        self.batch_sizes = Histogram(BATCH_SIZE_BUCKETS)

    def _load(self) -> None:
        # heavy (transformers' modeling code): only in the worker, not in the server
        from sentence_transformers import SentenceTransformer

        from pagoda.engine import embedding_bf16

        config = self.config
        model = SentenceTransformer(config.model, device=str(self.device), revision=config.revision)
        self._adopt(model, model.prompts.get(model.default_prompt_name or "", ""))
        self.dim = model.get_embedding_dimension()
        transformer = model[0]
        self.fused_linears = 0
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            self.fused_linears = embedding_bf16.fuse_linears(transformer)
            embedding_bf16.fuse_add_norms(transformer)
        self.layout = self._choose_layout()
        if self.fused_linears and self.layout == "run":
            start = time.monotonic()
            longest_run = max(self.max_batch_tokens, self.max_model_len)
            counts = embedding_bf16.compile_row_counts(transformer, longest_run)
            logger.info(
                "oneDNN's kernels compiled for %d run lengths (up to %d tokens) in %.1f s",
                counts,
                longest_run,
                time.monotonic() - start,
            )
        logger.info(
            "loaded %s%s on %s (%s): %d dimensions, max %d tokens, %s",
            config.model,
            at_revision(config.revision),
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.dim,
            self.max_model_len,
            LAYOUT_LOG[self.layout],
        )
        if self.fused_linears:
            logger.info("%d linears on oneDNN's packed bf16 weights", self.fused_linears)

    def info(self) -> dict:
        return {
            "max_model_len": self.max_model_len,
            "vocab_size": self.vocab_size,
            # what the server loads to tokenize requests before admitting them: the folder,
            # and the tokenizer as sentence-transformers set it up (its do_lower_case adds a
            # normalizer that the folder's files do not have)
            "tokenizer": self.tokenizer.name_or_path,
            "revision": self.config.revision,  # of a hub id's tokenizer files
            "tokenizer_json": self.tokenizer.backend_tokenizer.to_str(),
            "prompt": self.prompt,
            "dimensions": self.dim,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_batch_tokens": self.max_batch_tokens,
            "max_batch_size": self.config.max_batch_size,
        }

    # --- requests ----------------------------------------------------------------------

    def _adopt(self, model, prompt: str) -> None:
        """A loaded sentence-transformers model (either kind) in the worker's dtype, and what
        the worker reads from it: its tokenizer and its input limit."""
        self.model = model.to(self.dtype).eval()
        self.tokenizer = model.tokenizer
        transformer = model[0]
        self.max_model_len = max_model_len_of(self.config.max_model_len, model, transformer)
        model.max_seq_length = self.max_model_len
        self.vocab_size = transformer.model.get_input_embeddings().num_embeddings
        self.token_type_ids = "token_type_ids" in self.tokenizer.model_input_names
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.left_padding = self.tokenizer.padding_side == "left"
        self.prompt = prompt
        self.inputs = EmbeddingInputs(self.tokenizer, prompt, self.vocab_size, self.max_model_len)

    def add(
        self,
        request_id: str,
        inputs: list[str] | list[list[int]],
        truncate: int | None,
        dimensions: int | None,
    ) -> None:
        self._check_id(request_id)
        self._enqueue(request_id, self.inputs.token_ids(inputs, truncate), dimensions)

    def _enqueue(
        self,
        request_id: str,
        token_ids: list[list[int]],
        dimensions: int | None = None,
        token_type_ids: list[list[int]] | None = None,
    ) -> None:
        rows = torch.empty(len(token_ids), dimensions or self.dim)
        job = Job(request_id, rows, len(token_ids), sum(map(len, token_ids)), dimensions)
        self.jobs[request_id] = job
        types = token_type_ids or itertools.repeat(None)
        self.queue.extend(
            Item(job, i, ids, kinds) for i, (ids, kinds) in enumerate(zip(token_ids, types))
        )

    def _check_id(self, request_id: str) -> None:
        if request_id in self.jobs:
            raise Rejected(f"request id {request_id!r} is already in use")

    def abort(self, request_ids: list[str]) -> None:
        gone = {rid for rid in request_ids if self.jobs.pop(rid, None) is not None}
        if gone:
            self.queue = deque(item for item in self.queue if item.job.request_id not in gone)

    # --- batches -----------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[list]:
        if not self.gather.ready(len(self.jobs)):
            time.sleep(self.gather.poll_s)
            return []
        start = time.monotonic()
        batch = self._next_batch()
        try:
            embeddings = self._run(batch)
        except Exception as exc:
            # a CUDA error may leave the device unusable: the process ends and is restarted
            if self.device.type == "cuda" and not isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            self._fail(batch, exc)
            return []
        self.gather.ran(len({id(item.job) for item in batch}), time.monotonic() - start)
        self._count_batch(len(batch))
        outputs = []
        for item, row in zip(batch, embeddings):
            job = item.job
            if job.dimensions is not None:
                row = F.normalize(row[: job.dimensions], p=2, dim=-1)
            job.rows[item.index] = row
            job.remaining -= 1
            if job.remaining == 0:
                del self.jobs[job.request_id]
                rows = job.rows.numpy().astype("<f4", copy=False).tobytes()
                outputs.append([job.request_id, rows, *job.rows.shape, job.num_tokens])
        return outputs

    def _fail(self, batch: list[Item], exc: Exception) -> None:
        """End the requests of a batch that failed with an error (their other inputs are
        dropped); the other requests go on."""
        failed = {item.job.request_id for item in batch}
        logger.exception(
            "a batch of %d inputs failed; its %d requests get an error", len(batch), len(failed)
        )
        self.abort(list(failed))
        self.failed += [(rid, f"embedding failed: {type(exc).__name__}: {exc}") for rid in failed]

    def take_failed(self) -> list[tuple[str, str]]:
        failed, self.failed = self.failed, []
        return failed

    def _next_batch(self) -> list[Item]:
        """The longest of the oldest inputs, as many as the batch size and the token budget
        allow (at least one). The budget counts the tokens a pass runs: every input's own when
        packed, rows x the longest when padded."""
        config = self.config
        window = list(itertools.islice(self.queue, WINDOW_BATCHES * config.max_batch_size))
        window.sort(key=lambda item: len(item.token_ids), reverse=True)
        if self.layout != "padded":
            sizes = itertools.accumulate(len(item.token_ids) for item in window)
            fits = sum(1 for total in sizes if total <= self.max_batch_tokens)
        else:
            fits = self.max_batch_tokens // len(window[0].token_ids)
        batch = window[: max(1, min(config.max_batch_size, fits))]
        taken = {id(item) for item in batch}
        self.queue = deque(item for item in self.queue if id(item) not in taken)
        return batch

    def _run(self, batch: list[Item]) -> torch.Tensor:
        """The rows of a batch's inputs, in its order."""
        return self._embed([item.token_ids for item in batch])

    def _embed(self, token_ids: list[list[int]]) -> torch.Tensor:
        if self.layout == "padded":
            return self._embed_padded(token_ids)
        return self._embed_packed(token_ids, run=self.layout == "run")

    @torch.inference_mode()
    def _embed_padded(
        self, token_ids: list[list[int]], token_type_ids: list[list[int]] | None = None
    ) -> torch.Tensor:
        """Embeddings (float32, on the CPU) of one padded batch, as sentence-transformers
        computes them: its modules do the pooling and the normalization."""
        width = max(map(len, token_ids))
        input_ids = torch.full((len(token_ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        types = torch.zeros((len(token_ids), width), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            span = slice(width - len(ids), width) if self.left_padding else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids)
            attention_mask[row, span] = 1
            if token_type_ids is not None:
                types[row, span] = torch.tensor(token_type_ids[row])
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            features["token_type_ids"] = types
        return self._outputs(_run_modules(self._inputs(features), list(self.model)))

    @torch.inference_mode()
    def _embed_packed(self, token_ids: list[list[int]], run: bool = False) -> torch.Tensor:
        """The same embeddings, from a batch whose rows hold several inputs each, or from one
        run of all (see the module's docstring); the transformer's outputs are cut back into
        one padded row per input for the pooling modules."""
        sizes = [len(ids) for ids in token_ids]
        longest = max(sizes)
        if run:  # one row, its width one of few sizes (oneDNN's kernels are per shape)
            width, rows = padded_rows(sum(sizes)), [list(range(len(sizes)))]
        else:
            width = -(-longest // PACK_WIDTH_STEP) * PACK_WIDTH_STEP
            rows = _pack(sizes, width)
        # where each input lies: flat positions in the packed batch and in a padded one
        starts = torch.zeros(len(token_ids), dtype=torch.long)
        for r, members in enumerate(rows):
            offset = 0
            for i in members:
                starts[i] = r * width + offset
                offset += sizes[i]
        within = torch.arange(longest).expand(len(token_ids), longest)
        valid = within < torch.tensor(sizes)[:, None]
        packed_at = (starts[:, None] + within)[valid]
        padded_at = (torch.arange(len(token_ids))[:, None] * longest + within)[valid]
        flat_ids = torch.tensor(list(itertools.chain.from_iterable(token_ids)))
        input_ids = torch.full((len(rows) * width,), self.pad_id, dtype=torch.long)
        input_ids[packed_at] = flat_ids
        position_ids = torch.zeros(len(rows) * width, dtype=torch.long)
        position_ids[packed_at] = within[valid]
        features = {
            "input_ids": input_ids.view(len(rows), width),
            "position_ids": position_ids.view(len(rows), width),
        }
        if run:  # the padding at the end is a sequence of its own
            bounds = [0, *itertools.accumulate(sizes), width]
            features["cu_seq_lens_q"] = torch.tensor(sorted(set(bounds)), dtype=torch.int32)
        else:
            # a token sees the tokens of its own input; the padding sees itself (no empty
            # softmax)
            segment = torch.full((len(rows) * width,), -1, dtype=torch.long)
            segment[packed_at] = torch.arange(len(sizes))[:, None].expand(-1, longest)[valid]
            segment = segment.view(len(rows), width)
            features["attention_mask"] = segment[:, None, :, None] == segment[:, None, None, :]
        transformer, *pooling = self.model
        hidden = _run_modules(self._inputs(features), [transformer])["token_embeddings"]
        unpacked = hidden.new_zeros(len(token_ids) * longest, hidden.shape[-1])
        unpacked[padded_at] = hidden.reshape(-1, hidden.shape[-1])[packed_at]
        padded_ids = torch.zeros(len(token_ids) * longest, dtype=torch.long)
        padded_ids[padded_at] = flat_ids
        per_input = {
            "input_ids": padded_ids.view(len(token_ids), longest).to(self.device),
            "token_embeddings": unpacked.view(len(token_ids), longest, -1),
            "attention_mask": valid.long().to(self.device),
            "modality": "text",
        }
        return self._outputs(_run_modules(per_input, pooling))

    def _outputs(self, features: dict) -> torch.Tensor:
        return features["sentence_embedding"].float().cpu()

    def _inputs(self, features: dict[str, torch.Tensor]) -> dict:
        """A batch's tensors as the model's first module takes them, on its device."""
        if self.token_type_ids and "token_type_ids" not in features:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        return {**{k: v.to(self.device) for k, v in features.items()}, "modality": "text"}

    def _choose_layout(self) -> str:
        """How this model's batches are laid out: the first packed layout whose probe (three
        inputs, two of them sharing a row) gives the embeddings of a padded batch. A causal
        model (it would see its row-mate), or one that numbers positions its own way, keeps
        padded batches."""
        if self.left_padding:
            return "padded"
        # distinct tokens: in a row of one repeated token, attention sees the same value
        # everywhere, and a causal model passes for a bidirectional one
        probe = [[(101 + 37 * i + 7 * n) % self.vocab_size for i in range(n)] for n in (9, 4, 5)]
        padded = self._embed_padded(probe)
        tolerance = 1e-4 if self.dtype == torch.float32 else 2e-2
        restore = None
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:  # the kernel is bf16
            from pagoda.engine.embedding_bf16 import use_packed_attention  # see __post_init__

            restore = use_packed_attention(self.model[0].model)
        for layout in ("run", "rows") if restore else ("rows",):
            try:
                packed = self._embed_packed(probe, run=layout == "run")
            except Exception as exc:  # a model whose forward takes no 4D mask or position ids
                logger.info("packing inputs (%s) fails for this model (%s)", layout, exc)
                packed = None
            if packed is not None and (packed - padded).abs().max() <= tolerance:
                return layout
            if layout == "run":
                restore()
        return "padded"

    def _count_batch(self, size: int) -> None:
        self.batches += 1
        self.batch_sizes.observe(size)

    def take_rejected(self) -> list[tuple[str, str]]:
        return []  # every refusal happens at add

    def stats(self) -> dict:
        return {
            "running": len(self.jobs),
            "waiting": len(self.queue),
            "batches": self.batches,
            "batch_size": self.batch_sizes.encode(),
        }


def max_model_len_of(wanted: int | None, model, transformer) -> int:
    """The catalog's max_model_len, which may only lower the model's own limit (the input
    length sentence-transformers uses, else its position embeddings' count): a longer input
    would index past the position embeddings and end the process (vLLM refuses it too)."""
    positions = getattr(transformer.model.config, "max_position_embeddings", None)
    own = model.max_seq_length or positions
    if wanted is None:
        return own
    if own is not None and wanted > own:
        raise ValueError(
            f"max_model_len {wanted} is above this model's limit of {own} tokens: leave it "
            f"out, or set at most {own}"
        )
    return wanted


def _run_modules(features: dict, modules: list) -> dict:
    for module in modules:
        features = module(features)
    return features


def _pack(lengths: list[int], width: int) -> list[list[int]]:
    """Rows of at most `width` tokens holding every input (by index), longest first, each in
    the first row it fits (first-fit decreasing)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def run_embedding_worker(
    config: EmbeddingConfig, input_addr: str, output_addr: str, log_settings: LogSettings
) -> None:
    """Process entry point (module level, picklable arguments: a worker process's target)."""
    load = partial(EmbeddingWorker, config)
    run_worker(load, input_addr, output_addr, log_settings)
