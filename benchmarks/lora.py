"""What serving LoRA adapters costs: decode throughput of one engine without adapters against
one with two adapters loaded (rank 16 on every projection), in the same run.

On the adapter engine three request mixes run: all on the base model, all on one adapter, and
base / adapter a / adapter b in turn (one batch of all three). Each repeat times every
(engine, mix) pair on a static batch (`--num-prompts` prompts of `--input-len` tokens) and at
batch 1, in an order reversed every other repeat; every measurement gets prompts of its own
(random token ids), so none hits another's prefix cache. Figures: output tokens / wall time
of the generate call (prefill included), median over `--repeats` with the lowest and highest,
and each one's ratio to the engine without adapters. The adapters are peft's
(`init_lora_weights=False`: random, so that they change the output) on SmolLM2-135M.

    python benchmarks/lora.py                                   # SmolLM2-135M GGUF, dtype auto
    python benchmarks/lora.py --repeats 1 --num-prompts 4 --output-len 8
    python benchmarks/lora.py --out benchmarks/results/lora_X.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pagoda.engine import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from offline_throughput import default_model, machine_info  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (engine, request mix): the mix gives each prompt i its adapter
CASES = {
    "no adapters loaded, base": ("plain", lambda i: None),
    "2 adapters loaded, base": ("lora", lambda i: None),
    "2 adapters loaded, all on a": ("lora", lambda i: "a"),
    "2 adapters loaded, base/a/b": ("lora", lambda i: [None, "a", "b"][i % 3]),
}
MIXED = "2 adapters loaded, base/a/b"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def make_adapters(gguf: Path, rank: int, folder: Path) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    adapters = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False
        )
        with_adapter = get_peft_model(model, config)
        with_adapter.save_pretrained(folder / name)
        model = with_adapter.unload()  # the base model again, for the next adapter
        adapters[name] = str(folder / name)
    return adapters


def timed(llm: LLM, prompts: list[list[int]], mix, output_len: int) -> float:
    """Output tokens per second of one generate call."""
    params = SamplingParams(
        temperature=0, max_tokens=output_len, min_tokens=output_len, ignore_eos=True
    )
    lora = [mix(i) for i in range(len(prompts))]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora=lora)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    args = parse_args()
    gguf = Path(default_model())
    with tempfile.TemporaryDirectory() as folder:
        adapters = make_adapters(gguf, args.rank, Path(folder))
        engines = {
            "plain": LLM(str(gguf), dtype=args.dtype, max_model_len=1024),
            "lora": LLM(str(gguf), dtype=args.dtype, max_model_len=1024, lora_modules=adapters),
        }
    vocab = engines["plain"].engine.vocab_size
    rng = random.Random(args.seed)

    def prompts(count: int) -> list[list[int]]:
        return [
            [rng.randrange(100, vocab - 100) for _ in range(args.input_len)] for _ in range(count)
        ]

    for engine, mix in CASES.values():  # warm-up: first steps, graphs of the sizes to come
        timed(engines[engine], prompts(2), mix, 4)
    scenarios = {"static batch": args.num_prompts, "batch 1": 1}
    # one prompt cannot mix adapters: batch 1 runs the other cases
    cases = {s: [c for c in CASES if count > 1 or c != MIXED] for s, count in scenarios.items()}
    figures = {s: {case: [] for case in cases[s]} for s in scenarios}
    for repeat in range(args.repeats):
        for scenario, count in scenarios.items():
            order = cases[scenario] if repeat % 2 == 0 else cases[scenario][::-1]
            for case in order:
                engine, mix = CASES[case]
                figures[scenario][case].append(
                    timed(engines[engine], prompts(count), mix, args.output_len)
                )
    for llm in engines.values():
        llm.close()
    report(args, figures, engines["lora"])


def report(args: argparse.Namespace, figures: dict, llm: LLM) -> None:
    summary = {}
    for scenario, cases in figures.items():
        baseline = statistics.median(cases["no adapters loaded, base"])
        print(f"\n{scenario}: output tok/s, median of {args.repeats} [lowest, highest]")
        for case, runs in cases.items():
            median = statistics.median(runs)
            print(
                f"  {case:32s} {median:7.1f} [{min(runs):.1f}, {max(runs):.1f}]"
                f"  {median / baseline:.2f}x"
            )
            summary.setdefault(scenario, {})[case] = {
                "runs_tok_per_s": runs,
                "median_tok_per_s": median,
                "ratio_to_no_adapters": median / baseline,
            }
    result = {
        "settings": vars(args) | {"out": str(args.out)},
        "dtype": str(llm.engine.dtype),
        "machine": machine_info(llm.engine.device) | {"cpu": _cpu_model()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": summary,
    }
    out = args.out or Path(tempfile.gettempdir()) / "lora.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwritten to {out}")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
