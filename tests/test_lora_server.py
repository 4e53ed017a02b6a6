"""LoRA adapters served as models of their own (vLLM's --lora-modules): the catalog's
lora_modules and the command line's, and a real `pagoda serve` with a tiny base and two
adapters, driven by the openai SDK."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagoda.server.catalog import CatalogError, load_catalog
from pagoda.server.cli import parse_args
from pagoda.server.keys.commands import _prices
from pagoda.server.lora import catalog_adapters, flag_adapters
from tests.serving import failed_start

BASE = "test-org/tiny-qwen2"
PRICING = {"input_per_1m": 1000.0, "output_per_1m": 2000.0}
A_PRICING = {"input_per_1m": 3000.0, "output_per_1m": 5000.0}


def write_catalog(folder: Path, entries: list[dict]) -> Path:
    path = folder / "models.yaml"
    path.write_text(json.dumps({"models": entries}, indent=1))  # JSON is YAML: one key a line
    return path


def catalog_error(folder: Path, text: str) -> str:
    path = folder / "models.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError) as caught:
        load_catalog(path)
    return str(caught.value).replace(str(path), "models.yaml")


def chat_entry(model_id: str = BASE, **fields) -> dict:
    return {"id": model_id, "kind": "chat", "source": "org/model", **fields}


# -- the catalog ------------------------------------------------------------------------------


def test_a_chat_entry_takes_lora_modules_and_max_lora_rank(tmp_path: Path) -> None:
    (tmp_path / "adapters" / "a").mkdir(parents=True)
    b = tmp_path / "b"
    b.mkdir()
    entry = chat_entry(
        engine={"max_lora_rank": 16},
        pricing=PRICING,
        lora_modules=[
            {"id": "tiny-a", "source": "adapters/a", "pricing": A_PRICING},
            {"id": "tiny-b", "source": str(b)},
        ],
    )
    path = write_catalog(tmp_path, [entry])
    (loaded,) = load_catalog(path)
    assert loaded.engine_kwargs() == {"max_lora_rank": 16}
    adapters = catalog_adapters(loaded)  # a relative folder from the catalog's
    assert [(a.name, a.folder) for a in adapters] == [
        ("tiny-a", str(tmp_path / "adapters" / "a")),
        ("tiny-b", str(b)),
    ]
    # a key's budget: the adapter's own pricing, else its entry's
    prices = {name: price.model_dump() for name, price in _prices(str(path)).items()}
    per_image = {"per_image": 0.0}
    assert prices == {
        BASE: {**PRICING, **per_image},
        "tiny-a": {**A_PRICING, **per_image},
        "tiny-b": {**PRICING, **per_image},
    }


def test_an_adapter_id_is_unique_across_the_catalog(tmp_path: Path) -> None:
    text = """\
models:
  - id: m1
    kind: chat
    source: org/model
    lora_modules:
      - {id: a, source: org/a}
  - id: m2
    kind: chat
    source: org/model
    lora_modules:
      - {id: m1, source: org/b}   # another entry's model id
      - {id: a, source: org/c}    # another entry's adapter
      - {id: m2, source: org/d}   # its own entry's id
  - id: a                         # a model named as an earlier adapter
    kind: chat
    source: org/model
"""
    assert catalog_error(tmp_path, text).splitlines() == [
        "models.yaml:11: entry 2 (id 'm2'): lora_modules[0].id: duplicate of entry 1",
        "models.yaml:12: entry 2 (id 'm2'): lora_modules[1].id: duplicate of entry 1's "
        "lora_modules",
        "models.yaml:13: entry 2 (id 'm2'): lora_modules[2].id: duplicate of entry 2",
        "models.yaml:14: entry 3 (id 'a'): id: duplicate of entry 1's lora_modules",
    ]


@pytest.mark.parametrize("kind", ["embedding", "rerank", "image"])
def test_adapters_are_for_chat_entries_only(tmp_path: Path, kind: str) -> None:
    entry = f"models:\n  - id: m\n    kind: {kind}\n    source: org/model\n"
    adapters = "    lora_modules: [{id: a, source: org/a}]\n"
    assert catalog_error(tmp_path, entry + adapters) == (
        "models.yaml:5: entry 1 (id 'm'): lora_modules: only chat models take LoRA adapters"
    )
    rank = "    engine: {max_lora_rank: 8}\n"
    assert catalog_error(tmp_path, entry + rank).endswith(
        f"engine: {'a' if kind == 'rerank' else 'an'} {kind} model takes only dtype and device, "
        "not max_lora_rank"
    )


def test_an_adapters_fields_are_checked_with_their_line(tmp_path: Path) -> None:
    text = """\
models:
  - id: m
    kind: chat
    source: org/model
    lora_modules:
      - id: a
        source: org/a
      - id: b
        sourc: org/b
      - id: c
        source: ./c
        revision: v1
      - id: has space
        source: org/d
"""
    assert catalog_error(tmp_path, text).splitlines() == [
        "models.yaml:8: entry 1 (id 'm'): lora_modules[1].source: required",
        "models.yaml:9: entry 1 (id 'm'): lora_modules[1].sourc: unknown field "
        "(did you mean 'source'?)",
        "models.yaml:12: entry 1 (id 'm'): lora_modules[2].revision: only for a hub id's "
        "source; './c' is a local path",
        "models.yaml:13: entry 1 (id 'm'): lora_modules[3].id: string should match pattern "
        "'^\\S+$', got 'has space'",
    ]


def test_a_missing_adapter_folder_fails_the_start_naming_it(tiny_models, tmp_path: Path) -> None:
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        f"models:\n  - id: m\n    kind: chat\n    source: {tiny_models['qwen2']}\n"
        "    lora_modules: [{id: a, source: ./adapters/missing}]\n"
    )
    stderr = failed_start("--catalog", str(catalog), "--port", "1")
    missing = tmp_path / "adapters" / "missing"
    assert (
        stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"{catalog}:2: entry 1 (id 'm'): lora_modules[0].source: {missing} does not exist"
        )
    )
    assert "Traceback" not in stderr


# -- the command line -------------------------------------------------------------------------


def test_lora_modules_flag_takes_vllms_two_forms() -> None:
    args = parse_args(
        [
            "serve",
            "--model",
            "m",
            "--lora-modules",
            "a=/adapters/a",
            '{"name": "b", "path": "org/b", "base_model_name": "m"}',
            "--max-lora-rank",
            "32",
        ]
    )
    assert [tuple(module) for module in args.lora_modules] == [
        ("a", "/adapters/a", None),
        ("b", "org/b", "m"),
    ]
    assert args.max_lora_rank == 32


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a", "expected NAME=PATH or a JSON object with name and path, got 'a'"),
        ("=/x", "expected NAME=PATH or a JSON object with name and path, got '=/x'"),
        ("a=", "expected NAME=PATH or a JSON object with name and path, got 'a='"),
        ('{"name": "a"', "invalid JSON (Expecting ',' delimiter): '{\"name\": \"a\"'"),
        (
            '{"name": "a", "paht": "/x"}',
            'expected {"name": ..., "path": ...} (and optionally "base_model_name"), all '
            'non-empty strings, got \'{"name": "a", "paht": "/x"}\'',
        ),
        ('{"name": "a b", "path": "/x"}', "an adapter's name has no spaces, got 'a b'"),
    ],
)
def test_a_malformed_lora_module_is_a_cli_error(value: str, expected: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["serve", "--model", "m", "--lora-modules", value])
    assert f"pagoda serve: error: argument --lora-modules: {expected}\n" in capsys.readouterr().err


def test_lora_modules_flag_needs_model(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["serve", "--lora-modules", "a=/x"])
    err = capsys.readouterr().err
    assert "--lora-modules names how --model is served: give --model" in err


def test_lora_modules_flag_names_the_adapter_that_cannot_be_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    args = parse_args(["serve", "--model", "m", "--lora-modules", "a=a", "b=a", "a=a"])
    with pytest.raises(ValueError, match="^--lora-modules: 'a' names two adapters$"):
        flag_adapters(args.lora_modules, "m")
    with pytest.raises(ValueError, match="^--lora-modules: 'a' is the name --model is served "):
        flag_adapters(args.lora_modules, "a")
    other = parse_args(["serve", "--model", "m", "--lora-modules", *_json("a", "a", "x")])
    with pytest.raises(ValueError, match="base_model_name 'x' is not the model served \\('m'\\)"):
        flag_adapters(other.lora_modules, "m")
    (adapter,) = flag_adapters(args.lora_modules[:1], "m")  # a path from the working folder
    assert adapter.folder == str(tmp_path / "a")


def test_a_missing_adapter_path_fails_the_start_naming_it(tiny_models, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    stderr = failed_start(
        "--model", str(tiny_models["qwen2"]), "--lora-modules", f"a={missing}", "--port", "1"
    )
    assert (
        stderr.strip()
        .splitlines()[-1]
        .endswith(f"--lora-modules: adapter 'a': {missing} does not exist")
    )
    stderr = failed_start(
        "--model", str(tiny_models["qwen2"]), "--lora-modules", "a=./missing", "--port", "1"
    )
    assert (
        "--lora-modules: adapter 'a': './missing' is neither a local path nor a downloadable"
        in (stderr)
    )


def _json(name: str, path: str, base: str) -> list[str]:
    return [json.dumps({"name": name, "path": path, "base_model_name": base})]
