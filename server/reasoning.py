"""Reasoning parsers, vLLM's `--reasoning-parser`: a reasoning model's thinking, written between
<think> and </think>, goes to the message's `reasoning` (and `reasoning_content`, the name
DeepSeek's API and earlier vLLM releases use) instead of its `content`.

Where an output starts, in the thinking or in the answer, the prompt says first: its last tag
(DeepSeek-R1's and Qwen3-Thinking's templates end the prompt with <think>; Qwen3 with
`enable_thinking: false` ends it with an empty <think></think>). Without a tag there, an output
that opens with <think> thinks, and one that does not is the answer (qwen3) or thinks anyway
(deepseek_r1, whose outputs may leave out the opening tag). Thinking that never closes (an output
cut by max_tokens) is all reasoning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pagoda.engine.sampling_params import StructuredOutputsParams
from pagoda.server.detokenizer import held_back_length

START, END = "<think>", "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningParser:
    name: str
    start_id: int
    end_id: int
    thinks_untagged: bool  # an output without a tag before it or at its start
    tags_are_special: bool  # the detokenizer must then keep special tokens' text

    def starts_thinking(self, prompt_token_ids: list[int]) -> bool | None:
        """Whether the output starts in the thinking; None: its own start will say."""
        for token in reversed(prompt_token_ids):
            if token == self.start_id:
                return True
            if token == self.end_id:
                return False
        return None

    def after_thinking(
        self, constraint: StructuredOutputsParams, prompt_token_ids: list[int]
    ) -> StructuredOutputsParams:
        """`constraint`, holding from the end of the output's thinking (as vLLM's structured
        outputs do with a reasoning parser): the model thinks freely first."""
        thinking = self.starts_thinking(prompt_token_ids)
        if thinking is None and self.thinks_untagged:
            thinking = True
        tags = [self.start_id, self.end_id]
        return dataclasses.replace(constraint, thinking_tags=tags, thinking=thinking)

    def stream(self, prompt_token_ids: list[int]) -> ReasoningStream:
        return ReasoningStream(self.starts_thinking(prompt_token_ids), self.thinks_untagged)


PARSERS = {"qwen3": False, "deepseek_r1": True}  # name -> thinks_untagged


def reasoning_parser(name: str, tokenizer) -> ReasoningParser:
    """The parser for a model whose tokenizer has both tags as tokens of their own (as vLLM
    requires), else a ValueError that says so."""
    vocab = tokenizer.get_vocab()
    if START not in vocab or END not in vocab:
        raise ValueError(
            f"reasoning parser {name!r}: the tokenizer has no {START} and {END} tokens; "
            "is this a reasoning model?"
        )
    start_id, end_id = vocab[START], vocab[END]
    added = tokenizer.added_tokens_decoder
    special = any(added[i].special for i in (start_id, end_id) if i in added)
    return ReasoningParser(name, start_id, end_id, PARSERS[name], special)


@dataclass(slots=True)
class ReasoningStream:
    """One choice's text, split as it comes: `feed` and, at the end, `finish` give the new
    (reasoning, content). A tag split across deltas is held back until it is whole."""

    thinking: bool | None  # None: until the output's first text that is not blank
    thinks_untagged: bool
    held: str = ""
    thought: bool = False  # whether the output had a thinking part (even an empty one)
    reasoning_tokens: int = 0  # the tokens of the thinking, not its tags

    def feed(self, text: str, num_tokens: int = 0) -> tuple[str, str]:
        """The new text's (reasoning, content); its `num_tokens` count as reasoning where it
        comes and leaves inside the thinking (a tag's token opens or closes it)."""
        inside = self._thinking_now()
        split = self._split(text)
        if inside and self._thinking_now():
            self.reasoning_tokens += num_tokens
        return split

    def _thinking_now(self) -> bool:
        return self.thinks_untagged if self.thinking is None else self.thinking

    def _split(self, text: str) -> tuple[str, str]:
        self.held += text
        reasoning = content = ""
        while True:
            if self.thinking is None:
                start = self.held.lstrip()
                if start.startswith(START):
                    self.held = start[len(START) :]
                    self.thinking = True
                elif START.startswith(start):  # blank, or a part of the tag
                    return reasoning, content
                else:
                    self.thinking = self.thinks_untagged
            elif self.thinking:
                self.thought = True
                end = self.held.find(END)
                if end < 0:
                    keep = held_back_length(self.held, [END])
                    reasoning += self.held[: len(self.held) - keep]
                    self.held = self.held[len(self.held) - keep :]
                    return reasoning, content
                reasoning += self.held[:end]
                self.held = self.held[end + len(END) :]
                self.thinking = False
            else:
                content, self.held = content + self.held, ""
                return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What was held back, at the output's end."""
        held, self.held = self.held, ""
        if self._thinking_now():
            self.thought = True
            return held, ""
        return "", held
