"""Offline inference, vLLM-shaped: `LLM(model).generate(prompts, sampling_params)`."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

import torch
from tqdm import tqdm

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.sampling_params import (
    VOCABULARY_FIELDS,
    SamplingParams,
    check_token_ids,
    tokenize_bad_words,
)
from pagoda.engine.sequence import Sequence, SequenceDelta, TokenLogprobs
from pagoda.engine.structured_output import build_grammar
from pagoda.server.detokenizer import IncrementalDetokenizer

Prompt = str | dict
Message = dict  # {"role": ..., "content": ...}, as transformers' chat templates take it
# per sequence with stop strings, (request id, index): its text so far, cut at a stop string
Watched = dict[tuple[str, int], IncrementalDetokenizer]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None
    # the sum of the chosen tokens' logprobs, where logprobs were asked for (vLLM's)
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None  # the stop token id (or string) that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        tokenizer: str | None = None,
        tokenizer_revision: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        load_format: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        kv_cache_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.9,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        seed: int | None = 0,
        kernel_backend: str = "auto",
        enforce_eager: bool = False,
        skip_tokenizer_init: bool = False,
        cpu_threads: int | None = None,
        tensor_parallel_size: int = 1,
        generation_config: str = "auto",
        override_generation_config: dict | None = None,
        lora_modules: dict[str, str] | None = None,
        max_loras: int | None = None,
        max_lora_rank: int | None = None,
        **parallel,  # nnodes, node_rank, master_addr, master_port, distributed_timeout_s
    ) -> None:
        config = EngineConfig(
            model=model,
            revision=revision,
            tokenizer=tokenizer,
            tokenizer_revision=tokenizer_revision,
            dtype=dtype,
            device=device,
            load_format=load_format,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            kv_cache_blocks=kv_cache_blocks,
            kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization,
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            kernel_backend=kernel_backend,
            enforce_eager=enforce_eager,
            skip_tokenizer_init=skip_tokenizer_init,
            cpu_threads=cpu_threads,
            tensor_parallel_size=tensor_parallel_size,
            generation_config=generation_config,
            override_generation_config=override_generation_config,
            lora_modules=lora_modules,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            **parallel,
        )
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = count()

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` uses without sampling params: the model's recommended values
        (its generation_config.json, unless `generation_config="vllm"`), else the defaults."""
        return SamplingParams(**self.engine.sampling_defaults)

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """`lora`: a LoRA adapter of `lora_modules` (by name) for every prompt, or one per
        prompt (None: the base model), as vLLM's `lora_request`."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        adapters = lora if isinstance(lora, list) else [lora] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(adapters)} LoRA adapters given for {len(prompts)} prompts")
        for name in set(adapters) - {None} - set(self.engine.loras):
            raise ValueError(f"unknown LoRA adapter {name!r} (loaded: {list(self.engine.loras)})")
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"{len(sampling_params)} sampling params given for {len(prompts)} prompts"
            )
        # Tokenize and validate everything before the first request enters the engine.
        encoded = [self._encode(p) for p in prompts]
        for (ids, _), params in zip(encoded, sampling_params):
            self.engine.validate_prompt(ids, generates=params.max_tokens != 0)
            for name in VOCABULARY_FIELDS:
                check_token_ids(name, getattr(params, name), self.engine.vocab_size)
        for params in sampling_params:
            if params.structured_outputs is not None:
                build_grammar(params.structured_outputs)  # a bad constraint fails here
            if (params.stop or params.bad_words) and self.tokenizer is None:
                raise ValueError(
                    "stop strings and bad_words need a tokenizer (skip_tokenizer_init is set)"
                )
            if params.bad_words and params.bad_words_token_ids is None:
                params.bad_words_token_ids = tokenize_bad_words(self.tokenizer, params.bad_words)
        requests: list[tuple[RequestOutput, list[Sequence]]] = []
        try:
            for (ids, text), params, adapter in zip(encoded, sampling_params, adapters):
                output = RequestOutput(str(next(self._ids)), text, ids)
                requests.append((output, []))
                self.engine.add_request(output.request_id, ids, params, adapter)
                requests[-1] = (output, self.engine.sequences(output.request_id))
            watched = self._watch_stop_strings(requests)
            self._run(sum(p.n for p in sampling_params), use_tqdm, watched)
        except BaseException:  # Ctrl-C or an error: nothing of this call runs on in the next
            for output, _ in requests:
                self.engine.abort_request(output.request_id)
            raise
        return [self._finish(output, seqs, watched) for output, seqs in requests]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        lora: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a batch of them, each rendered by the chat
        template (the tokenizer's, or `chat_template`) and generated as `generate` does."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init is set)")
        batch = messages if messages and isinstance(messages[0], list | tuple) else [messages]
        prompts = []
        for conversation in batch:
            try:
                text = self.tokenizer.apply_chat_template(
                    list(conversation),
                    chat_template=chat_template,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    tools=tools,
                    tokenize=False,
                    **(chat_template_kwargs or {}),
                )
            except Exception as exc:  # jinja's errors, or a template that rejects a role
                raise ValueError(f"the chat template rejected the messages: {exc}") from exc
            # the template wrote the special tokens (BOS) itself
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt_token_ids": ids, "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm, lora)

    def close(self) -> None:
        """Stop the engine's other tensor-parallel ranks (with one rank: nothing to do).
        Dropping the LLM, or leaving its `with` block, does it too."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _encode(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init is set)")
            return self.tokenizer(prompt).input_ids, prompt
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return [int(t) for t in prompt["prompt_token_ids"]], prompt.get("prompt")
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return self._encode(prompt["prompt"])
        raise ValueError(
            "a prompt is a string, or a dict with 'prompt' (text) or 'prompt_token_ids'"
        )

    def _watch_stop_strings(self, requests: list[tuple[RequestOutput, list[Sequence]]]) -> Watched:
        return {
            (seq.request_id, seq.index): IncrementalDetokenizer(
                self.tokenizer,
                stop=seq.params.stop,
                skip_special_tokens=seq.params.skip_special_tokens,
                prompt_token_ids=output.prompt_token_ids,
                min_tokens=seq.params.min_tokens,
            )
            for output, seqs in requests
            for seq in seqs
            if seq.params.stop
        }

    def _run(self, total: int, use_tqdm: bool, watched: Watched) -> None:
        with tqdm(total=total, desc="Generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                deltas = self.engine.step()
                for request_id, message in self.engine.take_rejected():
                    raise ValueError(f"request {request_id}: {message}")
                bar.update(sum(self._ended(d, watched) for d in deltas))

    def _ended(self, delta: SequenceDelta, watched: Watched) -> bool:
        """Whether the delta ends its sequence, which a stop string in its text does too."""
        stops = watched.get((delta.request_id, delta.index)) if watched else None
        if stops is not None and not stops.stopped:
            stops.add(delta.new_token_ids)
            if stops.stopped and delta.finish_reason is None:
                self.engine.finish_sequence(delta.request_id, delta.index, "stop")
                return True
        return delta.finish_reason is not None

    def _decode(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(
            seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens
        )

    def _finish(
        self, output: RequestOutput, seqs: list[Sequence], watched: Watched
    ) -> RequestOutput:
        for seq in seqs:
            wanted = seq.params.logprobs is not None
            stops = watched.get((seq.request_id, seq.index))
            stop_str = None if stops is None else stops.stop_str
            text = self._decode(seq) if stop_str is None else stops.text
            if stop_str is not None and seq.params.include_stop_str_in_output:
                text += stop_str
            output.outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=seq.output_token_ids,
                    finish_reason=seq.finish_reason if stop_str is None else "stop",
                    logprobs=seq.logprobs if wanted else None,
                    cumulative_logprob=_cumulative_logprob(seq) if wanted else None,
                    stop_reason=_stop_token(seq) if stop_str is None else stop_str,
                )
            )
        output.num_cached_tokens = seqs[0].num_cached_tokens
        if seqs[0].params.prompt_logprobs is not None:
            output.prompt_logprobs = seqs[0].prompt_logprobs
        return output


def _cumulative_logprob(seq: Sequence) -> float:
    return sum(entry[token].logprob for token, entry in zip(seq.output_token_ids, seq.logprobs))


def _stop_token(seq: Sequence) -> int | None:
    """The stop_token_ids entry that ended `seq` (None for EOS, which comes first, as vLLM)."""
    if seq.finish_reason != "stop" or not seq.output_token_ids:
        return None
    last = seq.output_token_ids[-1]
    if last in seq.eos_token_ids and not seq.params.ignore_eos:
        return None
    return last if last in seq.params.stop_token_ids else None
