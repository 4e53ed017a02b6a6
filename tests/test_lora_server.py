"""LoRA adapters served as models of their own (vLLM's --lora-modules): the catalog's
lora_modules and the command line's, and a real `pagoda serve` with a tiny base and two
adapters, driven by the openai SDK."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
from huggingface_hub import constants

from pagoda.engine import LLM, SamplingParams
from pagoda.server.catalog import CatalogError, load_catalog
from pagoda.server.cli import parse_args
from pagoda.server.keys.commands import _prices
from pagoda.server.lora import catalog_adapters, flag_adapters
from tests import test_catalog
from tests.lora_adapters import build_adapter
from tests.serving import Server, failed_start
from tests.test_catalog import write_catalog
from tests.test_keys import ledger, new_key, wait_for
from tests.test_revisions import MAIN, V1, add_repo

BASE = "test-org/tiny-qwen2"
KEY = "sk-lora-test-key"
MAX_TOKENS = 12
MESSAGES = [{"role": "user", "content": "Tell me a story"}]
PRICING = {"input_per_1m": 1000.0, "output_per_1m": 2000.0}
A_PRICING = {"input_per_1m": 3000.0, "output_per_1m": 5000.0}


def catalog_error(folder: Path, text: str) -> str:
    message = test_catalog.catalog_error(folder, text)
    return message.replace(str(folder / "models.yaml"), "models.yaml")


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
    path = write_catalog(tmp_path, json.dumps({"models": [entry]}))  # JSON is YAML
    (loaded,) = load_catalog(path)
    assert loaded.engine_kwargs() == {"max_lora_rank": 16}
    adapters = catalog_adapters(loaded)  # a relative folder from the catalog's
    assert [(a.name, a.folder) for a in adapters] == [
        ("tiny-a", str(tmp_path / "adapters" / "a")),
        ("tiny-b", str(b)),
    ]
    # a key's budget: the adapter's own pricing, else its entry's
    prices = {name: price.model_dump() for name, price in _prices(load_catalog(path)).items()}
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


def test_a_hub_adapter_is_served_at_its_revision(
    adapters, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id's adapter resolved as a model's weights are: its revision's snapshot (here from
    the hub cache, offline), the default branch's without one."""
    cache = tmp_path / "hub"
    add_repo(cache, "acme/tiny-lora", adapters["tiny-a"], adapters["tiny-b"])  # v1, main
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    entry = "models:\n  - id: m\n    kind: chat\n    source: org/model\n    lora_modules:\n"
    text = entry + (
        "      - {id: at-v1, source: acme/tiny-lora, revision: v1}\n"
        "      - {id: at-main, source: acme/tiny-lora}\n"
    )
    at_v1, at_main = catalog_adapters(load_catalog(write_catalog(tmp_path, text))[0])
    snapshots = cache / "models--acme--tiny-lora" / "snapshots"
    assert (at_v1.source, at_v1.folder) == ("acme/tiny-lora", str(snapshots / V1))
    assert (at_main.source, at_main.folder) == ("acme/tiny-lora", str(snapshots / MAIN))
    text = entry + "      - {id: at-v9, source: acme/tiny-lora, revision: v9}\n"
    with pytest.raises(CatalogError) as caught:
        catalog_adapters(load_catalog(write_catalog(tmp_path, text))[0])
    assert str(caught.value).startswith(
        f"{tmp_path / 'models.yaml'}:2: entry 1 (id 'm'): lora_modules[0].revision: no revision "
        "'v9' of 'acme/tiny-lora' on the hub or in its cache"
    )


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


def served_tiny_qwen2(tiny_models) -> list[str]:
    """`pagoda serve` arguments: the tiny qwen2 as BASE, in fp32, 256 tokens of context."""
    model = str(tiny_models["qwen2"])
    return [
        "--model",
        model,
        "--served-model-name",
        BASE,
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
    ]


def _json(name: str, path: str, base: str) -> list[str]:
    return [json.dumps({"name": name, "path": path, "base_model_name": base})]


# -- a real server: a tiny base and two adapters ----------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """tiny-a on every projection (rank 8), tiny-b on q and v only (rank 4)."""
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_models["qwen2"]
    return {
        "tiny-a": build_adapter(base, root / "a", seed=1),
        "tiny-b": build_adapter(base, root / "b", seed=2, rank=4, targets=("q_proj", "v_proj")),
    }


@pytest.fixture(scope="module")
def offline(tiny_models, adapters) -> LLM:
    llm = LLM(
        str(tiny_models["qwen2"]),
        dtype="float32",
        max_model_len=256,
        lora_modules={name: str(folder) for name, folder in adapters.items()},
    )
    yield llm
    llm.close()


def expected_texts(llm: LLM, prompt_token_ids: list[int]) -> dict[str, str]:
    """Greedy outputs of the base and of each adapter, from the offline engine."""
    served = [BASE, "tiny-a", "tiny-b"]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [{"prompt_token_ids": prompt_token_ids}] * len(served)
    lora = [None, "tiny-a", "tiny-b"]
    outputs = llm.generate(prompts, params, lora=lora)
    texts = dict(zip(served, (out.outputs[0].text for out in outputs)))
    assert len(set(texts.values())) == 3, texts  # each adapter changes what the model says
    return texts


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'keys.db'}"


@pytest.fixture(scope="module")
def server(tiny_models, adapters, db, tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalog")
    (folder / "adapters").symlink_to(adapters["tiny-a"].parent)  # a path relative to the file
    catalog = folder / "models.yaml"
    catalog.write_text(
        f"""\
models:
  - id: {BASE}
    kind: chat
    source: {tiny_models["qwen2"]}
    max_model_len: 256
    engine: {{dtype: float32}}
    pricing: {json.dumps(PRICING)}
    lora_modules:
      - {{id: tiny-a, source: ./adapters/a, pricing: {json.dumps(A_PRICING)}}}
      - {{id: tiny-b, source: {adapters["tiny-b"]}}}
"""
    )
    srv = Server(["--catalog", str(catalog), "--database", db, "--api-key", KEY]).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def greedy_completion(model: str, prompt: list[int]) -> dict:
    """A /v1/completions request of MAX_TOKENS greedy tokens, as the SDK's arguments."""
    return {
        "model": model,
        "prompt": prompt,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "extra_body": {"ignore_eos": True},
    }


def async_client(server: Server, key: str = KEY) -> openai.AsyncOpenAI:
    """A client for one asyncio.run: its connections belong to that run's event loop."""
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


async def chat_text(client: openai.AsyncOpenAI, model: str, stream: bool = False) -> str:
    extra = {"ignore_eos": True}
    if not stream:
        response = await client.chat.completions.create(
            model=model, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS, extra_body=extra
        )
        assert response.model == model
        return response.choices[0].message.content
    chunks = await client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body=extra,
        stream=True,
    )
    parts = []
    async for chunk in chunks:
        assert chunk.model == model
        parts += [choice.delta.content or "" for choice in chunk.choices]
    return "".join(parts)


def test_base_and_adapters_in_one_batch_each_answer_as_the_offline_engine(server, offline) -> None:
    text = offline.tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    ids = offline.tokenizer.encode(text, add_special_tokens=False)
    expected = expected_texts(offline, ids)

    async def all_at_once() -> list[str]:
        client = async_client(server)
        models = [BASE, "tiny-a", "tiny-b"] * 2
        return await asyncio.gather(
            *(chat_text(client, model, stream=i >= 3) for i, model in enumerate(models))
        )

    texts = asyncio.run(all_at_once())
    assert texts == [expected[BASE], expected["tiny-a"], expected["tiny-b"]] * 2


def test_completions_run_under_the_adapter_named(server, offline) -> None:
    prompt = offline.tokenizer.encode("Once upon a time")
    expected = expected_texts(offline, prompt)

    async def complete(client: openai.AsyncOpenAI, model: str) -> str:
        response = await client.completions.create(**greedy_completion(model, prompt))
        assert response.model == model
        return response.choices[0].text

    async def all_at_once() -> list[str]:
        client = async_client(server)
        return await asyncio.gather(*(complete(client, model) for model in expected))

    assert asyncio.run(all_at_once()) == list(expected.values())


def test_models_lists_each_adapter_as_a_card_of_its_own(server, adapters) -> None:
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"})
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert list(cards) == [BASE, "tiny-a", "tiny-b"]
    assert cards[BASE]["root"] == BASE and cards[BASE]["parent"] is None
    for name, folder in adapters.items():
        card = http.get(f"/v1/models/{name}").json()
        assert card == cards[name]
        assert card["root"] == str(folder.resolve()) and card["parent"] == BASE
        assert card["max_model_len"] == 256 and card["object"] == "model"
    health = http.get("/health", params={"model": "tiny-a"})  # its base's engine
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert list(http.get("/health").json()["models"]) == [BASE]
    unknown = http.get("/v1/models/tiny-c")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    chat = http.post("/v1/chat/completions", json={"model": "tiny-c", "messages": MESSAGES})
    assert chat.status_code == 404
    assert chat.json()["error"] == {
        "message": "The model 'tiny-c' does not exist or is not served here.",
        "type": "not_found_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_the_tokenizer_routes_take_an_adapter_and_use_its_bases_tokenizer(server) -> None:
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"})
    bodies = {
        m: http.post("/tokenize", json={"model": m, "prompt": "Hi there"}).json()
        for m in (BASE, "tiny-a")
    }
    assert bodies["tiny-a"] == bodies[BASE] and bodies[BASE]["count"] > 0
    text = http.post("/detokenize", json={"model": "tiny-a", "tokens": bodies[BASE]["tokens"]})
    assert text.json() == {"prompt": "Hi there"}
    info = http.get("/tokenizer_info", params={"model": "tiny-b"})
    assert info.status_code == 200
    assert info.json() == http.get("/tokenizer_info", params={"model": BASE}).json()


def test_responses_run_under_the_adapter_each_request_names(server) -> None:
    sync = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)

    def chat_reply(model: str, messages: list[dict]) -> str:
        response = sync.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS
        )
        return response.choices[0].message.content

    first = sync.responses.create(
        model="tiny-a", input="Tell me a story", temperature=0, max_output_tokens=MAX_TOKENS
    )
    assert first.model == "tiny-a" and first.output_text == chat_reply("tiny-a", MESSAGES)
    follow = [*MESSAGES, {"role": "assistant", "content": first.output_text}]
    follow.append({"role": "user", "content": "More"})
    for model in ("tiny-a", "tiny-b"):  # continued under the adapter the request names
        second = sync.responses.create(
            model=model,
            input="More",
            previous_response_id=first.id,
            temperature=0,
            max_output_tokens=MAX_TOKENS,
        )
        assert second.model == model and second.output_text == chat_reply(model, follow)


def test_a_keys_models_are_matched_against_the_adapter_named(server, db) -> None:
    name, secret = new_key(db, models=["tiny-a"])
    own = openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0)
    assert [card.id for card in own.models.list()] == ["tiny-a"]
    reply = own.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=3)
    for model in ("tiny-b", BASE):
        with pytest.raises(openai.NotFoundError) as caught:
            own.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3)
        assert caught.value.code == "model_not_found"
    # the ledger's row names the adapter, and its cost is the adapter's own pricing
    (row,) = wait_for(lambda: ledger(db, name))
    usage = reply.usage
    assert row["model"] == "tiny-a" and row["input_tokens"] == usage.prompt_tokens
    cost = usage.prompt_tokens * 3000 / 1e6 + usage.completion_tokens * 5000 / 1e6
    assert row["cost_usd"] == pytest.approx(cost)
    # a key for the base only cannot use an adapter; tiny-b is priced as its base
    base_name, base_secret = new_key(db, models=[BASE])
    base_only = openai.OpenAI(base_url=f"{server.url}/v1", api_key=base_secret, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        base_only.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=3)
    b_name, b_secret = new_key(db, models=["tiny-b"])
    b_only = openai.OpenAI(base_url=f"{server.url}/v1", api_key=b_secret, max_retries=0)
    usage = b_only.chat.completions.create(model="tiny-b", messages=MESSAGES, max_tokens=3).usage
    (row,) = wait_for(lambda: ledger(db, b_name))
    cost = usage.prompt_tokens * 1000 / 1e6 + usage.completion_tokens * 2000 / 1e6
    assert row["model"] == "tiny-b" and row["cost_usd"] == pytest.approx(cost)


def test_metrics_count_an_adapters_requests_under_its_id(server) -> None:
    asyncio.run(chat_text(async_client(server), "tiny-b"))
    lines = httpx.get(f"{server.url}/metrics").text.splitlines()
    served = [line for line in lines if line.startswith("pagoda:generation_tokens_total{")]
    by_model = {
        line.split('model_name="')[1].split('"')[0]: float(line.split()[-1]) for line in served
    }
    assert set(by_model) == {BASE, "tiny-a", "tiny-b"} and by_model["tiny-b"] >= MAX_TOKENS
    # the engine's gauges are its base's: one engine
    running = [line for line in lines if line.startswith("pagoda:num_requests_running{")]
    assert [line.split('"')[1] for line in running] == [BASE]


def test_command_line_adapters_on_data_parallel_replicas(tiny_models, adapters, offline) -> None:
    """--lora-modules in both of vLLM's forms; each replica of --data-parallel-size knows
    every adapter."""
    b = json.dumps({"name": "tiny-b", "path": str(adapters["tiny-b"]), "base_model_name": BASE})
    srv = Server(
        [
            *served_tiny_qwen2(tiny_models),
            "--data-parallel-size",
            "2",
            "--lora-modules",
            f"tiny-a={adapters['tiny-a']}",
            b,
        ]
    ).wait_ready()
    try:
        cards = httpx.get(f"{srv.url}/v1/models").json()["data"]
        assert [(card["id"], card["parent"]) for card in cards] == [
            (BASE, None),
            ("tiny-a", BASE),
            ("tiny-b", BASE),
        ]
        prompt = offline.tokenizer.encode("Hi")  # shorter than a block: routed by load alone
        expected = expected_texts(offline, prompt)["tiny-b"]

        async def complete(client: openai.AsyncOpenAI) -> str:
            response = await client.completions.create(**greedy_completion("tiny-b", prompt))
            return response.choices[0].text

        async def four() -> list[str]:
            client = async_client(srv, "none")
            return await asyncio.gather(*(complete(client) for _ in range(4)))

        assert asyncio.run(four()) == [expected] * 4
        routed = [
            float(line.split()[-1])
            for line in httpx.get(f"{srv.url}/metrics").text.splitlines()
            if line.startswith("pagoda:replica_requests_routed_total{")
        ]
        assert len(routed) == 2 and all(routed), routed  # both replicas ran tiny-b
    finally:
        assert srv.stop() == 0, srv.log()


def test_an_adapter_the_engine_cannot_load_fails_the_start_in_one_line(
    tiny_models, adapters, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(
        (adapters["tiny-a"] / "adapter_model.safetensors").read_bytes()
    )  # no adapter_config.json
    stderr = failed_start(
        "--model", str(tiny_models["qwen2"]), "--lora-modules", f"tiny-x={broken}", "--port", "1"
    )
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert errors and "tiny-x" in errors[-1] and "adapter_config.json" in errors[-1], stderr
    assert "Traceback" not in stderr


# -- runtime loading: vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter ---------------


@pytest.fixture(scope="module")
def loading_server(tiny_models, adapters, db):
    """--model with tiny-a from the start and one slot left for run time (--max-loras 2)."""
    srv = Server(
        [
            *served_tiny_qwen2(tiny_models),
            "--lora-modules",
            f"tiny-a={adapters['tiny-a']}",
            "--max-loras",
            "2",
            "--database",
            db,
            "--api-key",
            KEY,
        ]
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def _post(server: Server, route: str, body: dict, key: str = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{server.url}/v1/{route}", json=body, headers=headers, timeout=60)


def _complete(server: Server, model: str, prompt: list[int]) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    response = client.completions.create(**greedy_completion(model, prompt))
    assert response.model == model
    return response.choices[0].text


def _served(server: Server) -> list[tuple[str, str | None]]:
    cards = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    return [(card["id"], card["parent"]) for card in cards.json()["data"]]


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def test_adapters_load_and_unload_at_run_time(loading_server, adapters, offline, tmp_path) -> None:
    srv = loading_server
    prompt = offline.tokenizer.encode("Once upon a time")
    expected = expected_texts(offline, prompt)
    loaded = _post(
        srv, "load_lora_adapter", {"lora_name": "tiny-b", "lora_path": str(adapters["tiny-b"])}
    )
    assert (
        loaded.status_code == 200
        and loaded.text == "Success: LoRA adapter 'tiny-b' added successfully."
    )
    assert _served(srv) == [(BASE, None), ("tiny-a", BASE), ("tiny-b", BASE)]
    assert _complete(srv, "tiny-b", prompt) == expected["tiny-b"]
    again = _post(
        srv, "load_lora_adapter", {"lora_name": "tiny-b", "lora_path": str(adapters["tiny-b"])}
    )
    assert "'tiny-b' has already been loaded" in _error(again, 400)
    full = _post(
        srv, "load_lora_adapter", {"lora_name": "tiny-c", "lora_path": str(adapters["tiny-a"])}
    )
    assert "no free LoRA slot: the 2 slots (max_loras) hold adapters" in _error(full, 400)

    assert _post(srv, "unload_lora_adapter", {"lora_name": "tiny-a"}).status_code == 200
    assert _served(srv) == [(BASE, None), ("tiny-b", BASE)]
    gone = httpx.post(
        f"{srv.url}/v1/completions",
        json={"model": "tiny-a", "prompt": "Hi"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert "'tiny-a' cannot be found" in _error(
        _post(srv, "unload_lora_adapter", {"lora_name": "tiny-a"}), 404
    )

    # a folder the engine cannot read leaves the slot free
    (tmp_path / "broken").mkdir()
    broken = _post(
        srv, "load_lora_adapter", {"lora_name": "tiny-c", "lora_path": str(tmp_path / "broken")}
    )
    assert "LoRA adapter 'tiny-c': no adapter_config.json in" in _error(broken, 400)
    missing = _post(
        srv, "load_lora_adapter", {"lora_name": "tiny-c", "lora_path": "/no/such/folder"}
    )
    assert "lora_path: /no/such/folder does not exist" in _error(missing, 400)
    # tiny-a's weights again, under another name, into tiny-a's old slot
    c = _post(
        srv, "load_lora_adapter", {"lora_name": "tiny-c", "lora_path": str(adapters["tiny-a"])}
    )
    assert c.status_code == 200, c.text
    assert _complete(srv, "tiny-c", prompt) == expected["tiny-a"]
    assert _complete(srv, BASE, prompt) == expected[BASE]

    # an engine restarted after a crash serves the adapters of now
    pid = httpx.get(f"{srv.url}/health?model={BASE}").json()["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: httpx.get(f"{srv.url}/health?model={BASE}").json()["pid"] not in (pid, None), 120
    )
    assert _complete(srv, "tiny-c", prompt) == expected["tiny-a"]
    assert _complete(srv, "tiny-b", prompt) == expected["tiny-b"]
    # vLLM's load_inplace: the name stays, its weights are another adapter's
    body = {"lora_name": "tiny-b", "lora_path": str(adapters["tiny-a"]), "load_inplace": True}
    assert _post(srv, "load_lora_adapter", body).status_code == 200
    assert _complete(srv, "tiny-b", prompt) == expected["tiny-a"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"lora_path": "/x"}, 400, "lora_name"),
        ({"lora_name": "x"}, 400, "lora_path"),
        ({"lora_name": BASE, "lora_path": "/x"}, 400, f"'{BASE}' is the id of a served model"),
        (
            {"lora_name": "x", "lora_path": "/x", "base_model_name": "nope"},
            400,
            "'nope' is not a served chat model",
        ),
    ],
)
def test_a_bad_load_request_is_a_400(loading_server, body, status, message) -> None:
    assert message in _error(_post(loading_server, "load_lora_adapter", body), status)


def test_a_managed_key_may_not_load_adapters(loading_server, db, adapters) -> None:
    _, secret = new_key(db)
    body = {"lora_name": "tiny-z", "lora_path": str(adapters["tiny-b"])}
    refused = _post(loading_server, "load_lora_adapter", body, key=secret)
    assert "needs the server's --api-key" in _error(refused, 403)
    assert "needs the server's --api-key" in _error(
        _post(loading_server, "unload_lora_adapter", {"lora_name": "tiny-b"}, key=secret), 403
    )
    assert "tiny-z" not in dict(_served(loading_server))


def test_a_server_without_free_slots_says_how_to_get_one(server, adapters) -> None:
    body = {"lora_name": "tiny-z", "lora_path": str(adapters["tiny-b"])}
    message = _error(_post(server, "load_lora_adapter", body), 400)
    assert "No served model takes LoRA adapters at run time" in message
