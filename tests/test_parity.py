"""Greedy output and logprobs of LLM.generate equal transformers' on the same weights (fp32)."""

import pytest
import torch
import transformers

from pagoda.engine import LLM, SamplingParams

NEW_TOKENS = 64
# different lengths, several longer than a few 16-token blocks
PROMPT_LENGTHS = (3, 16, 37, 100, 150)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "mistral"])
def arch_case(request, tiny_models):
    """(folder, transformers model, its greedy continuations of `prompts()`)."""
    folder = tiny_models[request.param]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = []
    for p in prompts():
        out = hf.generate(
            torch.tensor([p]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
        expected.append(out[0, len(p) :].tolist())
    return folder, hf, expected


def generate(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params)
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_matches_transformers(arch_case):
    folder, _, expected = arch_case
    llm = LLM(str(folder), dtype="float32")
    assert generate(llm) == expected


def test_chunked_prefill_matches(arch_case):
    folder, _, expected = arch_case
    llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=24)
    assert generate(llm) == expected


def test_prefix_cache_hits_match(arch_case):
    folder, _, expected = arch_case
    llm = LLM(str(folder), dtype="float32")
    assert generate(llm) == expected
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    # every full block but the one holding the last prompt token came from the cache
    for o in outs:
        assert o.num_cached_tokens == (len(o.prompt_token_ids) - 1) // 16 * 16
    assert sum(o.num_cached_tokens for o in outs) > 0


def test_preemption_matches(arch_case):
    folder, _, expected = arch_case
    # 16 blocks of 16 tokens: one sequence of 150 + 64 tokens fits, the batch does not.
    llm = LLM(str(folder), dtype="float32", max_model_len=256, kv_cache_blocks=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.scheduler.num_preemptions > 0
    # the prompts share nothing: what a preempted sequence finds again is its own work
    assert [o.num_cached_tokens for o in outs] == [0] * len(outs)
    assert llm.engine.block_manager.num_free_blocks == 16


def test_logprobs_match_transformers(arch_case):
    folder, hf, expected = arch_case
    llm = LLM(str(folder), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params)
    for prompt, out, want in zip(prompts(), outs, expected):
        completion = out.outputs[0]
        assert completion.token_ids == want
        ids = torch.tensor([prompt + want])
        with torch.no_grad():
            logits = hf(ids).logits[0, len(prompt) - 1 : -1]
        ref = logits.float().log_softmax(-1)
        for step, (token, entry) in enumerate(zip(want, completion.logprobs)):
            row = ref[step]
            assert token in entry
            assert len(entry) in (5, 6)  # the top 5, plus the chosen token if not among them
            top5_floor = row.topk(5).values[-1].item()
            for tid, lp in entry.items():
                want_lp = row[tid].item()
                assert lp.logprob == pytest.approx(want_lp, abs=1e-4)
                # the rank agrees with transformers' ordering, up to near-ties
                assert (row > want_lp + 1e-4).sum().item() + 1 <= lp.rank
                assert lp.rank <= (row >= want_lp - 1e-4).sum().item()
                if tid != token:
                    assert want_lp >= top5_floor - 1e-4


def test_repetition_penalty_matches_transformers(arch_case):
    folder, hf, _ = arch_case
    llm = LLM(str(folder), dtype="float32")
    prompt = prompts()[2]
    got = (
        llm.generate(
            {"prompt_token_ids": prompt},
            SamplingParams(temperature=0, max_tokens=32, min_tokens=32, repetition_penalty=1.3),
        )[0]
        .outputs[0]
        .token_ids
    )
    want = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
        repetition_penalty=1.3,
    )[0, len(prompt) :].tolist()
    assert got == want


@pytest.mark.parametrize("chunk", [None, 24])
def test_prompt_logprobs_match_transformers(arch_case, chunk):
    folder, hf, _ = arch_case
    llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=chunk, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params)
    for prompt, out in zip(prompts(), outs):
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
        for pos, entry in enumerate(out.prompt_logprobs[1:]):
            token = prompt[pos + 1]
            assert entry[token].logprob == pytest.approx(ref[pos, token].item(), abs=1e-4)
            assert 3 <= len(entry) <= 4


def test_scoring_a_prompt_that_fills_the_context(arch_case):
    """max_tokens 0 computes the prompt alone (its logprobs), so it may fill the context."""
    folder, hf, _ = arch_case
    prompt = prompts()[-1]
    llm = LLM(str(folder), dtype="float32", max_model_len=len(prompt))
    with pytest.raises(ValueError, match="no room to generate"):
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1))
    out = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(max_tokens=0, prompt_logprobs=0)
    )[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
    want = [ref[pos, token].item() for pos, token in enumerate(prompt[1:])]
    got = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
    assert out.prompt_logprobs[0] is None and got == pytest.approx(want, abs=1e-4)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_kernels_match_transformers(tiny_models, arch):
    """The engine with its Triton kernels (under TRITON_INTERPRET=1 on a CPU) against
    transformers: prefill in chunks, then decode."""
    folder = tiny_models[arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    short = [p[:n] for p, n in zip(prompts()[:3], (3, 16, 37))]
    llm = LLM(str(folder), dtype="float32", kernel_backend="triton", max_num_batched_tokens=20)
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)
    outs = llm.generate([{"prompt_token_ids": p} for p in short], params)
    for p, out in zip(short, outs):
        want = hf.generate(
            torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )[0, len(p) :].tolist()
        assert out.outputs[0].token_ids == want


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_one_kv_head_with_explicit_head_dim_matches(tmp_path, backend):
    """Issue 14's report: Qwen3, hidden 64, 4 heads sharing ONE KV head of head_dim 32 (not
    hidden / heads), initializer_range 0.25, prompts of 40 and 130 tokens among five."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        initializer_range=0.25,
        max_position_embeddings=2048,
    )
    hf = transformers.Qwen3ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (3, 16, 40, 100, 130)]
    params = SamplingParams(temperature=0, max_tokens=48, min_tokens=48)
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend=backend, skip_tokenizer_init=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, out in zip(prompts, outs):
        want = hf.generate(torch.tensor([p]), max_new_tokens=48, min_new_tokens=48, do_sample=False)
        assert out.outputs[0].token_ids == want[0, len(p) :].tolist()
