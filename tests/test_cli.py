"""The `pagoda` command line: it parses without the server's imports, and `serve` forks the
forkserver its workers come from, which imports their modules."""

import json
import subprocess
import sys

import pytest

import pagoda
from pagoda.engine.core import run_engine_core
from pagoda.engine.cross_encoder_worker import run_cross_encoder_worker
from pagoda.engine.embedding_worker import run_embedding_worker
from pagoda.engine.image_worker import run_image_worker
from pagoda.server.cli import parse_args
from pagoda.server.forkserver import SHARED_IMPORTS, WORKER_IMPORTS


def run_python(code: str, check: bool = True) -> subprocess.CompletedProcess:
    """`code` in a new interpreter: the imports a command makes are its own there."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert not check or result.returncode == 0, result.stderr
    return result


def test_worker_modules_are_those_of_the_workers_entry_points():
    targets = {
        "chat": run_engine_core,
        "embedding": run_embedding_worker,
        "rerank": run_cross_encoder_worker,
        "image": run_image_worker,
    }
    assert {kind: target.__module__ for kind, target in targets.items()} == {
        kind: modules[0] for kind, modules in WORKER_IMPORTS.items()
    }


def test_parsing_and_the_keys_command_do_not_import_torch():
    code = (
        "import sys\n"
        "from pagoda.server.cli import parse_args\n"
        "args = parse_args(['keys', 'list', '--database', 'sqlite:///unused.db'])\n"
        "parse_args(['serve', '--port', '1'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'uvicorn') if m in sys.modules))\n"
    )
    result = run_python(code)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--database", "bogus://x"], "cannot open the database bogus://x"),
        (["--catalog", "no-such.yaml"], "no-such.yaml"),
        (["--host", "no.such.host.invalid"], "cannot listen on no.such.host.invalid"),
        (["--nnodes", "2"], "--nnodes and --master-port serve one model"),
        (["--model", ".", "--chat-template", "{% if %}"], "--chat-template: not a Jinja template"),
        (["--model", ".", "--revision", "v1"], "--revision: only for a hub id's source"),
        (
            ["--model", ".", "--lora-modules", "a=/no/such/adapter"],
            "--lora-modules: adapter 'a': /no/such/adapter does not exist",
        ),
        (["--model", "{empty}"], "has no config.json (nor one .gguf file)"),
        (["--model", "{not_json}"], "/config.json is not JSON: "),
        (
            ["--model", "{gpt2}"],
            "--model: unsupported model architecture ['GPT2LMHeadModel']; supported: Llama",
        ),
    ],
)
def test_a_start_that_fails_its_checks_imports_no_server_module(flags, error, tmp_path):
    """A typo in the catalog, the database, the address or a chat model's template, revision
    or adapter, or a model folder the engine would refuse, fails before the server's imports
    (torch, uvicorn, the routes: 5-8 s on two cores; a template is compiled by transformers' own
    Jinja environment) and before the workers' forkserver starts."""
    folders = {name: tmp_path / name for name in ("empty", "not_json", "gpt2")}
    for folder in folders.values():
        folder.mkdir()
    (folders["not_json"] / "config.json").write_text('{"architectures": ')
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    (folders["gpt2"] / "config.json").write_text(json.dumps(gpt2))
    flags = [str(folders[flag[1:-1]]) if flag[1:-1] in folders else flag for flag in flags]
    code = (
        "import multiprocessing.forkserver, sys\n"
        "from pagoda.server import cli\n"
        "try:\n"
        f"    cli.main(['serve', *{flags!r}])\n"
        "except SystemExit as exc:\n"
        "    print(exc.code)\n"
        "heavy = ('torch', 'pagoda.server.serve', 'uvicorn')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "print(multiprocessing.forkserver._forkserver._forkserver_pid)\n"
    )
    result = run_python(code, check=False)
    assert result.stdout.splitlines() == ["1", "[]", "None"], result.stderr
    (line,) = result.stderr.splitlines()
    assert " ERROR pagoda: " in line and error in line


def test_the_server_leaves_the_workers_heavy_imports_to_the_workers():
    """The HTTP server imports the workers' entry points and the engine's light modules, not
    the model code: transformers' modeling code alone took 3 s of a 6 s start-up import. What
    it imports before forking the forkserver, it imports in any case (transformers.activations
    as it reads a model's config, for its tokenizer)."""
    heavy = ("transformers.modeling_utils", "pagoda.engine.model_runner", "sentence_transformers")
    shared = [m for m in SHARED_IMPORTS if m != "transformers.activations"]
    code = (
        "import sys\n"
        "import pagoda.server.serve\n"
        f"print(sorted(m for m in {heavy!r} + ('diffusers',) if m in sys.modules))\n"
        f"print([m for m in {shared!r} if m not in sys.modules])\n"
    )
    result = run_python(code)
    assert result.stdout.split() == ["[]", "[]"]


def test_the_workers_imports_leave_cuda_uninitialised_in_the_forkserver():
    """Workers fork from a process that imported their modules: had an import initialised
    CUDA there (xgrammar's tvm_ffi asks torch.cuda.is_available() as it loads), every GPU
    worker would fail to start. Here torch is made to look like a CUDA build on a node with
    one GPU, and the server's imports before the fork (`start`'s) and then the workers' modules
    are imported: none may reach the CUDA runtime."""
    code = (
        "import importlib, sys, torch, torch.cuda\n"
        "from pagoda.server import forkserver\n"
        "calls = []\n"
        "# a CUDA build to the availability check only (elsewhere torch would import CUDA's)\n"
        "answers = ('is_available', 'device_count')\n"
        "torch.cuda._is_compiled = lambda: sys._getframe(1).f_code.co_name in answers\n"
        "torch.cuda._device_count_nvml = lambda: 1\n"
        "torch._C._cuda_getDeviceCount = lambda: calls.append('cudaGetDeviceCount') or 1\n"
        "forkserver._fork = lambda preload, release: None\n"
        "forkserver.start({'chat'}, release=lambda: None)\n"
        "for module in (m for modules in forkserver.WORKER_IMPORTS.values() for m in modules):\n"
        "    importlib.import_module(module)\n"
        "assert torch.cuda.is_available()\n"
        "print(calls)\n"
    )
    result = run_python(code)
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "spawned"])
def test_the_forkserver_forks_workers_without_the_servers_socket(forked):
    """The forkserver is a fork of the server (its command line is the server's), or, on a
    Python whose forkserver protocol differs, multiprocessing's spawned one; either forks
    workers that run, and neither holds the socket the server had bound."""
    code = (
        "import multiprocessing, socket, sys, psutil\n"
        "from pagoda.server import forkserver\n"
        f"if not {forked}:\n"
        "    forkserver._KNOWN_PROTOCOL = ()\n"
        "sock = socket.socket()\n"
        "sock.bind(('127.0.0.1', 0))\n"
        "port = sock.getsockname()[1]\n"
        "forkserver.start({'chat'}, release=sock.close)\n"
        "sock.listen()  # as uvicorn does once the models have loaded\n"
        "worker = multiprocessing.get_context('forkserver').Process(target=sys.exit, args=(7,))\n"
        "worker.start()\n"
        "worker.join()\n"
        "server = psutil.Process(multiprocessing.forkserver._forkserver._forkserver_pid)\n"
        "print(worker.exitcode, server.ppid() == psutil.Process().pid,\n"
        "      server.cmdline() == psutil.Process().cmdline(),\n"
        "      [c for c in server.net_connections() if c.laddr and c.laddr.port == port])\n"
        "forkserver.stop()\n"
    )
    result = run_python(code)
    assert result.stdout.split() == ["7", "True", str(forked), "[]"], result.stderr


@pytest.mark.parametrize(
    "option",
    [
        "--shutdown-timeout",
        "--image-url-ttl",
        "--distributed-timeout",
        "--request-body-timeout",
        "--stream-send-timeout",
    ],
)
def test_durations_are_positive_and_finite(option, capsys):
    for bad in ("inf", "nan", "0", "-5", "soon"):
        with pytest.raises(SystemExit):
            parse_args(["serve", option, bad])
        assert f"argument {option}" in capsys.readouterr().err
    assert 2.5 in vars(parse_args(["serve", option, "2.5"])).values()


def test_help_of_the_module_lists_the_commands():
    run = [sys.executable, "-m", "pagoda"]
    top = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True).stdout
    assert "{serve," in top and "usage: pagoda [-h]" in top
    serve = subprocess.run([*run, "--port", "1", "--help"], capture_output=True, text=True)
    assert serve.stdout.startswith("usage: pagoda serve")  # `serve` left out


@pytest.mark.parametrize(
    ("option", "bad"),
    [
        ("--port", "0"),
        ("--port", "70000"),
        ("--port", "-1"),
        ("--master-port", "65536"),
        ("--max-model-len", "0"),
        ("--max-model-len", "-5"),
        ("--max-num-seqs", "0"),
        ("--max-num-batched-tokens", "0"),
        ("--cpu-threads", "0"),
        ("--tensor-parallel-size", "0"),
        ("--nnodes", "0"),
        ("--node-rank", "-1"),
        ("--data-parallel-size", "0"),
        ("--max-request-bytes", "0"),
        ("--max-concurrent-requests", "0"),
        ("--max-waiting-requests", "0"),
        ("--max-waiting-requests", "-1"),
        ("--max-failed-starts", "-1"),
        ("--timeout-keep-alive", "-1"),
        ("--limit-concurrency", "0"),
        ("--backlog", "-1"),
        ("--kv-cache-memory", "0"),
        ("--image-cache-bytes", "0"),
        ("--public-url", "images.example.com/pagoda"),  # image URLs a client cannot fetch
        ("--public-url", "ftp://images.example.com"),
        ("--public-url", "https://"),
        ("--dtype", "fp8"),
        ("--device", "gpu"),
        ("--log-level", "verbose"),
        ("--max-num-seqs", "2.5"),
        ("--override-generation-config", "temperature=0.7"),
        ("--override-generation-config", '["temperature", 0.7]'),
    ],
)
def test_counts_sizes_and_names_are_checked_as_they_are_parsed(option, bad, capsys):
    """Before: `--max-waiting-requests 0` served with the default 512, `-1` refused every
    request with a 429, `--max-concurrent-requests 0` too, `--port 70000` started, `--port -1`
    and `--max-model-len -5` failed only after the models had loaded."""
    with pytest.raises(SystemExit):
        parse_args(["serve", option, bad])
    assert f"argument {option}" in capsys.readouterr().err


def test_public_url_takes_an_http_or_https_url():
    for url in ("https://images.example.com/pagoda/", "http://10.0.0.5:8000"):
        assert parse_args(["serve", "--public-url", url]).public_url == url


def test_log_level_takes_any_case():
    assert parse_args(["serve", "--log-level", "DEBUG"]).log_level == "debug"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "m", "--catalog", "c.yaml"], "argument --catalog: not allowed with"),
        (["--served-model-name", "x"], "--served-model-name names how --model is served"),
        (["--tool-call-parser", "mistral"], "--tool-call-parser names how --model is served"),
        (["--revision", "v1"], "--revision names how --model is served"),
        (["--chat-template", "t.jinja"], "--chat-template names how --model is served"),
    ],
)
def test_options_of_model_are_refused_with_the_catalog(args, expected, capsys):
    """Before, each was accepted and ignored: the catalog (or --model) served as if unsaid."""
    with pytest.raises(SystemExit):
        parse_args(["serve", *args])
    assert expected in capsys.readouterr().err


def test_a_bad_log_level_is_one_line_not_a_traceback():
    """Before: `pagoda serve --log-level bogus` ended in setup_logging's ValueError traceback."""
    run = [sys.executable, "-m", "pagoda", "serve", "--log-level", "bogus"]
    result = subprocess.run(run, capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("pagoda serve: error: argument --log-level")


def test_version():
    """Before: `python -m pagoda --version` was read as `serve --version`, an unknown option."""
    run = [sys.executable, "-m", "pagoda", "--version"]
    result = subprocess.run(run, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pagoda {pagoda.__version__}"


def test_tokenizer_export_refuses_a_max_model_len_below_one(tmp_path):
    """Before: `pagoda tokenizer export MODEL DIR --max-model-len -3` wrote
    `"model_max_length": -3` and exited 0."""
    run = [sys.executable, "-m", "pagoda", "tokenizer", "export", "unused", str(tmp_path / "out")]
    result = subprocess.run([*run, "--max-model-len", "-3"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "argument --max-model-len: must be at least 1, got -3" in result.stderr
    assert not (tmp_path / "out").exists()
