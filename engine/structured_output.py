"""Grammar-constrained decoding with xgrammar.

A request's constraint (`StructuredOutputsParams`) is turned into an xgrammar `Grammar` when it
is added (cheap, no tokenizer: a bad schema fails there), then compiled against the tokenizer on
a worker thread, cached by its key, so that the step loop never waits for a compilation: the
scheduler skips a sequence until its grammar is ready. Each sequence gets its own matcher. Each
step the sampler writes the allowed tokens of every constrained row into a bitmask, sets the
other logits to -inf before anything else (logprobs report the constrained distribution), and
advances the matchers with the sampled tokens. A preempted sequence keeps its generated tokens
(recomputation only rebuilds their KV), so its matcher stays where it was.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xgrammar as xgr

from pagoda.engine.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from pagoda.engine.sequence import Sequence

logger = logging.getLogger(__name__)
CACHE_SIZE = 256  # compiled grammars kept (each holds per-token masks: tens to hundreds of KB)

# JSON schema keywords xgrammar ignores or cannot enforce (measured with xgrammar 0.2.9): an
# output built under them could fail validation, so a schema using one is refused.
UNSUPPORTED_KEYWORDS = (
    "allOf",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "patternProperties",
    "propertyNames",
    "minProperties",
    "maxProperties",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedItems",
)


# keywords whose value maps names to schemas (the names are not keywords)
SCHEMA_MAPS = ("properties", "$defs", "definitions")
# keywords whose value is not a schema
VALUES = ("enum", "const", "default", "examples", "required", "description", "title")
# what may stand beside a "$ref": xgrammar compiles the ref alone, ignoring any other keyword
REF_SIBLINGS = {
    "$ref",
    "$defs",
    "definitions",
    "description",
    "title",
    "default",
    "examples",
    "$comment",
    "$schema",
    "$id",
    "deprecated",
    "readOnly",
    "writeOnly",
}


def unsupported_feature(schema: Any, path: str = "") -> str | None:
    """The first schema feature that cannot be enforced, as "keyword at path", or None."""
    if isinstance(schema, list):
        return next(
            (f for i, item in enumerate(schema) if (f := unsupported_feature(item, f"{path}/{i}"))),
            None,
        )
    if not isinstance(schema, dict):
        return None
    where = path or "/"
    for key in UNSUPPORTED_KEYWORDS:
        if key in schema:
            return f"'{key}' at {where}"
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        return f"a remote '$ref' ({ref}) at {where}"
    if ref is not None and (beside := sorted(set(schema) - REF_SIBLINGS)):
        return f"'{beside[0]}' beside a '$ref' at {where}"
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and (reason := _regex_error(pattern)):
        return f"a 'pattern' that is not supported ({reason}) at {where}"
    multiple = schema.get("multipleOf")
    if multiple is not None and not (schema.get("type") == "integer" and _integral(multiple)):
        return f"'multipleOf' on a non-integer at {where}"
    for key, value in schema.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                if found := unsupported_feature(sub, f"{path}/{key}/{name}"):
                    return found
        elif key not in VALUES and (found := unsupported_feature(value, f"{path}/{key}")):
            return found
    return None


def _integral(value: Any) -> bool:
    return isinstance(value, int | float) and float(value).is_integer()


def _regex_error(pattern: str) -> str | None:
    # a pattern in a schema is compiled leniently: an assertion xgrammar cannot enforce
    # (lookaround) is dropped with a warning, where the same regex on its own is an error
    try:
        xgr.Grammar.from_regex(pattern)
    except RuntimeError as exc:
        return _reason(exc)
    return None


def _reason(exc: RuntimeError) -> str:
    """What xgrammar's parse error says is wrong: its last line, without the location."""
    return str(exc).strip().splitlines()[-1].split(": ", 1)[-1]


def build_grammar(params: StructuredOutputsParams) -> xgr.Grammar:
    """The grammar of a constraint, or ValueError naming what is wrong with it."""
    kind, text = params.key
    try:
        if kind == "json":
            if found := unsupported_feature(params.json):
                raise ValueError(f"the JSON schema uses {found}, which cannot be enforced")
            # compact separators: a small model given free whitespace may loop on newlines
            grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
            return _no_control_characters(grammar)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema(
                '{"type": "object"}', any_whitespace=False, strict_mode=False
            )
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "choice":
            literals = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
            return xgr.Grammar.from_ebnf(f"root ::= {literals}")
        return xgr.Grammar.from_ebnf(text)
    except RuntimeError as exc:
        raise ValueError(f"invalid structured_outputs.{kind}: {_reason(exc)}") from None


# xgrammar 0.2.9 writes the characters of a length-bounded string as this class, which lets raw
# control characters (invalid in JSON) through; its plain strings exclude them.
_LOOSE_STRING_CHARS = r"[^\"\\\r\n]"
_JSON_STRING_CHARS = r"[^\0-\x1f\"\\\r\n]"


def _no_control_characters(grammar: xgr.Grammar) -> xgr.Grammar:
    text = str(grammar)
    if _LOOSE_STRING_CHARS not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHARS, _JSON_STRING_CHARS))


@dataclass(slots=True)
class SequenceGrammar:
    """One sequence's grammar: compiling (`matcher` None) or ready; a reasoning model's only
    once its thinking ended (StructuredOutputsParams.thinking_tags)."""

    compiled: Future
    matcher: xgr.GrammarMatcher | None = None
    broken: bool = False  # the matcher refused a token (stops masked by min_tokens, ignore_eos)
    tags: list[int] | None = None  # the thinking's (start, end) token ids
    thinking: bool | None = False  # None: the next token is the output's first

    def advance(self, token: int) -> bool:
        """Take a sampled token; False where the grammar refused it."""
        if self.thinking is None:
            self.thinking = token == self.tags[0]
            if self.thinking:
                return True
        if self.thinking:
            self.thinking = token != self.tags[1]
            return True
        return self.matcher.accept_token(token)


class GrammarCompiler:
    """Compiles grammars on a worker thread against one tokenizer, keeping the results."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_token_ids)
        )
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pagoda-grammar")
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()

    def submit(self, params: StructuredOutputsParams) -> Future:
        key = params.key
        future = self._cache.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = self._pool.submit(self._compile, params)
            self._cache[key] = future
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return future

    def _compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        return self._compiler.compile_grammar(build_grammar(params))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def attach(seq: Sequence, compiled: Future, params: StructuredOutputsParams) -> None:
    thinking = params.thinking if params.thinking_tags else False
    seq.grammar = SequenceGrammar(compiled, tags=params.thinking_tags, thinking=thinking)


def start_matcher(seq: Sequence) -> None:
    """Give a sequence whose grammar compiled its matcher, advanced over any output so far."""
    grammar = seq.grammar
    grammar.matcher = xgr.GrammarMatcher(grammar.compiled.result())
    for token in seq.output_token_ids:
        grammar.advance(token)


def apply_bitmask(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Set the logits of the tokens each constrained row's grammar forbids to -inf, in place."""
    rows = [i for i, s in enumerate(seqs) if _active(s)]
    if not rows:
        return
    bitmask = _bitmask(len(seqs), logits.shape[-1])
    for i in rows:  # each fill writes its whole row: rows from earlier steps need no reset
        grammar = seqs[i].grammar
        grammar.matcher.fill_next_token_bitmask(bitmask, i)
        if grammar.thinking is None:  # the first token may open the thinking instead
            start = grammar.tags[0]
            bitmask.numpy().view(np.uint32)[i, start >> 5] |= np.uint32(1 << (start & 31))
    if logits.device.type != "cpu":
        bitmask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
        return
    dense = _mask_sparse_rows(logits, bitmask, rows)
    if dense:
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=dense)


def _mask_sparse_rows(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> list[int]:
    """Mask the rows that allow under half the vocabulary by keeping their allowed logits
    (xgrammar's CPU kernel takes ~15 ns per forbidden token: 23 ms for 32 rows of 49K that
    forbid all but a few, as at a JSON structure token); return the other rows."""
    vocab = logits.shape[-1]
    words = bitmask.numpy().view(np.uint32)[rows]  # bit j of word w: token 32 * w + j
    values = logits.numpy()  # numpy: small ops that torch would hand to its thread pool
    dense = []
    for row, row_words, count in zip(rows, words, np.bitwise_count(words).sum(axis=1).tolist()):
        if 2 * count > vocab:
            dense.append(row)
            continue
        nonzero = np.flatnonzero(row_words)
        bits = (row_words[nonzero, None] >> _BIT) & 1
        ids = (nonzero[:, None] * 32 + _BIT)[bits.astype(bool)]
        ids = ids[ids < vocab]
        kept = values[row, ids]
        values[row].fill(-np.inf)
        values[row, ids] = kept
    return dense


_BIT = np.arange(32, dtype=np.uint32)
_bitmasks: dict[int, torch.Tensor] = {}  # vocab size -> a reused buffer of rows


def _bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    # allocated once: a fresh torch.full per step costs tens of ms on a busy multi-threaded CPU
    buffer = _bitmasks.get(vocab_size)
    if buffer is None or buffer.shape[0] < num_rows:
        buffer = _bitmasks[vocab_size] = xgr.allocate_token_bitmask(max(num_rows, 256), vocab_size)
    return buffer[:num_rows]


def accept_tokens(seqs: list[Sequence], tokens: list[int]) -> None:
    for seq, token in zip(seqs, tokens):
        if _ready(seq) and not seq.grammar.advance(token):
            # only when another rule forced a token the grammar forbids
            logger.warning("request %s left its grammar at token %d", seq.request_id, token)
            seq.grammar.broken = True


def _ready(seq: Sequence) -> bool:
    grammar = seq.grammar
    return (
        grammar is not None
        and grammar.matcher is not None
        and not grammar.broken
        and not grammar.matcher.is_terminated()
    )


def _active(seq: Sequence) -> bool:
    """Whether the grammar constrains the sequence's next token (not while it thinks)."""
    return _ready(seq) and seq.grammar.thinking is not True
