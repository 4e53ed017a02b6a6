"""Per-request sampling parameters, validated on construction (vLLM's names and meanings)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20


@dataclass(slots=True)
class StructuredOutputsParams:
    """A constraint on the output, enforced by a grammar in the sampler; exactly one is set.

    `json`: a JSON schema (dict or JSON text); `regex`; `choice`: the output is one of these
    strings; `grammar`: an EBNF (GBNF) grammar; `json_object`: any JSON object."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # A reasoning model thinks freely, and the constraint holds from the end of its thinking:
    # the (start, end) token ids of its tags, and whether the output starts in the thinking
    # (None: its first token says, the start tag or one the constraint allows).
    thinking_tags: list[int] | None = None
    thinking: bool | None = False

    def __post_init__(self) -> None:
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError("structured_outputs.json must be a JSON schema object")
        for name, kind, what in (
            ("regex", str, "a string"),
            ("grammar", str, "a string"),
            ("json_object", bool, "a boolean"),
        ):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), kind):
                raise ValueError(f"structured_outputs.{name} must be {what}")
        if self.choice is not None:
            choice = self.choice
            self.choice = list(choice) if isinstance(choice, list | tuple) else []
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        tags = self.thinking_tags
        if tags is not None and not (len(tags) == 2 and all(isinstance(t, int) for t in tags)):
            raise ValueError("structured_outputs.thinking_tags must be two token ids")
        given = [name for name, value in self._constraints().items() if value not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar and "
                f"json_object, got {', '.join(given) or 'none'}"
            )

    def _constraints(self) -> dict[str, Any]:
        return {
            "json": self.json,
            "regex": self.regex,
            "choice": self.choice,
            "grammar": self.grammar,
            "json_object": self.json_object,
        }

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what a compiled grammar is cached by (property order matters)."""
        kind, value = next((k, v) for k, v in self._constraints().items() if v not in (None, False))
        if kind in ("regex", "grammar"):
            return kind, value
        return kind, json.dumps(value, ensure_ascii=False)


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # None: all; else only these may be drawn
    # Words never to complete: their token sequences come from `tokenize_bad_words`, which
    # the offline LLM and the server call (the engine has no tokenizer).
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    max_tokens: int | None = 16  # None: up to max_model_len; 0: the prompt only (scoring)
    min_tokens: int = 0
    stop_token_ids: list[int] | None = field(default_factory=list)  # None: none (vLLM's)
    # Stop strings: the offline LLM cuts the text at the first (the server's frontend applies
    # the request's own `stop`); the engine itself never reads them.
    stop: str | list[str] | None = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the chosen token plus the top k
    prompt_logprobs: int | None = None  # the same for each prompt token (scoring, `echo`)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):  # as it crosses to the engine process
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.top_k == -1:
            self.top_k = 0
        self.stop_token_ids = list(self.stop_token_ids or ())
        if isinstance(self.stop, str | list | tuple | None):
            self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self._validate()

    def _validate(self) -> None:
        for name in ("n", "seed"):  # a str or float here would fail mid-batch, in torch
            value = getattr(self, name)
            if not (isinstance(value, int) or value is None and name == "seed"):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if self.allowed_token_ids is not None and not (
            self.allowed_token_ids and all(isinstance(t, int) for t in self.allowed_token_ids)
        ):
            raise ValueError(f"allowed_token_ids must be token ids, got {self.allowed_token_ids!r}")
        if self.bad_words is not None and not all(
            isinstance(w, str) and w.strip() for w in self.bad_words
        ):
            raise ValueError(f"bad_words must be non-blank strings, got {self.bad_words!r}")
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1 (disabled) or positive, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.repetition_penalty > 0.0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                self.max_tokens is None or self.max_tokens >= 0,
                f"max_tokens must be >= 0, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


VOCABULARY_FIELDS = ("logit_bias", "allowed_token_ids")  # fields that hold token ids


def check_token_ids(name: str, token_ids: Iterable[int] | None, vocab_size: int) -> None:
    """The ids of field `name` are the model's (SamplingParams alone cannot know the vocabulary):
    a bias or an allowed id computed with another tokenizer would otherwise do nothing."""
    if outside := [t for t in token_ids or () if not 0 <= t < vocab_size]:
        raise ValueError(
            f"token id {outside[0]} in {name} is outside the vocabulary [0, {vocab_size})"
        )


def tokenize_bad_words(tokenizer: Any, words: list[str] | None) -> list[list[int]] | None:
    """Each bad word's token sequences: as written and after a space, as it reads mid-text
    (a word-initial token differs from the same word's token after a space)."""
    if not words:
        return None
    sequences: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences
