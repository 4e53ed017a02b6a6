import os

import torch

# Triton kernels run under the interpreter on a machine without a GPU. The variable must be
# set before anything imports triton (transformers does, through tests.tiny_models).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.tiny_models import (  # noqa: E402
    ARCHITECTURES,
    build_tiny_model,
    build_tiny_reranker,
)


@pytest.fixture(scope="session")
def smollm2_fp32(tmp_path_factory):
    """SmolLM2-135M as transformers reads the GGUF (Q4_1 dequantized to fp32: 20-40 s here),
    saved once per run as a plain folder that each test file's process then loads in about a
    second."""
    import transformers
    from filelock import FileLock

    from tests.test_smollm2 import smollm2_gguf

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's own
    folder = shared / "smollm2-fp32"
    with FileLock(str(shared / "smollm2-fp32.lock")):
        if not (folder / "config.json").exists():
            gguf = smollm2_gguf()
            read = transformers.AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            plain = type(read)(read.config)  # a model read from GGUF refuses save_pretrained
            plain.load_state_dict(read.state_dict())
            plain.save_pretrained(folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """arch name -> folder of a tiny random model of that architecture."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_reranker(tmp_path_factory):
    """A tiny random cross-encoder (64 positions) with MiniLM's tokenizer."""
    return build_tiny_reranker(tmp_path_factory.mktemp("tiny_reranker"))


# <think>, the first token added to the tiny tokenizer: a regex spells the tag where a test
# keeps the token out (a random model would otherwise think freely from it, and never stop)
THINK_START_ID = 499


@pytest.fixture(scope="session")
def thinking_model(tiny_models, tmp_path_factory):
    """The tiny llama with <think> and </think> tokens, as reasoning models have."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("thinking") / "llama"
    shutil.copytree(tiny_models["llama"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.save_pretrained(folder)
    assert tokenizer.convert_tokens_to_ids("<think>") == THINK_START_ID
    return folder


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian's `postgresql` package), started for the session."""
    from tests.postgres import PostgresServer, binaries

    bin_dir = binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql)")
    server = PostgresServer(bin_dir)
    yield server
    server.close()
