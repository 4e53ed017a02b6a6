"""Hub ids served at a pinned revision: a catalog entry's `revision`, and the offline API's
`revision` and `tokenizer_revision`. The hub is a cache built here and read offline
(HF_HUB_OFFLINE): each repository has two snapshots of different weights, the tag `v1` at the
first commit and `main` at the second."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from huggingface_hub import constants
from sentence_transformers import CrossEncoder, SentenceTransformer
from transformers import AutoTokenizer

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.cross_encoder_worker import CrossEncoderWorker
from pagoda.engine.embedding_worker import EmbeddingConfig
from pagoda.engine.image_pipeline import ImageModelConfig, ImagePipeline
from pagoda.server.catalog import CatalogError, load_catalog, resolve_revision
from pagoda.server.embeddings import _worker_config
from pagoda.server.images import image_model_config
from pagoda.server.tokenizer_export import load_served_tokenizer, model_source
from tests.serving import Server, failed_start
from tests.test_image_pipelines import build_tiny_sd
from tests.tiny_models import build_tiny_embedder, build_tiny_model, build_tiny_reranker

V1 = "1a" * 20  # the commit tagged v1
MAIN = "2b" * 20  # the commit main points at
LLAMA = "acme/tiny-llama"
EMBEDDER = "acme/tiny-embedder"
SD = "acme/tiny-sd"
RERANKER = "acme/tiny-reranker"
REFS = ("v1", "main")  # the two snapshots of each repository, in order
V1_TOKEN = "<only-in-v1>"  # v1's tokenizer has it, main's has not
PROMPTS = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (5, 40)]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
TEXTS = ["hello", "The quick brown fox jumps over the lazy dog."]


def add_repo(cache: Path, repo_id: str, v1: Path, main: Path) -> None:
    """`repo_id` in the hub cache at `cache`, laid out as huggingface_hub lays it out."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(v1, repo / "snapshots" / V1)
    shutil.copytree(main, repo / "snapshots" / MAIN)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)


@pytest.fixture(scope="module")
def weights(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The local folders behind each commit: what each revision must serve."""
    root = tmp_path_factory.mktemp("weights")
    llama_v1 = root / "llama-v1"
    shutil.copytree(tiny_models["llama"], llama_v1)
    tokenizer = AutoTokenizer.from_pretrained(llama_v1)
    tokenizer.add_tokens([V1_TOKEN])
    tokenizer.save_pretrained(llama_v1)
    return {
        "llama-v1": llama_v1,
        "llama-main": build_tiny_model("llama", root / "llama-main", seed=1),
        "embedder-v1": build_tiny_embedder(root / "embedder-v1", seed=0),
        "embedder-main": build_tiny_embedder(root / "embedder-main", seed=1),
    }


@pytest.fixture(scope="module")
def hub_cache(weights, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    add_repo(cache, LLAMA, weights["llama-v1"], weights["llama-main"])
    add_repo(cache, EMBEDDER, weights["embedder-v1"], weights["embedder-main"])
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> Path:
    """The hub cache, offline, for this process and the ones it starts."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def greedy(model: str | Path, **kwargs) -> list[tuple[list[int], str]]:
    """Each prompt's greedy completion: its token ids and its text."""
    llm = LLM(str(model), dtype="float32", **kwargs)
    return [(o.outputs[0].token_ids, o.outputs[0].text) for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def references(weights) -> dict[str, list[tuple[list[int], str]]]:
    outputs = {name: greedy(weights[f"llama-{name}"]) for name in ("v1", "main")}
    # else no test below could tell the revisions apart
    assert [text for _, text in outputs["v1"]] != [text for _, text in outputs["main"]]
    return outputs


def test_the_offline_api_loads_the_revision_it_is_given(offline_hub, references, caplog):
    """Before: `LLM() got an unexpected keyword argument 'revision'`; a hub id was always
    served at main."""
    caplog.set_level("INFO", logger="pagoda")
    assert greedy(LLAMA, revision=V1) == references["v1"]
    assert f"loaded {LLAMA} at revision {V1} " in caplog.text
    assert greedy(LLAMA, revision="v1") == references["v1"]
    assert greedy(LLAMA) == references["main"]
    assert f"loaded {LLAMA} at revision {MAIN} " in caplog.text


def test_the_tokenizer_comes_at_its_own_revision(offline_hub, weights):
    """vLLM's tokenizer_revision: the model's own tokenizer at another revision, or another
    tokenizer's at one; without it, the tokenizer is the model's at the model's revision."""
    v1_token_id = AutoTokenizer.from_pretrained(weights["llama-v1"]).convert_tokens_to_ids(V1_TOKEN)

    def token_id(**kwargs) -> int | None:
        llm = LLM(kwargs.pop("model", LLAMA), dtype="float32", **kwargs)
        return llm.get_tokenizer().convert_tokens_to_ids(V1_TOKEN)

    unknown = AutoTokenizer.from_pretrained(weights["llama-main"]).unk_token_id
    assert token_id() == unknown
    assert token_id(tokenizer_revision="v1") == v1_token_id
    assert token_id(revision="v1") == v1_token_id
    assert token_id(revision="v1", tokenizer_revision="main") == unknown
    local = str(weights["llama-main"])
    assert token_id(model=local, tokenizer=LLAMA, tokenizer_revision=V1) == v1_token_id


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"revision": "v9"}, f"model '{LLAMA}' at revision 'v9' cannot be downloaded: "),
        ({"revision": "c" * 40}, f"at revision '{'c' * 40}' cannot be downloaded: "),
        ({"tokenizer_revision": "v9"}, f"tokenizer '{LLAMA}' at revision 'v9' cannot be loaded"),
    ],
)
def test_an_unknown_revision_is_refused_naming_it(offline_hub, kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        LLM(LLAMA, dtype="float32", **kwargs)


def test_a_revision_of_a_local_folder_is_refused(weights):
    """A revision pins a hub repository's files; given with a folder it would be ignored."""
    folder = str(weights["llama-main"])
    with pytest.raises(ValueError, match=f"revision 'v1' is for a hub id, and '{folder}' is a"):
        LLM(folder, revision="v1")
    with pytest.raises(ValueError, match="tokenizer_revision 'v1' is for a hub id"):
        LLM(folder, tokenizer_revision="v1")


def test_the_catalog_pins_each_entry_to_its_revisions_commit(offline_hub, tmp_path):
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        f"models:\n  - id: e\n    kind: embedding\n    source: {EMBEDDER}\n    revision: v1\n"
        f"  - id: latest\n    kind: embedding\n    source: {EMBEDDER}\n"
        f"  - id: gone\n    kind: embedding\n    source: {EMBEDDER}\n    revision: v9\n"
    )
    tagged, latest, gone = load_catalog(catalog)
    assert (resolve_revision(tagged), resolve_revision(latest)) == (V1, MAIN)
    assert _worker_config(tagged).revision == V1
    with pytest.raises(CatalogError) as error:
        resolve_revision(gone)
    assert str(error.value).startswith(
        f"{catalog}:9: entry 3 (id 'gone'): revision: no revision 'v9' of '{EMBEDDER}' on the "
        "hub or in its cache: RevisionResolutionError: "
    )


def test_a_revision_on_a_folder_the_catalog_names_is_refused(tmp_path, weights):
    """`acme/tiny` that is a folder beside the catalog reads as a path: a revision there would
    be ignored."""
    shutil.copytree(weights["llama-main"], tmp_path / "acme" / "tiny")
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        "models:\n  - id: t\n    kind: chat\n    source: acme/tiny\n    revision: v1\n"
    )
    (entry,) = load_catalog(catalog)
    with pytest.raises(CatalogError, match=r"models.yaml:2: entry 1 \(id 't'\): revision: only"):
        resolve_revision(entry)


def test_the_exported_tokenizer_is_the_one_at_the_entrys_revision(offline_hub, tmp_path):
    """`pagoda tokenizer export` (benchmark clients tokenize with it) of a pinned entry."""
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        f"models:\n  - id: t\n    kind: chat\n    source: {LLAMA}\n    revision: v1\n"
    )
    served = model_source("t", catalog)
    assert (served.source, served.revision) == (LLAMA, V1)
    assert V1_TOKEN in load_served_tokenizer(served).get_vocab()


@pytest.mark.parametrize("kind", ["chat", "embedding"])
def test_an_unknown_revision_stops_the_start_naming_the_entry(offline_hub, tmp_path, kind):
    source = LLAMA if kind == "chat" else EMBEDDER
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        f"models:\n  - id: pinned\n    kind: {kind}\n    source: {source}\n    revision: v9\n"
    )
    stderr = failed_start("--catalog", str(catalog), "--port", "1")
    assert f"{catalog}:2: entry 1 (id 'pinned'): revision: no revision 'v9' of " in stderr
    assert "Traceback" not in stderr


@pytest.fixture(scope="module")
def server(hub_cache, tmp_path_factory):
    catalog = tmp_path_factory.mktemp("revisions") / "models.yaml"
    chat = "    kind: chat\n    max_model_len: 256\n    engine: {dtype: float32}\n"
    embedding = "    kind: embedding\n    engine: {dtype: float32}\n"
    catalog.write_text(
        f"models:\n  - id: by-commit\n    source: {LLAMA}\n    revision: {V1}\n{chat}"
        f"  - id: by-tag\n    source: {LLAMA}\n    revision: v1\n{chat}"
        f"  - id: latest\n    source: {LLAMA}\n{chat}"
        f"  - id: embedder-v1\n    source: {EMBEDDER}\n    revision: v1\n{embedding}"
        f"  - id: embedder-latest\n    source: {EMBEDDER}\n{embedding}"
    )
    srv = Server(["--catalog", str(catalog)], env={"HF_HUB_CACHE": str(hub_cache)}).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def test_a_server_serves_each_entry_at_its_revision(server, references, weights):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    for model, expected in (("by-commit", "v1"), ("by-tag", "v1"), ("latest", "main")):
        for prompt, (_, text) in zip(PROMPTS, references[expected]):
            completion = client.completions.create(
                model=model,
                prompt=prompt["prompt_token_ids"],
                max_tokens=GREEDY.max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert completion.choices[0].text == text, model
    for model, expected in (("embedder-v1", "v1"), ("embedder-latest", "main")):
        got = client.embeddings.create(model=model, input=TEXTS)
        vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
        reference = SentenceTransformer(str(weights[f"embedder-{expected}"]), device="cpu")
        np.testing.assert_allclose(vectors, reference.encode(TEXTS), atol=1e-5)
    log = server.log()
    for model, commit in (("by-commit", V1), ("by-tag", V1), ("latest", MAIN)):
        assert f"serving {model} at revision {commit} on " in log
    assert f"serving embedder-v1 (embedding) at revision {V1} on " in log
    assert f"serving embedder-latest (embedding) at revision {MAIN} on " in log


def test_the_model_flag_serves_its_revision(hub_cache, references):
    """`pagoda serve --model ID --revision R`, as vLLM's. Before: `unrecognized arguments:
    --revision v1`; --model was always served at main."""
    args = ["--model", LLAMA, "--revision", "v1", "--dtype", "float32", "--max-model-len", "256"]
    server = Server(args, env={"HF_HUB_CACHE": str(hub_cache)}).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        for prompt, (_, text) in zip(PROMPTS, references["v1"]):
            completion = client.completions.create(
                model=LLAMA,
                prompt=prompt["prompt_token_ids"],
                max_tokens=GREEDY.max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert completion.choices[0].text == text
        assert f"serving {LLAMA} at revision {V1} on " in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_a_revision_flag_that_cannot_serve_fails_the_start(offline_hub, weights):
    unknown = failed_start("--model", LLAMA, "--revision", "v9", "--port", "1")
    assert f"--revision: no revision 'v9' of '{LLAMA}' on the hub or in its cache: " in unknown
    folder = weights["llama-main"]
    local = failed_start("--model", str(folder), "--revision", "v1", "--port", "1")
    assert f"--revision: only for a hub id's source; {folder} is a local path" in local
    assert "Traceback" not in unknown + local


@pytest.fixture(scope="module")
def sd_repo(hub_cache, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd")
    folders = {name: build_tiny_sd(root / name, seed=seed) for seed, name in enumerate(REFS)}
    add_repo(hub_cache, SD, folders["v1"], folders["main"])
    return folders


def test_an_image_model_loads_its_entrys_revision(offline_hub, sd_repo, tmp_path):
    """The image worker's pipeline, from catalog entries at v1 and at main."""

    def unet_weights(config: ImageModelConfig) -> dict[str, torch.Tensor]:
        return ImagePipeline(config).pipe.unet.state_dict()

    catalog = tmp_path / "models.yaml"
    settings = "    kind: image\n    engine: {dtype: float32, device: cpu}\n"
    catalog.write_text(
        f"models:\n  - id: v1\n    source: {SD}\n    revision: v1\n{settings}"
        f"  - id: main\n    source: {SD}\n{settings}"
    )
    served = {e.id: image_model_config(e) for e in load_catalog(catalog)}
    assert (served["v1"].revision, served["main"].revision) == (V1, MAIN)
    for name in REFS:
        local = unet_weights(ImageModelConfig(str(sd_repo[name]), device="cpu", dtype="float32"))
        weights = unet_weights(served[name])
        assert all(torch.equal(weights[key], local[key]) for key in local), name


def test_a_reranker_loads_the_revision_it_is_given(offline_hub, tmp_path_factory):
    """The cross-encoder worker, at v1 and at main, against CrossEncoder on each commit's
    folder."""
    root = tmp_path_factory.mktemp("rerankers")
    folders = {name: build_tiny_reranker(root / name, seed=seed) for seed, name in enumerate(REFS)}
    add_repo(offline_hub, RERANKER, folders["v1"], folders["main"])
    pairs = [["Where is the tower?", "In Paris."], ["bananas", "They are yellow."]]
    for name, commit in zip(REFS, (V1, MAIN)):
        config = EmbeddingConfig(RERANKER, revision=commit, dtype="float32", cross_encoder=True)
        worker = CrossEncoderWorker(config)
        worker.add("r", pairs, None, None)
        outputs = []
        while worker.has_work():
            outputs += worker.step()
        ((_, rows, _, _, _),) = outputs
        expected = CrossEncoder(str(folders[name]), device="cpu").predict(pairs)
        np.testing.assert_allclose(np.frombuffer(rows, "<f4"), expected, atol=1e-5)
