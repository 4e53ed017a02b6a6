"""The step API: add requests, abort them, and step; each step returns what it produced."""

from __future__ import annotations

import logging
import weakref
from concurrent.futures import FIRST_COMPLETED, wait
from itertools import count

import torch

from pagoda.engine import distributed, loader, lora, profiling, tensor_parallel
from pagoda.engine.block_manager import BlockManager
from pagoda.engine.config import DEFAULT_CPU_KV_CACHE_MEMORY, EngineConfig
from pagoda.engine.cuda_graphs import CAPTURE_SIZES
from pagoda.engine.model_runner import ModelRunner
from pagoda.engine.models import model_class
from pagoda.engine.sampling_defaults import max_tokens_cap, sampling_defaults
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.scheduler import Scheduler
from pagoda.engine.sequence import Sequence, SequenceDelta
from pagoda.engine.structured_output import GrammarCompiler, attach, start_matcher
from pagoda.kernels.rotary import context_length
from pagoda.logs import at_revision

logger = logging.getLogger(__name__)
GIB = 1 << 30
GRAMMAR_WAIT_S = 0.005  # an idle step waits this long for a grammar that is compiling


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.resolve_device()  # first: a device that cannot run fails fast
        source = loader.resolve_source(config.model, config.revision)
        self.hf_config = loader.load_config(source)
        model_class(self.hf_config.architectures)  # one the engine runs, before anything starts
        if config.tensor_parallel_size > 1:  # a size that does not split: before any rank starts
            tensor_parallel.Layout.of(self.hf_config, 0, config.tensor_parallel_size)
        # tensor parallelism: rank 0 starts the other ranks (None on them, and with one rank)
        self.leader = distributed.start_leader(config)
        # an engine dropped without close() still stops its ranks and leaves the process group,
        # so that the process can start another; not at exit, where multiprocessing ends the
        # (daemon) ranks without waiting on a rank that may be stuck in a collective
        self._stop_ranks = None
        if self.leader is not None:
            self._stop_ranks = weakref.finalize(self, self.leader.close)
            self._stop_ranks.atexit = False
        try:
            self._load(config, source)
        except BaseException:
            # the ranks started, and the group formed: neither may outlive a failed load (the
            # process could not form another group, and the ranks would wait on it for good)
            if self._stop_ranks is not None:
                self._stop_ranks.detach()
                self.leader.close(stop=False)
                self.leader = None
            raise

    def _load(self, config: EngineConfig, source) -> None:
        self.device = distributed.rank_device(self.device)
        if self.device.type == "cuda":
            # Triton launches and CUDA graphs go to the current device, not to the tensors' one
            torch.cuda.set_device(self.device)
        self.tokenizer = (
            None
            if config.skip_tokenizer_init
            else loader.load_tokenizer(source, *config.tokenizer_source())
        )
        self.eos_token_ids = loader.eos_token_ids(source, self.hf_config, self.tokenizer)
        self.sampling_defaults = sampling_defaults(
            None if source.gguf_file else source.folder,
            config.generation_config,
            config.override_generation_config,
        )
        self.max_tokens_cap = max_tokens_cap(
            self.sampling_defaults, config.generation_config, config.override_generation_config
        )
        if self.sampling_defaults:
            logger.info(
                "sampling fields a request leaves unset default to %s (generation_config %s%s)",
                self.sampling_defaults,
                config.generation_config,
                " and override_generation_config" if config.override_generation_config else "",
            )
        if self.max_tokens_cap is not None:
            logger.info("a served request gets at most %d tokens", self.max_tokens_cap)
        self.vocab_size = self.hf_config.vocab_size
        self.max_model_len = self._resolve_max_model_len()
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        elif config.tensor_parallel_size > 1 and self.device.type == "cpu":
            torch.set_num_threads(distributed.cpu_threads_per_rank(config))
        self.dtype = config.resolve_dtype(self.device, loader.checkpoint_dtype(self.hf_config))
        # read before the weights load: a bad adapter fails fast
        adapters = lora.load_adapters(config.lora_modules or {}, self.hf_config.num_hidden_layers)
        self.max_loras = len(adapters) if config.max_loras is None else config.max_loras
        max_lora_rank = self._max_lora_rank(adapters)
        self._lora_ids = count()
        self.loras: dict[str, lora.Loaded] = {
            adapter.name: lora.Loaded(slot, next(self._lora_ids), str(adapter.folder))
            for slot, adapter in enumerate(adapters)
        }
        model = loader.build_model(
            self.hf_config,
            source,
            config,
            self.device,
            self.dtype,
            self.max_model_len,
            (adapters, self.max_loras, max_lora_rank),
        )
        if self.max_loras:
            logger.info(
                "LoRA: %d adapter slots of rank up to %d, %d loaded%s",
                self.max_loras,
                max_lora_rank,
                len(adapters),
                "".join(f"; {a.name}: rank {a.rank} from {a.folder}" for a in adapters),
            )
        num_blocks = self._num_kv_blocks(model)
        use_graphs = self._use_graphs()
        self.runner = ModelRunner(
            model,
            num_blocks,
            config.block_size,
            self.device,
            self.dtype,
            config.seed,
            decode_graphs=(self.max_model_len, config.max_num_seqs) if use_graphs else None,
        )
        self.runner.leader = self.leader
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.resolve_max_num_batched_tokens(self.device),
        )
        self._requests: dict[str, list[Sequence]] = {}
        self.grammars = (
            None
            if self.tokenizer is None
            else GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        )
        self._compiling: dict[str, list[Sequence]] = {}  # requests whose grammar is compiling
        self.rejected: list[tuple[str, str]] = []  # (request id, why): grammars that failed
        logger.info(
            "loaded %s%s (%s) on %s in %s: max_model_len %d, KV cache %d blocks of %d tokens",
            config.model,
            at_revision(source.commit),
            type(model).__name__,
            self.device,
            self.dtype,
            self.max_model_len,
            num_blocks,
            config.block_size,
        )

    def _max_lora_rank(self, adapters: list[lora.Adapter]) -> int:
        largest = max((adapter.rank for adapter in adapters), default=0)
        wanted = self.config.max_lora_rank
        if wanted is None:  # vLLM's 16 for adapters to come
            return max(largest, 16) if self.max_loras > len(adapters) else largest
        if largest > wanted:
            adapter = next(a for a in adapters if a.rank == largest)
            raise ValueError(
                f"LoRA adapter {adapter.name!r} has rank {largest}, above max_lora_rank={wanted}"
            )
        return wanted

    def _resolve_max_model_len(self) -> int:
        config = self.hf_config
        limit = context_length(config.rope_parameters, config.max_position_embeddings)
        why = "max_position_embeddings and its rope scaling"
        window = _sliding_window(config)
        if window is not None and window < limit:
            # Within the window, sliding-window attention is plain causal attention.
            logger.warning("sliding window of %d tokens: max_model_len capped to it", window)
            limit, why = window, "its sliding window"
        wanted = self.config.max_model_len
        if wanted is None:
            return limit
        if wanted > limit:
            raise ValueError(
                f"max_model_len {wanted} exceeds what the model supports ({limit}, {why})"
            )
        return wanted

    def _num_kv_blocks(self, model: torch.nn.Module) -> int:
        size = self.config.block_size
        per_seq = -(-self.max_model_len // size)
        if self.config.kv_cache_blocks is not None:
            num_blocks = self.config.kv_cache_blocks
        else:
            per_block = ModelRunner.kv_bytes_per_block(model, size, self.dtype)
            num_blocks = self._kv_cache_memory(model) // per_block
            num_blocks = min(num_blocks, per_seq * self.config.max_num_seqs)
        num_blocks = distributed.min_over_ranks(num_blocks)  # every rank's cache alike
        if num_blocks < per_seq:
            raise ValueError(
                f"a KV cache of {num_blocks} blocks of {size} tokens cannot hold one sequence of "
                f"max_model_len={self.max_model_len}: give more KV cache memory or a smaller "
                "max_model_len"
            )
        return num_blocks

    def _kv_cache_memory(self, model: torch.nn.Module) -> int:
        if self.config.kv_cache_memory is not None:
            return self.config.kv_cache_memory
        if self.device.type != "cuda":
            return DEFAULT_CPU_KV_CACHE_MEMORY
        activations = profiling.activation_peak(
            model,
            self.config.resolve_max_num_batched_tokens(self.device),
            self.config.max_num_seqs,
            min(self.config.max_num_seqs, CAPTURE_SIZES[-1]) if self._use_graphs() else None,
            self.config.block_size,
            self.device,
            self.dtype,
        )
        free, total = torch.cuda.mem_get_info(self.device)
        budget = profiling.kv_cache_budget(
            total, free, self.config.gpu_memory_utilization, activations
        )
        logger.info(
            "memory: %.2f GiB in use after loading, %.2f GiB for a step's activations, "
            "%.2f GiB for the KV cache",
            (total - free) / GIB,
            activations / GIB,
            budget / GIB,
        )
        return budget

    def _use_graphs(self) -> bool:
        # the torch attention path reads host-side lengths, which a graph would freeze; on a
        # CPU a graph replays the C++ kernels alone, and tensor parallelism adds collectives
        if self.config.enforce_eager or self.config.kernel_backend == "torch":
            return False
        return self.device.type == "cuda" or (
            self.device.type == "cpu" and self.config.tensor_parallel_size == 1
        )

    # -- the step API -----------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: str | None = None,
    ) -> None:
        """`lora`: the name of one of `lora_modules`' adapters to run under, or None."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if lora is not None and lora not in self.loras:
            known = ", ".join(self.loras) or "none are loaded"
            raise ValueError(f"unknown LoRA adapter {lora!r} ({known})")
        self.validate_prompt(prompt_token_ids, generates=params.max_tokens != 0)
        room = self.max_model_len - len(prompt_token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seqs = []
        for index in range(params.n):
            seq = Sequence(
                request_id=request_id,
                index=index,
                token_ids=list(prompt_token_ids),
                num_prompt_tokens=len(prompt_token_ids),
                params=params,
                max_tokens=max_tokens,
                eos_token_ids=self.eos_token_ids,
                generator=_child_generator(params.seed, index, self.device),
                shares_prompt_with=seqs[0] if seqs and self.config.enable_prefix_caching else None,
                lora_slot=-1 if lora is None else self.loras[lora].slot,
                lora_id=-1 if lora is None else self.loras[lora].id,
            )
            seqs.append(seq)
        if params.structured_outputs is not None:
            self._compile_grammar(request_id, seqs, params)
        for seq in seqs:
            self.scheduler.add(seq)
        self._requests[request_id] = seqs

    def load_lora(self, name: str, source: str) -> None:
        """Serve one more adapter (a PEFT folder or hub id) from a free slot, between steps."""
        if name in self.loras:
            raise ValueError(f"LoRA adapter {name!r} is already loaded")
        if self.config.tensor_parallel_size > 1:
            raise ValueError("LoRA adapters load at start under tensor parallelism")
        # a slot is free once no adapter holds it and no request still runs under its last one
        held = {loaded.slot for loaded in self.loras.values()}
        held |= {seq.lora_slot for seqs in self._requests.values() for seq in seqs}
        free = [slot for slot in range(self.max_loras) if slot not in held]
        if not free:
            raise ValueError(
                f"no free LoRA slot: the {self.max_loras} slots (max_loras) hold adapters, "
                "or requests still run under one unloaded"
            )
        folder = lora.adapter_folder(name, source)
        adapter = lora.load_adapter(name, folder, self.hf_config.num_hidden_layers)
        self.runner.model.lora.write(free[0], adapter)
        self.loras[name] = lora.Loaded(free[0], next(self._lora_ids), str(folder))
        logger.info("LoRA adapter %s loaded: rank %d from %s", name, adapter.rank, folder)

    def unload_lora(self, name: str) -> None:
        """Stop serving an adapter: new requests naming it are refused, those running under it
        finish under it, and its slot is free once they have."""
        if self.loras.pop(name, None) is None:
            raise ValueError(f"unknown LoRA adapter {name!r}")
        logger.info("LoRA adapter %s unloaded", name)

    def _compile_grammar(self, request_id: str, seqs: list[Sequence], params) -> None:
        if self.grammars is None:
            raise ValueError("structured outputs need the tokenizer (skip_tokenizer_init is set)")
        compiled = self.grammars.submit(params.structured_outputs)
        for seq in seqs:
            attach(seq, compiled, params.structured_outputs)
        self._compiling[request_id] = seqs

    def _start_matchers(self) -> None:
        for request_id, seqs in list(self._compiling.items()):
            compiled = seqs[0].grammar.compiled
            if not compiled.done():
                continue
            del self._compiling[request_id]
            if compiled.exception() is not None:
                self.rejected.append((request_id, str(compiled.exception())))
                self.abort_request(request_id)
                continue
            for seq in seqs:
                start_matcher(seq)

    def take_rejected(self) -> list[tuple[str, str]]:
        rejected, self.rejected = self.rejected, []
        return rejected

    def validate_prompt(self, prompt_token_ids: list[int], generates: bool = True) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) > self.max_model_len - generates:
            room = "no room to generate" if generates else "more than the context holds"
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens, {room} "
                f"within max_model_len={self.max_model_len}"
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary (0-{self.vocab_size - 1})"
            )

    def abort_request(self, request_id: str) -> None:
        self._compiling.pop(request_id, None)
        for seq in self._requests.pop(request_id, []):
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def finish_sequence(self, request_id: str, index: int, reason: str) -> SequenceDelta | None:
        """End one choice of a request between steps (a stop string found in its text): its
        last delta, without tokens; None where it had ended already (or its request had)."""
        seqs = self._requests.get(request_id)
        if seqs is None or seqs[index].is_finished:
            return None
        seq = seqs[index]
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        if all(s.is_finished for s in seqs):
            del self._requests[request_id]
        return SequenceDelta(
            request_id, index, [], [], None, reason, seq.num_prompt_tokens, seq.num_cached_tokens
        )

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[SequenceDelta]:
        if self.leader is not None:
            self.leader.check_alive()
        if self._compiling:
            self._start_matchers()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self._compiling:  # nothing else to do: do not spin while they compile
                pending = [seqs[0].grammar.compiled for seqs in self._compiling.values()]
                wait(pending, timeout=GRAMMAR_WAIT_S, return_when=FIRST_COMPLETED)
            return []
        try:
            sampled = self.runner.run(batch)
        except RuntimeError as exc:  # gloo: a peer's connection closed
            if self.leader is None:
                raise
            raise distributed.RankDiedError(f"a tensor-parallel step failed: {exc}") from exc
        self.scheduler.update(batch, sampled)
        deltas = []
        for i in sampled:
            seq = batch.seqs[i]
            deltas.append(
                SequenceDelta(
                    request_id=seq.request_id,
                    index=seq.index,
                    new_token_ids=seq.token_ids[-1:] if seq.num_output_tokens else [],
                    new_logprobs=seq.logprobs[-1:] if seq.params.logprobs is not None else [],
                    finish_reason=seq.finish_reason,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_cached_tokens=seq.num_cached_tokens,
                    prompt_logprobs=seq.prompt_logprobs
                    if seq.params.prompt_logprobs is not None and seq.num_output_tokens <= 1
                    else None,
                )
            )
        for request_id in {d.request_id for d in deltas if d.finish_reason is not None}:
            if all(s.is_finished for s in self._requests[request_id]):
                del self._requests[request_id]
        return deltas

    def sequences(self, request_id: str) -> list[Sequence]:
        return self._requests.get(request_id, [])

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do with one rank)."""
        if self._stop_ranks is not None:
            self._stop_ranks()  # runs Leader.close once
            self.leader = None


def _sliding_window(config) -> int | None:
    if hasattr(config, "use_sliding_window") and not config.use_sliding_window:
        return None
    return getattr(config, "sliding_window", None)


def _child_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    # Choice 0 draws as an n=1 request with the same seed would; the others get their own.
    child_seed = seed if index == 0 else hash((seed, index)) % (1 << 63)
    return torch.Generator(device=device).manual_seed(child_seed)
