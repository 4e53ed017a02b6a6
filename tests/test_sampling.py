"""Sampling parameters, the step API and abort, on a tiny random Llama."""

import pytest
import torch

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.sampler import sample
from pagoda.engine.sequence import Sequence


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=512)


def ids(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_token_ids": torch.randint(3, 1000, (n,), generator=g).tolist()}


def tokens(outputs) -> list[list[int]]:
    return [c.token_ids for o in outputs for c in o.outputs]


def test_seeded_sampling_ignores_batch_companions(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=40, ignore_eos=True)
    alone = tokens(llm.generate(ids(20, 0), seeded))
    others = [ids(n, 10 + n) for n in (5, 33, 70)]
    unseeded = SamplingParams(temperature=1.2, max_tokens=40, ignore_eos=True)
    mixed = llm.generate([others[0], ids(20, 0), others[1], others[2]], [unseeded, seeded] * 2)
    assert tokens(mixed)[1] == alone[0]
    # and a different seed draws something else
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=40, ignore_eos=True)
    assert tokens(llm.generate(ids(20, 0), other_seed)) != alone


def test_top_k_one_equals_greedy(llm):
    prompts = [ids(n, n) for n in (4, 30, 90)]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    top1 = llm.generate(
        prompts, SamplingParams(temperature=0.8, top_k=1, max_tokens=32, ignore_eos=True)
    )
    assert tokens(top1) == tokens(greedy)


def test_abort_mid_batch_leaves_others_unchanged(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = {name: ids(n, n)["prompt_token_ids"] for name, n in (("a", 12), ("b", 40), ("c", 75))}
    reference = dict(
        zip(
            ["a", "c"],
            tokens(llm.generate([{"prompt_token_ids": prompts[k]} for k in "ac"], params)),
        )
    )

    produced: dict[str, list[int]] = {k: [] for k in prompts}
    for name, prompt in prompts.items():
        engine.add_request(f"abort-{name}", prompt, params)
    for step in range(200):
        if step == 5:
            engine.abort_request("abort-b")
        for delta in engine.step():
            produced[delta.request_id.removeprefix("abort-")] += delta.new_token_ids
        if not engine.has_unfinished_requests():
            break
    assert produced["a"] == reference["a"]
    assert produced["c"] == reference["c"]
    assert 0 < len(produced["b"]) < 30
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_n_choices_share_prompt_blocks(llm):
    prompt = ids(70, 5)
    out = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    seqs_cached = llm.engine.block_manager.cached
    assert seqs_cached  # the shared prompt blocks were registered
    # the first choice draws as an n=1 request with the same seed
    single = llm.generate(prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=16))[0]
    assert single.outputs[0].token_ids == out.outputs[0].token_ids


def test_n_children_hit_the_prompt_cache(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=512)
    prompt = ids(70, 6)["prompt_token_ids"]
    llm.engine.add_request("r", prompt, SamplingParams(n=3, temperature=1.0, max_tokens=4))
    seqs = llm.engine.sequences("r")
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert seqs[0].num_cached_tokens == 0
    assert [s.num_cached_tokens for s in seqs[1:]] == [64, 64]


def test_stop_token_ids_and_max_tokens(llm):
    prompt = ids(25, 3)
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    run = free[0].outputs[0].token_ids
    assert free[0].outputs[0].finish_reason == "length" and len(run) == 20
    stop_at = run[6]
    first = run.index(stop_at)
    stopped = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at])
    )
    assert stopped[0].outputs[0].token_ids == run[: first + 1]
    assert stopped[0].outputs[0].finish_reason == "stop"
    # min_tokens holds the stop back
    late = llm.generate(
        prompt,
        SamplingParams(
            temperature=0, max_tokens=20, stop_token_ids=[stop_at], min_tokens=first + 1
        ),
    )[0].outputs[0]
    assert stop_at not in late.token_ids[: first + 1]
    assert len(late.token_ids) > first + 1


def test_eos_stops_unless_ignored(tiny_models):
    llm = LLM(str(tiny_models["qwen2"]), dtype="float32", max_model_len=512)
    prompt = ids(10, 8)
    eos = next(iter(llm.engine.eos_token_ids))
    biased = SamplingParams(temperature=0, max_tokens=10, logit_bias={eos: 100.0})
    out = llm.generate(prompt, biased)[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    ignored = SamplingParams(temperature=0, max_tokens=10, logit_bias={eos: 100.0}, ignore_eos=True)
    out = llm.generate(prompt, ignored)[0].outputs[0]
    assert out.token_ids == [eos] * 10 and out.finish_reason == "length"
    held = SamplingParams(temperature=0, max_tokens=10, logit_bias={eos: 100.0}, min_tokens=3)
    out = llm.generate(prompt, held)[0].outputs[0]
    assert eos not in out.token_ids[:3] and out.token_ids[3] == eos and len(out.token_ids) == 4


def _seq(output: list[int], params: SamplingParams, prompt=(1, 2)) -> Sequence:
    return Sequence(
        request_id="x",
        index=0,
        token_ids=list(prompt) + output,
        num_prompt_tokens=len(prompt),
        params=params,
        max_tokens=100,
        eos_token_ids=frozenset([0]),
    )


def test_frequency_and_presence_penalties():
    logits = torch.zeros(2, 8)
    seqs = [
        _seq([5, 5, 6], SamplingParams(temperature=0, frequency_penalty=0.5, logprobs=8)),
        _seq([5, 5, 6], SamplingParams(temperature=0, presence_penalty=0.5, logprobs=8)),
    ]
    logits[:, 7] = -10.0  # keep the winner away from the penalized tokens
    out = sample(logits, seqs, torch.Generator().manual_seed(0))
    # logprobs are those of the raw distribution, before penalties
    raw = logits.log_softmax(-1)
    assert out[0][1][5].logprob == pytest.approx(raw[0, 5].item())
    # recompute the penalized logits: greedy then picks an unpenalized token in both rows
    assert out[0][0] not in (5, 6, 7) and out[1][0] not in (5, 6, 7)


def test_penalties_shift_logits_by_the_openai_formula():
    from pagoda.engine.sampler import _apply_penalties
    from pagoda.engine.sampling_tensors import SamplingTensors, TokenCounts

    logits = torch.zeros(2, 8)
    seqs = [
        _seq([5, 5, 6], SamplingParams(frequency_penalty=0.5)),
        _seq([5, 5, 6], SamplingParams(presence_penalty=0.5, repetition_penalty=2.0), prompt=(3,)),
    ]
    logits[1, 3] = 4.0
    tensors = SamplingTensors.build(seqs, 8, TokenCounts(torch.device("cpu")))
    out = _apply_penalties(logits.clone(), tensors)
    assert out[0, 5].item() == pytest.approx(-1.0) and out[0, 6].item() == pytest.approx(-0.5)
    assert out[0, 1].item() == 0.0  # prompt tokens count only for the repetition penalty
    assert out[1, 5].item() == pytest.approx(-0.5) and out[1, 6].item() == pytest.approx(-0.5)
    assert out[1, 3].item() == pytest.approx(2.0)  # positive logit divided by 2


def test_top_p_and_min_p_restrict_the_draw():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    seqs = [
        _seq([], SamplingParams(temperature=1.0, top_p=0.6)),
        _seq([], SamplingParams(temperature=1.0, min_p=0.5)),
    ]
    gen = torch.Generator().manual_seed(0)
    drawn = [set(), set()]
    for _ in range(300):
        for row, (token, _) in enumerate(sample(logits, seqs, gen)):
            drawn[row].add(token)
    assert drawn[0] == {0, 1}  # 0.5 alone < 0.6, so the second token is kept
    assert drawn[1] == {0, 1}  # 0.15 < 0.5 * 0.5


@pytest.mark.parametrize(
    "params,top_k",
    [(SamplingParams(temperature=0.8), None), (SamplingParams(temperature=0.8, top_k=6), 6)],
    ids=["temperature", "top_k"],  # one kernel on a CPU; torch's ops after top-k
)
def test_draws_follow_the_distribution(params, top_k):
    """The inverse-CDF draw against the probabilities it samples: 40,000 draws of a row; each
    token's count within 5 standard deviations of its expectation, and tokens of zero
    probability (a -inf logit, those past top-k) never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.5, float("-inf"), 0.0, -1.0, -3.0, 1.5]])
    expected = (logits / 0.8).softmax(-1)[0]
    if top_k:
        expected[expected < expected.sort(descending=True).values[top_k - 1]] = 0.0
    expected /= expected.sum()
    gen = torch.Generator().manual_seed(1)
    rows = 1000
    counts = torch.zeros(8)
    for _ in range(40):
        seqs = [_seq([], params) for _ in range(rows)]
        drawn = sample(logits.expand(rows, -1).clone(), seqs, gen)
        counts += torch.bincount(torch.tensor([token for token, _ in drawn]), minlength=8)
    n = counts.sum()
    sigma = (n * expected * (1 - expected)).sqrt()
    assert counts[expected == 0].sum() == 0
    assert ((counts - n * expected).abs() <= 5 * sigma + 1e-9).all(), (counts, n * expected)


def test_sampling_kernel_inverts_the_distribution_as_torch_does():
    """The one-kernel draw (temperature only) against torch's softmax, cumsum and search at the
    same uniform numbers: the same token but where the two orders of summation put a uniform
    number on either side of a boundary (1 in 1,600 in a trial), never a -inf logit's."""
    from pagoda.engine.sampler import _inverse_cdf
    from pagoda.kernels import elementwise_cpu

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 5000, generator=gen) * 3
    logits[0, :4000] = float("-inf")
    temperature = torch.linspace(0.3, 1.5, 64)
    uniform = torch.rand(64, 1, generator=gen)
    drawn = elementwise_cpu.sample_rows(logits, temperature, uniform)
    if drawn is None:
        pytest.skip("no CPU kernels")
    reference = _inverse_cdf((logits / temperature[:, None]).softmax(-1), uniform)
    assert (drawn == reference).sum() >= 62
    assert drawn[0] >= 4000


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_selection_kernels_match_sorting(scale):
    """top-k's k-th largest value and top-p's smallest kept probability, found without sorting
    (bisection on vector passes, then a selection over the survivors), against the same
    values read off sorted rows: rows with -inf, ties, k at and past the vocabulary, top-p off."""
    from pagoda.kernels import elementwise_cpu

    if not elementwise_cpu.available():
        pytest.skip("no CPU kernels")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3000, generator=gen) * scale
    x[0, :500] = float("-inf")
    x[1, 100:400] = x[1, 7]  # a run of ties
    k = torch.tensor([1, 40, 2999, 3000, 5000, 300])
    ranked = x.sort(dim=-1, descending=True).values
    kth = ranked.gather(1, (k.clamp(max=3000) - 1)[:, None])
    kth = torch.where(k[:, None] < 3000, kth, float("-inf"))
    assert torch.equal(elementwise_cpu.kth_largest_rows(x, k), kth)

    probs = (x / 0.7).softmax(dim=-1)
    top_p = torch.tensor([0.9, 0.5, 0.95, 1.0, 0.2, 0.99])
    ranked = probs.sort(dim=-1, descending=True).values
    before = ranked.double().cumsum(dim=-1) - ranked.double()
    kept = (before < top_p.double()[:, None]).sum(dim=-1, keepdim=True)
    cutoff = torch.where(top_p[:, None] < 1, ranked.gather(1, kept - 1), 0.0)
    assert torch.equal(elementwise_cpu.top_p_cutoff_rows(probs, top_p), cutoff)
