"""An embedding request's inputs as token ids, checked against the model's limits.

The server tokenizes and checks them before a key's limits admit the request (its tokens count
against the key's tpm), then sends the worker token ids; the worker checks them again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagoda.engine.worker import Rejected


@dataclass(slots=True)
class EmbeddingInputs:
    tokenizer: Any  # the model's (sentence-transformers') Hugging Face tokenizer
    prompt: str  # the model's default prompt, put before every text
    vocab_size: int
    max_model_len: int

    def token_ids(
        self, inputs: list[str] | list[list[int]], truncate: int | None
    ) -> list[list[int]]:
        """Every input's token ids; Rejected (a 400) for a bad one."""
        limit = self.truncation_limit(truncate)
        if inputs and isinstance(inputs[0], str):
            return self._tokenize(inputs, limit)
        return [self._checked_ids(i, ids, limit) for i, ids in enumerate(inputs)]

    def pair_token_ids(
        self, pairs: list[list[str]], truncate: int | None = None
    ) -> tuple[list[list[int]], list[list[int]] | None]:
        """A cross-encoder's pairs of texts as sentence-transformers' CrossEncoder tokenizes
        them: one sequence each, cut to the model's limit (or to `truncate` tokens, vLLM's
        truncate_prompt_tokens) by taking tokens off the longer text first ("longest_first");
        and their token type ids (None if the model has none)."""
        encoded = self.tokenizer(
            [first for first, _ in pairs],
            [second for _, second in pairs],
            truncation="longest_first",
            max_length=self.pair_truncation_limit(truncate),
            return_attention_mask=False,
            verbose=False,
        )
        return encoded["input_ids"], encoded.get("token_type_ids")

    def truncation_limit(self, truncate: int | None, smallest: int = 1) -> int | None:
        if truncate is None:
            return None
        if truncate == -1:
            return self.max_model_len
        if not smallest <= truncate <= self.max_model_len:
            raise Rejected(
                f"truncate_prompt_tokens must be -1 or between {smallest} and the model's maximum "
                f"context length ({self.max_model_len}), got {truncate}",
                param="truncate_prompt_tokens",
            )
        return truncate

    def pair_truncation_limit(self, truncate: int | None) -> int:
        """A pair's most tokens: `truncate`, or the model's limit. A pair keeps its special
        tokens, so fewer than those is refused (the tokenizer would not cut it at all)."""
        special_tokens = self.tokenizer.num_special_tokens_to_add(pair=True)
        return self.truncation_limit(truncate, special_tokens) or self.max_model_len

    def leading_tokens(self, texts: list[str], count: int) -> list[str]:
        """Each text up to the end of its `count`-th token (Cohere's max_tokens_per_doc)."""
        spans = self.tokenizer(
            texts,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            verbose=False,
        )["offset_mapping"]
        return [
            text if len(offsets) <= count else text[: offsets[count - 1][1]]
            for text, offsets in zip(texts, spans)
        ]

    def _tokenize(self, texts: list[str], limit: int | None) -> list[list[int]]:
        """Token ids as sentence-transformers makes them (special tokens, the model's default
        prompt); a text over the limit is refused, or cut as the tokenizer cuts it when asked."""
        texts = [self.prompt + text for text in texts] if self.prompt else texts
        kwargs = {"add_special_tokens": True, "return_attention_mask": False, "verbose": False}
        token_ids = self.tokenizer(texts, **kwargs)["input_ids"]
        for index, ids in enumerate(token_ids):
            if limit is None:
                self._check_length(index, ids)
            elif len(ids) > limit:
                token_ids[index] = self.tokenizer(
                    texts[index], truncation=True, max_length=limit, **kwargs
                )["input_ids"]
        return token_ids

    def _checked_ids(self, index: int, ids: list[int], limit: int | None) -> list[int]:
        """Token ids as given (no special tokens added, as vLLM does)."""
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise Rejected(
                f"input {index}: token ids must be in [0, {self.vocab_size})", param="input"
            )
        if limit is None:
            self._check_length(index, ids)
        elif len(ids) > limit:
            return ids[:limit] if self.tokenizer.truncation_side == "right" else ids[-limit:]
        return ids

    def _check_length(self, index: int, ids: list[int]) -> None:
        if len(ids) > self.max_model_len:
            raise Rejected(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"input {index} has {len(ids)} tokens. Please reduce the length of the input, "
                "or set truncate_prompt_tokens.",
                code="context_length_exceeded",
                param="input",
            )
