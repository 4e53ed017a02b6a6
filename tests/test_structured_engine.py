"""Grammar-constrained decoding in the engine (offline API) with tiny random models, whose
unconstrained output is gibberish: whatever is valid here is valid by construction."""

import json
import re
import threading

import jsonschema
import pytest
import torch
import transformers
import xgrammar as xgr

from pagoda import LLM, SamplingParams, StructuredOutputsParams
from pagoda.engine.structured_output import unsupported_feature

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fox"]}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "pets", "home"],
}
PROMPTS = ["The quick brown fox", "Numbers like 12345", "A scheduler hands out"]


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models["llama"]), max_model_len=512)


def _generate(llm, structured, prompts=PROMPTS, **kwargs):
    defaults = dict(temperature=0.9, seed=3, max_tokens=150, structured_outputs=structured)
    params = SamplingParams(**{**defaults, **kwargs})
    return [c for out in llm.generate(prompts, params) for c in out.outputs]


def test_json_schema_outputs_validate(llm):
    outputs = _generate(llm, StructuredOutputsParams(json=PERSON), n=2)
    assert len(outputs) == 2 * len(PROMPTS)
    finished = [c for c in outputs if c.finish_reason == "stop"]
    assert finished, [c.text for c in outputs]
    for c in finished:
        value = json.loads(c.text)
        jsonschema.validate(value, PERSON)
        assert list(value) == list(PERSON["properties"])  # the schema's property order
    assert len({c.text for c in outputs}) > 1  # still sampled, not one fixed output


def test_json_schema_given_as_text_and_greedy(llm):
    outputs = _generate(llm, StructuredOutputsParams(json=json.dumps(PERSON)), temperature=0)
    for c in outputs:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), PERSON)


def test_json_object(llm):
    outputs = _generate(llm, StructuredOutputsParams(json_object=True), max_tokens=60)
    for c in outputs:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:
            assert c.text.startswith("{")


def test_regex_choice_and_grammar(llm):
    for c in _generate(llm, StructuredOutputsParams(regex=r"[a-z]{3}-\d{2}")):
        assert c.finish_reason == "stop"
        assert re.fullmatch(r"[a-z]{3}-\d{2}", c.text)
    choices = ["yes", "no way", 'say "hi"']
    for c in _generate(llm, StructuredOutputsParams(choice=choices), n=3):
        assert c.text in choices
    ebnf = 'root ::= "x" [0-9] [0-9]? "y" (", " root)?'
    for c in _generate(llm, StructuredOutputsParams(grammar=ebnf), max_tokens=400):
        if c.finish_reason == "stop":
            assert re.fullmatch(r"x\d\d?y(, x\d\d?y)*", c.text)


def test_logprobs_are_of_the_constrained_distribution(llm):
    choices = ["yes", "no"]
    params = SamplingParams(
        temperature=0,
        max_tokens=5,
        logprobs=20,
        structured_outputs=StructuredOutputsParams(choice=choices),
    )
    out = llm.generate(PROMPTS[0], params)[0].outputs[0]
    first = out.logprobs[0]
    allowed = {t: lp.logprob for t, lp in first.items() if lp.logprob > float("-inf")}
    texts = {llm.tokenizer.decode([t]) for t in allowed}
    assert all(any(choice.startswith(t) for choice in choices) for t in texts), texts
    # the masked distribution is renormalized over what the grammar allows
    assert sum(torch.tensor(list(allowed.values())).exp()) == pytest.approx(1.0, abs=1e-4)


def test_greedy_matches_a_masked_transformers_reference(llm, tiny_models):
    """Greedy constrained decoding equals transformers' argmax over the tokens the grammar
    allows, step by step, with the same xgrammar matcher driving the reference."""
    pattern = r"[a-z ]{4,12}\.[0-9]{2}"
    ours = _generate(
        llm, StructuredOutputsParams(regex=pattern), prompts=PROMPTS[:1], temperature=0
    )[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    info = xgr.TokenizerInfo.from_huggingface(llm.tokenizer, vocab_size=1024, stop_token_ids=[2])
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_regex(pattern))
    ids = llm.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    bitmask = xgr.allocate_token_bitmask(1, 1024)
    reference = []
    with torch.no_grad():
        while not matcher.is_terminated():
            logits = model(ids).logits[:, -1].float()
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            token = int(logits.argmax())
            matcher.accept_token(token)
            reference.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert ours.token_ids == reference
    assert re.fullmatch(pattern, ours.text)


def test_preemption_chunked_prefill_and_prefix_cache_keep_outputs_valid(tiny_models):
    # 12 blocks of 16 tokens for 8 sequences of up to ~100 tokens: preemptions must happen;
    # a step budget of 24 tokens chunks every prompt
    llm = LLM(
        str(tiny_models["qwen2"]), max_model_len=256, kv_cache_blocks=16, max_num_batched_tokens=24
    )
    prompt = "Paged attention stores keys and values in fixed-size blocks of memory. " * 2
    outputs = _generate(
        llm, StructuredOutputsParams(json=PERSON), prompts=[prompt] * 4, n=2, max_tokens=90
    )
    assert llm.engine.scheduler.num_preemptions > 0
    stopped = [c for c in outputs if c.finish_reason == "stop"]
    assert stopped
    for c in stopped:
        jsonschema.validate(json.loads(c.text), PERSON)
    # the same requests without preemption give the same tokens (greedy)
    greedy = dict(temperature=0, max_tokens=60)
    small = _generate(llm, StructuredOutputsParams(json=PERSON), prompts=[prompt] * 4, **greedy)
    roomy = LLM(str(tiny_models["qwen2"]), max_model_len=256)
    big = _generate(roomy, StructuredOutputsParams(json=PERSON), prompts=[prompt] * 4, **greedy)
    assert [c.token_ids for c in small] == [c.token_ids for c in big]


def test_a_compiling_grammar_does_not_stall_other_requests(llm):
    engine = llm.engine
    gate = threading.Event()
    engine.grammars._pool.submit(gate.wait)  # hold the compile thread
    schema = {**PERSON, "title": "not compiled before"}
    constrained = SamplingParams(
        temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=schema)
    )
    ids = llm.tokenizer(PROMPTS[1]).input_ids
    engine.add_request("constrained", ids, constrained)
    engine.add_request("plain", ids, SamplingParams(temperature=0, max_tokens=5))
    produced: dict[str, int] = {"constrained": 0, "plain": 0}
    for _ in range(8):
        for delta in engine.step():
            produced[delta.request_id] += len(delta.new_token_ids)
    assert produced == {"constrained": 0, "plain": 5}
    gate.set()
    while engine.has_unfinished_requests():
        for delta in engine.step():
            produced[delta.request_id] += len(delta.new_token_ids)
    assert produced["constrained"] > 0


def test_grammars_are_compiled_once_per_schema(llm):
    first = llm.engine.grammars.submit(StructuredOutputsParams(json=PERSON))
    again = llm.engine.grammars.submit(StructuredOutputsParams(json=json.dumps(PERSON)))
    assert first is again
    other = llm.engine.grammars.submit(StructuredOutputsParams(json={**PERSON, "title": "x"}))
    assert other is not first


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "object", "allOf": [{"required": ["a"]}]}, "'allOf' at /"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems'"),
        ({"properties": {"a": {"not": {"type": "string"}}}}, "'not' at /properties/a"),
        ({"properties": {"a": {"$ref": "https://example.com/a.json"}}}, "remote '$ref'"),
        ({"type": "number", "multipleOf": 0.5}, "'multipleOf'"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "'patternProperties'"),
        ({"type": "string", "pattern": "^(?!test)[a-z]{4}$"}, "'pattern'"),
        ({"items": {"type": "string", "pattern": "(?<=a)b"}}, "Lookbehind"),
        (
            {
                "$defs": {"N": {"type": "string"}},
                "properties": {"n": {"$ref": "#/$defs/N", "maxLength": 3}},
            },
            "'maxLength' beside a '$ref' at /properties/n",
        ),
    ],
)
def test_unenforceable_schemas_are_refused_by_name(llm, schema, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        _generate(llm, StructuredOutputsParams(json=schema))


def test_property_names_are_not_keywords():
    schema = {"type": "object", "properties": {"not": {"type": "string"}, "if": {"enum": [1]}}}
    assert unsupported_feature(schema) is None


def test_annotations_beside_a_ref_and_plain_patterns_are_taken():
    schema = {
        "$defs": {"N": {"type": "string", "pattern": "^[A-Z][a-z]+$"}},
        "$ref": "#/$defs/N",
        "description": "a name",
        "title": "Name",
    }
    assert unsupported_feature(schema) is None


def test_bad_constraints_are_refused(llm):
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")
    with pytest.raises(ValueError, match="Lookahead"):
        _generate(llm, StructuredOutputsParams(regex="(?=a)b"))
    with pytest.raises(ValueError, match="not defined"):
        _generate(llm, StructuredOutputsParams(grammar="root ::= missing"))
