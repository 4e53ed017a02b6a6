"""The offline API as vLLM's users call it: `LLM(...).generate(...)`, on a tiny random Llama."""

import pytest
import torch

from pagoda.engine import LLM, SamplingParams
from tests.tiny_models import a_bad_word


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=256)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def test_an_interrupted_generate_leaves_nothing_running(llm, monkeypatch):
    """Ctrl-C mid-generate: the next call must not first run the interrupted requests out."""
    step, calls = llm.engine.step, []

    def interrupted_on_third_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "step", interrupted_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["a b c"] * 4, greedy(200))
    assert not llm.engine.has_unfinished_requests()
    blocks = llm.engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks
    calls[:] = [1] * 100  # counts on from past the interrupting step
    out = llm.generate("a b c", greedy(4))[0]
    assert len(out.outputs[0].token_ids) == 4
    assert len(calls) == 104  # one step a token: no leftover request was stepped


def test_vllm_prompt_and_parameter_forms(llm, tiny_models):
    text = llm.generate("a b c", greedy(6))[0]
    as_dict = llm.generate({"prompt": "a b c"}, greedy(6))[0]  # vLLM's TextPrompt
    assert (as_dict.prompt, as_dict.prompt_token_ids) == ("a b c", text.prompt_token_ids)
    assert as_dict.outputs[0].token_ids == text.outputs[0].token_ids
    assert llm.get_tokenizer() is llm.tokenizer
    none_stops = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop_token_ids=None)
    assert llm.generate("a b c", none_stops)[0].outputs[0].token_ids == text.outputs[0].token_ids
    for field, value in (("n", "2"), ("n", 1.5), ("seed", "x"), ("seed", 1.5)):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    with LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=64, seed=None) as other:
        assert (
            other.generate("a b c", greedy(6))[0].outputs[0].token_ids == text.outputs[0].token_ids
        )


def test_cumulative_logprob_and_stop_reason(llm, tiny_models):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    prompt = [1, *range(40, 60)]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logprobs=0)
    out = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
    chosen = logits.log_softmax(-1).gather(1, torch.tensor(out.token_ids).unsqueeze(1))
    assert out.cumulative_logprob == pytest.approx(chosen.sum().item(), abs=1e-4)
    assert out.stop_reason is None and out.finish_reason == "length"
    # stopped by a stop token: stop_reason names it; no logprobs asked: no cumulative_logprob
    stop = out.token_ids[3]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=8, stop_token_ids=[stop])
    out = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
    assert (out.finish_reason, out.stop_reason, out.token_ids[-1]) == ("stop", stop, stop)
    assert out.cumulative_logprob is None


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_the_text_and_end_the_sequence(llm, include):
    full = llm.generate("a b c", greedy(40))[0].outputs[0]
    text = full.text
    start = next(i for i in range(8, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    stop = text[start : start + 3]
    cut = text.find(stop)
    params = SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, stop=[stop, "never there"],
        include_stop_str_in_output=include,
    )  # fmt: skip
    plain, stopped = llm.generate(["a b c", "a b c"], [greedy(40), params])
    assert plain.outputs[0].token_ids == full.token_ids  # its neighbour's stop left it alone
    out = stopped.outputs[0]
    assert out.text == text[:cut] + (stop if include else "")
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    # generation ended at the token that completed the stop string
    ids = out.token_ids
    assert ids == full.token_ids[: len(ids)]
    decode = llm.tokenizer.decode
    assert stop in decode(ids) and stop not in decode(ids[:-1])
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["x", ""])


def test_stop_strings_wait_for_min_tokens(llm):
    full = llm.generate("a b c", greedy(40))[0].outputs[0]
    decode = llm.tokenizer.decode
    k = next(k for k in range(4, 40) if "\ufffd" not in decode(full.token_ids[:k]))
    head = decode(full.token_ids[:k])
    stop = next(c for c in head if c != "\ufffd")  # found before the k-th token ends
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop, min_tokens=k)
    out = llm.generate("a b c", params)[0].outputs[0]
    end = full.text.find(stop, len(head))
    assert out.text == (full.text if end < 0 else full.text[:end])


def test_chat_renders_the_template_for_one_conversation_or_a_batch(llm):
    one = [{"role": "user", "content": "a b c"}]
    two = [{"role": "system", "content": "d e"}, {"role": "user", "content": "f"}]
    template = llm.tokenizer.apply_chat_template
    params = greedy(6)

    def expected(conversation, **kwargs) -> list[int]:
        ids = template(conversation, tokenize=True, return_dict=False, **kwargs)
        return llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids

    single = llm.chat(one, params)
    assert len(single) == 1
    assert single[0].prompt == template(one, tokenize=False, add_generation_prompt=True)
    assert single[0].outputs[0].token_ids == expected(one, add_generation_prompt=True)
    batch = llm.chat([one, two], [params, params])
    assert [o.outputs[0].token_ids for o in batch] == [
        expected(one, add_generation_prompt=True),
        expected(two, add_generation_prompt=True),
    ]
    bare = llm.chat(one, params, add_generation_prompt=False)[0]
    assert bare.prompt_token_ids == template(one, tokenize=True, return_dict=False)
    custom = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    assert llm.chat(one, params, chat_template=custom)[0].prompt == "a b c|"
    with pytest.raises(ValueError, match="2 sampling params given for 1 prompts"):
        llm.chat(one, [params, params])


def test_out_of_range_values_are_refused_up_front(llm, tiny_models):
    """vLLM refuses these; the bias was silently dropped, and a utilization past 1 accepted (on
    a CPU it is not read; on a GPU it asks for more than the device has)."""
    with pytest.raises(ValueError, match="token id 5000 in logit_bias"):
        llm.generate("a", SamplingParams(logit_bias={5000: 10.0}))
    with pytest.raises(ValueError, match="token id 5000 in allowed_token_ids"):
        llm.generate("a", SamplingParams(allowed_token_ids=[5, 5000]))
    for bad in ({"allowed_token_ids": []}, {"bad_words": ["ok", " "]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(str(tiny_models["llama"]), gpu_memory_utilization=2.0)


def test_allowed_token_ids_are_the_only_ones_drawn(llm):
    free = llm.generate("a b c", SamplingParams(temperature=0, max_tokens=1, logprobs=20))
    top = free[0].outputs[0].logprobs[0]
    by_rank = sorted(top, key=lambda t: top[t].rank)
    allowed = [by_rank[4], by_rank[2], *(t for t in (11, 17) if t not in by_rank[:3])]
    for sampled in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        params = SamplingParams(
            **sampled, max_tokens=12, ignore_eos=True, logprobs=1, allowed_token_ids=allowed
        )
        out = llm.generate("a b c", params)[0].outputs[0]
        assert len(out.token_ids) == 12 and set(out.token_ids) <= set(allowed)
        # logprobs stay the model's: ranks among the whole vocabulary
        assert out.logprobs[0][out.token_ids[0]].rank > 1
        if sampled["temperature"] == 0:  # the likeliest allowed token
            assert out.token_ids[0] == by_rank[2]


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_constraints_that_leave_no_token_give_way(llm, temperature):
    # only EOS allowed, and EOS banned until min_tokens: the ban yields to allowed_token_ids
    # (a row with nothing drawable had taken token 0, or crashed the step past the vocabulary)
    eos = llm.tokenizer.eos_token_id
    params = SamplingParams(
        temperature=temperature, seed=1, max_tokens=6, min_tokens=3, allowed_token_ids=[eos]
    )
    out = llm.generate("a b c", params)[0].outputs[0]
    assert out.token_ids == [eos] * 4 and out.finish_reason == "stop"


def test_bad_words_are_never_completed(llm):
    full = llm.generate("a b c", greedy(40))[0].outputs[0]
    ids = full.token_ids
    word = a_bad_word(llm.tokenizer, ids)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, bad_words=[word])
    out = llm.generate("a b c", params)[0].outputs[0]
    sequences = params.bad_words_token_ids

    def completes(ids: list[int]) -> int | None:  # where a bad word's sequence first ends
        ends = [
            i + len(seq)
            for seq in sequences
            for i in range(len(ids) - len(seq) + 1)
            if ids[i : i + len(seq)] == seq
        ]
        return min(ends, default=None)

    end = completes(ids)
    assert end is not None and completes(out.token_ids) is None
    # greedy: the same tokens up to the one that would have completed it, then another
    assert out.token_ids[: end - 1] == ids[: end - 1]
    assert out.token_ids[end - 1] != ids[end - 1]
