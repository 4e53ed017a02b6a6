"""LoRA adapters in the engine (engine/lora.py), against transformers with peft's adapter.

Base-model and adapter requests share each step's batch; every one must give transformers +
peft's greedy tokens on the same weights (fp32), for adapters of different ranks and targets
(the smaller ranks padded up to the largest), with and without rsLoRA's scaling."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pagoda.engine import LLM, SamplingParams
from tests.lora_adapters import ALL_TARGETS, build_adapter, reference_model
from tests.test_smollm2 import smollm2_gguf

NEW_TOKENS = 12
TIE = 1e-4  # transformers' two best logits this close: either token is greedy
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=0)
PROMPTS = [[5, 17, 300, 42, 7], list(range(100, 140)), [900, 3, 3, 512, 64, 8, 77, 41, 2, 9, 10]]


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, dict]:
    """Per architecture: "wide" (rank 8, every projection) and "narrow" (rank 4, q and v
    only, rsLoRA's alpha / sqrt(r))."""
    root = tmp_path_factory.mktemp("lora")
    made = {}
    for arch in ("llama", "qwen2", "qwen3"):
        base = tiny_models[arch]
        made[arch] = {
            "wide": build_adapter(base, root / arch / "wide", seed=1),
            "narrow": build_adapter(
                base,
                root / arch / "narrow",
                seed=2,
                rank=4,
                targets=("q_proj", "v_proj"),
                use_rslora=True,
            ),
        }
    return made


def _reference(base, adapter, prompt: list[int]) -> tuple[list[int], float]:
    """transformers + peft's greedy tokens, and the first token's logprob."""
    return _cached_reference(base, adapter, tuple(prompt))


@functools.cache  # each backend's run, and the two-rank one, check against the same answers
def _cached_reference(base, adapter, prompt: tuple[int, ...]) -> tuple[list[int], float]:
    prompt = list(prompt)
    model = reference_model(base, adapter)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    first = torch.log_softmax(out.logits[0][0].double(), -1)[out.sequences[0, len(prompt)]]
    return out.sequences[0, len(prompt) :].tolist(), first.item()


@pytest.mark.parametrize("kernel_backend", ["auto", "torch"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_mixed_batch_matches_transformers_with_peft(tiny_models, adapters, arch, kernel_backend):
    _check_mixed_batch(tiny_models[arch], adapters[arch], kernel_backend=kernel_backend)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tensor_parallel_cuts_the_adapters_as_the_weights(tiny_models, adapters, arch):
    """Two ranks (gloo): q/k/v and gate/up's B and o/down's A cut as their weights are."""
    _check_mixed_batch(tiny_models[arch], adapters[arch], tensor_parallel_size=2)


def _check_mixed_batch(base, adapters: dict, **engine) -> None:
    names = [None, "wide", "narrow"]
    llm = LLM(
        str(base),
        dtype="float32",
        skip_tokenizer_init=True,
        lora_modules={name: str(folder) for name, folder in adapters.items()},
        **engine,
    )
    try:
        # every prompt under every adapter, in one call: one batch of nine sequences
        prompts = [{"prompt_token_ids": p} for p in PROMPTS for _ in names]
        lora = [name for _ in PROMPTS for name in names]
        outputs = llm.generate(prompts, GREEDY, lora=lora)
    finally:
        llm.close()
    got = {}
    for prompt, name, output in zip(prompts, lora, outputs):
        completion = output.outputs[0]
        first = completion.logprobs[0][completion.token_ids[0]].logprob
        got[tuple(prompt["prompt_token_ids"]), name] = (completion.token_ids, first)
    for prompt in PROMPTS:
        for name in names:
            want, want_first = _reference(base, None if name is None else adapters[name], prompt)
            tokens, first = got[tuple(prompt), name]
            assert tokens == want, f"{base.name} {name} prompt of {len(prompt)}"
            assert abs(first - want_first) < 1e-4
        # each adapter changes what the base model says
        outputs_by_adapter = {tuple(got[tuple(prompt), name][0]) for name in names}
        assert len(outputs_by_adapter) == 3, f"{base.name}: an adapter changed nothing"


def test_prefix_cache_is_per_adapter(tiny_models, adapters):
    """A prompt cached under the base model is not a hit for an adapter (its KV differs), and
    one cached under an adapter is a hit for that adapter alone."""
    base = tiny_models["llama"]
    prompt = {"prompt_token_ids": list(range(200, 264))}  # 4 blocks of 16
    llm = LLM(
        str(base),
        dtype="float32",
        skip_tokenizer_init=True,
        lora_modules={name: str(folder) for name, folder in adapters["llama"].items()},
    )
    try:
        cached = []
        for name in (None, "wide", "wide", "narrow", None):
            (output,) = llm.generate(prompt, GREEDY, lora=name)
            cached.append((output.num_cached_tokens, output.outputs[0].token_ids))
    finally:
        llm.close()
    assert [hits for hits, _ in cached] == [0, 0, 48, 0, 48]
    want, _ = _reference(base, adapters["llama"]["wide"], prompt["prompt_token_ids"])
    assert cached[1][1] == cached[2][1] == want
    # the base model's decode steps replay CPU graphs, the adapters' run eagerly
    want, _ = _reference(base, None, prompt["prompt_token_ids"])
    assert cached[0][1] == cached[4][1] == want


def _engine(base, lora_modules: dict, **kwargs) -> LLM:
    return LLM(
        str(base), dtype="float32", skip_tokenizer_init=True, lora_modules=lora_modules, **kwargs
    )


def test_unknown_adapter_is_refused(tiny_models, adapters):
    llm = _engine(tiny_models["llama"], {"wide": str(adapters["llama"]["wide"])})
    try:
        with pytest.raises(ValueError, match="unknown LoRA adapter 'other'"):
            llm.generate({"prompt_token_ids": [5, 6]}, GREEDY, lora="other")
        with pytest.raises(ValueError, match="unknown LoRA adapter 'other'"):
            llm.engine.add_request("r", [5, 6], GREEDY, lora="other")
        assert llm.generate({"prompt_token_ids": [5, 6]}, GREEDY, lora="wide")[0].finished
    finally:
        llm.close()


def _edited(folder, tmp_path, config: dict | None = None, tensors=None):
    """A copy of an adapter with its config updated and/or its tensors edited."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "edited"
    copy.mkdir()
    settings = json.loads((folder / "adapter_config.json").read_text()) | (config or {})
    (copy / "adapter_config.json").write_text(json.dumps(settings))
    weights = load_file(folder / "adapter_model.safetensors")
    save_file(tensors(weights) if tensors else weights, copy / "adapter_model.safetensors")
    return copy


def _truncate_one(weights: dict) -> dict:
    key = next(k for k in weights if "q_proj.lora_A" in k)
    weights[key] = weights[key][:, :-8].contiguous()
    return weights


def _embedding_lora(weights: dict) -> dict:
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 1024)
    return weights


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"use_dora": True}, None, r"'bad': use_dora=True is not served"),
        ({"modules_to_save": ["lm_head"]}, None, r"'bad': modules_to_save=\['lm_head'\]"),
        ({"bias": "all"}, None, r"'bad': bias='all' is not served"),
        ({"peft_type": "IA3"}, None, r"'bad': peft_type='IA3'"),
        (None, _truncate_one, r"'bad': layer \d q_proj maps 120 to 128 features, the model's 128"),
        (None, _embedding_lora, r"'bad': 'base_model.model.model.embed_tokens.lora_embedding_A' "),
    ],
    ids=["dora", "modules_to_save", "bias", "not-lora", "other-model", "embedding"],
)
def test_an_adapter_the_engine_cannot_apply_fails_the_start(
    tiny_models, adapters, tmp_path, config, tensors, message
):
    folder = _edited(adapters["llama"]["wide"], tmp_path, config, tensors)
    with pytest.raises(ValueError, match=message):
        _engine(tiny_models["llama"], {"bad": str(folder)})


def test_a_missing_adapter_or_a_rank_over_the_limit_fails_the_start(
    tiny_models, adapters, tmp_path
):
    with pytest.raises(ValueError, match=r"'gone': .*neither a folder nor a downloadable hub id"):
        _engine(tiny_models["llama"], {"gone": str(tmp_path / "nothing-here")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"'empty': no adapter_config.json in "):
        _engine(tiny_models["llama"], {"empty": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match=r"'wide' has rank 8, above max_lora_rank=4"):
        _engine(
            tiny_models["llama"],
            {name: str(folder) for name, folder in adapters["llama"].items()},
            max_lora_rank=4,
        )


def test_smollm2_with_an_adapter_gives_transformers_peft_tokens(smollm2_fp32, tmp_path):
    """The real SmolLM2-135M (GGUF, dequantized to fp32) with a rank-16 adapter on every
    projection: greedy tokens equal transformers + peft's, for the adapter and the base, where
    transformers' two best logits are not within TIE of each other."""
    gguf = smollm2_gguf()
    model = copy.deepcopy(smollm2_fp32)  # peft adds its layers in place
    torch.manual_seed(0)
    config = LoraConfig(
        r=16, lora_alpha=8, target_modules=list(ALL_TARGETS), init_lora_weights=False
    )
    reference = get_peft_model(model, config).eval()
    reference.save_pretrained(tmp_path / "adapter")
    llm = LLM(
        str(gguf), dtype="float32", max_model_len=512, lora_modules={"a": str(tmp_path / "adapter")}
    )
    try:
        prompts = ["The capital of France is", "def fibonacci(n):"]
        ids = [llm.tokenizer(p)["input_ids"] for p in prompts]
        params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
        texts = {}
        for lora in ("a", None):
            outputs = llm.generate([{"prompt_token_ids": i} for i in ids], params, lora=lora)
            texts[lora] = [output.outputs[0].text for output in outputs]
            for prompt, output in zip(ids, outputs):
                got = output.outputs[0].token_ids
                if lora is None:
                    with reference.disable_adapter():
                        _assert_same_or_tie(reference, prompt, got)
                else:
                    _assert_same_or_tie(reference, prompt, got)
    finally:
        llm.close()
    assert texts["a"] != texts[None]


def _assert_same_or_tie(model, prompt: list[int], got: list[int]) -> None:
    with torch.no_grad():
        want = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False
        )[0, len(prompt) :].tolist()
        step = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if step is None:
            return
        logits = model(input_ids=torch.tensor([prompt + want[:step]])).logits[0, -1].double()
    gap = (logits.topk(2).values[0] - logits.topk(2).values[1]).item()
    assert gap <= TIE, f"token {step}: {got[step]}, transformers + peft's {want[step]} ({gap:.2e})"


def test_adapters_load_and_unload_while_the_engine_runs(tiny_models, adapters, tmp_path):
    """Slots beyond those the start fills take adapters later; an unloaded adapter's slot is
    reused, and its successor never meets its prefix cache."""
    base = tiny_models["llama"]
    other = build_adapter(base, tmp_path / "other", seed=3, rank=16, targets=("o_proj", "up_proj"))
    too_big = build_adapter(base, tmp_path / "big", seed=4, rank=32)
    prompt = {"prompt_token_ids": list(range(300, 340))}  # two full blocks: 32 cached tokens
    llm = _engine(base, {"wide": str(adapters["llama"]["wide"])}, max_loras=2)
    engine = llm.engine
    try:

        def run(name):
            (output,) = llm.generate(prompt, GREEDY, lora=name)
            return output.outputs[0].token_ids, output.num_cached_tokens

        assert run("wide") == (
            _reference(base, adapters["llama"]["wide"], prompt["prompt_token_ids"])[0],
            0,
        )
        engine.load_lora("narrow", str(adapters["llama"]["narrow"]))
        want = _reference(base, adapters["llama"]["narrow"], prompt["prompt_token_ids"])[0]
        assert run("narrow") == (want, 0)
        with pytest.raises(ValueError, match="no free LoRA slot: the 2 slots"):
            engine.load_lora("other", str(other))
        with pytest.raises(ValueError, match="'narrow' is already loaded"):
            engine.load_lora("narrow", str(adapters["llama"]["narrow"]))
        engine.unload_lora("wide")
        with pytest.raises(ValueError, match="unknown LoRA adapter 'wide'"):
            run("wide")
        with pytest.raises(ValueError, match="unknown LoRA adapter 'wide'"):
            engine.unload_lora("wide")
        with pytest.raises(ValueError, match="'big' has rank 32, above max_lora_rank=16"):
            engine.load_lora("big", str(too_big))
        engine.load_lora("other", str(other))  # into wide's slot, whose KV blocks are cached
        assert engine.loras["other"].slot == 0
        want = _reference(base, other, prompt["prompt_token_ids"])[0]
        assert run("other") == (want, 0)
        assert run("other") == (want, 32)
        assert (
            run("narrow")[0]
            == _reference(base, adapters["llama"]["narrow"], prompt["prompt_token_ids"])[0]
        )
    finally:
        llm.close()


def test_an_engine_with_slots_and_no_adapter_yet(tiny_models, adapters):
    llm = _engine(tiny_models["qwen2"], {}, max_loras=1, max_lora_rank=8)
    try:
        prompt = PROMPTS[1]
        base_tokens = llm.generate({"prompt_token_ids": prompt}, GREEDY)[0].outputs[0].token_ids
        assert base_tokens == _reference(tiny_models["qwen2"], None, prompt)[0]
        llm.engine.load_lora("wide", str(adapters["qwen2"]["wide"]))
        tokens = (
            llm.generate({"prompt_token_ids": prompt}, GREEDY, lora="wide")[0].outputs[0].token_ids
        )
        assert tokens == _reference(tiny_models["qwen2"], adapters["qwen2"]["wide"], prompt)[0]
    finally:
        llm.close()


def test_the_update_reads_nothing_back_to_the_host(tiny_models, adapters):
    """What a decode CUDA graph captures of a LoRA projection (the masked path, any mix of
    slots): no op whose output size or result depends on the device's data."""
    from tests.test_moe_triton import _SyncingOps

    llm = _engine(tiny_models["llama"], {n: str(f) for n, f in adapters["llama"].items()})
    try:
        lora = llm.engine.runner.model.lora
        projection = llm.engine.runner.model.layers[0].self_attn.qkv_proj
        device = projection.lora_a.device  # a GPU's, where gpu_check.sh runs this
        x = torch.randn(5, projection.in_features, device=device)
        with _SyncingOps() as spy:
            lora.set_step(torch.tensor([-1, 0, 1, 1, 0], device=device), {-1, 0, 1})
            mixed = projection(x)
        assert spy.seen == set() and lora.single_slot is None
        lora.set_step(torch.tensor([1] * 5, device=device), {1})  # one adapter: the same rows
        assert lora.single_slot == 1
        torch.testing.assert_close(projection(x)[2:4], mixed[2:4], rtol=1e-6, atol=1e-6)
    finally:
        llm.close()
