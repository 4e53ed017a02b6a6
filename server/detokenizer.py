"""Incremental detokenization of a generated token stream, with OpenAI-style stop strings.

Token ids go through `tokenizers.decoders.DecodeStream`, which withholds a token's text until it
ends on a whole character, so byte-level BPE and byte-fallback tokens never show half a UTF-8
character as U+FFFD mid-stream. On top of that, text that may be the start of a stop string is
held back until it either completes the stop string (then it and everything after is dropped) or
diverges (then it is released). As in vLLM, a stop string counts only where it ends in the
text of a token after the first `min_tokens`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Prompt tokens fed to the stream as context for the first generated token.
PROMPT_CONTEXT_TOKENS = 5

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas that are safe to show to the client.

    Concatenating every `add()` result and the final `flush()` gives the complete output text,
    which is also available as `text`.
    """

    def __init__(
        self,
        tokenizer,
        *,
        stop: str | Sequence[str] = (),
        skip_special_tokens: bool = True,
        prompt_token_ids: Sequence[int] | None = None,
        min_tokens: int = 0,
    ) -> None:
        self._backend = _backend_of(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        stops = [stop] if isinstance(stop, str) else stop
        self._stops = [s for s in stops if s]
        context = self._prompt_context(prompt_token_ids or [])
        self._stream = DecodeStream(context, skip_special_tokens=skip_special_tokens)
        # ids behind the stream's last chunk, and ids it has not turned into text yet
        self._last_chunk_ids: list[int] = context
        self._pending_ids: list[int] = []
        self._held = ""  # decoded text not emitted yet: a possible start of a stop string
        self._pieces: list[str] = []
        self._emitted = 0  # characters emitted so far
        self._min_tokens = min_tokens
        self._num_tokens = 0
        # characters of text that the first min_tokens tokens gave; None while they are not out
        self._stops_end_after: int | None = 0 if min_tokens == 0 else None
        self.stop_str: str | None = None  # the stop string found, once found

    @property
    def stopped(self) -> bool:
        """A stop string was found; nothing more will be emitted."""
        return self.stop_str is not None

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed newly generated ids; return the text that may be shown now."""
        if self.stopped:
            return ""
        new_text = ""
        for token_id in token_ids:
            new_text += self._step(token_id) or ""
            self._num_tokens += 1
            if self._num_tokens == self._min_tokens:
                self._stops_end_after = self._emitted + len(self._held) + len(new_text)
        return self._release(new_text)

    def flush(self) -> str:
        """At the end of generation, return the text still held back.

        That is a possible stop-string prefix that never completed, and the text of trailing
        tokens that do not end on a whole character (decoded with U+FFFD, as `decode` would).
        """
        if self.stopped:
            return ""
        tail = self._pending_text()
        self._pending_ids = []
        delta = self._release(tail)
        if not self.stopped:
            delta += self._held
            self._emit(self._held)
            self._held = ""
        return delta

    def _step(self, token_id: int) -> str | None:
        chunk = self._stream.step(self._backend, token_id)
        self._pending_ids.append(token_id)
        if chunk is not None:
            self._last_chunk_ids, self._pending_ids = self._pending_ids, []
        return chunk

    def _pending_text(self) -> str:
        """Text of the ids the stream still withholds, decoded after the last chunk's ids."""
        if not self._pending_ids:
            return ""
        context = self._decode(self._last_chunk_ids)
        text = self._decode(self._last_chunk_ids + self._pending_ids)
        return text[len(context) :] if text.startswith(context) else self._decode(self._pending_ids)

    def _release(self, new_text: str) -> str:
        """Apply stop strings to held + new text; emit what is settled, hold the rest."""
        if not new_text:
            return ""
        buffer = self._held + new_text
        found = None
        if self._stops_end_after is not None:
            found = _first_stop(buffer, self._stops, self._stops_end_after - self._emitted)
        if found is not None:
            cut, self.stop_str = found
            self._held = ""
            return self._emit(buffer[:cut])
        keep = held_back_length(buffer, self._stops)
        self._held = buffer[len(buffer) - keep :]
        return self._emit(buffer[: len(buffer) - keep])

    def _emit(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
            self._emitted += len(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt ending inside a character would make the stream emit the whole context once
        # the character completes; such tokens are dropped from the context.
        while context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context.pop()
        return context


def _backend_of(tokenizer) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"{type(tokenizer).__name__} has no `tokenizers` backend (not a fast one)")
    return backend


def _first_stop(text: str, stops: Sequence[str], end_after: int = 0) -> tuple[int, str] | None:
    """Start of the stop string that is complete first in `text` (by end, then by start) and
    ends after `end_after` characters, and that string."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop, max(0, end_after - len(stop) + 1))
        if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
            best = (start + len(stop), start, stop)
    return None if best is None else best[1:]


def held_back_length(text: str, strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `strings`: what a
    stream holds back until it knows whether one of them follows."""
    longest = max((len(string) for string in strings), default=0)
    for start in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[start:]
        if any(string.startswith(tail) for string in strings):
            return len(text) - start
    return 0


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte fallback
_BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE


def token_bytes(tokenizer: Any, token_id: int, text: str) -> bytes:
    """The bytes a token stands for (`text` is its decoded text). A token that holds part of a
    character decodes to U+FFFD, so its bytes come from its vocabulary piece instead: joined,
    the tokens' bytes give back the text (OpenAI's `logprobs.content[].bytes`)."""
    if REPLACEMENT_CHAR not in text:
        return text.encode()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if (byte := _BYTE_PIECE.fullmatch(piece)) is not None:
        return bytes([int(byte[1], 16)])
    if all(char in _BYTE_OF_CHAR for char in piece):
        return bytes(_BYTE_OF_CHAR[char] for char in piece)
    return text.encode()
